"""Training step throughput and peak memory of every phase, side by side with plain TorchRec.

One command per machine. For each rank count it starts ``torchrun`` once; every rank then builds,
in turn, each model variant on the same tables and sharding, and times training steps at each
batch size on in-memory batches (the same batches for every variant):

- ``plain``: TorchRec alone (``DLRMTrain(DLRM(EmbeddingBagCollection))``, fused optimizer in
  backward, ``DistributedModelParallel``, ``TrainPipelineSparseDist``), written here without any
  embdim code: the reference.
- ``plain_d<W>``: the same plain TorchRec model with every table (and the bottom MLP's output) W
  wide instead of ``--dim``: the ceiling any compact model of that compression can reach, as it
  also shrinks the dense interaction (a compact model keeps it at ``--dim`` to stand in for the EBC).
- ``plain_cap<N>``: plain TorchRec with every table capped at N rows (ids folded modulo N on the
  host, as a hashed production model would): the full-width model that fits the memory a compact
  model of all the rows takes (Criteo-1TB on one GPU).
- ``ebc`` / ``ebc_d<W>``: the sharded EmbeddingBagCollection alone (fused optimizer, all-to-all,
  no dense arch; loss = mean of the pooled outputs): the embedding-bound share of ``plain``'s step.
- ``ebc_compact_<method>``: the retrained compact module of ``compact_<method>`` alone in the EBC's
  place (same trivial loss): the stand-in's own throughput in the embedding-bound regime.
- ``full``: embdim's full-width baseline (``trainer.loop.Trainer``, as ``embdim train`` builds it).
- ``full_parquet``: the same model fed by the trainer's Parquet reader (``--loader-workers``
  processes per rank) from the on-disk synthetic dataset instead of memory: the streaming cost.
- ``search_<method>``: the method's search model as ``embdim search`` builds it (OptEmbed supernet,
  MLET factorized tables, AMTL / PME mask-aware collection with its side tables).
- ``compact_<method>``: the retrained compact model of a plan at ``--budget`` as ``embdim retrain``
  builds it: ``fixed`` (closed form, one width per field) and ``pme`` (per-id groups; the plan is
  exported from the ``search_pme`` model of the same run, so ``search_pme`` must come first).
  Per-id plans remap ids on the host (in the loader); that cost is measured separately per batch
  (``remap_ms``) and is not in the step time, as loader work overlaps training.
  ``compact_<method>_pad`` / ``compact_<method>_project`` (and ``ebc_compact_<method>_<layout>``):
  the same plan (same tables and ids) in the named layout, so pad and project are timed on
  identical tables; without the suffix the method's own layout (``search.layout``).

A ``_notriton`` suffix runs a variant with embdim's Triton kernels off (``EMBDIM_TRITON=0``:
the torch formulas they replace), to time both in one run.

Any variant but the ``search_*`` ones takes a ``_fp16`` suffix: its tables store fp16 weights
(``model.table_dtype = "fp16"``; for ``plain*``, TorchRec's ``DataType.FP16``).

The batches are single-hot unless ``--multi-hot-fields K``: then the last K fields carry bags of
``1 + Poisson(--multi-hot-mean - 1)`` ids.

The batches are generated once per rank: ids drawn per field from the same bounded power law as
``embdim data synth`` (Zipf, exponent 1.1), so the lookups hit a realistic skew. Step time is the
mean over ``--steps`` pipelined steps after ``--warmup`` steps, between CUDA synchronisations;
samples/s is global (batch per rank x ranks / step time); peak memory is the largest
``max_memory_allocated`` over the ranks during the timed steps (tables, optimizer state and
activations). ``emb GB/s`` estimates the embedding traffic per rank: every looked-up row is read
in forward and read and written by the fused optimizer in backward (3 x ids x width x 4 bytes),
over the step time; ``copy GB/s`` is the card's measured device-to-device copy rate (read +
write bytes of a 2 GiB ``copy_``), the ceiling for that traffic.

Usage::

    python -m bench.bench_gpu --ranks 1,2,4 --rows-per-table 2000000 --dim 128 \\
        --batch-sizes 8192,65536,131072 --shardings table_wise,row_wise --out /tmp/bench_gpu

Prints one markdown table (and ratios to ``plain`` in the same run); full results in
``OUT/results.jsonl`` and ``OUT/bench_gpu.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

DEFAULT_VARIANTS = ("plain", "full", "search_optembed", "search_mlet", "search_amtl", "search_pme",
                    "compact_fixed", "compact_pme")
ZIPF_EXPONENT = 1.1
NUM_DISTINCT_BATCHES = 4
"""Distinct batches per rank and batch size, cycled (enough that no step re-reads the previous one)."""


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="1", help="comma-separated rank counts (one torchrun each)")
    p.add_argument("--rows-per-table", type=int, default=1_000_000, help="rows of each of the 26 tables")
    p.add_argument("--cardinalities", default="", help="comma-separated rows per table (overrides "
                   "--rows-per-table; 'criteo-1tb' = the Criteo 1TB table sizes)")
    p.add_argument("--cardinality-cap", type=int, default=0, help="cap on rows per table (0 = none)")
    p.add_argument("--dim", type=int, default=128, help="full embedding width D")
    p.add_argument("--batch-sizes", default="8192,65536", help="comma-separated batch sizes per rank")
    p.add_argument("--shardings", default="table_wise", help="comma-separated sharding types")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated, in order")
    p.add_argument("--budget", type=float, default=0.25, help="budget of the compact plans and of search")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skeleton-rows", type=int, default=40_000,
                   help="rows of the on-disk dataset (its manifest and counts matter, and the rows feed "
                        "the full_parquet variant: give it enough for warmup + steps batches)")
    p.add_argument("--loader-workers", type=int, default=4, help="Parquet loader processes per rank (full_parquet)")
    p.add_argument("--multi-hot-fields", type=int, default=0, help="the last K fields are multi-hot")
    p.add_argument("--multi-hot-mean", type=float, default=8.0, help="mean ids per multi-hot bag")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--out", default="/tmp/embdim_bench_gpu")
    p.add_argument("--render", nargs="+", metavar="RESULTS_JSONL",
                   help="only print the tables of existing results.jsonl files (no run)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for variant in args.variants.split(","):
        try:
            variant_width(variant, args.dim)
            if variant.startswith("search_") and split_variant(variant)[1]:
                raise ValueError(f"{variant}: search variants take no _fp16 suffix")
        except ValueError as e:
            p.error(f"--variants: {e}")
    if not 0 <= args.multi_hot_fields <= 26 or args.multi_hot_mean < 1:
        p.error("--multi-hot-fields must be in [0, 26] and --multi-hot-mean at least 1")
    return args


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


# ---------------------------------------------------------------------------- data
def _cardinalities(args: argparse.Namespace) -> list[int]:
    from embdim.trainer.data.synth import CRITEO_1TB_CARDINALITIES

    if args.cardinalities == "criteo-1tb":
        cards = list(CRITEO_1TB_CARDINALITIES)
    elif args.cardinalities:
        cards = _ints(args.cardinalities)
    else:
        cards = [args.rows_per_table] * 26
    if args.cardinality_cap:
        cards = [min(c, args.cardinality_cap) for c in cards]
    return cards


def ensure_dataset(args: argparse.Namespace) -> Path:
    """A small on-disk dataset whose manifest has the benchmark's tables (the trainer needs one;
    its rows only feed the trainer's unused reader and AMTL's frequency counts)."""
    from embdim.trainer.data.synth import generate_synthetic

    data = Path(args.out) / "data"
    if not (data / "dataset.json").exists():
        generate_synthetic(data, num_rows=args.skeleton_rows, cardinalities=_cardinalities(args), progress=False)
    return data


def make_features(manifest: Any, batch_size: int, seed: int, multi_hot_fields: int = 0,
                  multi_hot_mean: float = 1.0) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """One batch on the host: ``(features, dense, labels)`` in the reader's ``FeatureDict`` form;
    the last ``multi_hot_fields`` fields get bags of ``1 + Poisson(multi_hot_mean - 1)`` ids."""
    from embdim.trainer.data.synth import zipf_ids

    rng = np.random.default_rng(seed)
    features = {}
    first_multi = len(manifest.sparse) - multi_hot_fields
    for j, f in enumerate(manifest.sparse):
        lengths = np.ones(batch_size, np.int32)
        if j >= first_multi:
            lengths += rng.poisson(multi_hot_mean - 1, size=batch_size).astype(np.int32)
        ids = zipf_ids(rng.random(int(lengths.sum())), max(1, f.num_embeddings - 1), ZIPF_EXPONENT)
        features[f.name] = (ids, lengths)
    dense = rng.standard_normal((batch_size, len(manifest.dense) or 1)).astype(np.float32)
    labels = (rng.random(batch_size) < 0.25).astype(np.float32)
    return features, dense, labels


def to_batch(features: dict[str, tuple[np.ndarray, np.ndarray]], dense: np.ndarray, labels: np.ndarray) -> Any:
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    keys = list(features)
    kjt = KeyedJaggedTensor(keys=keys,
                            values=torch.from_numpy(np.concatenate([features[k][0] for k in keys])),
                            lengths=torch.from_numpy(np.concatenate([features[k][1] for k in keys])))
    batch = Batch(dense_features=torch.from_numpy(dense), sparse_features=kjt, labels=torch.from_numpy(labels))
    return batch.pin_memory() if torch.cuda.is_available() else batch


# ---------------------------------------------------------------------------- models
def split_variant(variant: str) -> tuple[str, bool]:
    """``(variant without its _notriton and _fp16 suffixes, whether it has _fp16)``."""
    variant = variant.removesuffix("_notriton")
    return (variant[:-5], True) if variant.endswith("_fp16") else (variant, False)


def _config(args: argparse.Namespace, sharding: str, variant: str) -> Any:
    """The run config of one variant (at ``variant_width``, fp16 tables for ``*_fp16``) under one sharding type."""
    from embdim.trainer.config import load_config
    from embdim.trainer.phases import RunConfig

    d = variant_width(variant, args.dim)
    sets = [f"model.embedding_dim={d}", f"model.dense_arch_layer_sizes=[512, 256, {d}]",
            "model.over_arch_layer_sizes=[512, 256, 1]", f"sharding.sharding_type={sharding}",
            "data.batch_size=64", "data.num_workers=0", "train.progress_bar=false", f"search.budget={args.budget}",
            *args.set]
    if split_variant(variant)[1]:
        sets.append('model.table_dtype="fp16"')
    return load_config(None, sets, cls=RunConfig)


def plain_cap(variant: str) -> int:
    """N of a ``plain_cap<N>`` variant (0 for any other)."""
    base = split_variant(variant)[0]
    if not base.startswith("plain_cap"):
        return 0
    digits = base[len("plain_cap"):]
    if not digits.isdigit() or int(digits) <= 0:
        raise ValueError(f"{variant}: the cap after plain_cap must be a positive number of rows")
    return int(digits)


class FoldIds:
    """Host transform of ``plain_cap<N>``: every id modulo the capped table's rows."""

    def __init__(self, caps: dict[str, int]) -> None:
        self.caps = caps

    def __call__(self, features: dict, batch_size: int) -> dict:
        return {k: (ids % self.caps[k], lengths) for k, (ids, lengths) in features.items()}


