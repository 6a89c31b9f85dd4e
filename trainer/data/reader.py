"""Streaming Parquet reader: a dataset split's row groups -> torchrec ``Batch(dense, KJT, labels)``.

Work plan
---------
The work units of a split are its Parquet row groups ``(file, row_group, num_rows)``, listed from the
file footers in manifest file order. An epoch reads a *stream*: an ordered list of pieces
``(unit, start, end)``. At the start of an epoch the pieces are the whole units, in an order shuffled
by ``np.random.default_rng([seed, epoch])`` (identical on every rank); the rows of a unit follow the
permutation ``default_rng([seed, epoch, unit])`` and ``start:end`` index that permuted order
(``shuffle=False``: file order and identity permutations).

The stream's ``T`` rows are cut into ``world_size * N`` consecutive global batches. Rank ``r`` owns
batches ``[r*N, (r+1)*N)``, and its ``S = max(1, num_workers)`` DataLoader workers ("slots") each own a
contiguous run of those, so a worker decodes a contiguous stretch of the stream: each unit once, except
that the unit at a boundary between two slots is decoded by both (at most ``world_size * S - 1``
units per epoch). Every rank derives the whole cut from footer metadata, without communication.

- Training (``drop_last=True``): every batch has ``batch_size`` rows and
  ``N = T // (world_size * batch_size)``, so every rank yields exactly ``N`` batches (TorchRec's
  collectives hang otherwise) and no row is read twice. The last ``T - world_size*N*batch_size`` rows
  of the shuffled stream (fewer than ``world_size * batch_size``; other rows every epoch) are skipped.
  When ``T`` is a multiple of ``world_size * batch_size`` every row is read exactly once per epoch.
- Evaluation (``drop_last=False``): ``N = ceil(T / (world_size * batch_size))`` and the ``T`` rows are
  spread over the ``world_size * N`` batches as evenly as possible (sizes differ by at most one and
  never exceed ``batch_size``), so every row is read exactly once and every rank yields the same number
  of batches, as sharded models need. Batches of 0 rows arise only when ``T < world_size * N``: with
  ``batch_size >= 2`` exactly when the split has fewer rows than there are ranks (with ``batch_size``
  1, when ``T`` is not a multiple of ``world_size``). TorchRec's sharded EmbeddingBagCollection accepts
  them (stride-0 KJTs, checked forward and backward on 2 gloo ranks with table-wise, column-wise and
  data-parallel sharding; tests/test_reader.py keeps the table-wise case).

Order
-----
A rank's ``j``-th batch of an epoch is the ``j // S``-th batch of slot ``j % S``: the order in which
``DataLoader`` round-robins its workers. The main process also puts batches back into that order by
their sequence number, so the sequence a rank sees depends only on (seed, epoch, world_size,
num_workers, batch_size, data) whatever DataLoader's scheduling. The batches themselves do not depend on
``num_workers`` (only their order does), and ``num_workers`` 0 and 1 give identical sequences.

Resume
------
``state_dict()`` is identical on every rank: ``{"split", "epoch", "batches_in_epoch", "layout",
"pieces"}`` where ``pieces`` is the epoch's starting stream and ``batches_in_epoch`` counts the batches
each rank has handed out since. ``load_state_dict`` under the same cut (world_size, max(1, num_workers),
batch_size, drop_last) continues with exactly the batches that would have come next: each slot skips its
consumed batches by row arithmetic, whole pieces without decoding them. Under a different layout, it
computes which stream rows the old layout consumed (the first ``batches_in_epoch`` batches of every rank)
and re-deals the remaining rows (skipped tail included) as pieces ``(unit, start, end)`` over the new
layout: rows are still read at most once in that epoch. The next epoch starts afresh.

Row provenance
--------------
With ``track_rows=True`` each worker also records which rows it sliced into each batch, as
``(unit, row indices in file order within the row group)``; the batch carries them to the main
process and ``last_batch_rows`` returns them for the batch just yielded, while ``dropped_rows()``
lists the tail a training epoch skips. The trainer's ``train.sample_log`` writes both down to prove
exactly-once consumption across faults and restarts. Off by default: the normal path only checks a
flag.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embdim.trainer.data.manifest import DatasetError, Manifest, load_manifest

logger = logging.getLogger(__name__)

FeatureDict = dict[str, tuple[np.ndarray, np.ndarray]]
"""Sparse features of one batch: name -> (values int64 [sum(lengths)], lengths int32 [batch_size])."""
FeatureTransform = Callable[[FeatureDict, int], FeatureDict]
"""``f(features, batch_size) -> features``; the KJT keys are the returned dict's keys, in order."""

_STATE_KEYS = ("split", "epoch", "batches_in_epoch", "layout", "pieces")
_LAYOUT_KEYS = ("world_size", "num_workers", "batch_size", "seed", "shuffle", "drop_last")


def num_dense_features(manifest: Manifest) -> int:
    """Width of ``Batch.dense_features``: the dense columns, or 1 (zeros) when there are none.

    DLRM's bottom MLP needs a dense input, so datasets without dense columns (Avazu) get one
    all-zero feature.
    """
    return max(1, len(manifest.dense))


@dataclass(frozen=True)
class WorkUnit:
    """One Parquet row group: the unit of decoding, sharding and shuffling."""

    file: str
    """Path relative to the dataset folder, as listed in dataset.json."""
    row_group: int
    num_rows: int


