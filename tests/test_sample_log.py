"""Sample accounting: the reader's row provenance (``track_rows``) and the trainer's sample-log
reconciliation (``reconcile_sample_log``), on data whose rows carry their own ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_reader import TRAIN_GROUPS, make_dataset, read_rows, row_ids
from embdim.trainer.data.manifest import load_manifest
from embdim.trainer.data.reader import ParquetBatchReader, list_work_units
from embdim.trainer.sample_log import reconcile_sample_log


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds"), {"train": TRAIN_GROUPS}, multi_hot=True)


def _row_ids_of(provenance, dataset: Path) -> np.ndarray:
    """Split row ids ("rid") of ``[(file, row_group, rows)]``: the unit's first id plus the row."""
    units = list_work_units(dataset, load_manifest(dataset), "train")
    first = dict(zip([(u.file, u.row_group) for u in units], np.cumsum([0] + [u.num_rows for u in units])))
    parts = [first[(file, row_group)] + rows for file, row_group, rows in provenance]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


@pytest.mark.parametrize("num_workers,shuffle", [(0, True), (2, True), (2, False)])
def test_tracked_rows_are_the_rows_of_each_batch(dataset, num_workers, shuffle):
    # 2 ranks x 6 batches of 5 = 60 of the 64 rows; the reader skips 4 so that ranks stay equal.
    readers = [ParquetBatchReader(dataset, "train", batch_size=5, rank=r, world_size=2, num_workers=num_workers,
                                  shuffle=shuffle, drop_last=True, seed=3, track_rows=True) for r in range(2)]
    dropped = [_row_ids_of(reader.dropped_rows(), dataset) for reader in readers]
    np.testing.assert_array_equal(dropped[0], dropped[1])  # the plan is the same on every rank
    assert len(dropped[0]) == 4
    consumed = []
    for reader in readers:
        for batch in reader:
            # The recorded provenance names exactly the rows the batch holds, in the batch's order.
            np.testing.assert_array_equal(_row_ids_of(reader.last_batch_rows, dataset), row_ids(batch))
            consumed.append(row_ids(batch))
    np.testing.assert_array_equal(np.sort(np.concatenate(consumed + dropped[:1])), np.arange(64))


def test_tracked_rows_across_chained_redeals(dataset):
    """1 rank -> 2 ranks -> 1 rank within an epoch: the consumed rows plus the last plan's skipped tail
    are every row once (the earlier plans' tails were re-dealt, not skipped)."""
    def make(**kwargs):
        return ParquetBatchReader(dataset, "train", seed=7, track_rows=True, **kwargs)

    def take(reader, count):
        it, out = iter(reader), []
        for _ in range(count):
            batch = next(it)
            np.testing.assert_array_equal(_row_ids_of(reader.last_batch_rows, dataset), row_ids(batch))
            out.append(row_ids(batch))
        it.close()
        return out

    one = make(batch_size=8, num_workers=1)
    assert len(one.dropped_rows()) == 0  # 64 = 8 batches of 8
    consumed = take(one, 2)
    two = [make(batch_size=4, rank=r, world_size=2, num_workers=2) for r in range(2)]
    for reader in two:
        reader.load_state_dict(one.state_dict())
    assert len(_row_ids_of(two[0].dropped_rows(), dataset)) == 0  # 48 rows left = 2 x 6 x 4
    consumed += take(two[0], 2) + take(two[1], 2)
    last = make(batch_size=3)
    last.load_state_dict(two[0].state_dict())
    dropped = _row_ids_of(last.dropped_rows(), dataset)
    assert len(dropped) == 2  # 32 rows left: 10 batches of 3, 2 skipped
    consumed += read_rows(last)
    np.testing.assert_array_equal(np.sort(np.concatenate(consumed + [dropped])), np.arange(64))