class EmbeddingOnly(torch.nn.Module):
    """An EBC with a trivial loss (mean of the pooled outputs), so the step is the embedding work
    alone: input and output all-to-alls, the lookup, and the fused optimizer's backward."""

    def __init__(self, ebc: torch.nn.Module) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        loss = self.ebc(batch.sparse_features).values().mean()
        return loss, loss.detach()


def build_plain(config: Any, manifest: Any, env: Any, embedding_only: bool = False,
                cap: int = 0) -> tuple[Any, Any, list]:
    """Plain TorchRec: the reference every other variant is compared with (no embdim code).
    ``embedding_only``: the sharded EBC alone (:class:`EmbeddingOnly`) instead of the DLRM;
    ``cap``: at most that many rows per table. Returns ``(model, optimizer, tables)``."""
    from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingEnv
    from torchrec.models.dlrm import DLRM, DLRMTrain
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from embdim.sharding.planner import device_memory, get_sharders, sparse_optimizer
    from embdim.trainer.model import table_data_type

    d = config.model.embedding_dim
    data_type = table_data_type(config.model.table_dtype)
    tables = [EmbeddingBagConfig(name=f"t_{f.name}", embedding_dim=d, feature_names=[f.name], data_type=data_type,
                                 num_embeddings=min(f.num_embeddings, cap) if cap else f.num_embeddings)
              for f in manifest.sparse]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    if embedding_only:
        model: torch.nn.Module = EmbeddingOnly(ebc)
    else:
        model = DLRMTrain(DLRM(embedding_bag_collection=ebc, dense_in_features=len(manifest.dense) or 1,
                               dense_arch_layer_sizes=list(config.model.dense_arch_layer_sizes),
                               over_arch_layer_sizes=list(config.model.over_arch_layer_sizes),
                               dense_device=env.device))
    optim_cls, optim_kwargs = sparse_optimizer(config.optim, env.device.type)
    apply_optimizer_in_backward(optim_cls, ebc.parameters(), optim_kwargs)
    constraints = {t.name: ParameterConstraints(sharding_types=[config.sharding.sharding_type],
                                                compute_kernels=["fused"]) for t in tables}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=env.world_size, compute_device=env.device.type,
                                                         local_world_size=env.local_world_size,
                                                         hbm_cap=device_memory(env.device)),
                                       constraints=constraints)
    sharders = get_sharders(config.sharding.comm_precision)
    plan = planner.collective_plan(model, sharders, env.pg)
    dmp = DistributedModelParallel(module=model, env=ShardingEnv.from_process_group(env.pg), device=env.device,
                                   plan=plan, sharders=sharders)
    return dmp, fused_and_adam(dmp, config.optim.dense_lr), tables