def _column_roles(manifest: Manifest) -> list[tuple[str, str, str]]:
    """(column, role for messages, expected type) for every column the reader needs."""
    roles = [(manifest.label, "label", "float")]
    roles += [(name, "dense feature", "float") for name in manifest.dense]
    roles += [(f.name, "multi-hot sparse field" if f.multi_hot else "sparse field", "list" if f.multi_hot else "int")
              for f in manifest.sparse]
    return roles


def _check_schema(path: Path, schema: pa.Schema, manifest: Manifest) -> None:
    """Checks that ``path`` has exactly the columns of the manifest, with the format's types."""
    roles = _column_roles(manifest)
    extra = [name for name in schema.names if name not in {r[0] for r in roles}]
    # A column dataset.json names but the file lacks is reported first, naming the manifest's
    # entry (a renamed column shows up as both: the missing name is the one to fix).
    for name, role, _ in roles:
        if schema.get_field_index(name) < 0:
            unnamed = f" ({extra} not in dataset.json)" if extra else ""
            raise DatasetError(f"{path} (every row group): missing column {name!r} ({role} in dataset.json); "
                               f"the file has {schema.names}{unnamed}")
    if extra:  # most likely a feature missing from dataset.json: it would be dropped silently
        raise DatasetError(f"{path} (every row group): column(s) {extra} not in dataset.json (label, dense, sparse); "
                           f"declare them there or drop them from the file")
    for name, role, kind in roles:
        t = schema.field(name).type
        if kind == "float":
            ok, expected = t == pa.float32(), "float32"
        elif kind == "int":
            ok, expected = t == pa.int64(), "int64"
        else:
            ok = (pa.types.is_list(t) or pa.types.is_large_list(t)) and t.value_type == pa.int64()
            expected = "list<int64>"
        if not ok:
            raise DatasetError(f"{path} (every row group): column {name!r} ({role}) has type {t}, expected {expected}")


def list_work_units(dataset_dir: str | Path, manifest: Manifest, split: str) -> list[WorkUnit]:
    """Lists the non-empty row groups of ``split`` from the file footers, in manifest file order.

    Also checks every file's schema against the manifest and the split's total row count.

    Raises:
        DatasetError: unknown split, missing or unreadable file, missing column or wrong type, or a
            row count that disagrees with dataset.json.
    """
    dataset_dir = Path(dataset_dir)
    if split not in manifest.splits:
        raise DatasetError(f"{dataset_dir / 'dataset.json'}: no split {split!r}; splits are {sorted(manifest.splits)}")
    info = manifest.splits[split]
    units = []
    for file in info.files:
        path = dataset_dir / file
        if not path.is_file():
            raise DatasetError(f"{path}: not found (listed in dataset.json, split {split!r})")
        try:
            with pq.ParquetFile(path) as pf:
                metadata, schema = pf.metadata, pf.schema_arrow
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"{path}: not a readable Parquet file: {e}") from None
        _check_schema(path, schema, manifest)
        for rg in range(metadata.num_row_groups):
            num_rows = metadata.row_group(rg).num_rows
            if num_rows > 0:
                units.append(WorkUnit(file=file, row_group=rg, num_rows=num_rows))
    total = sum(u.num_rows for u in units)
    if total != info.num_rows:
        raise DatasetError(f"{dataset_dir / 'dataset.json'}: split {split!r} declares num_rows={info.num_rows}, "
                           f"but the footers of its {len(info.files)} file(s) hold {total} rows")
    return units


@dataclass(frozen=True)
class _Layout:
    world_size: int
    num_workers: int
    batch_size: int
    seed: int
    shuffle: bool
    drop_last: bool

    @property
    def num_slots(self) -> int:
        """Streams per rank: one per DataLoader worker, one in-process stream when num_workers is 0."""
        return max(1, self.num_workers)

    def same_cut(self, other: "_Layout") -> bool:
        """Whether both layouts cut a stream into the same per-slot batches (num_workers 0 == 1)."""
        return (self.world_size, self.num_slots, self.batch_size, self.drop_last) == (
            other.world_size, other.num_slots, other.batch_size, other.drop_last)


