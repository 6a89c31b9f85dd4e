"""Shared helpers of the dataset producers (converters and the synthetic generator).

- ``claim_output`` / ``staged_output``: lock ``--out`` for the build (one build per output; the
  staging folders of killed builds are removed), build the dataset in a temporary folder beside
  it and move it into place at the end (refusing to replace a non-empty folder that is not an
  embdim dataset, and a dataset without ``overwrite``);
- ``SplitWriter``: rolling ``part-NNNNN.parquet`` files of fixed-size row groups, each file
  written atomically;
- ``ValueCounter`` / ``build_vocab`` / ``map_to_ids``: streaming per-field value counts merged
  with bounded memory (bounded by the vocabulary), the frequency-ordered vocabulary
  (ids 1..V by descending train count, ties by value; 0 = OOV) and the value -> id mapping;
- ``IdCounter``: train-split id counts (``counts/<field>.npy``);
- ``parse_split`` / ``split_sizes``: the ``--split`` option.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import ExitStack, contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embdim.trainer.data.manifest import OOV_ID, SPLITS, DatasetError, SplitInfo
from embdim.io import atomic_path, atomic_save_npy, make_dirs, naming_storage_errors, output_lock

DEFAULT_ROW_GROUP_SIZE = 65536
DEFAULT_ROWS_PER_FILE = 2_000_000
"""Target rows per Parquet file (rounded down to whole row groups)."""

LABEL_TYPE = pa.float32()
DENSE_TYPE = pa.float32()
ID_TYPE = pa.int64()
MULTI_HOT_TYPE = pa.list_(pa.int64())


# --------------------------------------------------------------------------------------------
# output folder


def check_output_dir(out: str | Path, *, overwrite: bool = False) -> Path:
    """Raises unless ``out`` is absent, empty, or (with ``overwrite``) a previous embdim dataset."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise DatasetError(f"{out}: --out exists and is not a folder")
        if (out / "dataset.json").is_file():
            if not overwrite:
                raise DatasetError(f"{out}: --out already holds a dataset (dataset.json); give --overwrite to "
                                   "replace it, or another --out")
        elif any(out.iterdir()):
            raise DatasetError(
                f"{out}: --out is a non-empty folder that is not an embdim dataset (no dataset.json); "
                "refusing to overwrite it")
    return out


def _staging_prefixes(out: Path) -> tuple[str, str]:
    return f".{out.name}.building-", f".{out.name}.old-"


