"""Sample accounting (``train.sample_log``): which training rows each optimizer step consumed.

``SampleLog`` appends, per rank and attempt, one JSON line per trained step (and the rows each
epoch's plan skips) under ``RUN_DIR/sample_log/``; ``reconcile_sample_log`` replays the attempts
of a job (faults, torchrun restarts, resumes on other rank counts) into the rows that count, so a
test can prove every training row was trained on exactly once per epoch.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from embdim.sharding.distributed import DistEnv

logger = logging.getLogger(__name__)

SAMPLE_LOG_DIR = "sample_log"
_SAMPLE_FILE = re.compile(r"attempt_(\d+)\.rank_(\d+)\.jsonl")
RowList = list[tuple[str, int, np.ndarray]]
"""Rows as ``[(file, row_group, row indices in file order within the row group)]``."""


def _rows_json(rows: RowList) -> list[list]:
    return [[file, int(row_group), np.asarray(r).tolist()] for file, row_group, r in rows]


class SampleLog:
    """Append-only record of the training rows each optimizer step consumed (``train.sample_log``).

    ``RUN_DIR/sample_log/attempt_<a>.rank_<r>.jsonl``: one file per attempt (a ``fit()``: a fresh
    run, a rerun, or a worker group restarted by torchrun) and rank. Attempts are numbered in the
    order they start (rank 0 takes one more than the largest number in the folder and all ranks
    agree on it through a sum all-reduce), which is the order reconciliation replays them in. Lines:

    - first, ``{"kind": "attempt", "attempt", "rank", "world_size", "phase", "start_step",
      "restart_count"}``; ``start_step`` is the step of the checkpoint it resumed from (0: fresh);
    - ``{"kind": "step", "step", "epoch", "rows": [[file, row_group, [row, ...]], ...]}`` per
      optimizer step: the rows of this rank's batch of that step;
    - rank 0 only, at the start of every pass over an epoch: ``{"kind": "plan", "step", "epoch",
      "dropped": [...]}``, the rows of that epoch the reader skips so ranks get equal batch counts.

    A step's line is written and flushed before its checkpoint, and the file is fsynced before
    every checkpoint, so a checkpoint of step k implies the lines of steps <= k are on disk; a
    process killed mid-write leaves at most a torn last line, which ``reconcile_sample_log`` drops.
    """

    def __init__(self, directory: Path, env: DistEnv, *, phase: str, start_step: int, restart_count: int) -> None:
        from embdim.sharding.state import all_reduce_sum

        directory.mkdir(parents=True, exist_ok=True)
        attempt = 0
        if env.is_main:
            numbers = [int(m.group(1)) for p in directory.iterdir() if (m := _SAMPLE_FILE.fullmatch(p.name))]
            attempt = max(numbers, default=-1) + 1
        self.attempt = int(all_reduce_sum(torch.tensor([attempt], dtype=torch.int64, device=env.device)).item())
        self.path = directory / f"attempt_{self.attempt:04d}.rank_{env.rank:04d}.jsonl"
        try:
            self._file = open(self.path, "x", encoding="utf-8")
        except FileExistsError:
            raise RuntimeError(f"{self.path}: already exists; is another job writing to {directory.parent}?") from None
        self._write({"kind": "attempt", "attempt": self.attempt, "rank": env.rank, "world_size": env.world_size,
                     "phase": phase, "start_step": start_step, "restart_count": restart_count})

    def _write(self, record: dict[str, Any]) -> None:
        # One write of a whole line, flushed: another attempt only ever sees complete lines plus at
        # most one torn last line of a killed process.
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def step(self, step: int, epoch: int, rows: RowList) -> None:
        self._write({"kind": "step", "step": step, "epoch": epoch, "rows": _rows_json(rows)})

    def plan(self, step: int, epoch: int, dropped: RowList) -> None:
        self._write({"kind": "plan", "step": step, "epoch": epoch, "dropped": _rows_json(dropped)})

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()


@dataclass
class SampleAccount:
    """The training rows that counted, per epoch, as reconstructed by ``reconcile_sample_log``."""

    consumed: dict[int, dict[tuple[str, int], np.ndarray]] = field(default_factory=dict)
    """epoch -> (file, row_group) -> row indices trained on by the counted steps (repeats kept)."""
    dropped: dict[int, dict[tuple[str, int], np.ndarray]] = field(default_factory=dict)
    """epoch -> (file, row_group) -> row indices that the epoch's last plan skipped."""
    steps: list[int] = field(default_factory=list)
    """The counted steps, ascending."""
    attempts: list[dict[str, Any]] = field(default_factory=list)
    """Each attempt's header (rank 0's), with "counted": [first, last] counted step or None."""

    def num_rows(self, epoch: int, which: str = "consumed") -> int:
        """Rows (with repeats) consumed or dropped in an epoch."""
        return sum(len(r) for r in getattr(self, which).get(epoch, {}).values())

    def exactly_once_errors(self, units: Iterable[Any], epochs: int) -> list[str]:
        """Problems with "epochs 0..epochs-1 each consumed or dropped every row exactly once"; [] if none.

        Args:
            units: the split's row groups (``trainer.data.reader.list_work_units``: ``file``,
                ``row_group``, ``num_rows``).
            epochs: the number of whole epochs the run trained.
        """
        expected = {(u.file, u.row_group): u.num_rows for u in units}
        errors = []
        for epoch in sorted(set(self.consumed) | set(self.dropped) | set(range(epochs))):
            consumed, dropped = self.consumed.get(epoch, {}), self.dropped.get(epoch, {})
            if epoch >= epochs:
                errors.append(f"epoch {epoch}: {self.num_rows(epoch)} rows consumed beyond the {epochs} epoch(s)")
                continue
            for file, row_group in sorted(set(consumed) | set(dropped)):
                if (file, row_group) not in expected:
                    errors.append(f"epoch {epoch}: {file} row group {row_group} is not a row group of the split")
            for (file, row_group), n in expected.items():
                rows = np.concatenate([consumed.get((file, row_group), np.empty(0, np.int64)),
                                       dropped.get((file, row_group), np.empty(0, np.int64))])
                where = f"epoch {epoch}: {file} row group {row_group}"
                outside = rows[(rows < 0) | (rows >= n)]
                if len(outside):
                    errors.append(f"{where}: rows {outside[:5].tolist()} outside [0, {n})")
                    rows = rows[(rows >= 0) & (rows < n)]
                counts = np.bincount(rows, minlength=n)
                never, repeated = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
                if len(never):
                    errors.append(f"{where}: {len(never)} row(s) never consumed nor dropped, e.g. {never[:5].tolist()}")
                if len(repeated):
                    errors.append(f"{where}: {len(repeated)} row(s) counted more than once, e.g. "
                                  f"{repeated[:5].tolist()} ({counts[repeated[:5]].tolist()} times)")
        return errors