def fused_and_adam(dmp: Any, dense_lr: float) -> Any:
    """The sharded tables' fused optimizers plus Adam over the dense parameters, if any."""
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    optimizers: list = [dmp.fused_optimizer]
    if dense:
        optimizers.append(KeyedOptimizerWrapper(dense, lambda ps: torch.optim.Adam(ps, lr=dense_lr)))
    return CombinedOptimizer(optimizers)


def variant_width(variant: str, default: int) -> int:
    """The table width a reference variant runs at: ``plain_d32`` / ``ebc_d32`` -> 32, else ``default``."""
    plain_cap(variant)  # checks the cap of plain_cap<N>
    base, sep, width = split_variant(variant)[0].rpartition("_d")
    if sep and base in ("plain", "ebc"):
        if not width.isdigit() or int(width) <= 0 or int(width) % 4:
            raise ValueError(f"{variant}: the width after _d must be a positive multiple of 4 (sharded tables)")
        return int(width)
    return default


class Built:
    """A variant ready to time: model, optimizer, and how to turn host features into its batches."""

    def __init__(self, model: Any, optimizer: Any, tables: list, transform: Callable | None = None,
                 keep: Any = None) -> None:
        from torchrec.modules.embedding_configs import data_type_to_dtype

        self.model, self.optimizer, self.transform, self.keep = model, optimizer, transform, keep
        self.tables = list(tables)
        # Bytes of one row of the table each KJT key is looked up in (for the traffic estimate).
        self.key_bytes = {name: t.embedding_dim * data_type_to_dtype(t.data_type).itemsize
                          for t in tables for name in t.feature_names}

    def lookup_bytes(self, batch: Any) -> int:
        kjt = batch.sparse_features
        counts = kjt.length_per_key()
        return sum(n * self.key_bytes.get(k, 0) for k, n in zip(kjt.keys(), counts))


