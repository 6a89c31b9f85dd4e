"""Run configuration: nested dataclasses loaded from TOML, with ``--set section.key=value`` overrides.

Every section is a dataclass; every field has a default so ``embdim train --data DIR`` works
without a file. Unknown sections or keys and values of the wrong type raise ``ConfigError``
naming the file and the key. Each section validates itself in ``__post_init__``.

Example TOML::

    [data]
    batch_size = 2048

    [model]
    embedding_dim = 16
    dense_arch_layer_sizes = [64, 16]
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: tomli is the same parser (3.11 vendored it as tomllib); setup.py requires it there
    import tomli as tomllib

from embdim.errors import ConfigError
from embdim.errors import check as _check
from embdim.sharding.config import (  # noqa: F401 (re-exported: the [optim] and [sharding] sections)
    DENSE_OPTIMIZERS,
    SHARDING_TYPES,
    SPARSE_OPTIMIZERS,
    OptimConfig,
    ShardingConfig,
)

INTERACTIONS = ("dot", "dcn")
TABLE_DTYPES = ("fp32", "fp16")


@dataclass
class DataConfig:
    batch_size: int = 1024
    """Training rows per rank per step (the global batch is batch_size * world_size)."""
    eval_batch_size: int = 4096
    """Rows per rank per evaluation step."""
    num_workers: int = 0
    """DataLoader worker processes per rank decoding Parquet (0 = decode in the training process)."""
    shuffle: bool = True
    """Shuffle row groups and rows within each row group, by seed and epoch."""
    pin_memory: bool = False
    """Pin host batches (only useful on GPU)."""

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "data.batch_size", f"must be positive, got {self.batch_size}")
        _check(self.eval_batch_size > 0, "data.eval_batch_size", f"must be positive, got {self.eval_batch_size}")
        _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")


@dataclass
class ModelConfig:
    embedding_dim: int = 16
    """Full (common) embedding width of every table; a multiple of 4 (FBGEMM TBE requirement)."""
    dense_arch_layer_sizes: list[int] = field(default_factory=lambda: [64, 16])
    """Bottom MLP widths; the last must equal embedding_dim (DLRM's dot interaction)."""
    over_arch_layer_sizes: list[int] = field(default_factory=lambda: [64, 32, 1])
    """Top MLP widths; the last must be 1 (one logit)."""
    interaction: str = "dot"
    """Feature interaction: "dot" (torchrec DLRM) or "dcn" (torchrec DLRM_DCN)."""
    dcn_num_layers: int = 2
    """Cross layers of the DCN interaction."""
    dcn_low_rank_dim: int = 32
    """Low-rank width of each DCN cross layer."""
    table_dtype: str = "fp32"
    """Storage precision of the embedding tables: "fp32", or "fp16" (TorchRec's
    ``EmbeddingBagConfig.data_type``: FBGEMM's TBE stores half-precision weights, half the bytes,
    pools them in fp32 and rounds each updated row back to fp16: to nearest on CPU, stochastically
    on CUDA). Applies to the full-width tables of ``train`` and the compact tables of ``retrain``;
    search modules keep fp32 tables. The fused optimizer's state, projections and MLPs stay fp32,
    budgets stay in parameters. Needs a model-parallel ``sharding.sharding_type`` (not
    "data_parallel", whose replicated tables torch.optim would step in fp16)."""

    def __post_init__(self) -> None:
        _check(self.embedding_dim > 0 and self.embedding_dim % 4 == 0, "model.embedding_dim",
               f"must be a positive multiple of 4 (FBGEMM TBE), got {self.embedding_dim}")
        _check(len(self.dense_arch_layer_sizes) > 0 and self.dense_arch_layer_sizes[-1] == self.embedding_dim,
               "model.dense_arch_layer_sizes",
               f"last width must equal model.embedding_dim={self.embedding_dim}, got {self.dense_arch_layer_sizes}")
        _check(len(self.over_arch_layer_sizes) > 0 and self.over_arch_layer_sizes[-1] == 1,
               "model.over_arch_layer_sizes", f"last width must be 1, got {self.over_arch_layer_sizes}")
        _check(self.interaction in INTERACTIONS, "model.interaction",
               f"unknown {self.interaction!r}; choose from {list(INTERACTIONS)}")
        _check(self.dcn_num_layers > 0 and self.dcn_low_rank_dim > 0, "model.dcn_num_layers",
               "dcn_num_layers and dcn_low_rank_dim must be positive")
        _check(self.table_dtype in TABLE_DTYPES, "model.table_dtype",
               f"unknown {self.table_dtype!r}; choose from {list(TABLE_DTYPES)}")


@dataclass
class TrainConfig:
    epochs: int = 1
    """Passes over the training split."""
    max_steps: int = 0
    """Stop after this many steps in total (0 = no limit)."""
    seed: int = 0
    """Seed of model initialisation and data shuffling."""
    log_every: int = 50
    """Log loss, AUC and samples/s every this many steps (rank 0)."""
    eval_every: int = 0
    """Evaluate on the validation split every this many steps (0 = at the end of each epoch only)."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps (0 = only at the end)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to RUN_DIR/tensorboard."""
    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0."""
    keep_checkpoints: int = 2
    """Checkpoints kept in RUN_DIR/ckpt; older ones are deleted after each save (0 = keep all)."""
    pipeline: bool = True
    """Train with TorchRec's TrainPipelineSparseDist (input dist of the next batch overlaps this
    batch's compute); false runs a plain forward/backward/step loop."""
    fail_at_step: int = -1
    """Fault injection for tests: rank fail_rank raises right after finishing this step (and its
    checkpoint), when the run started below it (-1 = never). It fires only in the first attempt of a
    torchrun job, i.e. when TORCHELASTIC_RESTART_COUNT (set by torchrun in its workers) is unset or
    0: a worker group that ``--max-restarts`` restarts resumes from the last checkpoint and runs
    past the step, as after a real transient fault, also when the fault came before any checkpoint.
    A manual rerun is a new job (count 0 again): it fires again unless it resumes past the step or
    sets -1."""
    fail_rank: int = 0
    """Rank that raises at fail_at_step."""
    sample_log: bool = False
    """Debugging / tests: append, per rank and optimizer step, the training rows that step consumed
    (file, row group, row indices) to RUN_DIR/sample_log/ (one JSON line per step, plus each
    epoch's rows that the reader skips), so that ``trainer.sample_log.reconcile_sample_log`` can prove
    every row was trained on exactly once per epoch across faults, restarts and resumes. Costs a
    few bytes per row and step; off by default."""

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "train.epochs", f"must be positive, got {self.epochs}")
        for key in ("max_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
            _check(getattr(self, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(self, key)}")
        _check(self.fail_at_step == -1 or self.fail_at_step > 0, "train.fail_at_step",
               f"must be -1 (never) or a positive step, got {self.fail_at_step}")
        _check(self.fail_rank >= 0, "train.fail_rank", f"must be >= 0, got {self.fail_rank}")


@dataclass
class Config:
    """The whole run configuration; one attribute per TOML section."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Checks ``value`` against a field annotation (int, float, bool, str, list[...])."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key} has an unsupported type {annotation!r}")


def _build_section(cls: type, table: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {[f'{prefix}{k}' for k in unknown]}; "
                          f"[{prefix.rstrip('.')}] accepts {sorted(names)}")
    kwargs = {}
    for name, value in table.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {prefix}{name} must be a table, got {value!r}")
            kwargs[name] = _build_section(annotation, value, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(value, annotation, f"{prefix}{name}", source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:  # TOML literal syntax: 3, 0.5, true, "adam", [64, 16]
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string: --set optim.dense_optimizer=adam
    return path, value


def merge_overrides(table: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies ``section.key=value`` overrides on top of a parsed TOML table."""
    for text in overrides:
        path, value = _parse_override(text)
        node = table
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
        node[path[-1]] = value
    return table


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    cls: type = Config,
) -> Any:
    """Loads ``cls`` from a TOML file (optional) plus ``--set`` overrides.

    Raises ConfigError naming the file or override and the key for unknown keys, wrong types
    and failed validation.
    """
    table: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            table = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    if overrides:
        source = f"{source} + --set overrides" if path is not None else "--set overrides"
        table = merge_overrides(table, list(overrides))
    return _build_section(cls, table, "", source)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain-dict view of a config (for metrics.json and checkpoints)."""
    return dataclasses.asdict(config)