@contextmanager
def claim_output(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """The output folder of a dataset build, for the whole build: locked against a second job
    (``embdim.io.output_lock``, a lock file beside it), checked (``check_output_dir``), and rid
    of the staging folders of builds that were killed before they could remove them (under the
    lock, no live build owns them)."""
    out = Path(out).absolute()
    with output_lock(out, inside=False):
        check_output_dir(out, overwrite=overwrite)
        if out.parent.is_dir():
            for entry in out.parent.iterdir():
                if entry.is_dir() and entry.name.startswith(_staging_prefixes(out)):
                    shutil.rmtree(entry, ignore_errors=True)
        yield out


def _relax_permissions(root: Path) -> None:
    """Temporary files/folders are created private (0600/0700); give the finished dataset the
    usual permissions (0666/0777 less the umask) so that other users/processes can read it."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


@contextmanager
def staged_output(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary folder beside ``out``; on success it replaces ``out``.

    On error the temporary folder is removed and ``out`` is left untouched. A previous dataset at
    ``out`` is replaced (with ``overwrite``) only once the new one is complete. Run it inside
    ``claim_output``: the lock keeps a second build out of ``out``.
    """
    out = check_output_dir(out, overwrite=overwrite).absolute()
    make_dirs(out.parent)
    with naming_storage_errors(out.parent):
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefixes(out)[0], dir=out.parent))
    try:
        yield staging
        with naming_storage_errors(out):
            _relax_permissions(staging)
            check_output_dir(out, overwrite=overwrite)
            old = None
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=_staging_prefixes(out)[1], dir=out.parent))
                os.replace(out, old / "dataset")  # move the previous dataset aside (same filesystem)
            os.replace(staging, out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Parquet writing


def output_schema(label: str, dense: Sequence[str], sparse: Sequence[str], multi_hot: Sequence[str] = ()) -> pa.Schema:
    mh = set(multi_hot)
    return pa.schema(
        [pa.field(label, LABEL_TYPE)]
        + [pa.field(d, DENSE_TYPE) for d in dense]
        + [pa.field(s, MULTI_HOT_TYPE if s in mh else ID_TYPE) for s in sparse]
    )


class SplitWriter:
    """Writes one split as ``root/<split>/part-NNNNN.parquet`` files.

    Rows are buffered into row groups of exactly ``row_group_size`` rows (the last one of the split
    may be shorter); a file is closed after ``rows_per_file`` rows (rounded down to whole row
    groups). Each file is written under a temporary name and renamed when complete.
    """

    def __init__(self, root: str | Path, split: str, schema: pa.Schema, *, row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
                 rows_per_file: int | None = DEFAULT_ROWS_PER_FILE, first_index: int = 0,
                 compression: str = "snappy") -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        if row_group_size < 1:
            raise ValueError(f"row_group_size must be positive, got {row_group_size}")
        self.root = Path(root)
        self.split = split
        self.schema = schema
        self.row_group_size = int(row_group_size)
        if rows_per_file is None:
            self.rows_per_file = None
        else:
            self.rows_per_file = max(1, int(rows_per_file) // self.row_group_size) * self.row_group_size
        self.compression = compression
        self.files: list[str] = []
        self.num_rows = 0
        self._index = first_index
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._stack: ExitStack | None = None
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0

    def _open(self) -> None:
        rel = f"{self.split}/part-{self._index:05d}.parquet"
        self._index += 1
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.root / rel))
        self._rel = rel
        with naming_storage_errors(self.root / rel):
            self._writer = pq.ParquetWriter(tmp, self.schema, compression=self.compression)
        self._file_rows = 0

    def _close_file(self) -> None:
        if self._writer is None:
            return
        with naming_storage_errors(self.root / self._rel):
            self._writer.close()
        self._writer = None
        assert self._stack is not None
        self._stack.close()  # renames the temporary file onto its final name
        self._stack = None
        self.files.append(self._rel)

    def _write_group(self, table: pa.Table) -> None:
        if self._writer is None:
            self._open()
        assert self._writer is not None
        with naming_storage_errors(self.root / self._rel):
            self._writer.write_table(table, row_group_size=table.num_rows)
        self._file_rows += table.num_rows
        self.num_rows += table.num_rows
        if self.rows_per_file is not None and self._file_rows >= self.rows_per_file:
            self._close_file()

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if table.num_rows == 0:
            return
        if table.schema != self.schema:
            table = table.select(self.schema.names).cast(self.schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows < self.row_group_size:
            return
        buf = pa.concat_tables(self._pending).combine_chunks()
        start = 0
        while buf.num_rows - start >= self.row_group_size:
            self._write_group(buf.slice(start, self.row_group_size))
            start += self.row_group_size
        rest = buf.slice(start)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def close(self) -> SplitInfo:
        if self._pending_rows:
            self._write_group(pa.concat_tables(self._pending).combine_chunks())
            self._pending, self._pending_rows = [], 0
        self._close_file()
        return SplitInfo(files=list(self.files), num_rows=self.num_rows)

    def abort(self) -> None:
        """Drops the file being written (its temporary file is removed, nothing is renamed)."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:
                pass
            self._writer = None
        if self._stack is not None:
            err = RuntimeError("aborted")
            self._stack.__exit__(type(err), err, None)
            self._stack = None


# --------------------------------------------------------------------------------------------
# vocabularies and ids


class ValueCounter:
    """Counts the values of one categorical field over a stream of arrays, with memory bounded by
    the number of distinct values (partial counts are merged with a vectorized group-by)."""

    def __init__(self, merge_threshold: int = 1 << 20) -> None:
        self._parts: list[pa.Table] = []
        self._part_rows = 0
        self._merged_rows = 0
        self._threshold = merge_threshold
        self.total = 0
        """Non-null values seen."""

    def update(self, values: pa.Array | pa.ChunkedArray) -> None:
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        values = values.drop_null() if values.null_count else values
        if len(values) == 0:
            return
        self.total += len(values)
        vc = pc.value_counts(values)
        t = pa.Table.from_arrays([vc.field("values"), vc.field("counts")], names=["values", "counts"])
        self._parts.append(t)
        self._part_rows += t.num_rows
        if self._part_rows >= max(self._threshold, self._merged_rows):
            self._merge()

    def _merge(self) -> None:
        if len(self._parts) <= 1:
            return
        t = pa.concat_tables(self._parts).group_by("values").aggregate([("counts", "sum")])
        t = t.select(["values", "counts_sum"]).rename_columns(["values", "counts"])
        self._parts = [t]
        self._merged_rows = self._part_rows = t.num_rows

    def result(self) -> pa.Table:
        """Table(values, counts) of distinct values, unordered."""
        self._merge()
        if not self._parts:
            return pa.table({"values": pa.array([], pa.string()), "counts": pa.array([], pa.int64())})
        return self._parts[0]


def build_vocab(counts: pa.Table, min_count: int) -> tuple[pa.Array, np.ndarray]:
    """The vocabulary of values with count >= min_count, ordered by descending count then
    ascending value. Returns (values, counts); value i has id i + 1."""
    if min_count > 1:
        counts = counts.filter(pc.greater_equal(counts["counts"], min_count))
    order = pc.sort_indices(counts, sort_keys=[("counts", "descending"), ("values", "ascending")])
    counts = counts.take(order)
    values = counts["values"].combine_chunks()
    return values, counts["counts"].to_numpy().astype(np.int64)


def map_to_ids(values: pa.Array | pa.ChunkedArray, vocab: pa.Array) -> np.ndarray:
    """int64 ids of ``values``: 1 + position in ``vocab``; null or unseen values -> 0 (OOV)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if len(vocab) == 0:
        return np.zeros(len(values), np.int64)
    idx = pc.index_in(values, value_set=vocab)
    ids = pc.fill_null(pc.add(idx.cast(pa.int64()), 1), OOV_ID)
    return ids.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def list_array(offsets: np.ndarray, ids: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32, copy=False)), pa.array(ids, pa.int64()))