def build_variant(variant: str, config: Any, data: Path, run_dir: Path, env: Any, state: dict) -> Built:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from embdim.embedding_methods import IdRemapper
    from embdim.embedding_methods.mixed_dim import build_retrain_module
    from embdim.trainer.data.manifest import load_manifest
    from embdim.trainer.loop import Trainer
    from embdim.trainer.phases import TrainerSearchContext, build_method

    from embdim.trainer.model import build_tables, table_data_type

    manifest = load_manifest(data)
    full_tables = build_tables(manifest, config.model.embedding_dim, table_data_type(config.model.table_dtype))
    variant = split_variant(variant)[0]  # the _fp16 suffix is in the config already
    if cap := plain_cap(variant):
        model, optimizer, tables = build_plain(config, manifest, env, cap=cap)
        return Built(model, optimizer, tables,
                     transform=FoldIds({t.feature_names[0]: t.num_embeddings for t in tables}))
    if variant in ("plain", "ebc") or variant.startswith(("plain_d", "ebc_d")):
        return Built(*build_plain(config, manifest, env, embedding_only=variant.startswith("ebc")))
    if variant in ("full", "full_parquet"):
        trainer = Trainer(config, data, run_dir, env=env)
        return Built(trainer.model, trainer.optimizer, full_tables, keep=trainer)
    kind, _, name = variant.partition("_")
    budget = config.search.budget
    if kind == "search":
        method = build_method(config, name, manifest)
        if not getattr(method, "requires_search_training", True):
            raise ValueError(f"{variant}: {name} has no search training (its plan is closed-form)")
        tables = method.search_tables()
        trainer = Trainer(config, data, run_dir, env=env,
                          sparse_module_factory=lambda _t: method.build_search_module(
                              EmbeddingBagCollection(tables=tables, device=torch.device("meta"))),
                          aux_loss_fn=method.search_loss, extra_optimizers=method.extra_optimizers,
                          excluded_dense_params=method.extra_parameters, phase="search")
        context = TrainerSearchContext(trainer, manifest, data, budget, config.model.embedding_dim)
        if hasattr(method, "init_search_state"):
            method.init_search_state(trainer.sparse_module, context)
        return Built(trainer.model, trainer.optimizer, tables, keep=(trainer, method, context))
    if variant.startswith("ebc_compact_"):
        # The compact module alone where the EBC stood (EmbeddingOnly): the embedding-bound
        # regime of the stand-in, against ``ebc`` and ``ebc_d<W>``; Adam trains its projections.
        from embdim.sharding.planner import shard_model

        plan = _compact_plan(variant[len("ebc_compact_"):], variant, config, manifest, data, state)
        dmp = shard_model(EmbeddingOnly(compact_module(plan, config)), env, config.sharding, config.optim,
                          config.data.batch_size)
        return Built(dmp, fused_and_adam(dmp, config.optim.dense_lr), compact_module(plan, config).inner_configs(),
                     transform=IdRemapper(plan))
    if kind == "compact":
        plan = _compact_plan(name, variant, config, manifest, data, state)
        remapper = IdRemapper(plan)
        trainer = Trainer(config, data, run_dir, env=env,
                          sparse_module_factory=lambda _t: compact_module(plan, config),
                          feature_transform=remapper, phase="retrain")
        tables = compact_module(plan, config).inner_configs()
        return Built(trainer.model, trainer.optimizer, tables, transform=remapper, keep=trainer)
    raise ValueError(f"unknown variant {variant!r}; choose from plain, plain_d<W>, plain_cap<N>, ebc, ebc_d<W>, "
                     "full, full_parquet, search_<method>, compact_<method>[_pad|_project], "
                     "ebc_compact_<method>[_pad|_project], each but search_* with an optional _fp16")