def test_provenance_needs_track_rows(dataset):
    reader = ParquetBatchReader(dataset, "train", batch_size=8)
    with pytest.raises(RuntimeError, match="track_rows=True"):
        reader.dropped_rows()
    next(iter(reader))
    with pytest.raises(RuntimeError, match="track_rows=True"):
        reader.last_batch_rows


# ---------------------------------------------------------------------------- reconciliation
class _Unit:
    def __init__(self, file: str, row_group: int, num_rows: int) -> None:
        self.file, self.row_group, self.num_rows = file, row_group, num_rows


# A made-up split: row group ("f", 0) of 6 rows and ("f", 1) of 4.
UNITS = [_Unit("f", 0, 6), _Unit("f", 1, 4)]


def _write(path: Path, records: list[dict], torn: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn)


def _header(attempt: int, rank: int, world_size: int, start_step: int) -> dict:
    return {"kind": "attempt", "attempt": attempt, "rank": rank, "world_size": world_size, "phase": "train",
            "start_step": start_step, "restart_count": attempt}


def _step(step: int, epoch: int, *rows) -> dict:
    return {"kind": "step", "step": step, "epoch": epoch, "rows": [list(r) for r in rows]}


def _plan(step: int, epoch: int, *dropped) -> dict:
    return {"kind": "plan", "step": step, "epoch": epoch, "dropped": [list(r) for r in dropped]}


def _faulty_run(log: Path, *, last_step_rows=(("f", 1, [0, 1, 2, 3]),)) -> None:
    """Attempt 0 on 2 ranks (batches of 2, 2 epochs of 2 steps) fails after its checkpoint of step 3:
    rank 1 logged step 4, rank 0 died while writing it. Attempt 1 resumes from step 3 on 1 rank with
    batches of 4: the reader re-deals epoch 1's 6 unread rows (old tail included) and skips 2 others."""
    log.mkdir()
    _write(log / "attempt_0000.rank_0000.jsonl", [
        _header(0, 0, 2, 0), _plan(0, 0, ("f", 1, [2, 3])),
        _step(1, 0, ("f", 0, [0, 1])), _step(2, 0, ("f", 0, [4, 5])),
        _plan(2, 1, ("f", 0, [5]), ("f", 1, [0])), _step(3, 1, ("f", 0, [0, 1])),
    ], torn='{"kind": "step", "step": 4, "ep')
    _write(log / "attempt_0000.rank_0001.jsonl", [
        _header(0, 1, 2, 0),
        _step(1, 0, ("f", 0, [2, 3])), _step(2, 0, ("f", 1, [0, 1])),
        _step(3, 1, ("f", 0, [2, 3])), _step(4, 1, ("f", 0, [4]), ("f", 1, [1])),  # replaced by attempt 1
    ])
    _write(log / "attempt_0001.rank_0000.jsonl", [
        _header(1, 0, 1, 3), _plan(3, 1, ("f", 0, [4, 5])), _step(4, 1, *last_step_rows),
    ])


def test_reconcile_replays_attempts_and_discards_replaced_steps(tmp_path):
    log = tmp_path / "sample_log"
    _faulty_run(log)
    account = reconcile_sample_log(log)
    assert account.steps == [1, 2, 3, 4]
    assert [(a["attempt"], a["world_size"], a["start_step"], a["counted"]) for a in account.attempts] == [
        (0, 2, 0, [1, 3]), (1, 1, 3, [4, 4])]
    # Attempt 0's step 4 (rank 1: rows f/0/4 and f/1/1) does not count; attempt 1's does.
    assert sorted(account.consumed[1][("f", 0)].tolist()) == [0, 1, 2, 3]
    assert sorted(account.consumed[1][("f", 1)].tolist()) == [0, 1, 2, 3]
    # Epoch 1's skipped rows come from attempt 1's re-dealt plan, not attempt 0's.
    assert {k: v.tolist() for k, v in account.dropped[1].items()} == {("f", 0): [4, 5]}
    assert {k: v.tolist() for k, v in account.dropped[0].items()} == {("f", 1): [2, 3]}
    assert account.num_rows(0) == 8 and account.num_rows(1) == 8 and account.num_rows(1, "dropped") == 2
    assert account.exactly_once_errors(UNITS, epochs=2) == []
    # A third epoch that never ran: all of its rows are missing.
    errors = account.exactly_once_errors(UNITS, epochs=3)
    assert errors == ["epoch 2: f row group 0: 6 row(s) never consumed nor dropped, e.g. [0, 1, 2, 3, 4]",
                      "epoch 2: f row group 1: 4 row(s) never consumed nor dropped, e.g. [0, 1, 2, 3]"]
    assert "beyond the 1 epoch(s)" in " ".join(account.exactly_once_errors(UNITS, epochs=1))


