"""The distributed trainer: sharded DLRM training, evaluation, checkpoints and ``metrics.json``.

One ``Trainer`` serves every phase: plain training, and later the search and retrain phases,
which plug in through ``sparse_module_factory`` (a module standing in for the embedding
collection), ``aux_loss_fn`` (a regulariser added to the loss), ``extra_optimizers`` and
``evaluate_with`` (custom scoring over this rank's part of the validation split).

Training runs TorchRec's ``TrainPipelineSparseDist`` (the input all-to-all of batch i+1 overlaps
batch i), like the TorchRec DLRM reference (docs/torchrec-notes.md#pipelining). The pipeline pulls up to two
batches ahead of the one it trains, so the reader position saved in a checkpoint is the one
recorded when the last *trained* batch was yielded, not the reader's current one: resuming then
replays exactly the batches the pipeline had prefetched.

With ``train.sample_log`` the rows of every trained batch go the same way into an append-only
``SampleLog`` (``RUN_DIR/sample_log/``); ``reconcile_sample_log`` replays its attempts (faults,
torchrun restarts, reruns, resumes on other rank counts) into the rows that counted per epoch.

Example::

    env = init_distributed()
    trainer = Trainer(config, "data/", "runs/r1", env=env)
    metrics = trainer.fit()   # also written to runs/r1/metrics.json by rank 0
"""

from __future__ import annotations

import collections
import copy
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from embdim.sharding.planner import plan_summary, replicated_embedding_params, shard_model, sparse_optimizer, table_placement
from embdim.trainer.checkpoint import Checkpointer, CheckpointError, TrainerState, dataset_schema
from embdim.trainer.config import Config, ConfigError, OptimConfig, config_to_dict
from embdim.trainer.data.manifest import DatasetError, load_manifest
from embdim.sharding.distributed import DistEnv, env_int
from embdim.io import atomic_write_json
from embdim.trainer.logger import build_logger
from embdim.trainer.metrics import MetricAccumulator
from embdim.trainer.model import AuxLossFn, SparseModuleFactory, build_model, embedding_size
from embdim.trainer.sample_log import SAMPLE_LOG_DIR, SampleLog

logger = logging.getLogger(__name__)

ScoreFn = Callable[[Batch], None]
# Config keys that may differ between a checkpoint and the run resuming from it without a warning.
_RESUME_FREE_KEYS = {"fail_at_step", "fail_rank", "progress_bar", "log_every", "tensorboard", "sample_log"}


def dense_optimizer(config: OptimConfig, params: dict[str, torch.Tensor]) -> KeyedOptimizerWrapper:
    """The optimizer of the dense parameters (MLPs, projections), keyed by parameter name."""
    if config.dense_optimizer == "adam":
        cls, kwargs = torch.optim.Adam, {"lr": config.dense_lr, "eps": config.eps, "weight_decay": config.weight_decay}
    elif config.dense_optimizer == "adagrad":
        cls, kwargs = torch.optim.Adagrad, {"lr": config.dense_lr, "eps": config.eps, "weight_decay": config.weight_decay}
    elif config.dense_optimizer == "sgd":
        cls, kwargs = torch.optim.SGD, {"lr": config.dense_lr, "weight_decay": config.weight_decay}
    else:
        raise ConfigError(f"optim.dense_optimizer: unknown {config.dense_optimizer!r}")
    return KeyedOptimizerWrapper(params, lambda ps: cls(ps, **kwargs))


