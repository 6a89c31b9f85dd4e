"""The search and retrain phases: ``embdim search`` writes a size plan, ``embdim retrain`` trains
the compact model it describes.

search
    The method's search module stands in for DLRM's EmbeddingBagCollection (its inner collection
    is what DMP shards), its regulariser is added to the loss and its own optimizers step beside
    the dense one. Methods with a closed-form plan (fixed, MDE) skip training. After training the
    method exports a ``SizePlan`` through a ``SearchContext`` (shard-local reads, all-reduce,
    validation passes); if the method can start the retrain from searched weights (MLET's exact
    collapse, OptEmbed's rewind/inherit), those go beside the plan as ``plan_init.pt``.

retrain
    The plan becomes a ``MixedDimEmbeddingBagCollection`` (one table per field or id group, each
    its own width, padded or projected to the common width as the plan's layout says) and an
    ``IdRemapper`` that the data pipeline applies on the host, so the sharded tables stay plain
    TorchRec. ``metrics.json`` gains the
    full-width model's parameter count, and ``compact_embedding.pt`` (a plain state_dict of the
    module, for ``embedding_methods.load_compact_embedding``) is written at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from embdim.embedding_methods import get_method
from embdim.embedding_methods.base import EmbeddingMethod, FieldSpec, TrainingSchedule
from embdim.embedding_methods.mixed_dim import RETRAIN_WEIGHTS, build_retrain_module
from embdim.embedding_methods.plan import LAYOUTS, PlanError, SizePlan, load_plan, resolve_init_checkpoint, save_plan
from embdim.embedding_methods.remap import IdRemapper
from embdim.sharding import state as sharded_state
from embdim.sharding.compact import write_compact_state
from embdim.trainer.checkpoint import load_torch_file
from embdim.errors import ConfigError
from embdim.errors import check as _check
from embdim.trainer.config import Config
from embdim.trainer.data.manifest import Manifest, load_counts, load_manifest
from embdim.sharding.distributed import DistEnv
from embdim.io import atomic_path, atomic_write_json
from embdim.trainer.loop import Trainer
from embdim.trainer.model import table_data_type

logger = logging.getLogger(__name__)

INIT_FILE = "plan_init.pt"
INITIAL_FILE = "search_step0.pt"


@dataclass
class SearchConfig:
    budget: float = 1.0
    """Target fraction of the full-width embedding parameters, in (0, 1]; 1 = no budget."""
    init_from: str = ""
    """Checkpoint folder (RUN_DIR/ckpt/step_N or RUN_DIR) of a trained baseline to warm-start the
    search from (methods that support it, e.g. AMTL); empty = train from scratch."""
    layout: str = "auto"
    """How the compact model brings a group narrower than D to width D: "pad" (its values then
    zeros; stores nothing beyond the tables, the papers' models), "project" (a learned w -> D
    projection per group, MDE's layout, counted in the budget), or "auto" = the method's own
    ("project" for mde, "pad" for every other method). Chosen at search time because the budget
    counts what the layout stores; recorded in plan.json."""

    def __post_init__(self) -> None:
        _check(0.0 < self.budget <= 1.0, "search.budget", f"must be in (0, 1], got {self.budget}")
        _check(self.layout in ("auto", *LAYOUTS), "search.layout",
               f"unknown {self.layout!r}; choose from {['auto', *LAYOUTS]}")


@dataclass
class RetrainConfig:
    init: str = "plan"
    """Start values of the compact tables: "plan" = the weights the search left beside the plan
    (MLET's collapsed tables, OptEmbed's rewound/inherited rows) when there are any, else fresh;
    "fresh" = always a fresh initialisation."""

    epochs: int = -1
    """Training epochs of the retrain: -1 = the method's default (``train.epochs``; 0 for MLET when
    it starts from its exact collapse, which is the paper's final model), 0 = only evaluate the
    start weights, N > 0 = N epochs."""

    def __post_init__(self) -> None:
        _check(self.init in ("plan", "fresh"), "retrain.init", f"unknown {self.init!r}; choose from ['plan', 'fresh']")
        _check(self.epochs >= -1, "retrain.epochs", f"must be -1 (method default), 0 or positive, got {self.epochs}")


def _run_config_class() -> type:
    """``Config`` plus the search/retrain sections and one section per registered method, typed by
    the method's ``Config`` and named by it: generated from the method registry, so a new method's
    section exists as soon as its class does."""
    from embdim.embedding_methods import METHODS

    sections = [("search", SearchConfig, field(default_factory=SearchConfig)),
                ("retrain", RetrainConfig, field(default_factory=RetrainConfig))]
    sections += [(name, cls.Config, field(default_factory=cls.Config)) for name, cls in METHODS.items()]
    cls = dataclasses.make_dataclass("RunConfig", sections, bases=(Config,))
    cls.__module__ = __name__
    cls.__doc__ = ("``Config`` plus the search/retrain sections and one section per method (typed by the "
                   "method's ``Config``; generated from ``embedding_methods.METHODS``).")
    return cls


RunConfig = _run_config_class()


def field_specs(manifest: Manifest) -> list[FieldSpec]:
    return [FieldSpec(name=f.name, num_embeddings=f.num_embeddings, multi_hot=f.multi_hot) for f in manifest.sparse]


def build_method(config: RunConfig, method_name: str, manifest: Manifest) -> EmbeddingMethod:
    """The method named on the command line, configured by its TOML section."""
    method_cls = get_method(method_name)
    method_config = getattr(config, method_cls.name)
    has_budget = "budget" in {f.name for f in dataclasses.fields(method_config)}
    unset = has_budget and not 0.0 < method_config.budget < 1.0
    if unset and config.search.budget < 1.0:
        # Methods whose search model depends on the budget (MLET's retrain width) read it from
        # their own section; --budget fills it when the section leaves it unset.
        method_config = dataclasses.replace(method_config, budget=config.search.budget)
    layout = None if config.search.layout == "auto" else config.search.layout
    return method_cls(method_config, field_specs(manifest), config.model.embedding_dim, layout=layout)


class TrainerSearchContext:
    """``embedding_methods.base.SearchContext`` over a sharded ``Trainer``."""

    def __init__(self, trainer: Trainer | None, manifest: Manifest, dataset_dir: Path, budget: float,
                 embedding_dim: int) -> None:
        self.trainer = trainer
        self.budget = budget
        self.embedding_dim = embedding_dim
        self.fields = field_specs(manifest)
        self.dataset_dir = dataset_dir

    def _model(self) -> nn.Module:
        if self.trainer is None:
            raise RuntimeError("this method's plan is closed-form; it has no sharded model to read")
        return self.trainer.model

    def local_rows(self, table_name: str) -> Iterator[tuple[int, torch.Tensor]]:
        model = self._model()
        # A replicated (data-parallel) table is whole on every rank: yield it from rank 0 only so
        # that each element comes from exactly one rank (callers sum over ranks).
        if sharded_state.is_replicated(model, table_name) and self.trainer.env.rank != 0:
            return
        for row, col, block in sharded_state.local_shards(model, table_name):
            if col != 0 or block.shape[1] != sharded_state.table_shape(model, table_name)[1]:
                raise ValueError(f"table {table_name!r} is column-wise sharded; per-row search state needs whole "
                                 f"rows on one rank: set sharding.sharding_type to table_wise or row_wise")
            rows = min(block.shape[0], sharded_state.table_shape(model, table_name)[0] - row)
            yield row, block[:rows]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return sharded_state.all_reduce_sum(tensor)

    def gather_table_rows(self, table_name: str) -> torch.Tensor:
        return sharded_state.gather_table(self._model(), table_name)

    def evaluate(self, score_fn: Callable[[Any], None]) -> None:
        if self.trainer is None:
            raise RuntimeError("this method's plan is closed-form; it has no model to evaluate")
        self.trainer.evaluate_with(score_fn)

    def counts(self, field_name: str) -> np.ndarray:
        return load_counts(self.dataset_dir, field_name)

    def load_tables(self, path: Path, key_map: dict[str, str]) -> dict[str, str]:
        return sharded_state.load_checkpoint_tables(self._model(), path, key_map)


def unsharded_search_module(trainer: Trainer, method: EmbeddingMethod) -> nn.Module:
    """A CPU copy of the trained search module with every table gathered (collective).

    Methods turn it into retrain start values (MLET's collapse, OptEmbed's kept rows). Gathering
    holds whole tables on every rank: fine up to a few GiB of tables; larger runs should collapse
    shard by shard (``embedding_methods.mlet.collapse_shard``) instead.
    """
    tables = method.search_tables()
    clone = method.build_search_module(EmbeddingBagCollection(tables=tables, device=torch.device("cpu")))
    clone_params = dict(clone.named_parameters())
    live = dict(trainer.sparse_module.named_parameters())
    gathered: set[str] = set()
    with torch.no_grad():
        # Every sharded table of the search module (EBC tables, and a mask-aware module's
        # unpooled, side and accumulator tables) is gathered whole; the rest is replicated.
        for table in sharded_state.table_keys(trainer.model):
            names = [n for n in clone_params
                     if n.endswith((f"embedding_bags.{table}.weight", f"embeddings.{table}.weight"))
                     and n.split(".")[-2] == table]
            if len(names) != 1:
                continue  # a table of the DLRM outside the search module
            clone_params[names[0]].copy_(sharded_state.gather_table(trainer.model, table).cpu())
            gathered.add(names[0])
        for name, param in clone_params.items():
            if name in gathered:
                continue
            if name not in live:
                raise RuntimeError(f"search module parameter {name!r} not found in the sharded model")
            param.copy_(live[name].detach().cpu())
    return clone


def load_dense_from_checkpoint(trainer: Trainer, path: Path, key: str = "search.init_from") -> list[str]:
    """Loads the dense arches (everything outside DLRM's sparse arch) of a trained baseline's
    checkpoint into the search model, so a warm-started search starts as the baseline. The method
    loads the tables itself (it knows how they map). Collective; returns the keys loaded."""
    import torch.distributed.checkpoint as dcp

    path = sharded_state.resolve_checkpoint(path)
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    dense = {f"model.{k}": v for k, v in trainer.model.state_dict().items()
             if ".sparse_arch." not in k and isinstance(v, torch.Tensor) and f"model.{k}" in saved}
    if not dense:
        raise ConfigError(f"{key}: {path} holds no dense parameters of this model")
    dcp.load(dense, checkpoint_id=str(path))
    logger.info("warm start: loaded %d dense tensors from %s", len(dense), path)
    return sorted(dense)


def training_schedule(config: Config, manifest: Manifest, env: DistEnv) -> TrainingSchedule:
    """The search's training steps, from ``dataset.json`` before any reader exists (the train
    reader drops the last partial batch when it shuffles)."""
    from embdim.trainer.data.reader import num_batches_per_rank  # pyarrow only where it is needed

    steps = num_batches_per_rank(manifest.splits["train"].num_rows, env.world_size, config.data.batch_size,
                                 drop_last=config.data.shuffle)
    valid = manifest.splits.get("valid")
    return TrainingSchedule(steps_per_epoch=steps, epochs=config.train.epochs, max_steps=config.train.max_steps,
                            world_size=env.world_size, batch_size=config.data.batch_size,
                            valid_rows=valid.num_rows if valid is not None else 0)


def _barrier(env: DistEnv) -> None:
    if env.world_size > 1 and dist.is_initialized():
        dist.barrier()


def run_search(config: RunConfig, dataset_dir: str | Path, run_dir: str | Path, method_name: str,
               env: DistEnv) -> dict[str, Any]:
    """Runs a method's search phase and writes ``RUN_DIR/plan.json`` (plus ``metrics.json`` when
    the method trains a search model). Collective. Returns a summary dict."""
    dataset_dir, run_dir = Path(dataset_dir), Path(run_dir)
    manifest = load_manifest(dataset_dir)
    method = build_method(config, method_name, manifest)
    budget = config.search.budget
    # Before any training: an unreachable budget fails naming the floor, and settings that count
    # training steps adapt to the steps this data gives (or fail naming the setting).
    method.check_budget(budget)
    if method.requires_search_training:
        for note in method.fit_schedule(training_schedule(config, manifest, env)):
            logger.warning("%s", note)
    plan_path = run_dir / "plan.json"
    metrics: dict[str, Any] = {}
    if not method.requires_search_training:
        context = TrainerSearchContext(None, manifest, dataset_dir, budget, config.model.embedding_dim)
        plan = method.export_plan(None, context)
        init_state = None
    else:
        if config.search.init_from and not method.supports_warm_start:
            raise ConfigError(f"search.init_from: method {method.name!r} has no warm start")
        search_tables = method.search_tables()
        trainer = Trainer(
            config, dataset_dir, run_dir, env=env,
            sparse_module_factory=lambda _tables: method.build_search_module(
                EmbeddingBagCollection(tables=search_tables, device=torch.device("meta"))),
            aux_loss_fn=method.search_loss,
            extra_optimizers=method.extra_optimizers,
            excluded_dense_params=method.extra_parameters,
            phase="search",
        )
        resumed = trainer.resume() is not None
        context = TrainerSearchContext(trainer, manifest, dataset_dir, budget, config.model.embedding_dim)
        if config.search.init_from and not resumed:
            method.warm_start(trainer.sparse_module, context, Path(config.search.init_from))
            load_dense_from_checkpoint(trainer, Path(config.search.init_from))
        # Per-id side tables (frequency features) and zeroed accumulators, written shard by shard
        # into the live sharded tables.
        method.init_search_state(trainer.sparse_module, context)
        required = method.required_search_steps
        if required and config.train.max_steps and config.train.max_steps < required:
            raise ConfigError(f"train.max_steps: {method.name} needs at least {required} search steps "
                              f"(warmup + saliency batches), got {config.train.max_steps}")
        initial = None
        if method.wants_retrain_init() and method.needs_initial_checkpoint:
            # Step-0 weights for a lottery-ticket rewind, kept beside the run so that a resumed
            # search still rewinds to them.
            initial_path = run_dir / INITIAL_FILE
            if not resumed:
                initial = unsharded_search_module(trainer, method)
                if env.is_main:
                    with atomic_path(initial_path) as tmp:
                        torch.save(initial.state_dict(), tmp)
            elif initial_path.exists():
                initial = method.build_search_module(EmbeddingBagCollection(tables=search_tables,
                                                                            device=torch.device("cpu")))
                initial.load_state_dict(load_torch_file(initial_path, "the search's step-0 weights"))
            else:
                logger.warning("resumed search: %s is missing; the retrain starts from the searched weights "
                               "instead of the step-0 ones", initial_path)
        metrics = trainer.fit()
        method.bind_model(trainer.model)
        plan = method.export_plan(trainer.sparse_module, context)
        init_state = None
        if method.wants_retrain_init():
            final = unsharded_search_module(trainer, method)
            init_state = method.retrain_init_state(final, initial if initial is not None else final, plan)
    method.record_adaptations(plan)
    if init_state is not None:
        plan = dataclasses.replace(plan, init_checkpoint=INIT_FILE)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if init_state is not None:
            with atomic_path(run_dir / INIT_FILE) as tmp:
                torch.save({k: v.detach().cpu() for k, v in init_state.items()}, tmp)
        save_plan(plan, plan_path)
        summary = {"plan": str(plan_path), "method": plan.method, "budget": budget,
                   "embedding_params": plan.num_params(), "full_embedding_params": plan.full_params(),
                   "achieved_fraction": plan.achieved_fraction()}
        if metrics:
            metrics.update({f"plan_{k}": v for k, v in summary.items() if k != "plan"})
            atomic_write_json(run_dir / "metrics.json", metrics)
        logger.info("search done: %s params %d of %d (%.4f of full width, budget %s) -> %s", plan.method,
                    plan.num_params(), plan.full_params(), plan.achieved_fraction(), budget, plan_path)
    _barrier(env)
    return {"plan": str(plan_path), "achieved_fraction": plan.achieved_fraction(), **metrics}


def _check_plan_matches(plan: SizePlan, manifest: Manifest, plan_path: Path, dataset_dir: Path) -> None:
    names = [f.name for f in plan.fields]
    if names != manifest.sparse_names:
        raise PlanError(f"{plan_path}: fields {names} do not match {dataset_dir}/dataset.json fields "
                        f"{manifest.sparse_names}")
    for f in plan.fields:
        expected = manifest.field(f.name).num_embeddings
        if f.num_embeddings != expected:
            raise PlanError(f"{plan_path}: field {f.name!r} has num_embeddings {f.num_embeddings}, the dataset "
                            f"has {expected}")


def run_retrain(config: RunConfig, dataset_dir: str | Path, plan_path: str | Path, out_dir: str | Path,
                env: DistEnv) -> dict[str, Any]:
    """Trains the compact model of a size plan; writes ``metrics.json`` and ``compact_embedding.pt``."""
    dataset_dir, plan_path, out_dir = Path(dataset_dir), Path(plan_path), Path(out_dir)
    if plan_path.is_dir():
        plan_path = plan_path / "plan.json"
    manifest = load_manifest(dataset_dir)
    plan = load_plan(plan_path)
    _check_plan_matches(plan, manifest, plan_path, dataset_dir)
    if plan.embedding_dim != config.model.embedding_dim:
        raise ConfigError(f"model.embedding_dim: {config.model.embedding_dim} differs from the plan's common width "
                          f"{plan.embedding_dim} ({plan_path}); set --set model.embedding_dim={plan.embedding_dim}")
    remapper = IdRemapper(plan, cache_dir=out_dir / "remap_cache")
    trainer = Trainer(config, dataset_dir, out_dir, env=env,
                      sparse_module_factory=lambda _tables: build_retrain_module(
                          plan, device="meta", data_type=table_data_type(config.model.table_dtype)),
                      feature_transform=remapper, phase="retrain")
    init = resolve_init_checkpoint(plan, plan_path)
    from_plan = config.retrain.init == "plan" and init is not None
    if from_plan and trainer.resume() is None:
        state = load_torch_file(init, "the plan's retrain start weights; set retrain.init=\"fresh\" to go without")
        write_compact_state(trainer.sparse_module, state, init)
        logger.info("retrain starts from %s", init)
        if _continues_search(plan.method):
            # The compact tables compute what the trained search model computed; they belong with
            # its trained dense arches, not fresh ones (else "evaluate the collapse" is meaningless).
            search_dir = plan_path.parent
            if not (search_dir / "ckpt" / "latest").exists():
                raise PlanError(f"{plan_path}: {plan.method} continues the search model, whose dense arches are "
                                f"read from {search_dir / 'ckpt'}, which is missing; set retrain.init=\"fresh\" "
                                f"to train a fresh compact model instead")
            load_dense_from_checkpoint(trainer, search_dir, key="retrain.init")
    epochs = retrain_epochs(config, plan.method, from_plan)
    metrics = trainer.fit(epochs=epochs)
    compact = compact_state_dict(trainer)
    full = plan.full_params()
    metrics.update({
        "method": plan.method, "budget": plan.budget, "plan": str(plan_path),
        "full_embedding_params": full,
        "embedding_fraction": metrics["embedding_params"] / full if full else None,
        "compression_ratio": full / metrics["embedding_params"] if metrics["embedding_params"] else None,
    })
    if env.is_main:
        with atomic_path(out_dir / RETRAIN_WEIGHTS.name) as tmp:
            torch.save(compact, tmp)
        atomic_write_json(out_dir / "metrics.json", metrics)
    _barrier(env)
    return metrics


def retrain_epochs(config: RunConfig, method_name: str, from_plan: bool) -> int:
    """The retrain's epoch count: ``retrain.epochs`` when set, else 0 for a method whose plan
    weights are already the trained compact model (and are used), else ``train.epochs``."""
    if config.retrain.epochs >= 0:
        return config.retrain.epochs
    return 0 if from_plan and _continues_search(method_name) else config.train.epochs


def _continues_search(method_name: str) -> bool:
    from embdim.embedding_methods import METHODS

    method_cls = METHODS.get(method_name)
    return method_cls is not None and method_cls.search_trains_compact_model


def compact_state_dict(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The retrained module's full state_dict on CPU: sharded tables gathered (collective)."""
    module = trainer.sparse_module
    state: dict[str, torch.Tensor] = {}
    for config in module.inner_configs():
        state[f"ebc.embedding_bags.{config.name}.weight"] = sharded_state.gather_table(trainer.model, config.name).cpu()
    for name, param in module.named_parameters():
        if not name.startswith("ebc."):
            state[name] = param.detach().cpu().clone()
    for name, buf in module.named_buffers():
        if not name.startswith("ebc."):
            state[name] = buf.detach().cpu().clone()
    return state


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text())
