"""Atomic, resharding checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of ``RUN_DIR/ckpt``::

    step_120/                 # one DCP folder per checkpoint
      .metadata, __0_0.distcp, ...   model state (sharded tables + dense) and optimizer state
      trainer_state.json      # step, epoch, phase, config, and per rank: reader position, RNG
    latest                    # text file "step_120", replaced atomically after the folder is whole

A checkpoint is written into ``.step_N.tmp`` and renamed to ``step_N`` only once every rank's
shards and the sidecar are on disk; ``latest`` is switched after the rename. A crash at any point
leaves the previous checkpoint as ``latest``. The folder must be on storage every rank can reach.

DCP stores each table by global offsets, so a checkpoint loads under any other plan or number of
ranks (docs/torchrec-notes.md#sharded-weights). RNG states are per rank and restored only under the same number of
ranks; the reader position (rank-independent for ``ParquetBatchReader``) is restored always: under
another layout the reader re-deals the epoch's unread rows.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from embdim.trainer.distributed import DistEnv
from embdim.trainer.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or does not fit this run."""


@dataclass
class TrainerState:
    """What a checkpoint restores besides tensors."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Epoch in progress (the reader position says how far into it)."""
    phase: str = "train"
    train_seconds: float = 0.0
    """Training wall time accumulated over all runs so far."""
    samples: int = 0
    """Training samples processed over all ranks so far."""
    reader_state: dict | None = None
    """This rank's train-reader position after the last trained batch (None: start the epoch)."""
    extra: dict = field(default_factory=dict)
    """Trainer bookkeeping that must survive a restart (last evaluation, ...)."""


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode()}
    raise TypeError(f"cannot store {type(obj).__name__} in {STATE_FILE}")


