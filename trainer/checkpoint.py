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

Before a checkpoint is used it is validated (sidecar, DCP metadata, every shard file at least as
long as the metadata says): a damaged newest checkpoint (a truncated file, a disk that filled up
under another tool) is skipped with a warning and the newest intact one is used. A checkpoint of
another model (another dataset, plan or width) is refused with the mismatch named, before DCP
would fail on the first tensor. A save that fails on the file system (full disk, permissions)
removes its temporary folder and raises ``StorageError``; ``latest`` still names the previous
checkpoint.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
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
from torch.distributed.checkpoint.api import CheckpointException

from embdim.sharding.distributed import DistEnv
from embdim.io import as_storage_error, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or does not fit this run."""


def load_torch_file(path: str | Path, what: str) -> Any:
    """``torch.load`` of a file written with ``torch.save`` (weights only, to CPU); a missing,
    truncated or foreign file raises ``CheckpointError`` naming it and ``what`` it should hold."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what})") from None
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: damaged or not a torch.save file ({what}): {first}") from None


def dataset_schema(manifest: Any) -> dict[str, Any]:
    """What a checkpoint's tensors depend on in a dataset: label, dense columns, sparse fields
    with their cardinalities (stored in the sidecar's meta, compared on resume)."""
    return {"label": manifest.label, "dense": list(manifest.dense),
            "sparse": [[f.name, f.num_embeddings, bool(f.multi_hot)] for f in manifest.sparse]}


