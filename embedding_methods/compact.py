"""What a user's pipeline sees of the compact module: parameter groups, input checks, its weights.

``CompactModuleMixin`` is a base of every module that projects an inner ``EmbeddingBagCollection``
to the common width D (``embedding_methods.mixed_dim``). It adds:

- ``table_parameters()`` / ``dense_parameters()``: the inner tables (for a fused optimizer, e.g.
  ``apply_optimizer_in_backward(RowWiseAdagrad, module.table_parameters(), ...)`` before DMP) and
  everything else (the projections; they train with the dense optimizer). An optimizer fused
  over all of ``sparse_arch.parameters()`` would also catch the projections, which TBE cannot
  hold.
- ``check_input(kjt)``, called first in ``forward``: input that was not remapped by
  ``IdRemapper`` (raw field names, ids beyond a compact table) raises ``CompactInputError``
  naming the remapper, instead of an index error deep inside FBGEMM or TorchRec. Key names are
  checked on every batch (a set comparison); id ranges on the first ``input_checks`` batches
  (one reduction and one host sync each).
- ``compact_source``: where ``load_compact_embedding`` found the retrained weights, so that
  ``embdim.sharding.restore_compact_weights(dmp_model)`` can write them into the sharded model
  (``DistributedModelParallel`` builds fresh sharded tables; docs/torchrec-notes.md#dmp-re-init).
  A module with a source whose sharded tables got neither that call nor a ``load_state_dict``
  (e.g. from a DCP checkpoint) warns on its first batch: it would train fresh tables.

The common width D is the class's ``embedding_dim`` (the plan's; the dense arch must end at it).

The check runs through ``check_compact_input``, an ``torch.fx.wrap``-ed function, so the train
pipeline's fx trace records it as one opaque node and the KJT still reaches the inner collection
straight from the batch (docs/torchrec-notes.md#pipelining).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import logging

import torch
import torch.fx
from torch import nn

logger = logging.getLogger(__name__)

INNER = "ebc."
"""Parameter-name prefix of the inner collection's tables inside a compact module."""

REMAP_HINT = ("raw ids must go through embdim's IdRemapper before the model (IdRemapper(load_plan(run_dir)) "
              "on each batch or remap_dataset(dataset, remapper)), with the same feature_names as "
              "load_compact_embedding")


class CompactInputError(ValueError):
    """The compact module got input that was not remapped; the message names the key and ``IdRemapper``."""


@dataclass(frozen=True)
class CompactSource:
    """Where a compact module's weights come from (set by ``load_compact_embedding``).

    Args:
        plan (Path): the run's ``plan.json``.
        weights (Path | None): the retrained ``state_dict`` file (or DCP folder) that was (or, on
            ``meta``, will be) loaded; ``None`` when the run has none (fresh init).
        feature_names (dict[str, str] | list[str] | None): the renaming the module was built with.
    """

    plan: Path
    weights: Path | None
    feature_names: Any = None


class CompactModuleMixin:
    """Parameter groups, input checks and weight source of the compact module (see module docstring).

    Needs from the class: ``ebc`` (the inner collection) and ``inner_configs()``.
    """

    input_checks: int = 1
    """Batches whose ids are range-checked against the compact tables (0 turns the range check off;
    key names are always checked)."""

    compact_source: CompactSource | None = None
    """Set by ``load_compact_embedding``; read by ``embdim.sharding.restore_compact_weights``."""

    _inputs_checked: int = 0
    _input_spec: tuple[frozenset, dict[str, int]] | None = None
    _weights_loaded: bool = False  # set by load_state_dict (through attach_source) and the restore

    def named_table_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the inner tables (names start with ``ebc.``)."""
        named = self.named_parameters()  # type: ignore[attr-defined]
        return ((name, p) for name, p in named if name.startswith(INNER))

    def table_parameters(self) -> Iterator[nn.Parameter]:
        """The embedding tables: what a fused (in-backward) optimizer should own."""
        return (p for _, p in self.named_table_parameters())

    def named_dense_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of everything but the tables (the projections)."""
        named = self.named_parameters()  # type: ignore[attr-defined]
        return ((name, p) for name, p in named if not name.startswith(INNER))

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        """The projections (dense, data-parallel): trained by the dense optimizer."""
        return (p for _, p in self.named_dense_parameters())

    def check_input(self, features: Any) -> None:
        """Raises ``CompactInputError`` for input that did not go through ``IdRemapper``."""
        check_compact_input(self, features)

    def _expected_input(self) -> tuple[frozenset, dict[str, int]]:
        if self._input_spec is None:
            configs = self.inner_configs()  # type: ignore[attr-defined]
            rows = {cfg.feature_names[0]: int(cfg.num_embeddings) for cfg in configs}
            self._input_spec = (frozenset(rows), rows)
        return self._input_spec