def rng_state(device: torch.device) -> dict[str, Any]:
    """Python, NumPy and torch RNG states of this process, as JSON-able values."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if device.type == "cuda":
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8), device)


def _all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Saves and restores ``{model, optimizer, trainer state}`` under ``ckpt_dir``.

    Args:
        ckpt_dir (Path): the run's ``ckpt`` folder.
        env (DistEnv): this rank.
        keep (int): checkpoints kept on disk (0 keeps all); older ones are deleted after a save.
    """

    def __init__(self, ckpt_dir: str | Path, env: DistEnv, keep: int = 2) -> None:
        self.dir = Path(ckpt_dir)
        self.env = env
        self.keep = keep

    # ---------------------------------------------------------------- paths
    def latest(self) -> Path | None:
        """The folder ``latest`` points at, or None when there is no checkpoint yet."""
        pointer = self.dir / LATEST
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        path = self.dir / name
        if not name.startswith("step_") or not (path / STATE_FILE).exists():
            raise CheckpointError(f"{pointer}: points at {name!r}, which is not a complete checkpoint folder")
        return path

    def _steps(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.dir.glob("step_*"):
            try:
                out.append((int(p.name.split("_", 1)[1]), p))
            except ValueError:
                continue
        return sorted(out)

    # ---------------------------------------------------------------- save
    def save(self, model: nn.Module, optimizer: Any, state: TrainerState, meta: dict[str, Any]) -> Path:
        """Writes checkpoint ``step_<state.step>`` (collective: every rank calls it).

        Args:
            model (nn.Module): the DMP model (``state_dict()`` holds sharded tables).
            optimizer (Any): a ``KeyedOptimizer`` (the trainer's ``CombinedOptimizer``).
            state (TrainerState): step, epoch, ...; ``reader_state`` is this rank's.
            meta (dict): JSON-able run description stored in the sidecar (config, ...).
        """
        name = f"step_{state.step}"
        final, tmp = self.dir / name, self.dir / f".{name}.tmp"
        if self.env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crash during an earlier save of the same step
                shutil.rmtree(tmp)
        self._barrier()
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=str(tmp))
        per_rank = {"reader_state": state.reader_state, "rng": rng_state(self.env.device)}
        ranks = _all_gather_object(json.loads(json.dumps(per_rank, default=_json_default)))
        if self.env.is_main:
            # The reader's position is the same on every rank (and lists the epoch's whole work
            # plan): store each distinct one once, ranks refer to it by index.
            reader_states: list[Any] = []
            for entry in ranks:
                if entry["reader_state"] not in reader_states:
                    reader_states.append(entry["reader_state"])
                entry["reader_state"] = reader_states.index(entry["reader_state"])
            sidecar = {
                "format_version": FORMAT_VERSION,
                "step": state.step,
                "epoch": state.epoch,
                "phase": state.phase,
                "train_seconds": state.train_seconds,
                "samples": state.samples,
                "world_size": self.env.world_size,
                "extra": state.extra,
                "meta": meta,
                "reader_states": reader_states,
                "ranks": ranks,
            }
            atomic_write_json(tmp / STATE_FILE, json.loads(json.dumps(sidecar, default=_json_default)))
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step (a resumed run ending where it started)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            atomic_write_text(self.dir / LATEST, name + "\n")
            self._prune(keep_name=name)
        self._barrier()
        logger.info("saved checkpoint %s", final)
        return final

    def _prune(self, keep_name: str) -> None:
        if self.keep <= 0:
            return
        steps = [p for _, p in self._steps()]
        for path in steps[: max(0, len(steps) - self.keep)]:
            if path.name != keep_name:
                shutil.rmtree(path, ignore_errors=True)

    # ---------------------------------------------------------------- load
    def read_state(self, path: str | Path) -> dict[str, Any]:
        """The sidecar of a checkpoint folder, validated."""
        file = Path(path) / STATE_FILE
        try:
            raw = json.loads(file.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{file}: missing; {path} is not a complete checkpoint") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{file}: invalid JSON: {e}") from None
        for key in ("format_version", "step", "epoch", "phase", "world_size", "ranks"):
            if key not in raw:
                raise CheckpointError(f"{file}: missing key {key!r}")
        if raw["format_version"] != FORMAT_VERSION:
            raise CheckpointError(f"{file}: format_version {raw['format_version']}, this embdim reads {FORMAT_VERSION}")
        return raw

    def load(self, path: str | Path, model: nn.Module, optimizer: Any, *, load_optimizer: bool = True) -> TrainerState:
        """Restores model (and optimizer) tensors in place and returns the trainer state.

        The optimizer must hold state for every parameter it will ever have state for (run
        ``init_state()`` on lazily initialised optimizers first): DCP loads into existing tensors.
        Collective: every rank calls it.
        """
        path = Path(path)
        raw = self.read_state(path)
        state_dict: dict[str, Any] = {"model": model.state_dict()}
        if load_optimizer:
            state_dict["optim"] = optimizer.state_dict()
        try:
            dcp.load(state_dict, checkpoint_id=str(path))
        except Exception as e:  # DCP raises a CheckpointException listing each rank's failure
            raise CheckpointError(f"{path}: cannot load into this model: {e}") from e
        # The local shards and dense tensors were loaded in place; load_state_dict also restores
        # anything DCP replaced by value (non-tensor entries) and runs torchrec's hooks.
        model.load_state_dict(state_dict["model"])
        if load_optimizer:
            optimizer.load_state_dict(state_dict["optim"])
        reader_states = raw.get("reader_states", [])
        if raw["world_size"] == self.env.world_size:
            mine = raw["ranks"][self.env.rank]
            reader_state = reader_states[mine["reader_state"]]
            set_rng_state(mine["rng"], self.env.device)
        else:
            # ParquetBatchReader positions are rank-independent and re-deal the epoch's unread
            # rows over a new layout, so rank 0's position serves every rank; RNG streams do not
            # map between rank counts and are left as seeded.
            reader_state = reader_states[raw["ranks"][0]["reader_state"]] if reader_states else None
            logger.warning(
                "checkpoint %s was written by %d ranks, this run has %d: model and optimizer are "
                "resharded, the reader re-deals the unread rows of epoch %d, RNG states are not restored",
                path, raw["world_size"], self.env.world_size, raw["epoch"])
        return TrainerState(
            step=int(raw["step"]), epoch=int(raw["epoch"]), phase=str(raw["phase"]),
            train_seconds=float(raw.get("train_seconds", 0.0)), samples=int(raw.get("samples", 0)),
            reader_state=reader_state, extra=dict(raw.get("extra", {})),
        )

    def _barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
