"""One job per output folder: a second job on a run or dataset folder that another live process
holds is refused at once, naming the folder and the holder; the lock dies with its holder; the
ranks and phases of the holding job are not refused. Existing datasets are replaced only with
--overwrite, a run never goes into the dataset folder, failed commands leave no empty run folder,
and the staging folders of killed builds are removed by the next build of the same output."""

from __future__ import annotations

import errno
import os
import pathlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from embdim.launch.launcher import repo_env
from embdim.launch.main import main
from embdim.io import LOCKED_ENV, held_locks_env, output_lock
from tests.cli_checks import one_error_line, set_flags
from tests.tiny_data import write_tiny_dataset

SETS = set_flags()
CSV = "y,d0,s0,s1\n1,0.5,a,x\n0,1.5,b,y\n1,2.0,a,x\n0,,c,y\n1,3.0,a,z\n0,0.1,b,x\n1,0.2,a,y\n0,0.3,c,x\n"
CSV_FLAGS = ["--label", "y", "--dense", "d0", "--sparse", "s0,s1", "--min-count", "1", "--no-progress"]

HOLDER = """
import sys, time
from embdim.io import output_lock
with output_lock(sys.argv[1], inside=sys.argv[2] == "inside", command="embdim train --out held-by-test"):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("locks") / "data"
    write_tiny_dataset(out, num_rows={"train": 256, "valid": 64, "test": 64})
    return out


class _Holder:
    """Another process holding the lock of ``folder`` until killed."""

    def __init__(self, folder: Path, inside: bool = True, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), "inside" if inside else "beside"],
                                     env=env or repo_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.proc.stdout.readline().decode().strip()
        assert line == "locked", self.proc.stderr.read().decode()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.mark.slow
def test_busy_run_folder_is_refused_and_freed_when_the_holder_dies(data, tmp_path, capsys):
    run = tmp_path / "run"
    holder = _Holder(run)
    try:
        assert main(["train", "--data", str(data), "--out", str(run), *SETS]) == 2
        err = one_error_line(capsys)
        assert str(run) in err and "in use by another embdim job" in err
        assert f"pid {holder.proc.pid}" in err and "embdim train --out held-by-test" in err
        assert main(["run", "--data", str(data), "--method", "fixed", "--budget", "0.5", "--out", str(run),
                     *SETS]) == 2
        assert "in use by another embdim job" in one_error_line(capsys)
        assert main(["launch", "--nproc-per-node", "1", "--", "train", "--data", str(data), "--out", str(run)]) == 2
        assert "in use by another embdim job" in one_error_line(capsys)  # refused before torchrun starts
        assert sorted(p.name for p in run.iterdir()) == [".embdim.lock"]  # nothing written by the refused jobs
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock
    with output_lock(run):
        pass
    assert not (run / ".embdim.lock").exists()


@pytest.mark.slow
def test_ranks_and_phases_of_the_holding_job_are_not_refused(tmp_path):
    run = tmp_path / "run"
    probe = ("import sys; from embdim.io import output_lock\n"
             "with output_lock(sys.argv[1]) as lock: print('parent holds it' if lock is None else 'took it')")

    def child(folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", probe, str(folder)], env=env, capture_output=True, text=True)

    with output_lock(run):
        inherited = child(run / "retrain", held_locks_env(repo_env()))  # a phase writing into the run folder
        assert inherited.returncode == 0 and inherited.stdout.strip() == "parent holds it", inherited.stderr
        inherited = child(run, held_locks_env(repo_env()))  # a rank of the job
        assert inherited.stdout.strip() == "parent holds it", inherited.stderr
        stranger = child(run, {k: v for k, v in repo_env().items() if k != LOCKED_ENV})  # any other process
        assert stranger.returncode != 0 and "FolderBusy" in stranger.stderr and str(run) in stranger.stderr
        assert child(tmp_path / "other", held_locks_env(repo_env())).stdout.strip() == "took it"


def test_concurrent_dataset_builds_and_overwrite(tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_text(CSV)
    out = tmp_path / "ds"
    holder = _Holder(out, inside=False)  # a build of the same --out in progress
    try:
        assert main(["data", "csv", "--input", str(src), "--out", str(out), *CSV_FLAGS]) == 2
        err = one_error_line(capsys)
        assert str(out) in err and f"pid {holder.proc.pid}" in err
        assert not out.exists()
    finally:
        holder.kill()
    assert main(["data", "csv", "--input", str(src), "--out", str(out), *CSV_FLAGS]) == 0
    capsys.readouterr()
    before = (out / "dataset.json").read_text()
    # An existing dataset is not replaced without a word.
    assert main(["data", "csv", "--input", str(src), "--out", str(out), *CSV_FLAGS, "--min-count", "2"]) == 2
    err = one_error_line(capsys)
    assert str(out) in err and "already holds a dataset" in err and "--overwrite" in err
    assert (out / "dataset.json").read_text() == before
    assert main(["data", "csv", "--input", str(src), "--out", str(out), *CSV_FLAGS, "--min-count", "2",
                 "--overwrite"]) == 0
    assert '"min_count": 2' in (out / "dataset.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "in.csv"], "lock or staging files left"


def test_stale_build_folders_of_killed_builds_are_removed(tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_text(CSV)
    out = tmp_path / "ds"
    stale = tmp_path / ".ds.building-k1ll3d"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "part-00000.parquet").write_bytes(b"half a file")
    (tmp_path / ".ds.old-k1ll3d" / "dataset").mkdir(parents=True)
    other = tmp_path / ".other.building-x"  # another output's build: not ours to remove
    other.mkdir()
    assert main(["data", "csv", "--input", str(src), "--out", str(out), *CSV_FLAGS]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.building-x", "ds", "in.csv"]


@pytest.mark.slow
def test_run_folder_is_not_the_dataset_nor_a_file(data, tmp_path, capsys):
    for out in (data, data / "runs" / "r1"):
        assert main(["train", "--data", str(data), "--out", str(out), *SETS]) == 2
        err = one_error_line(capsys)
        assert "--out" in err and "dataset folder" in err
        assert main(["run", "--data", str(data), "--method", "fixed", "--budget", "0.5", "--out", str(out)]) == 2
        assert "dataset folder" in one_error_line(capsys)
    assert not (data / "runs").exists() and not (data / ".embdim.lock").exists()
    other = tmp_path / "other_data"
    write_tiny_dataset(other, num_rows={"train": 64})
    assert main(["search", "--data", str(data), "--method", "fixed", "--out", str(other), *SETS]) == 2
    assert "holds a dataset" in one_error_line(capsys)
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    assert main(["train", "--data", str(data), "--out", str(afile), *SETS]) == 2
    err = one_error_line(capsys)
    assert str(afile) in err and "is a file, not a folder" in err
    assert main(["train", "--data", str(data), "--out", str(afile / "run"), *SETS]) == 2
    assert str(afile) in one_error_line(capsys)
    assert afile.read_text() == "mine"


def test_failed_train_leaves_no_empty_run_folder(data, tmp_path, capsys):
    run = tmp_path / "run"
    # Fails in the trainer, after the run folder was created and locked.
    assert main(["train", "--data", str(data), "--out", str(run), *SETS, "--set", "data.batch_size=100000"]) == 2
    assert "data.batch_size" in one_error_line(capsys)
    assert not run.exists()
    kept = tmp_path / "kept"  # a folder the user made stays
    kept.mkdir()
    assert main(["train", "--data", str(data), "--out", str(kept), *SETS, "--set", "data.batch_size=100000"]) == 2
    capsys.readouterr()
    assert kept.is_dir() and not any(kept.iterdir())


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_unwritable_output_is_named_in_one_line(code, data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "locked_down" / "run"
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):  # what a read-only mount or a foreign folder answers
        if str(self).startswith(str(tmp_path / "locked_down")):
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    assert main(["train", "--data", str(data), "--out", str(run), *SETS]) == 2
    err = one_error_line(capsys)
    assert str(run) in err and ("permission denied" if code == errno.EACCES else "read-only file system") in err
    src = tmp_path / "in.csv"
    src.write_text(CSV)
    assert main(["data", "csv", "--input", str(src), "--out", str(run), *CSV_FLAGS]) == 2
    assert "locked_down" in one_error_line(capsys)