class IdCounter:
    """Occurrences of each id of one field (np.bincount accumulated; length num_embeddings)."""

    def __init__(self, num_embeddings: int) -> None:
        self.counts = np.zeros(num_embeddings, np.int64)

    def update(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        c = np.bincount(ids, minlength=len(self.counts))
        if len(c) > len(self.counts):
            raise DatasetError(f"id {int(ids.max())} out of range [0, {len(self.counts)})")
        self.counts += c


def save_counts(root: str | Path, field_name: str, counts: np.ndarray) -> None:
    atomic_save_npy(Path(root) / "counts" / f"{field_name}.npy", np.asarray(counts, np.int64))


# --------------------------------------------------------------------------------------------
# splits


def parse_split(split: str | Sequence[float], num_inputs: int) -> str | tuple[Fraction, Fraction, Fraction]:
    """``"files"`` (exactly 3 inputs: train, valid, test) or three non-negative fractions summing to 1."""
    if isinstance(split, str) and split.strip().lower() == "files":
        if num_inputs != 3:
            raise ValueError(f"--split files needs exactly 3 inputs (train, valid, test), got {num_inputs}")
        return "files"
    parts = [p.strip() for p in split.split(",")] if isinstance(split, str) else list(split)
    if len(parts) != 3:
        raise ValueError(f"--split: expected 'files' or three fractions train,valid,test, got {split!r}")
    try:
        fr = tuple(Fraction(str(p)) for p in parts)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--split: expected numbers, got {split!r}") from None
    if any(f < 0 for f in fr) or fr[0] == 0:
        raise ValueError(f"--split: fractions must be >= 0 with a positive train part, got {split!r}")
    total = sum(fr)
    if abs(total - 1) > Fraction(1, 1000):
        raise ValueError(f"--split: fractions must sum to 1, got {split!r} (sum {float(total):g})")
    return (fr[0] / total, fr[1] / total, fr[2] / total)  # type: ignore[return-value]


def split_sizes(total_rows: int, fractions: tuple[Fraction, Fraction, Fraction]) -> tuple[int, int, int]:
    """Contiguous train/valid/test row counts: cuts at round(total * cumulative fraction)."""
    a, b, _ = fractions
    cut1 = int(round(total_rows * a))
    cut2 = int(round(total_rows * (a + b)))
    cut2 = max(cut1, min(cut2, total_rows))
    return cut1, cut2 - cut1, total_rows - cut2


NEGATIVE_DENSE = {
    "clip": "log(1 + max(x, 0))",
    "signed-log": "sign(x) * log(1 + |x|)",
    "error": "log(1 + x); negative values are an error",
}
"""What ``dense_transform`` does with each ``negative`` mode (recorded in dataset.json)."""


def dense_transform(x: np.ndarray, negative: str = "clip") -> np.ndarray:
    """The dense feature transform as float32; NaN (missing) -> 0. ``negative``: "clip" =
    log(1 + max(x, 0)) (the DLRM reference's, negative values become 0), "signed-log" =
    sign(x) log(1 + |x|) (keeps them, symmetric), "error" = log(1 + x) (the caller has refused
    negative values)."""
    if negative not in NEGATIVE_DENSE:
        raise ValueError(f"negative dense mode must be one of {sorted(NEGATIVE_DENSE)}, got {negative!r}")
    x = np.asarray(x, np.float64)
    x = np.where(np.isnan(x), 0.0, x)
    if negative == "signed-log":
        return (np.sign(x) * np.log1p(np.abs(x))).astype(np.float32)
    return np.log1p(np.maximum(x, 0.0)).astype(np.float32)
