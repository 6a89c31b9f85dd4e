"""Embedding-size methods, the size plan they export, and the compact retrain module.

Registry: ``METHODS`` maps a method name to its ``EmbeddingMethod`` class; ``get_method(name)``
looks one up; ``METHOD_NAMES`` lists the names in report order. All three come from one scan of
this package's source for ``EmbeddingMethod`` subclasses (``_discover``), so a new method registers
itself by its class alone: see README.md in this folder for what else a method writes.

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

import ast
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


_PACKAGE_DIR = Path(__file__).resolve().parent


def _discover(package_dir: Path = _PACKAGE_DIR, package: str = "embdim.embedding_methods") -> dict[str, tuple[str, str]]:
    """The one method registry: ``{name: (module, class name)}`` in report order, read from the
    source of this package (``ast``, so it needs no torch or torchrec and imports nothing).

    A method registers itself by being a class in any module of this package (sub-folders too)
    that derives from ``EmbeddingMethod`` and sets ``name`` and ``report_order`` to literals;
    ``report_order`` sorts ``METHOD_NAMES`` (reports, CLI help, ``compare``'s default grid).
    """
    found: dict[str, tuple[str, str, int]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        if "EmbeddingMethod" not in source:
            continue
        module = ".".join((package, *path.relative_to(package_dir).with_suffix("").parts))
        for node in ast.parse(source, filename=str(path)).body:
            if not (isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and b.id == "EmbeddingMethod" for b in node.bases)):
                continue
            literals = {}
            for stmt in node.body:
                target = stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else \
                    getattr(stmt, "target", None) if isinstance(stmt, ast.AnnAssign) else None
                if isinstance(target, ast.Name) and isinstance(getattr(stmt, "value", None), ast.Constant):
                    literals[target.id] = stmt.value.value
            name, order = literals.get("name"), literals.get("report_order")
            if not isinstance(name, str) or not name or isinstance(order, bool) or not isinstance(order, int):
                raise RuntimeError(f"{path}: method class {node.name} must set name (a string) and report_order "
                                   f"(an int) to literals, to be registered")
            if name in found:
                raise RuntimeError(f"{path}: method name {name!r} is also used by {found[name][0]}.{found[name][1]}")
            found[name] = (module, node.name, order)
    return {name: (module, cls) for name, (module, cls, _) in sorted(found.items(), key=lambda kv: (kv[1][2], kv[0]))}


def _registry() -> dict[str, type[EmbeddingMethod]]:
    import importlib

    registry = {}
    for name, (module, cls_name) in _discover().items():
        cls = getattr(importlib.import_module(module), cls_name)
        if cls.name != name:  # pragma: no cover - the scan read this very literal
            raise RuntimeError(f"{module}.{cls_name}.name is {cls.name!r}, the source says {name!r}")
        registry[name] = cls
    return registry


def __getattr__(name: str) -> Any:
    # PEP 562: build METHODS (importing torchrec) only when someone asks for it.
    if name == "METHOD_NAMES":
        names = tuple(_discover())
        globals()["METHOD_NAMES"] = names
        return names
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