def _schema_difference(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    if saved.get("label") != now["label"]:
        return f"label column {saved.get('label')!r} there, {now['label']!r} here"
    if saved.get("dense") != now["dense"]:
        return f"dense columns {saved.get('dense')} there, {now['dense']} here"
    old = {name: (n, mh) for name, n, mh in saved.get("sparse", [])}
    new = {name: (n, mh) for name, n, mh in now["sparse"]}
    if list(old) != list(new):
        return f"sparse fields {list(old)} there, {list(new)} here"
    for name, (n, mh) in new.items():
        if old[name] != (n, mh):
            return f"field {name!r} has {old[name][0]} ids there, {n} here"
    return None


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
        """The newest intact checkpoint, or None when there is none yet.

        ``latest`` names the newest one; it and every ``step_N`` folder are validated
        (``damage``), newest first. Skipping a damaged one logs a warning naming it and why.
        Raises ``CheckpointError`` when checkpoints exist but none is intact."""
        pointer = self.dir / LATEST
        candidates: list[Path] = [path for _, path in reversed(self._steps())]
        if pointer.exists():
            name = pointer.read_text(errors="replace").strip()
            if name.startswith("step_") and "/" not in name:
                candidates = [self.dir / name, *[p for p in candidates if p.name != name]]
        damaged: list[str] = []
        for path in candidates:
            reason = self.damage(path)
            if reason is None:
                if damaged:
                    logger.warning("skipping damaged checkpoint(s): %s; resuming from %s", "; ".join(damaged), path)
                return path
            damaged.append(f"{path}: {reason}")
        if damaged:
            raise CheckpointError(f"no intact checkpoint in {self.dir}: {'; '.join(damaged)}; delete {self.dir} "
                                  f"to start over")
        return None

    def damage(self, path: str | Path) -> str | None:
        """Why the checkpoint folder ``path`` cannot be loaded, or None when it is intact: its
        sidecar parses, its DCP metadata loads, and every file the metadata points into exists and
        is long enough (a truncated or missing shard file is found here, not halfway through a load)."""
        path = Path(path)
        if not path.is_dir():
            return "missing"
        try:
            self.read_state(path)
        except CheckpointError as e:
            return str(e).split(": ", 1)[-1]
        try:
            metadata = dcp.FileSystemReader(str(path)).read_metadata()
        except Exception as e:  # a truncated pickle raises anything from EOFError to UnpicklingError
            return f"unreadable DCP metadata (.metadata: {type(e).__name__}: {e})"
        needed: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            rel = getattr(info, "relative_path", None)
            if rel is not None:
                needed[rel] = max(needed.get(rel, 0), int(info.offset) + int(info.length))
        for rel, size in sorted(needed.items()):
            try:
                actual = (path / rel).stat().st_size
            except FileNotFoundError:
                return f"shard file {rel} missing"
            if actual < size:
                return f"shard file {rel} truncated ({actual} bytes, the metadata needs {size})"
        return None

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
            # Left by a job killed while saving (the run folder's lock keeps other jobs out).
            for stale in self.dir.glob(".step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        self._barrier()
        try:
            self._write(model, optimizer, state, meta, name, final, tmp)
        except BaseException as e:
            if self.env.is_main and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)  # never leave half a checkpoint behind
            previous = self.dir / LATEST
            hint = (f"the previous checkpoint ({previous.read_text().strip()}) is intact" if previous.exists()
                    else "no earlier checkpoint")
            # DCP raises CheckpointException (a BaseException) with each rank's failure inside.
            err = as_storage_error(e, tmp, hint) if isinstance(e, (Exception, CheckpointException)) else None
            if err is None:
                raise
            raise err from e
        logger.info("saved checkpoint %s", final)
        return final

    def _write(self, model: nn.Module, optimizer: Any, state: TrainerState, meta: dict[str, Any], name: str,
               final: Path, tmp: Path) -> None:
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

    def check_fits(self, path: str | Path, raw: dict[str, Any], model_state: dict[str, Any],
                   meta: dict[str, Any] | None = None) -> None:
        """Raises ``CheckpointError`` naming the mismatch when checkpoint ``path`` (sidecar ``raw``)
        was written for another model: another dataset (``meta["dataset_schema"]``), another model
        width or architecture (``meta["config"]["model"]``), or tensors of other shapes (another
        plan). Checked before DCP would fail on the first tensor with a bare size mismatch."""
        path = Path(path)
        where = f"{path}: the run folder was made for another"
        saved_meta = raw.get("meta") or {}
        if meta is not None:
            saved_schema, schema = saved_meta.get("dataset_schema"), meta.get("dataset_schema")
            if saved_schema and schema:
                diff = _schema_difference(saved_schema, schema)
                if diff:
                    raise CheckpointError(f"{where} dataset ({saved_meta.get('dataset', '?')}: {diff}); give another "
                                          f"--out, or delete the folder to start over")
            saved_model = (saved_meta.get("config") or {}).get("model") or {}
            model_cfg = (meta.get("config") or {}).get("model") or {}
            changed = [k for k in model_cfg if k in saved_model and saved_model[k] != model_cfg[k]]
            if changed:
                k = changed[0]
                raise CheckpointError(f"{where} model: model.{k}={saved_model[k]!r} there, {model_cfg[k]!r} here; give "
                                      f"another --out, or set model.{k}={saved_model[k]!r} to resume it")
        try:
            saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable DCP metadata: {e}") from None
        for key, value in model_state.items():
            if not isinstance(value, torch.Tensor):  # ShardedTensor and DTensor are tensors: size() is global
                continue
            fqn = f"model.{key}"
            if fqn not in saved:
                raise CheckpointError(f"{where} model or plan: it has no tensor {key!r} (e.g. another method's "
                                      f"tables); give another --out")
            there = getattr(saved[fqn], "size", None)
            if there is not None and tuple(there) != tuple(value.size()):
                raise CheckpointError(f"{where} dataset, plan or width: {key} is {list(there)} there, "
                                      f"{list(value.size())} here; give another --out")

    def load(self, path: str | Path, model: nn.Module, optimizer: Any, *, load_optimizer: bool = True,
             meta: dict[str, Any] | None = None) -> TrainerState:
        """Restores model (and optimizer) tensors in place and returns the trainer state.

        The optimizer must hold state for every parameter it will ever have state for (run
        ``init_state()`` on lazily initialised optimizers first): DCP loads into existing tensors.
        ``meta``: this run's description (as passed to ``save``), checked against the
        checkpoint's (``check_fits``). Collective: every rank calls it.
        """
        path = Path(path)
        raw = self.read_state(path)
        self.check_fits(path, raw, model.state_dict(), meta)
        state_dict: dict[str, Any] = {"model": model.state_dict()}
        if load_optimizer:
            state_dict["optim"] = optimizer.state_dict()
        try:
            dcp.load(state_dict, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:  # CheckpointException lists each rank's failure
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