def num_batches_per_rank(num_rows: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """Batches every rank yields for a stream of ``num_rows`` rows (see the module docstring)."""
    if drop_last:
        return num_rows // (world_size * batch_size)
    return -(-num_rows // (world_size * batch_size))


def _unit_permutation(layout: _Layout, epoch: int, unit: int, num_rows: int) -> np.ndarray:
    """The order (int64 file-order row indices) in which a shuffled epoch reads the rows of ``unit``."""
    return np.random.default_rng([layout.seed, epoch, unit]).permutation(num_rows).astype(np.int64, copy=False)


class _Plan:
    """The cut of one stream (an epoch, or the rest of one after a re-deal) into batches: arithmetic only.

    Args:
        pieces: int64 [P, 3] rows ``(unit, start, end)``, in stream order.
        layout: the layout that cuts the stream.
    """

    def __init__(self, pieces: np.ndarray, layout: _Layout) -> None:
        self.pieces = pieces
        self.layout = layout
        self.offsets = np.concatenate([[0], np.cumsum(pieces[:, 2] - pieces[:, 1])]).astype(np.int64)
        self.num_rows = int(self.offsets[-1])
        self.num_batches = num_batches_per_rank(self.num_rows, layout.world_size, layout.batch_size,
                                                layout.drop_last)
        num_global = layout.world_size * self.num_batches
        # Global batch k holds stream rows [k*q + min(k, rem), ...): all batch_size when dropping the
        # tail, else as even as possible.
        if layout.drop_last:
            self._q, self._rem = layout.batch_size, 0
        else:
            self._q, self._rem = divmod(self.num_rows, num_global) if num_global else (0, 0)

    def batch_start(self, k: int) -> int:
        """First stream row of global batch ``k`` (``k`` may be the end index)."""
        return k * self._q + min(k, self._rem)

    def slot_batches(self, rank: int, slot: int) -> tuple[int, int]:
        """(first global batch, number of batches) of ``slot`` on ``rank``."""
        n, s = self.num_batches, self.layout.num_slots
        return rank * n + slot * (n // s) + min(slot, n % s), n // s + int(slot < n % s)

    def consumed_in_slot(self, num_consumed: int, slot: int) -> int:
        """Batches of ``slot`` among a rank's first ``num_consumed`` (round-robin order)."""
        s = self.layout.num_slots
        return num_consumed // s + int(slot < num_consumed % s)

    def row_pieces(self, begin: int, end: int) -> Iterator[tuple[int, int, int]]:
        """The pieces ``(unit, start, end)`` holding stream rows ``[begin, end)``, in order."""
        p = int(np.searchsorted(self.offsets, begin, side="right")) - 1
        while begin < end:
            unit, start, _ = self.pieces[p]
            lo, hi = begin - self.offsets[p], min(end, self.offsets[p + 1]) - self.offsets[p]
            yield int(unit), int(start + lo), int(start + hi)
            begin = int(self.offsets[p + 1])
            p += 1

    def remaining_pieces(self, num_consumed: int) -> np.ndarray:
        """The pieces not read once every rank has yielded ``num_consumed`` batches, in stream order."""
        consumed = []
        for rank in range(self.layout.world_size):
            for slot in range(self.layout.num_slots):
                first, _ = self.slot_batches(rank, slot)
                done = self.consumed_in_slot(num_consumed, slot)
                if done:
                    consumed.append((self.batch_start(first), self.batch_start(first + done)))
        rest, cursor = [], 0
        for begin, end in sorted(consumed):
            if begin > cursor:
                rest.extend(self.row_pieces(cursor, begin))
            cursor = end
        rest.extend(self.row_pieces(cursor, self.num_rows))
        return np.asarray(rest, dtype=np.int64).reshape(-1, 3)


class _Columns:
    """Decoded rows of one piece, laid out for cheap batch slicing.

    Attributes:
        labels: float32 [n].
        dense: float32 [n, num_dense] (num_dense may be 0).
        single: int64 [num_single_hot, n]: each field's ids contiguous, so a batch's KJT values (key-major)
            are one slice of it. In a whole decoded row group: a list of the columns instead.
        multi: per multi-hot field, (values int64, offsets int64 [n + 1]; starting at 0 except in a whole
            decoded row group, where they index the column's child array).
    """

    __slots__ = ("labels", "dense", "single", "multi")

    def __init__(self, labels: np.ndarray, dense: np.ndarray, single: np.ndarray,
                 multi: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.labels, self.dense, self.single, self.multi = labels, dense, single, multi

    def __len__(self) -> int:
        return len(self.labels)


class _UnitDecoder:
    """Reads, validates and permutes row groups of one split; one instance per worker process.

    Args:
        dataset_dir: the dataset folder.
        manifest: its manifest.
        units: the split's work units.
        validate: check values (ids in range, finite dense, 0/1 labels) of every decoded row group.
    """

    def __init__(self, dataset_dir: Path, manifest: Manifest, units: list[WorkUnit], validate: bool) -> None:
        self.dataset_dir = dataset_dir
        self.manifest = manifest
        self.units = units
        self.validate = validate
        self.single = [f for f in manifest.sparse if not f.multi_hot]
        self.multi = [f for f in manifest.sparse if f.multi_hot]
        self.columns = [manifest.label, *manifest.dense, *manifest.sparse_names]
        self._files: dict[str, pq.ParquetFile] = {}
        self._cached: Optional[tuple[int, _Columns]] = None

    def close(self) -> None:
        for pf in self._files.values():
            pf.close()
        self._files.clear()
        self._cached = None

    def _error(self, unit: WorkUnit, column: str, message: str) -> DatasetError:
        path = self.dataset_dir / unit.file
        return DatasetError(f"{path}: row group {unit.row_group}, column {column!r}: {message}")

    def _read(self, index: int) -> _Columns:
        """Decodes a whole row group (validated, file order). Consecutive pieces of a unit share it."""
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        unit = self.units[index]
        path = self.dataset_dir / unit.file
        try:
            pf = self._files.get(unit.file)
            if pf is None:
                pf = self._files[unit.file] = pq.ParquetFile(path)
            # One thread per reader process: parallelism comes from DataLoader workers (and ranks), and
            # Arrow's pool on top of them would oversubscribe the cores.
            table = pf.read_row_group(unit.row_group, columns=self.columns, use_threads=False)
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"{path}: row group {unit.row_group}: cannot read: {e}") from None
        if table.num_rows != unit.num_rows:
            raise DatasetError(f"{path}: row group {unit.row_group} has {table.num_rows} rows, its footer said "
                               f"{unit.num_rows}; was the file rewritten while reading?")

        def flat(name: str) -> np.ndarray:
            column = table.column(name)
            if column.null_count:
                raise self._error(unit, name, f"{column.null_count} null value(s); the format has no nulls")
            return column.to_numpy()

        labels = flat(self.manifest.label)
        dense = [flat(name) for name in self.manifest.dense]
        single = [flat(f.name) for f in self.single]
        multi = []
        for f in self.multi:
            column = table.column(f.name).combine_chunks()
            if column.null_count or column.values.null_count:
                raise self._error(unit, f.name, "null list(s) or id(s); the format has no nulls")
            # offsets index the child array absolutely, whether or not the array is a slice.
            multi.append((column.values.to_numpy(), column.offsets.to_numpy().astype(np.int64)))
        if self.validate:
            self._validate(unit, labels, dense, single, multi)
        n = unit.num_rows
        dense_rows = np.stack(dense, axis=1) if dense else np.empty((n, 0), np.float32)
        columns = _Columns(labels=labels, dense=dense_rows, single=single, multi=multi)
        self._cached = (index, columns)
        return columns

    def _validate(self, unit: WorkUnit, labels: np.ndarray, dense: list[np.ndarray], single: list[np.ndarray],
                  multi: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Vectorized value checks; a failure names the file, row group, column and first bad row.

        Each check is a single pass without temporaries on the success path; the exact (slower) search
        for the first bad row runs only once a column has failed.
        """
        bad = (labels != 0) & (labels != 1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise self._error(unit, self.manifest.label, f"labels must be 0 or 1, row {row} has {labels[row]}")
        for name, values in zip(self.manifest.dense, dense):
            # A NaN or inf makes the sum non-finite; a finite sum proves every value finite (an overflow
            # of huge finite values only sends the column to the exact check).
            with np.errstate(over="ignore"):
                total = values.sum()
            if not np.isfinite(total) and not np.isfinite(values).all():
                row = int(np.flatnonzero(~np.isfinite(values))[0])
                raise self._error(unit, name, f"dense values must be finite, row {row} has {values[row]}")
        sparse = [(f, ids, None) for f, ids in zip(self.single, single)]
        sparse += [(f, values[offsets[0]:offsets[-1]], offsets) for f, (values, offsets) in zip(self.multi, multi)]
        for f, ids, offsets in sparse:
            # Viewed as uint64, negative ids become >= 2**63: one max() checks both bounds.
            if len(ids) and ids.view(np.uint64).max() >= f.num_embeddings:
                pos = int(np.flatnonzero((ids < 0) | (ids >= f.num_embeddings))[0])
                row = pos if offsets is None else int(np.searchsorted(offsets, offsets[0] + pos, side="right")) - 1
                raise self._error(unit, f.name, f"ids must lie in [0, {f.num_embeddings}) (num_embeddings in "
                                                f"dataset.json), row {row} has {ids[pos]}")

    def piece(self, index: int, start: int, end: int, permutation: Optional[np.ndarray]) -> _Columns:
        """Rows ``permutation[start:end]`` of unit ``index`` (rows ``start:end`` without a permutation)."""
        raw = self._read(index)
        single = np.empty((len(raw.single), end - start), np.int64)
        if permutation is None:
            for i, column in enumerate(raw.single):
                single[i] = column[start:end]
            multi = []
            for values, offsets in raw.multi:
                o = offsets[start:end + 1]
                multi.append((values[o[0]:o[-1]], o - o[0]))
            return _Columns(labels=raw.labels[start:end], dense=raw.dense[start:end], single=single, multi=multi)
        # np.take, not fancy indexing: several times faster for these gathers (numpy 2).
        rows = permutation[start:end]
        for i, column in enumerate(raw.single):
            np.take(column, rows, out=single[i])
        multi = []
        for values, offsets in raw.multi:
            # Jagged gather: new row i takes values[offsets[r]:offsets[r+1]] for r = rows[i].
            starts = np.take(offsets, rows)
            lengths = np.take(offsets, rows + 1) - starts
            new_offsets = np.zeros(len(rows) + 1, np.int64)
            np.cumsum(lengths, out=new_offsets[1:])
            positions = np.arange(new_offsets[-1], dtype=np.int64) + np.repeat(starts - new_offsets[:-1], lengths)
            multi.append((np.take(values, positions), new_offsets))
        return _Columns(labels=np.take(raw.labels, rows), dense=np.take(raw.dense, rows, axis=0), single=single,
                        multi=multi)


def _empty_columns(decoder: _UnitDecoder) -> _Columns:
    """A 0-row piece, so that a 0-row batch is built by the same code as the others."""
    return _Columns(labels=np.empty(0, np.float32), dense=np.empty((0, len(decoder.manifest.dense)), np.float32),
                    single=np.empty((len(decoder.single), 0), np.int64),
                    multi=[(np.empty(0, np.int64), np.zeros(1, np.int64)) for _ in decoder.multi])


def _check_transformed(features: Any, batch_size: int) -> FeatureDict:
    """Checks a feature_transform result: lengths of ``batch_size`` rows that add up to the values."""
    if not isinstance(features, dict):
        raise ValueError(f"feature_transform must return a dict, got {type(features).__name__}")
    for key, pair in features.items():
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError(f"feature_transform returned {key!r}: expected a (values, lengths) tuple")
        values, lengths = pair
        if values.ndim != 1 or lengths.shape != (batch_size,):
            raise ValueError(f"feature_transform returned {key!r}: values must be 1-D and lengths of shape "
                             f"({batch_size},), got {values.shape} and {lengths.shape}")
        if int(lengths.sum()) != len(values):
            raise ValueError(f"feature_transform returned {key!r}: lengths add up to {int(lengths.sum())}, "
                             f"but there are {len(values)} values")
    return features


class _EpochStream(IterableDataset):
    """One rank's batches of one stream; DataLoader worker ``k`` yields those of one slot.

    Yields ``(sequence_number, _PackedBatch)``; the reader restores sequence order and unpacks the
    batches in the main process.
    """

    def __init__(self, dataset_dir: Path, manifest: Manifest, units: list[WorkUnit], plan: _Plan, *, rank: int,
                 epoch: int, num_consumed: int, feature_transform: Optional[FeatureTransform],
                 validate: bool, track_rows: bool = False) -> None:
        super().__init__()
        self.dataset_dir, self.manifest, self.units, self.plan = dataset_dir, manifest, units, plan
        self.rank, self.epoch, self.num_consumed = rank, epoch, num_consumed
        self.feature_transform = feature_transform
        self.validate = validate
        self.track_rows = track_rows

    def __iter__(self) -> Iterator[tuple[int, "_PackedBatch"]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        num_slots = self.plan.layout.num_slots
        # DataLoader asks worker 0 first; rotate so that worker 0 serves the slot holding the rank's
        # next batch and the round-robin order is the sequence order from the first batch on.
        slot = (worker + self.num_consumed) % num_slots
        first, num = self.plan.slot_batches(self.rank, slot)
        done = self.plan.consumed_in_slot(self.num_consumed, slot)
        if done >= num:
            return
        decoder = _UnitDecoder(self.dataset_dir, self.manifest, self.units, self.validate)
        try:
            begin, end = self.plan.batch_start(first + done), self.plan.batch_start(first + num)
            chunks = self._chunks(decoder, begin, end)
            current, cursor = _empty_columns(decoder), 0
            unit, source = -1, None
            for i in range(done, num):
                size = self.plan.batch_start(first + i + 1) - self.plan.batch_start(first + i)
                parts = []
                rows: Optional[list[tuple[int, np.ndarray]]] = [] if self.track_rows else None
                while size > 0:
                    if cursor == len(current):
                        (current, unit, source), cursor = next(chunks), 0
                    take = min(size, len(current) - cursor)
                    parts.append((current, cursor, cursor + take))
                    if rows is not None:
                        rows.append((unit, source[cursor:cursor + take]))
                    cursor += take
                    size -= take
                packed = self._batch(decoder, parts)
                packed.rows = rows
                yield i * num_slots + slot, packed
        finally:
            decoder.close()

    def _chunks(self, decoder: _UnitDecoder, begin: int,
                end: int) -> Iterator[tuple[_Columns, int, Optional[np.ndarray]]]:
        """The decoded pieces of stream rows ``[begin, end)``, each with its unit and, when tracking
        rows, the file-order row indices (within the row group) of its rows; else None."""
        layout = self.plan.layout
        permutation_of: dict[int, np.ndarray] = {}
        for unit, start, stop in self.plan.row_pieces(begin, end):
            permutation = None
            if layout.shuffle:
                if unit not in permutation_of:
                    permutation_of.clear()  # pieces of a unit are adjacent in a slot's stretch
                    permutation_of[unit] = _unit_permutation(layout, self.epoch, unit, self.units[unit].num_rows)
                permutation = permutation_of[unit]
            source = None
            if self.track_rows:
                # The very indices the piece gathers, not a recomputation: the record is what was read.
                source = np.arange(start, stop, dtype=np.int64) if permutation is None else permutation[start:stop]
            yield decoder.piece(unit, start, stop, permutation), unit, source

    def _batch(self, decoder: _UnitDecoder, parts: list[tuple[_Columns, int, int]]) -> "_PackedBatch":
        if not parts:
            parts = [(_empty_columns(decoder), 0, 0)]
        size = sum(stop - start for _, start, stop in parts)
        num_single = len(decoder.single)
        features: Optional[FeatureDict] = None
        if decoder.multi or self.feature_transform is not None:
            single = np.concatenate([c.single[:, a:b] for c, a, b in parts], axis=1)
            features = {}
            single_row = {f.name: i for i, f in enumerate(decoder.single)}
            multi_index = {f.name: i for i, f in enumerate(decoder.multi)}
            for name in self.manifest.sparse_names:
                if name in single_row:
                    features[name] = (single[single_row[name]], np.ones(size, np.int32))
                    continue
                values_parts, length_parts = [], []
                for c, a, b in parts:
                    v, o = c.multi[multi_index[name]]
                    values_parts.append(v[o[a]:o[b]])
                    length_parts.append(np.diff(o[a:b + 1]))
                features[name] = (np.concatenate(values_parts), np.concatenate(length_parts).astype(np.int32))
            if self.feature_transform is not None:
                features = _check_transformed(self.feature_transform(features, size), size)
            keys = tuple(features)
            num_values = sum(len(v) for v, _ in features.values())
        else:
            keys = tuple(self.manifest.sparse_names)
            num_values = num_single * size
        packed = _PackedBatch.allocate(keys, size, num_dense_features(self.manifest), num_values)
        values, lengths, dense, labels = packed.arrays()
        # Copy straight into the batch's buffer: it owns exactly its batch's memory (a view of the
        # decoded row group would make DataLoader ship the whole row group to shared memory).
        np.concatenate([c.labels[a:b] for c, a, b in parts], out=labels)
        if self.manifest.dense:
            np.concatenate([c.dense[a:b] for c, a, b in parts], out=dense)
        else:
            dense.fill(0)
        if features is None:
            # All single-hot: values are the [num_fields, size] block in key-major order, lengths all 1.
            np.concatenate([c.single[:, a:b] for c, a, b in parts], axis=1, out=values.reshape(num_single, size))
            lengths.fill(1)
        elif features:
            np.concatenate([v for v, _ in features.values()], out=values, casting="same_kind")
            np.concatenate([n for _, n in features.values()], out=lengths, casting="same_kind")
        return packed


class _PackedBatch:
    """A batch's arrays in one flat buffer, unpacked into a ``Batch`` of views in the main process.

    DataLoader moves every tensor a worker returns into its own shared-memory segment, passed as a file
    descriptor that the main process fetches over a socket and maps: one buffer per batch instead of four
    tensors pays that once. Workers allocate it in shared memory directly (no copy on the way out), and
    pinning pins the single buffer. Layout: values int64 [num_values], then float32 dense [size, num_dense], float32
    labels [size] and int32 lengths [len(keys) * size]. ``rows``: the batch's provenance
    ``[(unit, file-order row indices)]`` when the reader tracks rows, else None.
    """

    __slots__ = ("buffer", "keys", "size", "num_dense", "num_values", "rows")

    def __init__(self, buffer: torch.Tensor, keys: tuple[str, ...], size: int, num_dense: int,
                 num_values: int, rows: Optional[list[tuple[int, np.ndarray]]] = None) -> None:
        self.buffer, self.keys, self.size, self.num_dense, self.num_values = buffer, keys, size, num_dense, num_values
        self.rows = rows

    @classmethod
    def allocate(cls, keys: tuple[str, ...], size: int, num_dense: int, num_values: int) -> "_PackedBatch":
        num_bytes = 8 * num_values + 4 * (size * num_dense + size + len(keys) * size)
        buffer = torch.empty(num_bytes, dtype=torch.uint8)
        if get_worker_info() is not None:
            # Allocate in shared memory right away: DataLoader would otherwise copy it there.
            buffer.share_memory_()
        return cls(buffer, keys, size, num_dense, num_values)

    def _bounds(self) -> list[int]:
        b = [0, 8 * self.num_values]
        for count in (self.size * self.num_dense, self.size, len(self.keys) * self.size):
            b.append(b[-1] + 4 * count)
        return b

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Writable numpy views (values, lengths, dense, labels) of the buffer."""
        raw, b = self.buffer.numpy(), self._bounds()
        return (raw[b[0]:b[1]].view(np.int64), raw[b[3]:b[4]].view(np.int32),
                raw[b[1]:b[2]].view(np.float32).reshape(self.size, self.num_dense), raw[b[2]:b[3]].view(np.float32))

    def pin_memory(self, *args: Any, **kwargs: Any) -> "_PackedBatch":
        return _PackedBatch(self.buffer.pin_memory(*args, **kwargs), self.keys, self.size, self.num_dense,
                            self.num_values, self.rows)

    def unpack(self) -> Batch:
        b = self._bounds()

        def view(i: int, dtype: torch.dtype) -> torch.Tensor:
            # An empty slice may come back from shared memory with stride 0, which .view(dtype) rejects.
            return self.buffer[b[i]:b[i + 1]].view(dtype) if b[i + 1] > b[i] else torch.empty(0, dtype=dtype)

        kjt = KeyedJaggedTensor(keys=list(self.keys), values=view(0, torch.int64), lengths=view(3, torch.int32),
                                stride=self.size)
        return Batch(dense_features=view(1, torch.float32).view(self.size, self.num_dense), sparse_features=kjt,
                     labels=view(2, torch.float32))


class ParquetBatchReader:
    """Streams one split of a dataset folder as torchrec ``Batch`` es, sharded over ranks and workers.

    ``iter(reader)`` yields the rest of the current epoch; when that iteration runs to its end the
    reader moves on to the next epoch, so ``for epoch in ...: for batch in reader:`` reads one epoch per
    loop, and after ``load_state_dict`` the first loop finishes the interrupted epoch. Leaving a loop
    early keeps the position: the next ``iter`` continues from there. See the module docstring for the
    work plan, its exactly-once guarantees and resumption.

    Args:
        dataset_dir: dataset folder (``dataset.json`` + Parquet files).
        split: "train", "valid" or "test".
        batch_size: rows per batch on this rank (the most, when ``drop_last`` is False).
        rank: this process's rank.
        world_size: number of ranks; all of them must build readers with the same arguments.
        num_workers: DataLoader worker processes decoding for this rank (0 = decode in this process).
        shuffle: shuffle row groups and rows within row groups, per (seed, epoch).
        seed: shuffling seed.
        drop_last: cut training batches of exactly ``batch_size`` rows and skip the remainder (default:
            ``shuffle``); False spreads every row over equal numbers of batches per rank (evaluation).
        feature_transform: picklable ``f(features, batch_size) -> features`` applied to each batch's
            sparse features (numpy values int64 and lengths int32 per field, in manifest order) before
            the KJT is built; the KJT keys are the returned keys, in order. The arrays it receives may be
            views of reader buffers.
        pin_memory: pin batches in page-locked memory (only with CUDA; ignored with a warning otherwise).
        validate: check values of every row group read (ids in ``[0, num_embeddings)``, finite dense
            values, 0/1 labels); column presence and types are always checked.
        multiprocessing_context: start method of the worker processes ("fork", "spawn", "forkserver";
            None = Python's default). A process that was itself spawned (torch.multiprocessing.spawn,
            tests/multiprocess.py) defaults to "spawn", whose workers re-import torch and torchrec at
            every epoch start (seconds each).
        track_rows: record which rows each batch holds (``last_batch_rows``) and which rows an
            epoch skips (``dropped_rows()``); for sample accounting, off by default (see the module
            docstring).

    Raises:
        DatasetError: bad manifest, files or schema (at construction) or bad values (while iterating),
            naming the file, row group and column; a training split too small for one batch per rank.
    """

    def __init__(self, dataset_dir: str | Path, split: str, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: Optional[bool] = None, feature_transform: Optional[FeatureTransform] = None,
                 pin_memory: bool = False, validate: bool = True,
                 multiprocessing_context: Optional[str] = None, track_rows: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy SeedSequence), got {seed}")
        self.dataset_dir = Path(dataset_dir)
        self.split = split
        self.manifest = load_manifest(self.dataset_dir)
        self.rank = rank
        self.num_workers = num_workers
        self.feature_transform = feature_transform
        self.validate = validate
        self.track_rows = track_rows
        self._last_rows: Optional[list[tuple[str, int, np.ndarray]]] = None
        self.multiprocessing_context = multiprocessing_context if num_workers > 0 else None
        self.pin_memory = pin_memory and torch.cuda.is_available()
        if pin_memory and not self.pin_memory:
            logger.warning("pin_memory=True needs CUDA; reading into pageable memory")
        self._layout = _Layout(world_size=world_size, num_workers=num_workers, batch_size=batch_size, seed=seed,
                               shuffle=shuffle, drop_last=shuffle if drop_last is None else drop_last)
        self._units = list_work_units(self.dataset_dir, self.manifest, split)
        self._unit_index = {(u.file, u.row_group): i for i, u in enumerate(self._units)}
        num_rows = self.manifest.splits[split].num_rows
        self._num_batches = num_batches_per_rank(num_rows, world_size, batch_size, self._layout.drop_last)
        if self._num_batches == 0:
            raise DatasetError(f"{self.dataset_dir / 'dataset.json'}: split {split!r} has {num_rows} rows, too few "
                               f"for one batch of {batch_size} on each of {world_size} rank(s); lower the batch size "
                               f"(data.batch_size) or use fewer ranks")
        if not self._layout.drop_last and num_rows < world_size * self._num_batches:
            logger.warning("split %r has %d rows for %d ranks x %d batches: some batches have 0 rows",
                           split, num_rows, world_size, self._num_batches)
        self._epoch = 0
        self._batches_in_epoch = 0
        self._plan: Optional[_Plan] = None
        logger.info("%s: %d row groups, %d rows; rank %d/%d reads %d batches of %d per epoch with %d worker(s)",
                    split, len(self._units), num_rows, rank, world_size, self._num_batches, batch_size, num_workers)

    @property
    def epoch(self) -> int:
        """The epoch that the next batch belongs to."""
        return self._epoch

    @property
    def batch_size(self) -> int:
        return self._layout.batch_size

    @property
    def world_size(self) -> int:
        return self._layout.world_size

    @property
    def units(self) -> list[WorkUnit]:
        """The split's row groups, in manifest file order (unit ``i`` of the permutation seeds)."""
        return list(self._units)

    def __len__(self) -> int:
        """Batches this rank yields in a whole epoch (the same on every rank)."""
        return self._num_batches

    @property
    def num_remaining_batches(self) -> int:
        """Batches the next ``iter(reader)`` yields: the rest of the current epoch."""
        return self._current_plan().num_batches - self._batches_in_epoch

    @property
    def last_batch_rows(self) -> list[tuple[str, int, np.ndarray]]:
        """Rows of the batch most recently yielded, in batch order: ``[(file, row_group, rows)]`` where
        ``rows`` (int64) index the row group in file order. Needs ``track_rows=True``."""
        if not self.track_rows:
            raise RuntimeError(f"{self.split} reader: last_batch_rows needs the reader built with track_rows=True")
        if self._last_rows is None:
            raise RuntimeError(f"{self.split} reader: no batch has been yielded yet")
        return self._last_rows

    def dropped_rows(self) -> list[tuple[str, int, np.ndarray]]:
        """Rows that the current epoch's plan skips (the tail past ``world_size * N * batch_size`` of the
        shuffled stream when ``drop_last``; none otherwise), as ``[(file, row_group, rows)]`` like
        ``last_batch_rows``. After a re-deal onto another layout, the tail of the re-dealt rows: the old
        plan's tail is then read. Needs ``track_rows=True``."""
        if not self.track_rows:
            raise RuntimeError(f"{self.split} reader: dropped_rows() needs the reader built with track_rows=True")
        plan = self._current_plan()
        layout = plan.layout
        begin = plan.batch_start(layout.world_size * plan.num_batches)
        out = []
        for unit, start, end in plan.row_pieces(begin, plan.num_rows):
            if layout.shuffle:
                rows = _unit_permutation(layout, self._epoch, unit, self._units[unit].num_rows)[start:end]
            else:
                rows = np.arange(start, end, dtype=np.int64)
            out.append((self._units[unit].file, self._units[unit].row_group, rows))
        return out

    def set_epoch(self, epoch: int) -> None:
        """Moves to the start of ``epoch``; a no-op for the current epoch, so a resumed position is kept."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self._epoch:
            self._start_epoch(epoch)

    def _start_epoch(self, epoch: int) -> None:
        self._epoch, self._batches_in_epoch, self._plan = epoch, 0, None

    def _current_plan(self) -> _Plan:
        if self._plan is None:
            order = np.arange(len(self._units))
            if self._layout.shuffle:
                order = np.random.default_rng([self._layout.seed, self._epoch]).permutation(len(self._units))
            rows = np.array([u.num_rows for u in self._units], dtype=np.int64)
            pieces = np.stack([order, np.zeros_like(order), rows[order]], axis=1).astype(np.int64)
            self._plan = _Plan(pieces, self._layout)
        return self._plan

    def __iter__(self) -> Iterator[Batch]:
        plan = self._current_plan()
        num_consumed = self._batches_in_epoch
        if num_consumed < plan.num_batches:
            stream = _EpochStream(self.dataset_dir, self.manifest, self._units, plan, rank=self.rank,
                                  epoch=self._epoch, num_consumed=num_consumed,
                                  feature_transform=self.feature_transform, validate=self.validate,
                                  track_rows=self.track_rows)
            if self.num_workers > 0:
                # Forked workers inherit the parent's cyclic garbage; one that frees a C++ object
                # whose threads stayed in the parent (a gloo ProcessGroup) hangs. Collect first.
                gc.collect()
            loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                persistent_workers=False, multiprocessing_context=self.multiprocessing_context)
            expected, pending = num_consumed, {}
            it = iter(loader)
            try:
                for sequence, batch in it:
                    pending[sequence] = batch
                    while expected in pending:
                        packed = pending.pop(expected)
                        out = packed.unpack()
                        if packed.rows is not None:
                            self._last_rows = [(self._units[u].file, self._units[u].row_group, rows)
                                               for u, rows in packed.rows]
                        expected += 1
                        # Count before handing out: a checkpoint taken while the consumer works on this
                        # batch must not replay it.
                        self._batches_in_epoch = expected
                        yield out
            finally:
                # Stop the workers now, also when the consumer leaves the loop early or a worker raised
                # (the exception's traceback would keep the iterator, and its workers, alive).
                shutdown = getattr(it, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
                del it
            if expected != plan.num_batches or pending:
                raise RuntimeError(f"reader internal error: rank {self.rank} got {expected} of "
                                   f"{plan.num_batches} batches (pending {sorted(pending)})")
        self._start_epoch(self._epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        """The position, identical on every rank (rank 0 can save it for all); plain JSON-able types."""
        plan = self._current_plan()
        layout = plan.layout
        return {
            "split": self.split,
            "epoch": self._epoch,
            "batches_in_epoch": self._batches_in_epoch,
            "layout": {key: getattr(layout, key) for key in _LAYOUT_KEYS},
            "pieces": [[self._units[u].file, self._units[u].row_group, int(s), int(e)] for u, s, e in plan.pieces],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a position saved by ``state_dict``, under this reader's layout (see the module docstring).

        Raises:
            ValueError: malformed state, another split, seed or shuffle setting, or a count past the epoch.
            DatasetError: the state names row groups this split does not have.
        """
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing or not isinstance(state["layout"], dict) or any(k not in state["layout"] for k in _LAYOUT_KEYS):
            raise ValueError(f"reader state needs keys {list(_STATE_KEYS)} and layout keys {list(_LAYOUT_KEYS)}; "
                             f"missing {missing or 'layout keys'}")
        if state["split"] != self.split:
            raise ValueError(f"reader state is for split {state['split']!r}, this reader reads {self.split!r}")
        old_layout = _Layout(**{k: state["layout"][k] for k in _LAYOUT_KEYS})
        for key in ("seed", "shuffle"):
            if getattr(old_layout, key) != getattr(self._layout, key):
                raise ValueError(f"reader state was saved with {key}={getattr(old_layout, key)!r}, this reader has "
                                 f"{key}={getattr(self._layout, key)!r}; the epoch's row order would differ")
        pieces = []
        for file, row_group, start, end in state["pieces"]:
            unit = self._unit_index.get((file, row_group))
            if unit is None:
                raise DatasetError(f"reader state names {self.dataset_dir / file} row group {row_group}, which split "
                                   f"{self.split!r} does not have")
            if not 0 <= start < end <= self._units[unit].num_rows:
                raise ValueError(f"reader state: rows [{start}, {end}) of {file} row group {row_group} are out of "
                                 f"range [0, {self._units[unit].num_rows})")
            pieces.append((unit, start, end))
        pieces = np.asarray(pieces, dtype=np.int64).reshape(-1, 3)
        old = _Plan(pieces, old_layout)
        num_consumed = int(state["batches_in_epoch"])
        if not 0 <= num_consumed <= old.num_batches:
            raise ValueError(f"reader state: batches_in_epoch={num_consumed} is outside [0, {old.num_batches}]")
        self._epoch = int(state["epoch"])
        if old_layout.same_cut(self._layout):
            self._plan, self._batches_in_epoch = _Plan(pieces, self._layout), num_consumed
            return
        self._plan, self._batches_in_epoch = _Plan(old.remaining_pieces(num_consumed), self._layout), 0
        logger.info("%s epoch %d: re-dealt %d unread rows from world_size=%d x %d slot(s), batch %d onto "
                    "world_size=%d x %d slot(s), batch %d: %d batches per rank remain",
                    self.split, self._epoch, self._plan.num_rows, old_layout.world_size, old_layout.num_slots,
                    old_layout.batch_size, self._layout.world_size, self._layout.num_slots,
                    self._layout.batch_size, self._plan.num_batches)