def attach_source(module: CompactModuleMixin, source: CompactSource) -> None:
    """Records where ``module``'s weights are, and notes a ``load_state_dict`` into its sharded
    tables (through DMP, e.g. of a DCP checkpoint) as their weights being loaded. A load before
    DMP does not count: DMP replaces the tables."""
    module.compact_source = source

    def loaded(*args: Any, **kwargs: Any) -> None:
        if _is_sharded(module):
            module._weights_loaded = True

    module._register_load_state_dict_pre_hook(loaded)  # type: ignore[attr-defined]


def _is_sharded(module: CompactModuleMixin) -> bool:
    return hasattr(module.ebc, "input_dist")  # type: ignore[attr-defined]  # a TorchRec ShardedModule


def _warn_if_fresh(module: CompactModuleMixin) -> None:
    source = module.compact_source
    if _is_sharded(module) and source is not None and source.weights is not None and not module._weights_loaded:
        logger.warning("%s: the sharded tables hold a fresh initialisation, not the retrained weights %s "
                       "(DistributedModelParallel builds new tables): call "
                       "embdim.sharding.restore_compact_weights(model) after wrapping, or load a checkpoint",
                       type(module).__name__, source.weights)


def _listed(names: list[str], limit: int = 8) -> str:
    return str(names[:limit])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > limit else "]")


def check_compact_keys(module: CompactModuleMixin, features: Any) -> None:
    """Raises ``CompactInputError`` unless the KJT's keys are exactly the module's inner features."""
    expected, _ = module._expected_input()
    keys = features.keys()
    if len(keys) != len(expected) or not expected.issuperset(keys):
        unknown = [k for k in keys if k not in expected]
        missing = sorted(expected.difference(keys))
        raise CompactInputError(f"{type(module).__name__}: the KJT's keys do not match the compact tables' "
                                f"features: unknown {_listed(unknown)}, missing {_listed(missing)}, expected "
                                f"{_listed(sorted(expected))}; {REMAP_HINT}")


def check_compact_input(module: CompactModuleMixin, features: Any) -> None:
    """The input check of ``CompactModuleMixin.check_input`` (one opaque node under fx tracing)."""
    check_compact_keys(module, features)
    if module._inputs_checked >= module.input_checks:
        return
    if module._inputs_checked == 0:
        _warn_if_fresh(module)
    module._inputs_checked += 1
    values = features.values()
    if values.numel() == 0:
        return
    _, rows = module._expected_input()
    keys = features.keys()
    per_key = features.length_per_key()
    bounds = torch.tensor([rows[k] for k in keys], dtype=values.dtype, device=values.device)
    upper = torch.repeat_interleave(bounds, torch.tensor(per_key, device=values.device))
    bad = (values < 0) | (values >= upper)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        ends = torch.tensor(per_key).cumsum(0)
        key = keys[int(torch.searchsorted(ends, torch.tensor(first), right=True))]
        raise CompactInputError(f"{type(module).__name__}: feature {key!r} has id {int(values[first])}, outside "
                                f"its compact table of {rows[key]} rows; {REMAP_HINT}")


# The train pipeline's fx trace records the check as one call (it reads the KJT's values).
torch.fx.wrap("check_compact_input")


def compact_weights(source: CompactSource) -> dict[str, torch.Tensor]:
    """The full ``state_dict`` (on CPU) that ``source.weights`` holds, keyed as the module's.

    A ``torch.save`` file is memory-mapped, not read whole; a DCP folder is loaded into an
    unsharded CPU module of the plan (``load_compact_embedding``'s path).
    """
    from embdim.embedding_methods.mixed_dim import CompactWeightsError, load_compact_embedding

    if source.weights is None:
        raise CompactWeightsError(f"{source.plan}: the run has no retrained weights and no init checkpoint "
                                  f"to restore")
    path = Path(source.weights)
    if path.is_dir():
        module = load_compact_embedding(source.plan, device="cpu", feature_names=source.feature_names)
        return module.state_dict()
    if not path.exists():
        raise CompactWeightsError(f"{path}: weights not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle / zip errors of a corrupt file
        raise CompactWeightsError(f"{path}: not a readable state_dict: {e}") from None
    if not isinstance(state, dict):
        raise CompactWeightsError(f"{path}: expected a state_dict, got {type(state).__name__}")
    return state