def compact_module(plan: Any, config: Any) -> Any:
    """The retrain module of ``plan`` on ``meta``, with the run's table precision."""
    from embdim.embedding_methods.mixed_dim import build_retrain_module
    from embdim.trainer.model import table_data_type

    return build_retrain_module(plan, device="meta", data_type=table_data_type(config.model.table_dtype))


def compact_method(name: str) -> tuple[str, str | None]:
    """``(method, layout or None)`` of a compact variant's name: ``pme_project`` -> (pme, project)."""
    from embdim.embedding_methods.plan import LAYOUTS

    base, _, layout = name.rpartition("_")
    return (base, layout) if base and layout in LAYOUTS else (name, None)


def needs_plan(variant: str, variants: str) -> bool:
    """Whether ``variant`` is a search whose plan a later ``[ebc_]compact_<method>`` retrains."""
    name = variant[len("search_"):]
    return variant.startswith("search_") and any(
        compact_method(split_variant(v)[0].removeprefix("ebc_").removeprefix("compact_"))[0] == name
        for v in variants.split(",") if split_variant(v)[0].startswith(("compact_", "ebc_compact_")))


def _compact_plan(name: str, variant: str, config: Any, manifest: Any, data: Path, state: dict) -> Any:
    """The size plan a ``compact_<name>`` variant retrains: ``fixed``'s closed form at the budget,
    or the plan exported from ``search_<name>`` earlier in the run, relabelled with the layout the
    name asks for (the same tables and ids). Sets ``state["fraction"]``."""
    import dataclasses

    from embdim.trainer.phases import TrainerSearchContext, build_method

    name, layout = compact_method(name)
    if name == "fixed":
        method = build_method(config, "fixed", manifest)
        plan = method.export_plan(None, TrainerSearchContext(None, manifest, data, config.search.budget,
                                                             config.model.embedding_dim))
    elif name in state.get("plans", {}):
        plan = state["plans"][name]
    else:
        raise ValueError(f"{variant}: no {name} plan; put search_{name} before it in --variants")
    if layout is not None:
        plan = dataclasses.replace(plan, layout=layout)
    state["fraction"] = plan.achieved_fraction()
    return plan


