"""Retrained compact-module weights into a sharded model: ``restore_compact_weights``.

``DistributedModelParallel`` builds fresh sharded tables: weights loaded into the compact module's
inner ``EmbeddingBagCollection`` before wrapping are gone afterwards, and a module built on
``meta`` loads nothing (docs/torchrec-notes.md#dmp-re-init). The projections are dense and
keep what they held (random on ``meta``). ``restore_compact_weights`` writes a run's retrained
``state_dict`` back after wrapping: every table shard by shard into this rank's live shards (no
collective; ``sharding.state``), the dense parameters whole (every rank reads the same file, so
the replicas stay equal). It also works on an unsharded model, where each table is one block.

It also puts the compact module's key check (``embedding_methods.compact``) in front of the sharded
collection's ``input_dist``: ``TrainPipelineSparseDist`` starts a batch's input distribution
before the model's forward runs, so a batch that skipped ``IdRemapper`` would otherwise fail
inside TorchRec (``'C3@g1' is not in list``) before the forward's own check could name the fix.

Example::

    module = load_compact_embedding("runs/oe", device="meta")
    model = DistributedModelParallel(DLRMTrain(DLRM(embedding_bag_collection=module, ...)), device=device)
    restore_compact_weights(model)          # the weights load_compact_embedding recorded
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from embdim.embedding_methods.compact import (INNER, CompactModuleMixin, CompactSource, check_compact_keys,
                                              compact_weights)
from embdim.sharding import state as sharded_state

_TABLE_PREFIX = INNER + "embedding_bags."


class RestoreError(ValueError):
    """Weights do not fit the model's compact module; the message names the source and the key."""


def compact_modules(model: nn.Module) -> list[tuple[str, CompactModuleMixin]]:
    """``(qualified name, module)`` of every compact embedding module in a (DMP-wrapped) model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, CompactModuleMixin)]


def _copy_rows(row: int, col: int, block: torch.Tensor, full: torch.Tensor) -> None:
    # Row-wise sharding pads the last shard past num_embeddings; padding rows keep their values.
    num_rows = max(0, min(block.shape[0], full.shape[0] - row))
    block[:num_rows] = full[row:row + num_rows, col:col + block.shape[1]].to(block)


@torch.no_grad()
def write_compact_state(module: nn.Module, state: dict[str, torch.Tensor], source: Any) -> None:
    """Writes a compact module's full (unsharded) ``state_dict`` into it, sharded or not.

    Tables (``ebc.embedding_bags.<table>.weight``) go shard by shard into this rank's live shards;
    the other entries (projections, buffers) are copied whole. Every table and dense entry of the
    module must be in ``state`` with its shape; ``RestoreError`` names ``source`` and the key.
    """
    tables = {cfg.name for cfg in module.inner_configs()}  # type: ignore[operator]
    dense = {k: v for k, v in [*module.named_parameters(), *module.named_buffers()] if not k.startswith(INNER)}
    expected = {f"{_TABLE_PREFIX}{t}.weight" for t in tables} | set(dense)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RestoreError(f"{source}: keys do not match the model's compact module: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    for key, value in state.items():
        if key in dense:
            if tuple(dense[key].shape) != tuple(value.shape):
                raise RestoreError(f"{source}: {key} has shape {tuple(value.shape)}, the module's is "
                                   f"{tuple(dense[key].shape)}")
            dense[key].copy_(value.to(dense[key]))
            continue
        table = key[len(_TABLE_PREFIX):-len(".weight")]
        shape = sharded_state.table_shape(module, table)
        if tuple(value.shape) != shape:
            raise RestoreError(f"{source}: {key} has shape {tuple(value.shape)}, the module's table is {shape}")
        sharded_state.write_rows(module, table, lambda r, c, block, v=value: _copy_rows(r, c, block, v))


def guard_input_dist(module: CompactModuleMixin) -> bool:
    """Makes the sharded inner collection of ``module`` check the KJT's keys before its input dist.

    Wraps this instance's ``input_dist`` (TorchRec's ``ShardedModule`` hook, which the pipeline
    calls ahead of the forward); returns False when the collection is not sharded. Idempotent.
    """
    sharded = module.ebc  # type: ignore[attr-defined]
    original = getattr(sharded, "input_dist", None)
    if original is None or getattr(original, "embdim_guard", False):
        return original is not None

    def input_dist(ctx: Any, features: Any, *args: Any, **kwargs: Any) -> Any:
        check_compact_keys(module, features)
        return original(ctx, features, *args, **kwargs)

    input_dist.embdim_guard = True  # type: ignore[attr-defined]
    object.__setattr__(sharded, "input_dist", input_dist)
    return True


def restore_compact_weights(model: nn.Module, run_dir: str | Path | None = None) -> list[str]:
    """Writes retrained compact-module weights into a model after ``DistributedModelParallel``.

    Args:
        model (nn.Module): the DMP-wrapped (or plain) model holding compact modules, e.g. a
            ``DLRMTrain`` whose ``sparse_arch`` embeds ``load_compact_embedding(...)``.
        run_dir (str | Path | None): the run folder (or its ``plan.json``) to read; ``None`` uses
            what ``load_compact_embedding`` recorded on each module (``compact_source``). Given,
            the model must hold exactly one compact module. (A renamed module, ``feature_names``,
            needs nothing more: its tables keep the plan's names.)

    Returns the qualified names of the restored modules. Every rank must call it (it reads only
    this rank's shards, so it runs no collective); call it before building a train pipeline. It
    also guards each sharded collection's input dist (``guard_input_dist``).
    """
    from embdim.embedding_methods.mixed_dim import RETRAIN_WEIGHTS
    from embdim.embedding_methods.plan import load_plan, plan_file, resolve_init_checkpoint

    found = compact_modules(model)
    if not found:
        raise RestoreError(f"restore_compact_weights: {type(model).__name__} holds no compact embedding module "
                           f"(load_compact_embedding's MixedDimEmbeddingBagCollection)")
    if run_dir is not None and len(found) != 1:
        raise RestoreError(f"restore_compact_weights: run_dir={run_dir!s} is ambiguous, the model holds "
                           f"{len(found)} compact modules {[n for n, _ in found]}; load each with "
                           f"load_compact_embedding and call restore_compact_weights(model)")
    for name, module in found:
        source = module.compact_source
        if run_dir is not None:
            plan_path = plan_file(run_dir)
            weights = plan_path.parent / RETRAIN_WEIGHTS
            if not weights.exists():
                weights = resolve_init_checkpoint(load_plan(plan_path), plan_path)
            source = CompactSource(plan=plan_path, weights=weights)
        if source is None:
            raise RestoreError(f"restore_compact_weights: module {name or type(module).__name__!r} was not built by "
                               f"load_compact_embedding; pass run_dir")
        write_compact_state(module, compact_weights(source), source.weights)  # type: ignore[arg-type]
        module._weights_loaded = True
        guard_input_dist(module)
    return [name for name, _ in found]
