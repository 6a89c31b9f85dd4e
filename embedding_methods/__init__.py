"""Embedding-size methods, the size plan they export, and the compact retrain module.

Registry: ``METHODS`` maps a method name to its ``EmbeddingMethod`` class; ``get_method(name)``
looks one up. To add a method: a new file with the class (nested ``Config`` dataclass), an entry
in ``_registry()`` below, a config under ``configs/`` and a test.

For users of a finished run (the whole recipe is in the README, "Using the compact model in an
existing DLRM pipeline"; the package root ``embdim`` re-exports these names)::

    from embdim.embedding_methods import IdRemapper, load_compact_embedding, load_plan, remap_dataset

    module = load_compact_embedding("runs/mde")        # stands in for the DLRM's EBC
    remap = IdRemapper(load_plan("runs/mde"))            # dict of arrays, KJT or Batch -> remapped

Imports are light: the plan and the remapper need only numpy, so data-loader processes that
unpickle an ``IdRemapper`` do not import torch or torchrec. The method classes, the compact module
and the TorchRec-side helpers (and with them torchrec) load on first use of their names
(``METHODS``, ``get_method``, ``load_compact_embedding``, ``remap_dataset``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from embdim.embedding_methods.plan import FieldPlan, GroupPlan, PlanError, SizePlan, load_plan, save_plan, summarize_plan
from embdim.embedding_methods.remap import FeatureNames, IdRemapper, RemapError, rename_plan, retrain_feature_names

if TYPE_CHECKING:
    from embdim.embedding_methods.base import EmbeddingMethod
    from embdim.embedding_methods.mixed_dim import MixedDimEmbeddingBagCollection

# Public names that need torch / torchrec, and the module each loads from on first use.
_LAZY = {
    "MixedDimEmbeddingBagCollection": "mixed_dim", "build_retrain_module": "mixed_dim",
    "features_to_kjt": "mixed_dim", "CompactWeightsError": "mixed_dim", "RETRAIN_WEIGHTS": "mixed_dim",
    "CompactInputError": "compact", "CompactModuleMixin": "compact", "CompactSource": "compact",
    "remap_dataset": "remap_kjt", "RemappedDataset": "remap_kjt", "RemappedIterableDataset": "remap_kjt",
}

__all__ = [
    "METHODS", "METHOD_NAMES", "get_method", "load_compact_embedding", "IdRemapper", "RemapError", "FeatureNames",
    "rename_plan", "retrain_feature_names", "SizePlan", "FieldPlan", "GroupPlan", "PlanError", "load_plan",
    "save_plan", "summarize_plan", *_LAZY,
]


# The registered names, in report order (available without importing torchrec).
METHOD_NAMES = ("fixed", "mde", "mlet", "optembed", "amtl", "pme")


def _registry() -> dict[str, type[EmbeddingMethod]]:
    from embdim.embedding_methods.amtl import AMTL
    from embdim.embedding_methods.fixed import FixedWidth
    from embdim.embedding_methods.mde import MDE
    from embdim.embedding_methods.mlet import MLET
    from embdim.embedding_methods.optembed import OptEmbed
    from embdim.embedding_methods.pme import PME

    registry = {"fixed": FixedWidth, "mde": MDE, "mlet": MLET, "optembed": OptEmbed, "amtl": AMTL, "pme": PME}
    assert tuple(registry) == METHOD_NAMES
    return registry


def __getattr__(name: str) -> Any:
    # PEP 562: build METHODS (importing torchrec) only when someone asks for it.
    if name == "METHODS":
        methods = _registry()
        globals()["METHODS"] = methods
        return methods
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"embdim.embedding_methods.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'embedding_methods' has no attribute {name!r}")


def get_method(name: str) -> type[EmbeddingMethod]:
    """The method class registered under ``name``; ValueError naming the choices otherwise."""
    from embdim.embedding_methods import METHODS

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name]


def load_compact_embedding(run_dir_or_plan: str | Path, device: Any = "cpu", *,
                           feature_names: Any = None) -> MixedDimEmbeddingBagCollection:
    """The compact embedding module of a run (see ``embedding_methods.mixed_dim.load_compact_embedding``).

    Built from ``RUN_DIR/plan.json`` (or the given plan file); loads the retrained weights
    ``RUN_DIR/retrain/compact_embedding.pt`` (a plain ``state_dict`` of the module, written by the
    trainer) when present, else the plan's ``init_checkpoint``, else keeps a fresh init; on
    ``meta`` it only records them for ``embdim.sharding.restore_compact_weights``. ``feature_names``
    renames the plan's fields to the pipeline's (``{"C1": "cat_0", ...}`` or a list in plan order).
    Feed it KJTs remapped by ``IdRemapper(plan, feature_names=...)``.
    """
    from embdim.embedding_methods.mixed_dim import load_compact_embedding as _load

    return _load(run_dir_or_plan, device=device, feature_names=feature_names)