def export_plan(built: Built, env: Any) -> Any:
    """The size plan of a trained search variant (``search_pme`` after its timed steps)."""
    trainer, method, context = built.keep
    if hasattr(method, "bind_model"):
        method.bind_model(trainer.model)
    return method.export_plan(trainer.sparse_module, context)


# ---------------------------------------------------------------------------- timing
def copy_bandwidth(device: torch.device) -> float | None:
    """Device-to-device copy rate in GB/s (read + write bytes), best of 5 copies of 2 GiB."""
    if device.type != "cuda":
        return None
    n = (2 << 30) // 4
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    best = float("inf")
    for _ in range(6):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 4 / best / 1e9


def host_batches(built: Built, feats: list, batch_size: int) -> tuple[list, float | None]:
    """The variant's in-memory batches of host features ``(sparse, dense, labels)``, remapped by
    its id transform if it has one, and that remap's time per batch in ms (None without one)."""
    if built.transform is None:
        return [to_batch(f, d, lab) for f, d, lab in feats], None
    t0 = time.perf_counter()
    transformed = [built.transform(f, batch_size) for f, _, _ in feats]
    remap_ms = (time.perf_counter() - t0) / len(feats) * 1e3
    return [to_batch(t, d, lab) for t, (_, d, lab) in zip(transformed, feats)], remap_ms


