"""A full disk (ENOSPC injected into the write path) gives one ``embdim: error:`` line naming the
path and the cause; temporary files are removed and the previous checkpoint stays valid, so the
same command resumes once there is room again."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import embdim.io as io
from embdim.launch.main import main
from embdim.trainer.checkpoint import Checkpointer
from embdim.io import StorageError, atomic_path, atomic_write_text
from tests.cli_checks import one_error_line, set_flags
from tests.tiny_data import write_tiny_dataset

SETS = set_flags("train.checkpoint_every=4", "train.max_steps=8")


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("disk") / "data"
    write_tiny_dataset(out, num_rows={"train": 1024, "valid": 128, "test": 128})
    return out


def test_atomic_write_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "previous")

    def fail(fd):
        raise _enospc()

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(StorageError, match=r"metrics\.json: no space left on device"):
        atomic_write_text(target, "new")
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary file left


def test_torch_save_failure_on_a_full_disk_is_named(tmp_path, monkeypatch):
    # torch.save reports a short write as "[enforce fail at inline_container.cc] unexpected pos"
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    target = tmp_path / "compact_embedding.pt"
    for full, cause in ((True, "no space left on device"), (False, "write failed (")):
        monkeypatch.setattr(io, "_disk_full", lambda path, full=full: full)
        with pytest.raises(StorageError) as info:
            with atomic_path(target):
                raise torch_error
        assert str(info.value).startswith(f"{target}: {cause}")
    assert not list(tmp_path.iterdir())


def test_full_disk_during_a_checkpoint_then_resume(data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_fsync = os.fsync

    def fsync(fd):  # ENOSPC where the file system reports it: on the flush of the second checkpoint
        if ".step_8.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            raise _enospc()
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(["train", "--data", str(data), "--out", str(run), *SETS]) == 2
    err = one_error_line(capsys)
    assert str(run / "ckpt" / ".step_8.tmp") in err and "no space left on device" in err, err
    assert "previous checkpoint (step_4) is intact" in err
    ckpt = run / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_4"]  # the partial one was removed
    assert (ckpt / "latest").read_text().strip() == "step_4"
    assert Checkpointer(ckpt, env=None).damage(ckpt / "step_4") is None
    assert not (run / "metrics.json").exists()

    monkeypatch.setattr(os, "fsync", real_fsync)  # room again: the same command resumes
    assert main(["train", "--data", str(data), "--out", str(run), *SETS]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == 8


def test_full_disk_while_converting(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.csv"
    src.write_text("y,d0,s0\n" + "".join(f"{i % 2},{i},v{i % 5}\n" for i in range(40)))

    def write_table(self, table, row_group_size=None):  # pyarrow reports it without an errno
        raise OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_table)
    out = tmp_path / "ds"
    assert main(["data", "csv", "--input", str(src), "--out", str(out), "--label", "y", "--dense", "d0",
                 "--sparse", "s0", "--min-count", "1", "--no-progress"]) == 2
    err = one_error_line(capsys)
    assert "part-00000.parquet" in err and "no space left on device" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]  # no staging folder, no lock file
