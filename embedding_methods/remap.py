"""Host-side id remapping from raw field ids to the compact retrain tables of a plan.

A field split into width groups becomes one KJT feature per group (``<field>`` when it has one
group, else ``<field>@g<k>``); kept ids are renumbered densely ``0..n_g-1`` inside their group
(in raw-id order) and pruned ids are DROPPED from the bag. Under sum pooling a dropped id adds
nothing, exactly as a shared all-zero row would, but costs no lookup and no row. Doing this in the
data pipeline keeps the GPU side plain TorchRec: the sharded tables are ordinary tables and
``TrainPipelineSparseDist`` still sees the KJT straight from the batch (docs/torchrec-notes.md#stand-in-modules).

The remapper takes what a data pipeline has: a dict of numpy arrays (embdim's own reader), or a
TorchRec ``KeyedJaggedTensor`` or ``Batch`` (``embedding_methods.remap_kjt``, imported only then);
``remap_dataset`` wraps a map-style or iterable dataset of batches. A pipeline whose fields are
named differently from the dataset the plan was searched on passes ``feature_names`` (the same
renaming as ``load_compact_embedding(..., feature_names=...)``).

Only numpy is imported here, so loader processes that unpickle a remapper stay light.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from embdim.embedding_methods.plan import PlanError, SizePlan, field_file_stems, group_feature_name
from embdim.io import atomic_save_npy

FeatureNames = Union[Mapping[str, str], Sequence[str], None]
"""A field renaming: ``{plan field: pipeline name}`` (fields not listed keep their names), or one
pipeline name per plan field in plan order, or ``None`` (the plan's names)."""


class RemapError(ValueError):
    """A batch does not fit the plan (missing field, id out of range); the message names the field."""


def retrain_feature_names(plan: SizePlan, feature_names: FeatureNames = None) -> list[str]:
    """KJT keys of the retrain model, in plan field order and group order (pruned fields have none)."""
    plan = rename_plan(plan, feature_names)
    return [group_feature_name(f.name, k, len(f.groups)) for f in plan.fields for k in range(len(f.groups))]


def rename_plan(plan: SizePlan, feature_names: FeatureNames, source: str = "feature_names") -> SizePlan:
    """The plan with its fields renamed to a pipeline's names (a copy; the id groups are shared).

    ``feature_names`` is ``{plan field: new name}`` (unlisted fields keep their names) or a list of
    one new name per plan field, in plan order; ``None`` returns ``plan`` itself. Renamed plans are
    validated: two fields may not end up with one name, nor a group feature (``<name>@g<k>``) with
    another field's name.
    """
    if feature_names is None:
        return plan
    old = [f.name for f in plan.fields]
    if isinstance(feature_names, Mapping):
        unknown = [k for k in feature_names if k not in old]
        if unknown:
            raise PlanError(f"{source}: {unknown} are not fields of the plan; its fields are {old}")
        new = [feature_names.get(name, name) for name in old]
    elif isinstance(feature_names, Sequence) and not isinstance(feature_names, (str, bytes)):
        new = list(feature_names)
        if len(new) != len(old):
            raise PlanError(f"{source}: {len(new)} names for the plan's {len(old)} fields {old}")
    else:
        raise PlanError(f"{source}: expected a dict {{plan field: name}} or a list of names, "
                        f"got {type(feature_names).__name__}")
    for before, after in zip(old, new):
        if not isinstance(after, str) or not after:
            raise PlanError(f"{source}: field {before!r} is renamed to {after!r}; names must be non-empty strings")
    clashes = sorted({n for n in new if new.count(n) > 1})
    if clashes:
        raise PlanError(f"{source}: several fields are renamed to {clashes}")
    renamed = dataclasses.replace(plan, fields=[dataclasses.replace(f, name=n) for f, n in zip(plan.fields, new)])
    renamed.validate(source)
    return renamed


def build_lookup(num_embeddings: int, groups_ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-field lookup ``raw id -> position in the concatenation of the groups`` (-1 = pruned).

    Returns ``(lookup, starts)``: group ``g`` owns positions ``[starts[g], starts[g+1])``, so an id's
    group is ``searchsorted(starts, pos, "right") - 1`` and its local row ``pos - starts[g]``. The
    positions are below ``num_embeddings``, so int32 suffices up to 2**31 ids (half the memory).
    """
    dtype = np.int32 if num_embeddings < 2**31 else np.int64
    lookup = np.full(num_embeddings, -1, dtype=dtype)
    starts = np.zeros(len(groups_ids) + 1, dtype=np.int64)
    for g, ids in enumerate(groups_ids):
        starts[g + 1] = starts[g] + len(ids)
        lookup[ids] = np.arange(starts[g], starts[g + 1], dtype=dtype)
    return lookup, starts


class _FieldRemap:
    """Remap state of one field; picklable, re-opening a memory-mapped lookup after unpickling."""

    def __init__(self, name: str, num_embeddings: int, out_keys: list[str], lookup: np.ndarray | None,
                 starts: np.ndarray | None, lookup_path: str | None) -> None:
        self.name = name
        self.num_embeddings = num_embeddings
        self.out_keys = out_keys
        self.lookup = lookup
        self.starts = starts
        self.lookup_path = lookup_path

    @property
    def passthrough(self) -> bool:
        return self.lookup is None and self.lookup_path is None and len(self.out_keys) == 1

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.lookup_path is not None:
            state["lookup"] = None  # loader processes map the shared file instead of copying it
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.lookup_path is not None:
            self.lookup = np.load(self.lookup_path, mmap_mode="r")

    def __call__(self, values: np.ndarray, lengths: np.ndarray, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
        num_groups = len(self.out_keys)
        if num_groups == 0:
            return []
        values = np.asarray(values)
        lengths = np.asarray(lengths)
        if lengths.shape != (batch_size,):
            raise RemapError(f"field {self.name!r}: lengths has shape {lengths.shape}, expected ({batch_size},)")
        if int(lengths.sum()) != values.shape[0]:
            raise RemapError(f"field {self.name!r}: lengths sum to {int(lengths.sum())} but there are "
                             f"{values.shape[0]} values")
        if values.size and (values.min() < 0 or values.max() >= self.num_embeddings):
            bad = values[(values < 0) | (values >= self.num_embeddings)][0]
            raise RemapError(f"field {self.name!r}: id {int(bad)} is out of range [0, {self.num_embeddings})")
        positions = self.lookup[values]
        kept = positions >= 0
        if values.shape[0] == batch_size and bool(np.all(lengths == 1)):
            # Single-hot (Criteo, Avazu): a row's new length is 1 if its id is in the group, else 0.
            if num_groups == 1:
                return [(positions[kept].astype(np.int64), kept.astype(np.int32))]
            group = np.searchsorted(self.starts, positions, side="right") - 1
            out = []
            for g in range(num_groups):
                in_group = kept & (group == g)
                out.append(((positions[in_group] - self.starts[g]).astype(np.int64), in_group.astype(np.int32)))
            return out
        rows = np.repeat(np.arange(batch_size), lengths)
        if num_groups == 1:
            # Pruning only: keep the surviving ids in order, count them per row.
            new_values = positions[kept].astype(np.int64)
            new_lengths = np.bincount(rows[kept], minlength=batch_size).astype(np.int32)
            return [(new_values, new_lengths)]
        # Several groups: a stable sort by group keeps each group's ids in row (bag) order; numpy
        # radix-sorts small integer keys, so this is linear in the number of ids.
        group = np.searchsorted(self.starts, positions, side="right") - 1
        group = np.where(kept, group, num_groups).astype(np.int16 if num_groups < 2**15 else np.int32)
        order = np.argsort(group, kind="stable")
        sorted_group = group[order]
        local = positions[order].astype(np.int64)
        per_group_lengths = np.bincount(group.astype(np.int64) * batch_size + rows,
                                        minlength=(num_groups + 1) * batch_size).reshape(num_groups + 1, batch_size)
        bounds = np.searchsorted(sorted_group, np.arange(num_groups + 1), side="left")
        out = []
        for g in range(num_groups):
            lo, hi = bounds[g], bounds[g + 1]
            out.append((local[lo:hi] - self.starts[g], per_group_lengths[g].astype(np.int32)))
        return out


class IdRemapper:
    """Maps a batch of raw-id features to the retrain model's KJT features (a reader ``feature_transform``).

    Args:
        plan (SizePlan): the size plan of the retrain model.
        feature_names (dict[str, str] | list[str] | None): the pipeline's names of the plan's fields
            (see ``rename_plan``); inputs and outputs then use these names (``cat_0``, ``cat_0@g1``).
        cache_dir (str | Path | None): folder for memory-mapped lookups of large fields; when set,
            fields with at least ``mmap_min_rows`` ids keep their lookup in
            ``cache_dir/<field>.lookup.npy`` (written atomically here) and loader processes that
            unpickle the remapper map that file, sharing its pages, instead of each holding a copy.
            ``None`` keeps every lookup in memory (shared after ``fork``, copied by ``spawn``).
        mmap_min_rows (int): size from which a field's lookup goes to ``cache_dir``.

    Call ``remapper(features, batch_size)`` with ``features[field] = (values int64, lengths int32)``;
    it returns the same structure keyed by ``retrain_feature_names(plan)``. Fields kept whole at one
    width are passed through untouched. ``remapper(kjt)`` and ``remapper(batch)`` take a TorchRec
    ``KeyedJaggedTensor`` or ``Batch`` and return the remapped KJT / a copy of the batch holding it
    (``embedding_methods.remap_kjt``).

    Example::

        remapper = IdRemapper(load_plan("run/plan.json"))
        out = remapper({"C1": (np.array([5, 7, 9]), np.array([1, 2], dtype=np.int32))}, batch_size=2)
        batch = remapper(batch)                 # torchrec.datasets.utils.Batch -> Batch
    """

    def __init__(self, plan: SizePlan, *, feature_names: FeatureNames = None, cache_dir: str | Path | None = None,
                 mmap_min_rows: int = 1 << 22) -> None:
        plan.validate("IdRemapper plan")
        plan = rename_plan(plan, feature_names, "IdRemapper feature_names")
        self.feature_names = retrain_feature_names(plan)
        self._fields: list[_FieldRemap] = []
        for f, stem in zip(plan.fields, field_file_stems(plan)):
            out_keys = [group_feature_name(f.name, k, len(f.groups)) for k in range(len(f.groups))]
            if len(f.groups) == 1 and f.groups[0].ids is None:
                self._fields.append(_FieldRemap(f.name, f.num_embeddings, out_keys, None, None, None))
                continue
            lookup, starts = build_lookup(f.num_embeddings, [g.ids for g in f.groups])
            lookup_path = None
            if cache_dir is not None and f.num_embeddings >= mmap_min_rows:
                target = Path(cache_dir) / f"{stem}.lookup.npy"
                atomic_save_npy(target, lookup)
                lookup_path = os.fspath(target.resolve())
                lookup = np.load(lookup_path, mmap_mode="r")
            self._fields.append(_FieldRemap(f.name, f.num_embeddings, out_keys, lookup, starts, lookup_path))

    @property
    def field_names(self) -> list[str]:
        """Raw fields this remapper expects, in plan order."""
        return [f.name for f in self._fields]

    def __call__(self, features: Any, batch_size: int | None = None) -> Any:
        """Remaps a dict of ``(values, lengths)`` arrays (``batch_size`` rows), a KJT or a ``Batch``."""
        if isinstance(features, Mapping):
            if batch_size is None:
                raise TypeError("IdRemapper: a dict of (values, lengths) arrays needs batch_size")
            return self.remap_arrays(features, batch_size)
        # TorchRec inputs: torch is imported only here, so numpy-only loader processes stay light.
        from embdim.embedding_methods.remap_kjt import remap_torchrec

        return remap_torchrec(self, features)

    def remap_arrays(self, features: Mapping[str, tuple[np.ndarray, np.ndarray]],
                     batch_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The numpy path of ``__call__``: ``{field: (values, lengths)}`` -> ``{feature: (values, lengths)}``."""
        missing = [f.name for f in self._fields if f.name not in features]
        if missing:
            raise RemapError(f"IdRemapper: batch lacks field(s) {missing} of the plan; it has {sorted(features)}")
        unknown = sorted(set(features) - {f.name for f in self._fields})
        if unknown:
            raise RemapError(f"IdRemapper: batch has field(s) {unknown} that the plan does not list")
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for f in self._fields:
            values, lengths = features[f.name]
            if f.passthrough:
                out[f.out_keys[0]] = (values, lengths)
                continue
            for key, pair in zip(f.out_keys, f(values, lengths, batch_size)):
                out[key] = pair
        return out