class _TrackedBatches:
    """Iterates a reader and remembers, per yielded batch, the reader position right after it.

    The train pipeline prefetches; ``pop_trained()`` is called once per finished step and returns
    the position after the oldest batch not yet trained, i.e. the one just trained.

    ``ParquetBatchReader.state_dict()`` lists the epoch's whole work plan (one entry per row
    group), which is constant within a pass while ``batches_in_epoch`` counts up by one per batch,
    so the plan is copied once per pass and each batch only records its count.

    With ``track_rows`` (the reader built with ``track_rows=True``) each batch also keeps the rows
    it holds (``reader.last_batch_rows``), so that the rows of the step just trained, not of the
    batches the pipeline prefetched, reach the sample log.
    """

    def __init__(self, reader: Any, *, track_rows: bool = False) -> None:
        self._reader = reader
        self._it = iter(reader)
        self._track_rows = track_rows
        self._base: dict | None = None
        self._count: int | None = None
        self._pending: collections.deque[tuple[Batch, Any, Any]] = collections.deque()
        self._replay: collections.deque[tuple[Batch, Any, Any]] = collections.deque()

    def __iter__(self) -> "_TrackedBatches":
        return self

    def __next__(self) -> Batch:
        if self._replay:  # batches pulled by a pipeline that was abandoned (see replay_pending)
            item = self._replay.popleft()
        else:
            try:
                batch = next(self._it)
            except StopIteration:
                raise
            except Exception as e:
                # Marked so the trainer never mistakes a data error raised inside the pipeline's
                # first progress() (which pulls batches ahead) for a failed fx trace.
                e.embdim_data_error = True  # type: ignore[attr-defined]
                raise
            item = (batch, self._position(), self._reader.last_batch_rows if self._track_rows else None)
        self._pending.append(item)
        return item[0]

    def _position(self) -> Any:
        if self._count is not None:
            self._count += 1
            return self._count
        state = copy.deepcopy(self._reader.state_dict())
        count = state.get("batches_in_epoch") if isinstance(state, dict) else None
        if isinstance(count, int):  # first batch of the pass: keep the plan, count from here
            self._base, self._count = state, count
            return count
        return state  # a reader without a batch counter: a full copy per batch

    def pop_trained(self) -> tuple[dict, Any]:
        """(reader position after the batch just trained, its rows or None when not tracked)."""
        _, position, rows = self._pending.popleft()
        if isinstance(position, int):
            return {**self._base, "batches_in_epoch": position}, rows
        return position, rows

    def replay_pending(self) -> None:
        """Yields the pulled-but-untrained batches again before new ones."""
        self._replay.extendleft(reversed(self._pending))
        self._pending.clear()


