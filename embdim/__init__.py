"""embdim: learned embedding sizes for TorchRec-sharded CTR models.

The project's top-level folders ``trainer/``, ``sharding/``, ``embedding_methods/`` and
``launch/`` are this package's subpackages: code imports them as ``embdim.trainer`` and so on,
never as bare ``trainer``, so a user's own ``trainer``, ``launch`` or ``sharding`` package on
``sys.path`` cannot shadow them (or be shadowed). In a source checkout (editable install, or the
repository root on ``PYTHONPATH``) the subpackages are found in the folder above this one; an
installed wheel places them inside this package (``setup.py`` maps them).
"""

from __future__ import annotations

import os

SUBPACKAGES = ("trainer", "sharding", "embedding_methods", "launch")
"""The project's top-level folders, importable as ``embdim.<name>``."""

_here = os.path.dirname(os.path.abspath(__file__))
if not os.path.isdir(os.path.join(_here, SUBPACKAGES[0])):
    # Source checkout: the subpackages sit beside this folder, in the repository root.
    __path__.append(os.path.dirname(_here))  # noqa: F821 (module __path__ of a package)

# The public API of a finished run, in one place (README, "Using the compact model in an existing
# DLRM pipeline"): ``from embdim import load_compact_embedding, IdRemapper, ...``. Names load on
# first use (PEP 562), so ``import embdim`` imports neither torch nor the subpackages.
_API = {
    "restore_compact_weights": "embdim.sharding.compact",
    **{name: "embdim.embedding_methods" for name in (
        "load_compact_embedding", "load_plan", "IdRemapper", "RemapError", "rename_plan", "retrain_feature_names",
        "remap_dataset", "RemappedDataset", "RemappedIterableDataset", "features_to_kjt",
        "MixedDimEmbeddingBagCollection", "build_retrain_module", "CompactInputError", "CompactWeightsError",
        "SizePlan", "PlanError", "METHOD_NAMES", "get_method",
    )},
}
__all__ = [*SUBPACKAGES, *_API]


def __getattr__(name: str) -> object:
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'embdim' has no attribute {name!r}")
