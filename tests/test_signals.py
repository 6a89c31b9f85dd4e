"""Signals to the CLI stop the whole process tree (torchrun agent, every rank) and leave the run
resumable; ``kill -9`` of the CLI leaves no rank running; a second job on a busy run folder is
refused while the first one trains.

The commands run as real processes (``python -m embdim.launch.main``) on 2 gloo ranks. Every
process of a job is found through an environment variable the test sets on the command: its
descendants inherit it, also after they were orphaned (``/proc/<pid>/environ``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from embdim.launch.launcher import repo_env
from embdim.launch.main import main
from embdim.io import output_lock
from tests.tiny_data import tiny_run_flags, write_tiny_dataset

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

DIM = 16
TRAIN_ROWS = 4096
STEPS_PER_EPOCH = TRAIN_ROWS // (2 * 64)  # 2 ranks x 64 rows per step
# Two epochs with a checkpoint every 2 steps: long enough to be stopped mid-training on a loaded
# 2-core machine, short enough for the rerun to finish in seconds.
SETS = [*tiny_run_flags(DIM, epochs=2), "--set", "train.checkpoint_every=2"]
TAG = "EMBDIM_TEST_JOB"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("signals") / "data"
    write_tiny_dataset(out, num_rows={"train": TRAIN_ROWS, "valid": 256, "test": 256})
    return out


def _job_processes(tag: str) -> dict[int, str]:
    """Live (not zombie) processes carrying ``EMBDIM_TEST_JOB=tag``: pid -> command line."""
    needle = f"\0{TAG}={tag}\0".encode()
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle not in b"\0" + f.read() + b"\0":
                    continue
            with open(f"/proc/{name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                out[int(name)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return out


def _start(argv: list[str]) -> tuple[subprocess.Popen, str]:
    tag = uuid.uuid4().hex
    env = {**repo_env(), TAG: tag}
    proc = subprocess.Popen([sys.executable, "-m", "embdim.launch.main", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    return proc, tag


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"exited {proc.returncode} before {path} appeared:\n{out.decode()[-3000:]}\n"
                        f"{err.decode()[-3000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def _wait_gone(tag: str, deadline: float) -> dict[int, str]:
    left = _job_processes(tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _job_processes(tag)
    return left


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def _cleanup(tag: str) -> None:
    for pid in _job_processes(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_sigterm_stops_run_tree_and_rerun_resumes(data, tmp_path, capsys):
    run = tmp_path / "run"
    # The closed-form search on one in-process rank: the run adopts it and starts the retrain.
    assert main(["search", "--data", str(data), "--method", "fixed", "--budget", "0.6", "--out", str(run), *SETS]) == 0
    argv = ["run", "--data", str(data), "--method", "fixed", "--budget", "0.6", "--out", str(run),
            "--nproc-per-node", "2", *SETS]
    proc, tag = _start(argv)
    try:
        _wait_for(run / "retrain" / "ckpt" / "latest", proc)
        tree = _job_processes(tag)
        # the CLI, the torchrun agent and both ranks
        assert sum("torch.distributed.run" in c for c in tree.values()) == 1, tree
        assert sum(" retrain " in c and "torch.distributed.run" not in c for c in tree.values()) == 2, tree
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        out, err = proc.communicate(timeout=30)
        left = _wait_gone(tag, signalled + 10.0)
        assert not left, f"still running 10 s after SIGTERM: {left}"
    finally:
        _cleanup(tag)
    assert proc.returncode == 128 + signal.SIGTERM
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert lines == ["embdim: interrupted by SIGTERM; rerun the same command to resume"], lines
    # Nothing writes into the run folder after the command returned.
    files = _files(run)
    time.sleep(1.0)
    assert _files(run) == files
    state = json.loads((run / "run_state.json").read_text())
    assert state["phases"]["retrain"]["status"] == "interrupted"
    assert "interrupted by SIGTERM" in (run / "logs" / "retrain.log").read_text()
    assert not (run / "retrain" / "metrics.json").exists()

    # The same command resumes from the retrain's checkpoint and finishes.
    capsys.readouterr()
    assert main(argv) == 0
    text = capsys.readouterr().out
    metrics = json.loads((run / "retrain" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 2 and metrics["steps"] == 2 * STEPS_PER_EPOCH
    state = json.loads((run / "run_state.json").read_text())
    assert state["phases"]["retrain"]["status"] == "done" and state["phases"]["retrain"]["attempts"] == 2
    # Quiet by default: progress and a summary on the screen, the ranks' output in the log.
    assert "run: search: already done, skipped" in text and "run: retrain: done in" in text
    assert "resumed from" in text and "run: test AUC" in text
    assert "(fused)" not in text and "FutureWarning" not in text and "OMP_NUM_THREADS" not in text
    assert "(fused)" in (run / "logs" / "retrain.log").read_text()  # the sharding plan went to the log
    assert not (run / ".embdim.lock").exists()


@pytest.mark.slow
def test_kill_9_of_launch_leaves_no_rank_and_busy_folder_is_refused(data, tmp_path, capsys):
    run = tmp_path / "train"
    train = ["train", "--data", str(data), "--out", str(run), *tiny_run_flags(DIM, epochs=50),
             "--set", "train.checkpoint_every=2"]
    proc, tag = _start(["launch", "--nproc-per-node", "2", "--", *train])
    try:
        _wait_for(run / "ckpt" / "latest", proc)
        # A second job on the same run folder is refused at once, naming the folder and the holder.
        assert main(train) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("embdim: error: ") and len(err.splitlines()) == 1, err
        assert str(run) in err and "in use by another embdim job" in err and f"pid {proc.pid}" in err, err
        assert "launch --nproc-per-node 2" in err
        assert len(_job_processes(tag)) == 4  # the launcher, the agent, 2 ranks
        proc.kill()  # SIGKILL: no handler runs in the launcher
        killed = time.monotonic()
        proc.communicate(timeout=30)
        left = _wait_gone(tag, killed + 10.0)
        assert not left, f"still running 10 s after kill -9 of the launcher: {left}"
    finally:
        _cleanup(tag)
    files = _files(run)
    time.sleep(1.0)
    assert _files(run) == files, "a rank went on writing checkpoints"
    with output_lock(run):  # the kernel released the dead launcher's lock
        pass


@pytest.mark.slow
def test_killed_dataset_builds_leave_nothing_behind(tmp_path, capsys):
    out = tmp_path / "ds"
    argv = ["data", "synth", "--out", str(out), "--rows", "4000000", "--workers", "2", "--no-progress"]

    def started(proc: subprocess.Popen) -> None:  # the pool writes into the staging folder
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".ds.building-*/train/*")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)

    proc, tag = _start(argv)
    try:
        started(proc)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert not _wait_gone(tag, signalled + 10.0)
    finally:
        _cleanup(tag)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.decode().strip() == ("embdim: interrupted by SIGTERM; nothing was written to --out; rerun the same "
                                    "command to build it")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no staging folder, no lock file

    proc, tag = _start(argv)
    try:
        started(proc)
        proc.kill()  # SIGKILL: its staging folder stays, but no pool worker goes on writing into it
        killed = time.monotonic()
        proc.communicate(timeout=30)
        assert not _wait_gone(tag, killed + 10.0)
    finally:
        _cleanup(tag)
    left = sorted(p.name for p in tmp_path.iterdir())  # the dead build's staging folder and (unlocked) lock file
    assert len(left) == 2 and left[0].startswith(".ds.building-") and left[1] == ".ds.lock", left
    # The next build of the same --out removes it.
    assert main(["data", "synth", "--out", str(out), "--rows", "2000", "--workers", "1", "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
