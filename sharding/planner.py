"""Sharders, the sharding planner and ``DistributedModelParallel`` wrapping.

Every ``EmbeddingBagCollection`` / ``EmbeddingCollection`` in the model is sharded by TorchRec with
the optimizer fused into its backward (FBGEMM TBE); everything else is dense and data-parallel.

CPU quirk (docs/torchrec-notes.md#row-wise-on-cpu): TorchRec's base sharder offers row-wise sharding only for CUDA, yet
the fused CPU kernel runs it fine over gloo, so our sharders add the row-wise types on any device.

Example::

    env = init_distributed()
    model = build_model(config.model, manifest, device=env.device)
    dmp = shard_model(model, env, config.sharding, config.optim, config.data.batch_size)
    print(plan_summary(dmp.plan))
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from embdim.errors import ConfigError
from embdim.sharding.config import OptimConfig, ShardingConfig
from embdim.sharding.distributed import DistEnv

logger = logging.getLogger(__name__)

_ROW_WISE_TYPES = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)
_MODEL_PARALLEL_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise")


class _AnyDeviceRowWise:
    """Offers row-wise sharding types on every device, not only CUDA (see module docstring)."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))  # type: ignore[misc]
        return types + [t for t in _ROW_WISE_TYPES if t not in types]


class RowWiseEmbeddingBagCollectionSharder(_AnyDeviceRowWise, EmbeddingBagCollectionSharder):
    """``EmbeddingBagCollectionSharder`` that can shard row-wise on CPU too."""