_RECORD_KEYS = {"attempt": ("attempt", "rank", "world_size", "start_step"), "step": ("step", "epoch", "rows"),
                "plan": ("step", "epoch", "dropped")}


def _read_sample_file(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").split("\n")
    torn = lines.pop()  # "" after a complete last line; else the line a killed process was writing
    if torn:
        logger.warning("%s: dropping a torn last line (%d characters) of a killed process", path, len(torn))
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON line: {e}") from None
        kind = record.get("kind") if isinstance(record, dict) else None
        if kind not in _RECORD_KEYS:
            raise ValueError(f"{path}:{number}: unknown record kind {kind!r}; expected one of {sorted(_RECORD_KEYS)}")
        missing = [k for k in _RECORD_KEYS[kind] if k not in record]
        if missing:
            raise ValueError(f"{path}:{number}: {kind} record without {missing}")
        if (kind == "attempt") != (number == 1):
            raise ValueError(f"{path}:{number}: the attempt header must be the first line and only there")
        record["_where"] = f"{path}:{number}"
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no attempt header (the process died before writing it?)")
    return records


def _row_arrays(rows: list, where: str) -> Iterator[tuple[tuple[str, int], np.ndarray]]:
    for entry in rows:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], list)):
            raise ValueError(f"{where}: a row entry must be [file, row_group, [rows...]], got {str(entry)[:80]}")
        yield (entry[0], int(entry[1])), np.asarray(entry[2], dtype=np.int64)


