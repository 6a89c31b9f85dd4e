"""Host-side id remapping from raw field ids to the compact retrain tables of a plan.

A field split into width groups becomes one KJT feature per group (``<field>`` when it has one
group, else ``<field>@g<k>``); kept ids are renumbered densely ``0..n_g-1`` inside their group
(in raw-id order) and pruned ids are DROPPED from the bag. Under sum pooling a dropped id adds
nothing, exactly as a shared all-zero row would, but costs no lookup and no row. Doing this in the
data pipeline keeps the GPU side plain TorchRec: the sharded tables are ordinary tables and
``TrainPipelineSparseDist`` still sees the KJT straight from the batch (docs/torchrec-notes.md#stand-in-modules).

Only numpy is imported here, so loader processes stay light.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from embdim.embedding_methods.plan import SizePlan, field_file_stems, group_feature_name
from embdim.trainer.io import atomic_save_npy


class RemapError(ValueError):
    """A batch does not fit the plan (missing field, id out of range); the message names the field."""


def retrain_feature_names(plan: SizePlan) -> list[str]:
    """KJT keys of the retrain model, in plan field order and group order (pruned fields have none)."""
    return [group_feature_name(f.name, k, len(f.groups)) for f in plan.fields for k in range(len(f.groups))]


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
        cache_dir (str | Path | None): folder for memory-mapped lookups of large fields; when set,
            fields with at least ``mmap_min_rows`` ids keep their lookup in
            ``cache_dir/<field>.lookup.npy`` (written atomically here) and loader processes that
            unpickle the remapper map that file, sharing its pages, instead of each holding a copy.
            ``None`` keeps every lookup in memory (shared after ``fork``, copied by ``spawn``).
        mmap_min_rows (int): size from which a field's lookup goes to ``cache_dir``.

    Call ``remapper(features, batch_size)`` with ``features[field] = (values int64, lengths int32)``;
    it returns the same structure keyed by ``retrain_feature_names(plan)``. Fields kept whole at one
    width are passed through untouched.

    Example::

        remapper = IdRemapper(load_plan("run/plan.json"))
        out = remapper({"C1": (np.array([5, 7, 9]), np.array([1, 2], dtype=np.int32))}, batch_size=2)
    """

    def __init__(self, plan: SizePlan, *, cache_dir: str | Path | None = None, mmap_min_rows: int = 1 << 22) -> None:
        plan.validate("IdRemapper plan")
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

    def __call__(self, features: dict[str, tuple[np.ndarray, np.ndarray]],
                 batch_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
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