class RowWiseEmbeddingCollectionSharder(EmbeddingCollectionSharder):
    """``EmbeddingCollectionSharder`` that can shard row-wise on CPU too (mask-aware modules).

    Only plain row-wise: the sharded EmbeddingCollection has no table-row-wise implementation
    ("Sharding not supported table_row_wise" at sharding time), though the planner would pick it.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = [t for t in super().sharding_types(compute_device_type) if t != ShardingType.TABLE_ROW_WISE.value]
        return types + ([ShardingType.ROW_WISE.value] if ShardingType.ROW_WISE.value not in types else [])


COMM_PRECISIONS = ("fp32", "fp16", "bf16")


def get_sharders(comm_precision: str = "fp32") -> list[ModuleSharder[nn.Module]]:
    """TorchRec's default sharders with the EBC / EC ones replaced by the row-wise-capable twins.

    ``comm_precision`` other than fp32 sends the embedding all-to-all / reduce-scatter (forward
    outputs and backward gradients) in half precision through TorchRec's quantized comms codecs:
    half the bytes of the step's largest communication (BENCHMARKS.md, weak scaling).
    """
    if comm_precision not in COMM_PRECISIONS:
        raise ConfigError(f"sharding.comm_precision: unknown {comm_precision!r}; choose from {list(COMM_PRECISIONS)}")
    registry = None
    if comm_precision != "fp32":
        from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry

        kind = CommType.FP16 if comm_precision == "fp16" else CommType.BF16
        registry = get_qcomm_codecs_registry(QCommsConfig(forward_precision=kind, backward_precision=kind))
    ours: list[ModuleSharder[nn.Module]] = [RowWiseEmbeddingBagCollectionSharder(qcomm_codecs_registry=registry),
                                            RowWiseEmbeddingCollectionSharder(qcomm_codecs_registry=registry)]
    replaced = {EmbeddingBagCollection, EmbeddingCollection}
    return ours + [s for s in get_default_sharders() if s.module_type not in replaced]


def embedding_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(fqn, module)`` of every (unsharded) EmbeddingBagCollection / EmbeddingCollection."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))]


def _table_configs(module: nn.Module) -> list[BaseEmbeddingConfig]:
    if isinstance(module, EmbeddingBagCollection):
        return module.embedding_bag_configs()
    return module.embedding_configs()


def build_constraints(model: nn.Module, config: ShardingConfig, device_type: str,
                      world_size: int = 1) -> dict[str, ParameterConstraints]:
    """Per-table ``ParameterConstraints`` from ``[sharding]``: the forced sharding type (unless
    "auto") and the compute kernel. ``data_parallel`` tables use the DENSE kernel, the only one
    TorchRec offers for them. A table with fewer rows than ``world_size`` is never row-wise:
    a rank would hold an empty shard, on which FBGEMM's CPU backward fails ("free(): invalid
    size", or "more than 2B rows"); size plans make such tables (a width group of one id)."""
    if config.compute_kernel == "fused_uvm_caching" and device_type != "cuda":
        raise ConfigError("sharding.compute_kernel: 'fused_uvm_caching' needs CUDA; use 'fused' on CPU")
    if config.sharding_type == ShardingType.DATA_PARALLEL.value:
        kernels = [EmbeddingComputeKernel.DENSE.value]
    else:
        kernels = [config.compute_kernel]
    if config.sharding_type == "auto":
        # The planner chooses among the model-parallel types (data_parallel needs the DENSE
        # kernel; ask for it explicitly).
        sharding_types = [t.value for t in ShardingType if t.value in _MODEL_PARALLEL_TYPES]
    else:
        sharding_types = [config.sharding_type]
    # A module may restrict its own tables (a mask-aware search module needs whole rows on one
    # rank and never replicates its accumulators): it exposes ``sharding_constraints()`` as
    # ``{table_name: allowed sharding types}``, intersected with the configured ones.
    restricted: dict[str, list[str]] = {}
    for module in model.modules():
        if callable(getattr(module, "sharding_constraints", None)):
            restricted.update(module.sharding_constraints())
    constraints = {}
    for _, module in embedding_modules(model):
        for table in _table_configs(module):
            name, rows = table.name, table.num_embeddings
            if config.sharding_type == ShardingType.DATA_PARALLEL.value and table.data_type != DataType.FP32:
                # Replicated tables are plain parameters stepped by torch.optim, whose state takes
                # the parameter's dtype: fp16 Adagrad adds eps=1e-8, which rounds to 0 in fp16, to
                # sqrt(0) for every row without gradient and writes 0/0 = NaN into those rows.
                dtype = table.data_type.value.lower()
                raise ConfigError(f"model.table_dtype: table {name!r} is {dtype}, which needs a model-parallel "
                                  f"sharding type (the fused TBE keeps optimizer state in fp32), not "
                                  f"sharding.sharding_type='data_parallel' (torch.optim would step the replicated "
                                  f"tables in {dtype})")
            if name in constraints:
                raise ValueError(f"embedding table name {name!r} is used twice in the model; table names must be unique")
            types = sharding_types
            if rows < world_size:
                types = [t for t in types if t not in _ROW_WISE_TYPES] or [ShardingType.TABLE_WISE.value]
            if name in restricted:
                types = [t for t in types if t in restricted[name]]
                if not types:
                    raise ConfigError(f"sharding.sharding_type: table {name!r} can only be sharded as "
                                      f"{restricted[name]}, not {sharding_types}")
            constraints[name] = ParameterConstraints(sharding_types=types, compute_kernels=kernels)
    return constraints