def start_pipeline(built: Built, env: Any) -> Any:
    """A ``TrainPipelineSparseDist`` over the variant in training mode."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    built.model.train()
    return TrainPipelineSparseDist(built.model, built.optimizer, env.device, execute_all_batches=True)


def run_steps(pipeline: Any, stream: Any, steps: int, env: Any) -> float:
    """Seconds for ``steps`` pipelined steps, synchronised with the device at the end."""
    t0 = time.perf_counter()
    for _ in range(steps):
        pipeline.progress(stream)
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    return time.perf_counter() - t0


def time_steps(built: Built, batches: Any, env: Any, warmup: int, steps: int) -> tuple[float, float]:
    """Mean pipelined step time (s) and this rank's peak memory (bytes; CPU: 0). ``batches``: a
    list (cycled) or an endless iterator."""
    pipeline = start_pipeline(built, env)
    stream = itertools.cycle(batches) if isinstance(batches, list) else batches
    cuda = env.device.type == "cuda"
    run_steps(pipeline, stream, warmup, env)
    if cuda:
        torch.cuda.reset_peak_memory_stats(env.device)
    torch.distributed.barrier()
    elapsed = run_steps(pipeline, stream, steps, env)
    peak = torch.cuda.max_memory_allocated(env.device) if cuda else 0
    return elapsed / steps, float(peak)


def parquet_stream(data: Path, batch_size: int, env: Any, num_workers: int) -> Any:
    """Training batches from the on-disk dataset, epoch after epoch (as ``Trainer.fit`` reads them)."""
    from embdim.trainer.data.reader import ParquetBatchReader

    reader = ParquetBatchReader(data, "train", batch_size=batch_size, rank=env.rank, world_size=env.world_size,
                                num_workers=num_workers, shuffle=True, seed=0,
                                pin_memory=env.device.type == "cuda")
    if len(reader) == 0:
        raise ValueError(f"{data}: too few rows for one batch of {batch_size} per rank; raise --skeleton-rows")
    epoch = 0
    while True:
        reader.set_epoch(epoch)
        yield from reader
        epoch += 1


def _max_over_ranks(values: list[float], env: Any) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def worker(args: argparse.Namespace) -> None:
    from embdim.trainer.data.manifest import load_manifest
    from embdim.sharding.distributed import destroy, init_distributed

    env = init_distributed()
    data = Path(args.out) / "data"
    manifest = load_manifest(data)
    out = Path(args.out)
    results_path = out / "results.jsonl"
    bandwidth = copy_bandwidth(env.device)
    host = {b: [make_features(manifest, b, seed=1000 * env.rank + i, multi_hot_fields=args.multi_hot_fields,
                              multi_hot_mean=args.multi_hot_mean) for i in range(NUM_DISTINCT_BATCHES)]
            for b in _ints(args.batch_sizes)}
    for sharding in args.shardings.split(","):
        if env.world_size == 1 and sharding != args.shardings.split(",")[0]:
            continue  # one rank holds every table whole: all sharding types are the same placement
        state: dict[str, Any] = {"plans": {}}
        for variant in args.variants.split(","):
            config = _config(args, sharding, variant)
            width = config.model.embedding_dim
            run_dir = out / "runs" / f"p{env.world_size}_{sharding}_{variant}"
            record: dict[str, Any] = {"nproc": env.world_size, "sharding": sharding, "variant": variant,
                                      "dim": width, "copy_gbps": bandwidth, "date": datetime.date.today().isoformat(),
                                      "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda"
                                      else "cpu"}
            os.environ["EMBDIM_TRITON"] = "0" if variant.endswith("_notriton") else "1"
            try:
                t0 = time.perf_counter()
                built = build_variant(variant, config, data, run_dir, env, state)
                record["build_s"] = time.perf_counter() - t0
                record["fraction"] = state.pop("fraction", None)
                if width != args.dim:  # a narrower reference: its width ratio
                    record["fraction"] = width / args.dim
                if cap := plain_cap(variant):  # a capped reference: its share of the rows
                    cards = [f.num_embeddings for f in manifest.sparse]
                    record["fraction"] = sum(min(c, cap) for c in cards) / sum(cards)
                record["table_dtype"] = config.model.table_dtype
                record["table_gib"] = table_gib(built)
            except Exception as e:  # recorded and skipped: one variant failing must not hide the others
                _emit(results_path, env, {**record, "error": f"{type(e).__name__}: {e}"})
                continue
            for batch_size, feats in host.items():
                row = dict(record, batch_size=batch_size)
                try:
                    remap_ms = None  # host remapping ms per batch, for per-id plans
                    if variant == "full_parquet":
                        batches = parquet_stream(data, batch_size, env, args.loader_workers)
                        lookup = batch_size * len(manifest.sparse) * args.dim * 4.0
                    else:
                        batches, remap_ms = host_batches(built, feats, batch_size)
                        lookup = sum(built.lookup_bytes(b) for b in batches) / len(batches)
                    step_s, peak, remap = _max_over_ranks([step_s_peak for step_s_peak in
                                                           time_steps(built, batches, env, args.warmup, args.steps)]
                                                          + [remap_ms or 0.0], env)
                    # Per rank: the global lookups of one step are spread over the ranks' shards.
                    row.update(step_ms=step_s * 1e3, samples_per_s=batch_size * env.world_size / step_s,
                               peak_gib=peak / 2**30, remap_ms=remap if remap_ms is not None else None,
                               emb_gbps=3 * lookup / step_s / 1e9)
                except torch.cuda.OutOfMemoryError as e:
                    row["error"] = f"OOM: {str(e).splitlines()[0]}"
                    torch.cuda.empty_cache()
                _emit(results_path, env, row)
            if needs_plan(variant, args.variants):
                t0 = time.perf_counter()
                state["plans"][variant[7:]] = export_plan(built, env)
                _emit(results_path, env, {**record, "variant": f"export_{variant[7:]}",
                                           "export_s": time.perf_counter() - t0,
                                           "fraction": state["plans"][variant[7:]].achieved_fraction()})
            del built
            gc.collect()
            if env.device.type == "cuda":
                torch.cuda.empty_cache()
    destroy()


def table_gib(built: Built) -> float:
    """GiB of the variant's embedding weights on all ranks (what its tables store)."""
    from torchrec.modules.embedding_configs import data_type_to_dtype

    return sum(t.num_embeddings * t.embedding_dim * data_type_to_dtype(t.data_type).itemsize
               for t in built.tables) / 2**30


def _emit(path: Path, env: Any, row: dict) -> None:
    if env.is_main:
        with open(path, "a") as f:  # append-only log: a crash loses at most the row being written
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