class Trainer:
    """Trains, evaluates and checkpoints a sharded DLRM on a dataset folder.

    Args:
        config (Config): the run configuration.
        dataset_dir (str | Path): a folder made by ``embdim data`` (``dataset.json`` + Parquet).
        run_dir (str | Path): where ``metrics.json``, ``ckpt/`` and ``tensorboard/`` go.
        env (DistEnv): from ``sharding.distributed.init_distributed()``.
        sparse_module_factory (SparseModuleFactory | None): ``tables -> module`` replacing the
            EmbeddingBagCollection in DLRM (see ``trainer.model``).
        aux_loss_fn (AuxLossFn | None): ``sparse_module -> Tensor | None`` added to the training
            loss (the module is the one in the EBC slot, after sharding).
        extra_optimizers: optimizers for parameters that must not use the dense optimizer, or a
            callable ``sparse_module -> optimizers`` (called after sharding, when the parameters
            are materialised). Their parameters are left out of the dense optimizer.
        excluded_dense_params: parameters (or a callable ``sparse_module -> parameters``) the
            dense optimizer must not update.
        feature_transform (FeatureTransform | None): ``f(features, batch_size) -> features`` the
            readers apply to each batch's sparse features before building the KJT (e.g. an id
            remap for compact tables); see ``trainer.data.reader``. Must be picklable.
        phase (str): tag of the phase ("train", "search", "retrain"): logs, checkpoints,
            metrics.json. A checkpoint of another phase is refused on resume.
    """

    def __init__(
        self,
        config: Config,
        dataset_dir: str | Path,
        run_dir: str | Path,
        *,
        env: DistEnv,
        sparse_module_factory: SparseModuleFactory | None = None,
        aux_loss_fn: AuxLossFn | None = None,
        extra_optimizers: Any = (),
        excluded_dense_params: Any = (),
        feature_transform: Callable[..., Any] | None = None,
        phase: str = "train",
    ) -> None:
        self.config = config
        self.dataset_dir = Path(dataset_dir)
        self.run_dir = Path(run_dir)
        self.env = env
        self.phase = phase
        self.feature_transform = feature_transform
        self.manifest = load_manifest(self.dataset_dir)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

        seed = config.train.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        model = build_model(config.model, self.manifest, device=env.device,
                            sparse_module_factory=sparse_module_factory, aux_loss_fn=aux_loss_fn)
        # Counted on the unsharded model, where every collection still reports its own configs.
        self.embedding_params, self.embedding_bytes = embedding_size(model)
        self.model: DistributedModelParallel = shard_model(
            model, env, config.sharding, config.optim, config.data.batch_size)
        logger.info("sharding plan (%d ranks):\n%s", env.world_size, plan_summary(self.model.plan))
        self.optimizer = self._build_optimizer(extra_optimizers, excluded_dense_params)

        from embdim.trainer.data.reader import ParquetBatchReader  # the reader pulls in pyarrow & workers

        self._reader_cls = ParquetBatchReader
        self.train_reader = self._make_reader("train", shuffle=config.data.shuffle,
                                              track_rows=config.train.sample_log)
        if len(self.train_reader) == 0:
            raise DatasetError(f"{self.dataset_dir}: the train split gives no batch of {config.data.batch_size} "
                               f"rows per rank on {env.world_size} ranks; lower data.batch_size")
        self._eval_readers: dict[str, Any] = {}
        self.checkpointer = Checkpointer(self.run_dir / "ckpt", env, keep=config.train.keep_checkpoints)
        self.scalars = build_logger(self.run_dir, enabled=config.train.tensorboard, is_main=env.is_main)
        self.state = TrainerState(phase=phase)
        self.state.extra = {"epoch_step": 0, "history": [], "last_valid": None}
        self._pipeline: TrainPipelineSparseDist | None = None
        self._pipelined = False
        self._saved_step = -1
        self._resumed_from: int | None = None
        self._resumed_path: Path | None = None
        self._resume_checked = False
        # Worker-group restarts so far (torchrun sets it in every worker; absent without torchrun):
        # train.fail_at_step fires only in the first attempt, and the sample log records it.
        self._restart_count = env_int("TORCHELASTIC_RESTART_COUNT", 0)
        self._sample_log: SampleLog | None = None

    # ------------------------------------------------------------------ construction
    @property
    def sparse_module(self) -> nn.Module:
        """The module in DLRM's EBC slot (sharded collection or the factory's stand-in)."""
        return self.model.module.sparse_module

    def _build_optimizer(self, extra_optimizers: Any, excluded_dense_params: Any) -> CombinedOptimizer:
        named = dict(in_backward_optimizer_filter(self.model.named_parameters()))
        name_of = {id(p): n for n, p in named.items()}
        if callable(extra_optimizers):
            extra_optimizers = extra_optimizers(self.sparse_module)
        if callable(excluded_dense_params):
            excluded_dense_params = excluded_dense_params(self.sparse_module)
        excluded = {id(p) for p in excluded_dense_params}
        optims: list[tuple[str, KeyedOptimizer]] = [("fused", self.model.fused_optimizer)]
        for i, opt in enumerate(extra_optimizers):
            params = [p for group in opt.param_groups for p in group["params"]]
            missing = [tuple(p.shape) for p in params if id(p) not in name_of]
            if missing:
                raise ValueError(f"extra optimizer {i} ({type(opt).__name__}) holds parameters that are not dense "
                                 f"parameters of the sharded model (shapes {missing}); pass a callable that builds it "
                                 f"from the sparse module after sharding")
            excluded |= {id(p) for p in params}
            optims.append((f"extra{i}", KeyedOptimizerWrapper({name_of[id(p)]: p for p in params}, lambda _, o=opt: o)))
        replicated = replicated_embedding_params(self.model)
        if replicated:
            cls, kwargs = sparse_optimizer(self.config.optim, self.env.device.type)
            optims.append(("replicated_tables", KeyedOptimizerWrapper(replicated, lambda ps: cls(ps, **kwargs))))
            excluded |= {id(p) for p in replicated.values()}
        dense = {n: p for n, p in named.items() if id(p) not in excluded and p.requires_grad}
        if dense:
            optims.insert(1, ("dense", dense_optimizer(self.config.optim, dense)))
        self._lazy_optims = [o for name, o in optims if name != "fused"]
        return CombinedOptimizer(optims)

    def _make_reader(self, split: str, *, shuffle: bool, track_rows: bool = False) -> Any:
        batch_size = self.config.data.batch_size if split == "train" else self.config.data.eval_batch_size
        return self._reader_cls(
            self.dataset_dir, split, batch_size=batch_size, rank=self.env.rank, world_size=self.env.world_size,
            num_workers=self.config.data.num_workers, shuffle=shuffle, seed=self.config.train.seed,
            feature_transform=self.feature_transform, pin_memory=self.config.data.pin_memory,
            track_rows=track_rows,
        )

    def _eval_reader(self, split: str) -> Any:
        if split not in self.manifest.splits:
            raise DatasetError(f"{self.dataset_dir}/dataset.json: no {split!r} split")
        if split not in self._eval_readers:
            self._eval_readers[split] = self._make_reader(split, shuffle=False)
        reader = self._eval_readers[split]
        reader.set_epoch(0)
        return reader

    # ------------------------------------------------------------------ evaluation
    def _detach_pipeline(self) -> None:
        # Direct calls into a pipelined sharded module fail ("Invalid PipelinedForward usage");
        # progress() re-attaches by itself, keeping its in-flight batches (docs/torchrec-notes.md#pipelining).
        if self._pipeline is not None:
            self._pipeline.detach()

    def eval_batches(self, split: str = "valid") -> Iterator[Batch]:
        """This rank's batches of a split, on the device, with the model in eval mode and no
        autograd. Every rank gets the same number of batches and must consume them all."""
        reader = self._eval_reader(split)
        self._detach_pipeline()
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in reader:
                    yield batch.to(self.env.device, non_blocking=True)
        finally:
            self.model.train()

    def evaluate_with(self, score_fn: ScoreFn, split: str = "valid") -> None:
        """Runs ``score_fn(batch)`` over this rank's part of a split in eval mode (the search
        phase's hook: score many candidates per batch). Collective: all ranks call it."""
        for batch in self.eval_batches(split):
            score_fn(batch)

    def evaluate(self, split: str = "valid") -> dict[str, float | None]:
        """AUC and logloss of the model on a whole split; identical on every rank (collective)."""
        acc = MetricAccumulator()
        for batch in self.eval_batches(split):
            _, (_, logits, labels) = self.model(batch)
            acc.update(logits, labels)
        return acc.compute(self.env.device)

    # ------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict[str, Any]:
        return {"config": config_to_dict(self.config), "dataset": str(self.dataset_dir.resolve()),
                "dataset_schema": dataset_schema(self.manifest), "sharding_plan": table_placement(self.model.plan)}

    def save_checkpoint(self) -> None:
        """Saves ``ckpt/step_<step>`` (collective)."""
        if self._sample_log is not None:
            # Lines of steps <= this checkpoint's step must survive any crash after it: a resumed
            # attempt replaces only the steps after the checkpoint.
            self._sample_log.sync()
        self.checkpointer.save(self.model, self.optimizer, self.state, self._meta())
        self._saved_step = self.state.step

    def resume(self) -> Path | None:
        """Restores ``RUN_DIR/ckpt/latest`` when it exists (model, optimizers, reader position,
        RNG, step); returns its path, or None for a fresh run. ``fit()`` calls it; calling it
        earlier (to inspect the restored model) is fine, it runs once. Collective."""
        if self._resume_checked:
            return self._resumed_path
        self._resume_checked = True
        path = self.checkpointer.latest()
        if path is None:
            return None
        raw = self.checkpointer.read_state(path)
        if raw["phase"] != self.phase:
            raise CheckpointError(f"{path}: written by phase {raw['phase']!r}, this run is phase {self.phase!r}")
        self._warn_config_changes(raw.get("meta", {}).get("config", {}), path)
        # DCP loads into existing tensors, so lazily created optimizer state (Adam moments) must
        # exist first: one zero-gradient step creates it, and the load overwrites it.
        for opt in self._lazy_optims:
            opt.init_state()
            opt.zero_grad(set_to_none=True)
        self.state = self.checkpointer.load(path, self.model, self.optimizer, meta=self._meta())
        self.state.phase = self.phase
        self.state.extra.setdefault("history", [])
        self.state.extra.setdefault("last_valid", None)
        if self.state.reader_state is None:
            self.state.extra["epoch_step"] = 0
        self._saved_step = self._resumed_from = self.state.step
        self._resumed_path = path
        logger.info("resumed from %s (step %d, epoch %d)", path, self.state.step, self.state.epoch)
        return path

    def _warn_config_changes(self, saved: dict, path: Path) -> None:
        now = config_to_dict(self.config)
        changed = [f"{section}.{key}" for section, values in now.items() for key, value in values.items()
                   if key not in _RESUME_FREE_KEYS and saved.get(section, {}).get(key, value) != value]
        if changed:
            logger.warning("resuming from %s with a different config: %s", path, ", ".join(changed))

    # ------------------------------------------------------------------ training
    def _make_pipeline(self) -> TrainPipelineSparseDist | None:
        if not self.config.train.pipeline:
            return None
        return TrainPipelineSparseDist(self.model, self.optimizer, self.env.device, execute_all_batches=True)

    def _plain_step(self, batches: _TrackedBatches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = next(batches).to(self.env.device, non_blocking=True)
        self.optimizer.zero_grad()
        loss, output = self.model(batch)
        loss.backward()
        self.optimizer.step()
        return output

    def _train_step(self, batches: _TrackedBatches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._pipeline is None:
            return self._plain_step(batches)
        first = not self._pipelined
        try:
            output = self._pipeline.progress(batches)
        except StopIteration:
            raise
        except Exception as e:
            # The pipeline fx-traces the model on its first batch to find the sharded modules it
            # can pipeline. A stand-in sparse module whose forward cannot be traced (control flow
            # on tensor values) fails there, before any step: train without the pipeline instead.
            if not first or getattr(self._pipeline, "_pipelined_modules", None) or getattr(e, "embdim_data_error", False):
                raise
            logger.warning("TrainPipelineSparseDist could not trace the model (%s: %s); falling back to a "
                           "plain training loop", type(e).__name__, e)
            self._pipeline = None
            batches.replay_pending()
            return self._plain_step(batches)
        if first:
            self._pipelined = True
            pipelined = getattr(self._pipeline, "_pipelined_modules", [])
            if pipelined:
                logger.info("train pipeline: %d sharded module(s) pipelined", len(pipelined))
            else:
                logger.warning("train pipeline: no sharded module could be pipelined (its input is not taken "
                               "straight from the batch); it runs as a plain loop without overlap")
        return output

    @property
    def num_pipelined_modules(self) -> int:
        """Sharded modules the train pipeline rewrote (0 before the first step or without it)."""
        return len(getattr(self._pipeline, "_pipelined_modules", []) or []) if self._pipeline else 0

    def _done(self) -> bool:
        max_steps = self.config.train.max_steps
        return bool(max_steps) and self.state.step >= max_steps

    def fit(self, epochs: int | None = None) -> dict[str, Any]:
        """Trains for ``epochs`` (default ``train.epochs``; 0 = only evaluate) or ``train.max_steps``,
        resuming from ``RUN_DIR/ckpt/latest`` when it exists; evaluates, checkpoints, writes
        ``metrics.json``; returns the metrics."""
        cfg = self.config.train
        epochs = cfg.epochs if epochs is None else epochs
        if epochs < 0:
            raise ValueError(f"fit: epochs must be >= 0, got {epochs}")
        self.resume()
        self._pipeline = self._make_pipeline()
        self.model.train()
        start_step = self.state.step
        if cfg.sample_log and self._sample_log is None:
            self._sample_log = SampleLog(self.run_dir / SAMPLE_LOG_DIR, self.env, phase=self.phase,
                                         start_step=start_step, restart_count=self._restart_count)
        try:
            while self.state.epoch < epochs and not self._done():
                if self.state.reader_state is not None:
                    self.train_reader.load_state_dict(self.state.reader_state)
                else:
                    self.train_reader.set_epoch(self.state.epoch)
                    self.state.extra["epoch_step"] = 0
                if self._sample_log is not None and self.env.is_main:
                    # The plan is the same on every rank: rank 0 records what this pass skips.
                    self._sample_log.plan(self.state.step, self.state.epoch, self.train_reader.dropped_rows())
                finished = self._train_epoch(start_step)
                if finished:
                    self.state.epoch += 1
                    self.state.extra["epoch_step"] = 0
                    self.state.reader_state = None
                    self._record_valid()
            if self._saved_step != self.state.step:
                self.save_checkpoint()
        finally:
            if self._sample_log is not None:
                self._sample_log.close()
                self._sample_log = None
        return self._finish()

    def _train_epoch(self, start_step: int) -> bool:
        """Trains until the epoch ends (True) or max_steps is reached (False)."""
        cfg = self.config.train
        batches = _TrackedBatches(self.train_reader, track_rows=self._sample_log is not None)
        done = self.state.extra["epoch_step"]
        total = done + getattr(self.train_reader, "num_remaining_batches", len(self.train_reader) - done)
        if cfg.max_steps:
            total = min(total, done + cfg.max_steps - self.state.step)
        bar = tqdm(total=total, initial=done, desc=f"{self.phase} epoch {self.state.epoch}",
                   disable=not (cfg.progress_bar and self.env.is_main), dynamic_ncols=True, leave=False)
        window = MetricAccumulator()
        window_loss = torch.zeros(2, dtype=torch.float64, device=self.env.device)  # sum, count
        window_time, window_samples = 0.0, 0
        try:
            while not self._done():
                t0 = time.perf_counter()
                try:
                    loss, logits, labels = self._train_step(batches)
                except StopIteration:
                    return True
                elapsed = time.perf_counter() - t0
                self.state.step += 1
                self.state.extra["epoch_step"] += 1
                self.state.reader_state, rows = batches.pop_trained()
                if self._sample_log is not None:
                    # Before this step's checkpoint (below), so that the checkpoint implies the line.
                    self._sample_log.step(self.state.step, self.state.epoch, rows)
                n = labels.numel()
                self.state.train_seconds += elapsed
                self.state.samples += n * self.env.world_size
                window_time += elapsed
                window_samples += n
                window.update(logits, labels)
                # Accumulated on the device: loss.item() every step would synchronise a GPU.
                window_loss[0] += loss.detach().double() * n
                window_loss[1] += n
                bar.update(1)
                step = self.state.step
                if cfg.log_every and step % cfg.log_every == 0:
                    self._log_window(window, window_loss, window_time, window_samples)
                    window.reset()
                    window_loss.zero_()
                    window_time, window_samples = 0.0, 0
                if cfg.eval_every and step % cfg.eval_every == 0:
                    self._record_valid()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if (step == cfg.fail_at_step and self.env.rank == cfg.fail_rank and start_step < step
                        and self._restart_count == 0):
                    raise RuntimeError(f"injected failure at step {step} on rank {self.env.rank} (train.fail_at_step)")
            return False
        finally:
            bar.close()

    def _log_window(self, window: MetricAccumulator, loss: torch.Tensor, seconds: float, samples: int) -> None:
        from embdim.sharding.state import all_reduce_sum

        totals = all_reduce_sum(torch.tensor([loss[0].item(), loss[1].item(), float(samples), seconds],
                                             dtype=torch.float64, device=self.env.device))
        metrics = window.compute(self.env.device)
        mean_loss = (totals[0] / totals[1]).item()
        # Ranks run in lockstep, so the global rate is all samples over the mean rank time.
        rate = totals[2].item() / max(totals[3].item() / self.env.world_size, 1e-9)
        auc = metrics["auc"]
        logger.info("%s step %d epoch %d: loss %.4f  auc %s  %.0f samples/s", self.phase, self.state.step,
                    self.state.epoch, mean_loss, "n/a" if auc is None else f"{auc:.4f}", rate)
        self.scalars.log({f"{self.phase}/loss": mean_loss, f"{self.phase}/auc": auc,
                          f"{self.phase}/samples_per_s": rate}, self.state.step)

    def _record_valid(self) -> dict[str, Any] | None:
        if "valid" not in self.manifest.splits:
            return None
        last = self.state.extra.get("last_valid")
        if last is not None and last["step"] == self.state.step:
            return last
        metrics = self.evaluate("valid")
        entry = {"step": self.state.step, "epoch": self.state.epoch, "valid_auc": metrics["auc"],
                 "valid_logloss": metrics["logloss"]}
        self.state.extra["last_valid"] = entry
        self.state.extra["history"].append(entry)
        auc, ll = metrics["auc"], metrics["logloss"]
        logger.info("%s step %d: valid auc %s logloss %s", self.phase, self.state.step,
                    "n/a" if auc is None else f"{auc:.4f}", "n/a" if ll is None else f"{ll:.4f}")
        self.scalars.log({"valid/auc": auc, "valid/logloss": ll}, self.state.step)
        return entry

    def _finish(self) -> dict[str, Any]:
        valid = self._record_valid()
        test = self.evaluate("test") if "test" in self.manifest.splits else None
        if test is not None:
            self.scalars.log({"test/auc": test["auc"], "test/logloss": test["logloss"]}, self.state.step)
        final = test if test is not None else ({"auc": valid["valid_auc"], "logloss": valid["valid_logloss"]}
                                               if valid is not None else {"auc": None, "logloss": None})
        dense_params = sum(p.numel() for p in dict(in_backward_optimizer_filter(self.model.named_parameters())).values())
        metrics = {
            "phase": self.phase,
            "auc": final["auc"],
            "logloss": final["logloss"],
            "valid_auc": valid["valid_auc"] if valid else None,
            "valid_logloss": valid["valid_logloss"] if valid else None,
            "test_auc": test["auc"] if test else None,
            "test_logloss": test["logloss"] if test else None,
            "embedding_params": self.embedding_params,
            "embedding_bytes": self.embedding_bytes,
            "dense_params": dense_params,
            "samples_per_s": self.state.samples / self.state.train_seconds if self.state.train_seconds else None,
            "train_seconds": self.state.train_seconds,
            "steps": self.state.step,
            "epochs": self.state.epoch,
            "samples": self.state.samples,
            "world_size": self.env.world_size,
            "resumed_from_step": self._resumed_from,
            "pipelined_modules": self.num_pipelined_modules,
            "history": self.state.extra["history"],
            "sharding_plan": table_placement(self.model.plan),
            "config": config_to_dict(self.config),
        }
        if self.env.is_main:
            atomic_write_json(self.run_dir / "metrics.json", metrics)
            logger.info("%s done: %d steps, test auc %s, valid auc %s -> %s", self.phase, self.state.step,
                        metrics["test_auc"], metrics["valid_auc"], self.run_dir / "metrics.json")
        self.scalars.close()
        return metrics