def reconcile_sample_log(directory: str | Path) -> SampleAccount:
    """Replays the attempts of a sample log (``SampleLog``) into the rows that count, per epoch.

    An attempt that resumed from the checkpoint of step k replaced everything earlier attempts did
    after step k: a step line of attempt i counts iff ``start_i < step <= min(start_j, j > i)``
    (the rows an attempt trained on after the checkpoint that a later attempt resumed from were
    trained on again, from the checkpoint's weights, by the later attempt). Every counted step must
    have one line from each rank of its attempt, with the same epoch, and the counted steps must
    be consecutive. An epoch's skipped rows are those of its last plan line that counts
    (``start_i <= step <= min(start_j, j > i)``, in attempt order): after a resume on another
    number of ranks the reader re-deals the epoch's unread rows and skips another tail.

    Raises:
        ValueError: naming the file (and line) of a malformed, inconsistent or incomplete log.
    """
    directory = Path(directory)
    files: dict[int, dict[int, Path]] = {}
    for path in sorted(directory.glob("attempt_*.rank_*.jsonl")):
        m = _SAMPLE_FILE.fullmatch(path.name)
        if m:
            files.setdefault(int(m.group(1)), {})[int(m.group(2))] = path
    if not files:
        raise ValueError(f"{directory}: no sample log files (attempt_*.rank_*.jsonl); was train.sample_log on?")
    attempts = []
    for number in sorted(files):
        records = {rank: _read_sample_file(path) for rank, path in files[number].items()}
        first = records[min(records)][0]
        for rank, recs in records.items():
            header = recs[0]
            if (header["attempt"], header["rank"]) != (number, rank):
                raise ValueError(f"{header['_where']}: header says attempt {header['attempt']} rank {header['rank']}, "
                                 f"the file name attempt {number} rank {rank}")
            if (header["world_size"], header["start_step"]) != (first["world_size"], first["start_step"]):
                raise ValueError(f"{header['_where']}: world_size/start_step {header['world_size']}/"
                                 f"{header['start_step']} differ from {first['_where']}")
        missing = sorted(set(range(first["world_size"])) - set(records))
        if missing or set(records) - set(range(first["world_size"])):
            raise ValueError(f"{directory}: attempt {number} ran on {first['world_size']} rank(s) but has the files of "
                             f"ranks {sorted(records)}")
        attempts.append((number, records))

    account = SampleAccount()
    consumed: dict[int, dict[tuple[str, int], list[np.ndarray]]] = {}
    plans: dict[int, dict] = {}
    starts = [records[0][0]["start_step"] for _, records in attempts]
    for i, (number, records) in enumerate(attempts):
        start = starts[i]
        cut = min(starts[i + 1:], default=None)  # None: no later attempt replaced any of its steps
        by_rank: dict[int, dict[int, dict]] = {}
        for rank, recs in records.items():
            steps = by_rank[rank] = {}
            for record in recs[1:]:
                t = record["step"]
                if record["kind"] == "plan":
                    if rank == 0 and start <= t and (cut is None or t <= cut):
                        plans[record["epoch"]] = record  # later attempts and lines override
                    continue
                if t <= start:
                    raise ValueError(f"{record['_where']}: step {t} is not after the attempt's start step {start}")
                if t in steps:
                    raise ValueError(f"{record['_where']}: step {t} logged twice (also {steps[t]['_where']})")
                if cut is None or t <= cut:
                    steps[t] = record
        counted = sorted(set().union(*(set(s) for s in by_rank.values())))
        for t in counted:
            lines = [by_rank[r].get(t) for r in sorted(by_rank)]
            if any(line is None for line in lines):
                have = [r for r in sorted(by_rank) if t in by_rank[r]]
                raise ValueError(f"{directory}: attempt {number}: step {t} was logged by ranks {have} of "
                                 f"{len(by_rank)} (an attempt that failed with no later attempt resuming it?)")
            if len({line["epoch"] for line in lines}) != 1:
                raise ValueError(f"{lines[0]['_where']}: ranks disagree on the epoch of step {t}")
            for line in lines:
                for key, rows in _row_arrays(line["rows"], line["_where"]):
                    consumed.setdefault(line["epoch"], {}).setdefault(key, []).append(rows)
        header = dict(records[0][0])
        header.pop("_where")
        header["counted"] = [counted[0], counted[-1]] if counted else None
        account.attempts.append(header)
        account.steps += counted
    if account.steps and account.steps != list(range(account.steps[0], account.steps[-1] + 1)):
        gaps = sorted(set(range(account.steps[0], account.steps[-1] + 1)) - set(account.steps))
        raise ValueError(f"{directory}: no counted line for step(s) {gaps[:10]}: the attempts do not chain up")
    account.consumed = {e: {k: np.concatenate(v) for k, v in rows.items()} for e, rows in sorted(consumed.items())}
    for epoch in account.consumed:
        if epoch not in plans:
            raise ValueError(f"{directory}: epoch {epoch} has no counted plan line (rank 0's skipped rows)")
    for epoch, record in sorted(plans.items()):
        dropped: dict[tuple[str, int], list[np.ndarray]] = {}
        for key, rows in _row_arrays(record["dropped"], record["_where"]):
            dropped.setdefault(key, []).append(rows)
        account.dropped[epoch] = {k: np.concatenate(v) for k, v in dropped.items()}
    return account