# ---------------------------------------------------------------------------- driver
def render(rows: list[dict]) -> str:
    """Markdown: one line per (ranks, sharding, batch, variant) with its ratio to ``plain``."""
    plain = {(r["nproc"], r["sharding"], r.get("batch_size")): r for r in rows
             if r["variant"] == "plain" and "samples_per_s" in r}
    lines = ["| GPUs | sharding | batch/GPU | variant | fraction | tables GiB | samples/s | step ms | x plain step | "
             "peak GiB | emb GB/s | copy GB/s | remap ms |", "|" + "---|" * 13]
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        if r["variant"].startswith("export_"):
            continue
        ref = plain.get((r["nproc"], r["sharding"], r.get("batch_size")))
        if "error" in r:
            lines.append(f"| {r['nproc']} | {r['sharding']} | {r.get('batch_size', '')} | {r['variant']} | | | "
                         f"{r['error'][:120]} | | | | | | |")
            continue
        ratio = r["step_ms"] / ref["step_ms"] if ref else None
        lines.append(f"| {r['nproc']} | {r['sharding']} | {r['batch_size']} | {r['variant']} | "
                     f"{fmt(r.get('fraction'), '.3f')} | {fmt(r.get('table_gib'), '.2f')} | "
                     f"{r['samples_per_s']:,.0f} | {r['step_ms']:.2f} | "
                     f"{fmt(ratio, '.2f')} | {r['peak_gib']:.1f} | {fmt(r.get('emb_gbps'), '.0f')} | "
                     f"{fmt(r.get('copy_gbps'), '.0f')} | {fmt(r.get('remap_ms'), '.1f')} |")
    exports = [r for r in rows if r["variant"].startswith("export_")]
    for r in exports:
        lines.append(f"\n{r['variant']} ({r['nproc']} GPUs, {r['sharding']}): {r['export_s']:.1f} s, "
                     f"fraction {r['fraction']:.4f}")
    return "\n".join(lines) + "\n"


def render_matrix(rows: list[dict]) -> str:
    """Markdown: one line per (ranks, sharding, batch): plain TorchRec's samples/s and peak memory,
    then every other variant's step time as a multiple of plain's (lower is better) and its peak."""
    timed = [r for r in rows if "step_ms" in r]
    variants = list(dict.fromkeys(r["variant"] for r in timed if r["variant"] != "plain"))
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in timed:
        by_key.setdefault((r["nproc"], r["sharding"], r["batch_size"]), {})[r["variant"]] = r
    head = ["GPUs", "sharding", "batch/GPU", "plain samples/s", "plain GiB", *[f"{v} x step (GiB)" for v in variants]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(by_key, key=lambda k: (k[1], k[0], k[2])):
        cells = by_key[key]
        plain = cells.get("plain")
        row = [str(key[0]), key[1], str(key[2]), f"{plain['samples_per_s']:,.0f}" if plain else "",
               f"{plain['peak_gib']:.1f}" if plain else ""]
        for v in variants:
            r = cells.get(v)
            row.append(f"{r['step_ms'] / plain['step_ms']:.2f} ({r['peak_gib']:.1f})" if r and plain else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.render:
        rows = [json.loads(line) for path in args.render for line in Path(path).read_text().splitlines() if line]
        print(render_matrix(rows))
        print(render(rows))
        return 0
    if args.worker:
        worker(args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ensure_dataset(args)
    print(f"dataset ready in {time.perf_counter() - t0:.0f} s", flush=True)
    results = out / "results.jsonl"
    first = len(results.read_text().splitlines()) if results.exists() else 0
    root = Path(__file__).resolve().parents[1]
    from embdim.launch.launcher import repo_env

    env = repo_env()
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--worker"]
    for nproc in _ints(args.ranks):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "bench.bench_gpu", *passthrough, "--worker"]
        code = subprocess.run(cmd, env=env, cwd=root).returncode
        if code:
            print(f"torchrun with {nproc} ranks exited {code}", flush=True)
    rows = [json.loads(line) for line in results.read_text().splitlines()[first:]] if results.exists() else []
    table = render(rows)
    header = (f"Command: python -m bench.bench_gpu {' '.join(passthrough)}\n"
              f"Date: {datetime.date.today().isoformat()}; torch {torch.__version__}\n\n")
    from embdim.io import atomic_write_text

    atomic_write_text(out / "bench_gpu.md", header + table)
    print(header + table, flush=True)
    return 0 if rows and not any("error" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