def test_reconcile_reports_repeated_and_missing_rows(tmp_path):
    log = tmp_path / "sample_log"
    _faulty_run(log, last_step_rows=(("f", 1, [0, 1, 2, 2]),))
    errors = reconcile_sample_log(log).exactly_once_errors(UNITS, epochs=2)
    assert errors == ["epoch 1: f row group 1: 1 row(s) never consumed nor dropped, e.g. [3]",
                      "epoch 1: f row group 1: 1 row(s) counted more than once, e.g. [2] ([2] times)"]
    log2 = tmp_path / "other"
    _faulty_run(log2, last_step_rows=(("f", 1, [0, 1, 2, 3]), ("g", 0, [0]), ("f", 0, [9])))
    errors = reconcile_sample_log(log2).exactly_once_errors(UNITS, epochs=2)
    assert "epoch 1: g row group 0 is not a row group of the split" in errors
    assert "epoch 1: f row group 0: rows [9] outside [0, 6)" in errors


def test_reconcile_rejects_inconsistent_logs(tmp_path):
    log = tmp_path / "sample_log"
    _faulty_run(log)
    # The failed attempt alone: rank 1 logged step 4, rank 0 did not (its line was torn).
    (log / "attempt_0001.rank_0000.jsonl").unlink()
    with pytest.raises(ValueError, match=r"attempt 0: step 4 was logged by ranks \[1\] of 2"):
        reconcile_sample_log(log)
    (log / "attempt_0000.rank_0001.jsonl").unlink()
    with pytest.raises(ValueError, match=r"attempt 0 ran on 2 rank\(s\) but has the files of ranks \[0\]"):
        reconcile_sample_log(log)

    # Attempt 1 resumes from step 4, which attempt 0 never logged on every rank: a gap at step 4.
    gap = tmp_path / "gap"
    _faulty_run(gap)
    _write(gap / "attempt_0001.rank_0000.jsonl", [_header(1, 0, 1, 4), _step(5, 1, ("f", 1, [0]))])
    with pytest.raises(ValueError, match="step 4 was logged by ranks"):
        reconcile_sample_log(gap)
    _write(gap / "attempt_0000.rank_0000.jsonl", [_header(0, 0, 2, 0), _step(1, 0, ("f", 0, [0, 1]))])
    _write(gap / "attempt_0000.rank_0001.jsonl", [_header(0, 1, 2, 0), _step(1, 0, ("f", 0, [2, 3]))])
    _write(gap / "attempt_0001.rank_0000.jsonl", [_header(1, 0, 1, 2), _plan(2, 0), _step(3, 0, ("f", 1, [0]))])
    with pytest.raises(ValueError, match=r"no counted line for step\(s\) \[2\]"):
        reconcile_sample_log(gap)

    bad = tmp_path / "bad"
    _faulty_run(bad)
    path = bad / "attempt_0000.rank_0001.jsonl"
    path.write_text(path.read_text().replace('"step": 2,', '"step": 2', 1))
    with pytest.raises(ValueError, match=rf"{path}:3: not a JSON line"):
        reconcile_sample_log(bad)
    with pytest.raises(ValueError, match="no sample log files"):
        reconcile_sample_log(tmp_path / "empty")