def sparse_optimizer(config: OptimConfig, device_type: str) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The optimizer class and kwargs fused into the tables' backward (FBGEMM ``EmbOptimType``
    EXACT_ADAGRAD, EXACT_ROWWISE_ADAGRAD, ADAM, EXACT_SGD)."""
    if config.sparse_optimizer == "adam" and device_type != "cuda":
        # FBGEMM's CPU TBE asserts "Optimizer adam is not supported in CPU mode"; say it up front.
        raise ConfigError("optim.sparse_optimizer: 'adam' needs CUDA (FBGEMM's CPU kernel supports "
                          "adagrad, rowwise_adagrad and sgd)")
    if config.sparse_optimizer == "adagrad":
        return torch.optim.Adagrad, {"lr": config.sparse_lr, "eps": config.eps}
    if config.sparse_optimizer == "rowwise_adagrad":
        return RowWiseAdagrad, {"lr": config.sparse_lr, "eps": config.eps}
    if config.sparse_optimizer == "adam":
        return torch.optim.Adam, {"lr": config.sparse_lr, "eps": config.eps}
    if config.sparse_optimizer == "sgd":
        return torch.optim.SGD, {"lr": config.sparse_lr}
    raise ConfigError(f"optim.sparse_optimizer: unknown {config.sparse_optimizer!r}")


def device_memory(device: torch.device) -> int | None:
    """HBM of the card, for the planner; ``Topology`` otherwise assumes 32 GB per GPU and refuses
    table sets a 141 GB H200 holds easily (measured: Criteo-1TB shape with PME's accumulators)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def plan_model(model: nn.Module, env: DistEnv, sharding: ShardingConfig, batch_size: int) -> ShardingPlan:
    """Runs the planner on rank 0 and broadcasts the plan (``collective_plan``), so every rank
    shards identically. ``batch_size`` is the per-rank training batch (the planner's cost model)."""
    topology = Topology(
        world_size=env.world_size, compute_device=env.device.type, local_world_size=env.local_world_size,
        hbm_cap=device_memory(env.device),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=build_constraints(model, sharding, env.device.type, env.world_size),
        debug=False,
    )
    return planner.collective_plan(model, get_sharders(sharding.comm_precision), env.pg)


def shard_model(model: nn.Module, env: DistEnv, sharding: ShardingConfig, optim: OptimConfig,
                batch_size: int) -> DistributedModelParallel:
    """Fuses the sparse optimizer into the embedding tables, plans and wraps the model in DMP.

    Takes only the settings it needs: the ``[sharding]`` and ``[optim]`` sections and the per-rank
    training batch size (``data.batch_size``), for the planner's cost model.

    The fused optimizer must be attached before DMP (docs/torchrec-notes.md#fused-optimizers): sharded tables have no
    ``.grad``; their update runs inside the backward of the TBE kernel. The result exposes it as
    ``dmp.fused_optimizer``.
    """
    modules = embedding_modules(model)
    if not modules:
        raise ValueError("the model holds no EmbeddingBagCollection or EmbeddingCollection to shard")
    optim_cls, optim_kwargs = sparse_optimizer(optim, env.device.type)
    # Tables that already carry a fused optimizer keep it: a method's auxiliary tables (frozen side
    # features with lr 0, a saliency accumulator with SGD lr 1) set their own, and TorchRec
    # refuses two optimizers on one table ("Only support 1 optimizer").
    params = [p for _, m in modules for p in m.parameters() if not getattr(p, "_optimizer_classes", None)]
    if params:
        apply_optimizer_in_backward(optim_cls, params, optim_kwargs)
    plan = plan_model(model, env, sharding, batch_size)
    return DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(env.pg),
        device=env.device,
        plan=plan,
        sharders=get_sharders(sharding.comm_precision),
    )


def replicated_embedding_params(dmp: DistributedModelParallel) -> dict[str, nn.Parameter]:
    """Parameters of data-parallel tables, keyed by name.

    TorchRec runs those with the DENSE kernel as plain replicated parameters: the fused optimizer
    does not cover them (their ``apply_optimizer_in_backward`` marking is dropped) and DDP
    all-reduces their gradients, so the trainer gives them the sparse optimizer itself.
    """
    tables = {t for t, p in table_placement(dmp.plan).items() if p["sharding_type"] == ShardingType.DATA_PARALLEL.value}
    out = {}
    for name, param in dmp.named_parameters():
        parts = name.split(".")
        if len(parts) >= 3 and parts[-3] in ("embedding_bags", "embeddings") and parts[-2] in tables:
            out[name] = param
    return out


def plan_summary(plan: ShardingPlan) -> str:
    """One line per table: module, sharding type, kernel, and each shard's rank and rows x cols."""
    lines = []
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            shards = []
            if ps.sharding_spec is not None and hasattr(ps.sharding_spec, "shards"):
                for s in ps.sharding_spec.shards:
                    rank = s.placement.rank() if s.placement is not None else "?"
                    (row, col), (rows, cols) = s.shard_offsets[:2], s.shard_sizes[:2]
                    shards.append(f"rank {rank}: rows {row}..{row + rows - 1} cols {col}..{col + cols - 1}")
            else:  # data_parallel: a full replica on every rank
                shards.append("replicated on every rank")
            lines.append(f"{module_path or '<root>'}.{table}: {ps.sharding_type} ({ps.compute_kernel}); " + "; ".join(shards))
    return "\n".join(lines)


def table_placement(plan: ShardingPlan) -> dict[str, dict[str, Any]]:
    """Machine-readable plan: ``{table: {"sharding_type", "compute_kernel", "ranks"}}``."""
    out = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            out[table] = {"sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel, "ranks": ps.ranks}
    return out
