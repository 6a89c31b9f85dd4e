"""Streaming converters of raw CTR logs (Criteo, Avazu, any CSV/Parquet) to the embdim format.

Every converter reads its inputs with pyarrow's streaming CSV reader (or Parquet batches), block
by block, so memory is bounded by the vocabularies rather than the files:

0. ``--split a,b,c`` only: count the rows of the inputs (a light pass over one column) to place
   the contiguous train/valid/test cuts (``--split files``: the three inputs are the splits);
1. count the values of every categorical field over the **train** rows (``pyarrow.compute
   .value_counts`` per block, merged by a vectorized group-by); the vocabulary of a field is its
   values seen at least ``min_count`` times, with ids 1..V by descending count (ties by value);
2. map values to ids (``pyarrow.compute.index_in`` against the vocabulary, +1; missing and
   unseen -> 0, the OOV id), log-transform the dense features, and write Parquet row groups;
   count the ids of the train split (``counts/<field>.npy``).

Text inputs may be compressed (gzip, bz2, zstd; detected by their first bytes, not the file
name) and are decompressed while streaming: the Criteo 1TB logs are read as the ``day_N.gz`` files
they are distributed as. Any other binary input is refused naming the file.

Dense values below 0 are handled as ``negative_dense`` says: "clip" (the default; the DLRM
reference's log(1 + max(x, 0)), the number of clipped values per column is recorded in
dataset.json and printed), "signed-log" (sign(x) log(1 + |x|)) or "error".

The dataset is built in a temporary folder beside ``out`` and moved into place at the end;
``dataset.json`` is written last. ``out`` is locked for the whole build (a second build of the
same ``out`` is refused), an existing dataset there is replaced only with ``overwrite``, and the
staging folders of killed builds of ``out`` are removed first (``writer.claim_output``).
``vocab/<field>.parquet`` keeps each vocabulary (row i holds the value of id i + 1 and its train
count) so that ids can be mapped back to raw values.

Public entry points: ``convert_criteo`` (``convert_criteo.py``), ``convert_avazu``
(``convert_avazu.py``), ``convert_csv`` (``convert_csv.py``), one module per format; each defines
a ``_Format`` (which columns, how to read and parse a block). This module holds what they share:
the parsing helpers, the text input handling and the pipeline (``_convert``).
"""

from __future__ import annotations

import codecs
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from tqdm import tqdm

from embdim.trainer.data.manifest import SPLITS, DatasetError, Manifest, SparseField, write_manifest
from embdim.trainer.data.writer import (
    IdCounter,
    SplitWriter,
    ValueCounter,
    build_vocab,
    NEGATIVE_DENSE,
    claim_output,
    dense_transform,
    list_array,
    map_to_ids,
    output_schema,
    parse_split,
    save_counts,
    split_sizes,
    staged_output,
)
from embdim.io import atomic_path

DEFAULT_SPLIT = "0.8,0.1,0.1"
DEFAULT_MIN_COUNT = 2
DEFAULT_BLOCK_SIZE = 16 << 20
DEFAULT_NEGATIVE_DENSE = "clip"


# --------------------------------------------------------------------------------------------
# parsing helpers (errors name the file, the column and the row)


def _where(path: Path, row: int, header_lines: int) -> str:
    """``row`` is the 0-based data row within the file; ``header_lines`` < 0: not a text file."""
    if header_lines < 0:
        return f"row {row + 1}"
    return f"row {row + 1} (line {row + 1 + header_lines})"


def _first_bad_number(values: pa.Array) -> int | None:
    for i, v in enumerate(values.to_pylist()):
        if v is None:
            continue
        try:
            float(v)
        except (TypeError, ValueError):
            return i
    return None


def _to_float(values: pa.Array, path: Path, column: str, first_row: int, header_lines: int, what: str) -> np.ndarray:
    """float64 values (null -> NaN); non-numeric strings raise naming the file, column and row."""
    if pa.types.is_floating(values.type) or pa.types.is_integer(values.type) or pa.types.is_boolean(values.type) \
            or pa.types.is_null(values.type):
        out = values.cast(pa.float64())
    else:
        try:
            out = pc.cast(values, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            bad = _first_bad_number(values)
            at = f", {_where(path, first_row + bad, header_lines)}: {values[bad].as_py()!r}" if bad is not None else ""
            raise DatasetError(f"{path}: {what} column {column!r} holds a non-numeric value{at}") from None
    return out.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _labels(values: pa.Array, path: Path, column: str, first_row: int, header_lines: int) -> np.ndarray:
    x = _to_float(values, path, column, first_row, header_lines, "label")
    bad = np.flatnonzero(~((x == 0.0) | (x == 1.0)))
    if len(bad):
        i = int(bad[0])
        raw = values[i].as_py()
        raise DatasetError(
            f"{path}: {_where(path, first_row + i, header_lines)}: label column {column!r} holds "
            f"{'an empty value' if raw is None else repr(raw)}; labels must be 0 or 1")
    return x.astype(np.float32)


def _dense(values: pa.Array, path: Path, column: str, first_row: int, header_lines: int, negative: str,
           clipped: dict[str, int]) -> np.ndarray:
    """The transformed dense column (see the module docstring); ``clipped[column]`` counts the
    values that "clip" set to 0."""
    x = _to_float(values, path, column, first_row, header_lines, "dense")
    infinite = np.flatnonzero(np.isinf(x))
    if len(infinite):  # an explicit infinity is bad data, not a missing value: do not map it to 0 silently
        i = int(infinite[0])
        raise DatasetError(f"{path}: {_where(path, first_row + i, header_lines)}: dense column {column!r} holds "
                           f"{values[i].as_py()!r}; dense values must be finite (leave the cell empty if missing)")
    x = np.where(np.isfinite(x), x, 0.0)
    below = np.flatnonzero(x < 0)
    if len(below):
        if negative == "error":
            i = int(below[0])
            raise DatasetError(f"{path}: {_where(path, first_row + i, header_lines)}: dense column {column!r} holds "
                               f"{values[i].as_py()!r}; negative dense values are refused (--negative-dense error; "
                               f"'clip' maps them to 0, 'signed-log' keeps their sign)")
        if negative == "clip":
            clipped[column] = clipped.get(column, 0) + len(below)
    return dense_transform(x, negative)


def _as_string(values: pa.Array) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_string(values.type):
        return values
    if pa.types.is_large_string(values.type) or pa.types.is_dictionary(values.type):
        return values.cast(pa.string())
    return pc.cast(values, pa.string())


@dataclass
class _Multi:
    """A multi-hot column: the non-empty items (strings) and, for each, its row."""
    num_rows: int
    values: pa.Array
    parents: np.ndarray


def _split_multi(values: pa.Array, separator: str) -> _Multi:
    """Splits a multi-hot column (``a|b|c`` strings or a list column) into items; empty items are dropped."""
    n = len(values)
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        lists = values
    else:
        lists = pc.split_pattern(_as_string(values), pattern=separator)
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.utf8_trim_whitespace(_as_string(flat))
    keep = pc.and_(pc.is_valid(flat), pc.not_equal(flat, "")).fill_null(False)
    keep_np = keep.to_numpy(zero_copy_only=False)
    return _Multi(n, flat.filter(keep), parents[keep_np])


def _multi_ids(m: _Multi, vocab: pa.Array) -> tuple[pa.ListArray, np.ndarray]:
    """list<int64> ids (a row without items gets [0], the OOV id) and the flat ids (for counts)."""
    ids = map_to_ids(m.values, vocab)
    lengths = np.bincount(m.parents, minlength=m.num_rows) if len(m.parents) else np.zeros(m.num_rows, np.int64)
    old_offsets = np.zeros(m.num_rows + 1, np.int64)
    np.cumsum(lengths, out=old_offsets[1:])
    new_lengths = np.maximum(lengths, 1)
    offsets = np.zeros(m.num_rows + 1, np.int64)
    np.cumsum(new_lengths, out=offsets[1:])
    flat = np.zeros(int(offsets[-1]), np.int64)
    if len(ids):
        pos = offsets[m.parents] + (np.arange(len(ids)) - old_offsets[m.parents])
        flat[pos] = ids
    return list_array(offsets, flat), flat


# --------------------------------------------------------------------------------------------
# input formats


@dataclass
class _Prepared:
    """One block of input rows, parsed: label, dense (float32, transformed), categoricals."""
    num_rows: int
    label: np.ndarray | None = None
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    single: dict[str, pa.Array] = field(default_factory=dict)
    multi: dict[str, _Multi] = field(default_factory=dict)


def _is_parquet(path: Path) -> bool:
    if path.suffix.lower() in (".parquet", ".pq"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False


# Compressed text: detected by the first bytes, so that a renamed or suffix-less file works too.
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"))


def _codec(path: Path) -> str | None:
    """The compression of a text input ("gzip", "bz2", "zstd") or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise DatasetError(f"{path}: cannot open: {e.strerror or e}") from None
    for magic, codec in _MAGIC:
        if head.startswith(magic):
            return codec
    if len(head) == 4 and head.startswith(b"BZh") and head[3:4] in b"123456789":
        return "bz2"
    return None


def _open_text(path: Path) -> pa.NativeFile:
    """A (decompressing) input stream of a text input."""
    codec = _codec(path)
    try:
        return pa.input_stream(str(path), compression=codec)
    except (OSError, pa.ArrowInvalid) as e:
        raise DatasetError(f"{path}: cannot open{f' as {codec}' if codec else ''}: {e}") from None


def _check_text(path: Path, head: bytes) -> None:
    """Refuses binary data (NUL bytes, or not UTF-8) in the first bytes of a text input."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
        text = b"\0" not in head
    except UnicodeDecodeError:
        text = False
    if not text:
        codec = _codec(path)
        raise DatasetError(f"{path}: binary data{f' inside the {codec} compression' if codec else ''}, not CSV/TSV "
                           "text (UTF-8); inputs are text logs, optionally gzip/bz2/zstd-compressed, or Parquet")


class _Format:
    """An input format: which columns it has, how to read blocks and how to parse them."""

    source = ""
    header_lines = 1
    label: str
    dense: list[str]
    sparse: list[str]
    multi_hot: list[str]

    def __init__(self, block_size: int) -> None:
        self.block_size = int(block_size)
        self.negative_dense = DEFAULT_NEGATIVE_DENSE
        self.clipped: dict[str, int] = {}
        """Per dense column, the negative values "clip" set to 0."""

    # -- to implement
    def check(self, path: Path) -> None:
        raise NotImplementedError

    def iter_raw(self, path: Path, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError

    def raw_columns(self, numeric: bool) -> list[str]:
        raise NotImplementedError

    def prepare(self, batch: pa.RecordBatch, path: Path, first_row: int, numeric: bool) -> _Prepared:
        raise NotImplementedError

    # -- shared
    def count_rows(self, path: Path) -> int:
        n = 0
        for b in self.iter_raw(path, columns=[self.raw_columns(numeric=True)[0]]):
            n += b.num_rows
        return n

    def _csv_batches(self, path: Path, read_options: pcsv.ReadOptions, parse_options: pcsv.ParseOptions,
                     convert_options: pcsv.ConvertOptions) -> Iterator[pa.RecordBatch]:
        stream = _open_text(path)
        try:
            reader = pcsv.open_csv(stream, read_options=read_options, parse_options=parse_options,
                                   convert_options=convert_options)
        except (pa.ArrowInvalid, pa.ArrowKeyError, OSError) as e:
            stream.close()
            raise DatasetError(f"{path}: cannot read as {self.source} CSV: {e}") from None
        with stream, reader:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except (pa.ArrowInvalid, OSError) as e:
                    raise DatasetError(f"{path}: malformed {self.source} data: {e}") from None
                yield batch


def _string_types(names: Sequence[str]) -> dict[str, pa.DataType]:
    return {n: pa.string() for n in names}



def _first_line(path: Path, limit: int = 64 << 20) -> bytes:
    """The first line of a text input (decompressed), without its line break; binary data is
    refused naming the file."""
    try:
        with _open_text(path) as f:
            buf = b""
            while b"\n" not in buf and len(buf) < limit:
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                buf += chunk
    except (OSError, pa.ArrowInvalid) as e:
        raise DatasetError(f"{path}: cannot read: {e}") from None
    _check_text(path, buf[: 1 << 16])
    return buf.split(b"\n", 1)[0].rstrip(b"\r")


def _count_lines(path: Path, chunk_size: int = 1 << 24) -> int:
    """Non-empty lines of a text input (decompressed), by counting line breaks:
    exact for formats without quoted line breaks (Criteo, Avazu). Empty lines ("" or "\\r") are
    not counted, as pyarrow's CSV reader skips them."""
    lines = blank = 0
    tail = np.frombuffer(b"\0\n", np.uint8)  # as if preceded by a line break: a leading empty line is blank
    last = b""
    try:
        with _open_text(path) as f:
            while True:
                chunk = f.read(chunk_size)
                if not chunk:
                    break
                probe = np.concatenate([tail, np.frombuffer(chunk, np.uint8)])
                nl, cr = probe == 10, probe == 13
                lines += int(nl[2:].sum())
                blank += int((nl[2:] & (nl[1:-1] | (cr[1:-1] & nl[:-2]))).sum())
                tail, last = probe[-2:].copy(), chunk[-1:]
    except (OSError, pa.ArrowInvalid) as e:
        raise DatasetError(f"{path}: cannot read: {e}") from None
    if last and last not in (b"\n", b"\r"):
        lines += 1  # a last line without a line break
    return lines - blank


def _read_header(path: Path, delimiter: str) -> list[str]:
    line = _first_line(path)
    if not line.strip():
        raise DatasetError(f"{path}: empty file or empty header line (a CSV header naming the columns is expected)")
    try:
        # Without threads: the threaded reader releases this Python file object on one of Arrow's
        # pool threads, which can still be doing so when the interpreter finalizes (a one-line
        # header parses fast, and a failing command exits at once); taking the GIL then ends the
        # thread inside a C++ destructor: "terminate called without an active exception", exit 134.
        t = pcsv.read_csv(io.BytesIO(line + b"\n"), read_options=pcsv.ReadOptions(use_threads=False),
                          parse_options=pcsv.ParseOptions(delimiter=delimiter))
    except pa.ArrowInvalid as e:
        raise DatasetError(f"{path}: cannot parse the CSV header: {e}") from None
    _check_unique(path, t.schema.names)
    return t.schema.names


def _check_unique(path: Path, names: list[str]) -> None:
    """Duplicated column names are an error: a reader would silently use the first one."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        where = "; ".join(f"{n!r} at columns {[i + 1 for i, m in enumerate(names) if m == n]}" for n in dupes)
        raise DatasetError(f"{path}: the header names a column more than once ({where}); rename the duplicates")
# --------------------------------------------------------------------------------------------
# the pipeline


def _bar(progress: bool, desc: str, total: int | None):
    return tqdm(total=total, desc=desc, unit="rows", unit_scale=True, disable=not progress, file=sys.stderr,
                leave=False, dynamic_ncols=True)


class _Router:
    """Iterates the inputs block by block and routes row ranges to train/valid/test."""

    def __init__(self, fmt: _Format, inputs: list[Path], mode, file_rows: list[int] | None) -> None:
        self.fmt, self.inputs, self.mode = fmt, inputs, mode
        if mode == "files":
            self.sizes = None
        else:
            assert file_rows is not None
            self.total = sum(file_rows)
            self.sizes = split_sizes(self.total, mode)
            self.file_rows = file_rows

    def ranges(self) -> list[tuple[str, int, int]]:
        assert self.sizes is not None
        a, b, _ = self.sizes
        return [("train", 0, a), ("valid", a, a + b), ("test", a + b, self.total)]

    def __iter__(self) -> Iterator[tuple[str, Path, int, pa.RecordBatch]]:
        return self.iterate(train_only=False, numeric=True)

    def iterate(self, *, train_only: bool, numeric: bool) -> Iterator[tuple[str, Path, int, pa.RecordBatch]]:
        cols = self.fmt.raw_columns(numeric)
        if self.mode == "files":
            for split, path in zip(SPLITS, self.inputs):
                if train_only and split != "train":
                    return
                first = 0
                for batch in self.fmt.iter_raw(path, cols):
                    yield split, path, first, batch
                    first += batch.num_rows
            return
        ranges = self.ranges()
        g = 0  # global row index of the first row of the current block
        for path, expected in zip(self.inputs, self.file_rows):
            first = 0
            for batch in self.fmt.iter_raw(path, cols):
                n = batch.num_rows
                for split, lo, hi in ranges:
                    s, e = max(lo, g), min(hi, g + n)
                    if s < e and not (train_only and split != "train"):
                        yield split, path, first + (s - g), batch.slice(s - g, e - s)
                g += n
                first += n
                if train_only and g >= ranges[0][2]:
                    return
            if first != expected:
                raise DatasetError(f"{path}: read {first} rows, but the first pass counted {expected}; "
                                   "did the file change during the conversion?")


MAP_MIN_ROWS = 1 << 16
MAP_MAX_ROWS = 1 << 20


def _coalesce(blocks: Iterator[tuple[str, Path, int, pa.RecordBatch]], target_rows: int):
    """Merges consecutive blocks of the same split and file into batches of about ``target_rows``
    rows: ``index_in`` rebuilds its hash table of the vocabulary at every call, so mapping bigger
    batches amortizes that cost when vocabularies are large."""
    pending: list[pa.RecordBatch] = []
    key = None
    first = rows = 0

    def flush():
        t = pa.Table.from_batches(pending).combine_chunks()
        batches = t.to_batches()
        return key[0], key[1], first, batches[0] if len(batches) == 1 else pa.RecordBatch.from_struct_array(
            pa.concat_arrays([b.to_struct_array() for b in batches]))

    for split, path, start, batch in blocks:
        if pending and (split, path) != key:
            yield flush()
            pending, rows = [], 0
        if not pending:
            key, first = (split, path), start
        pending.append(batch)
        rows += batch.num_rows
        if rows >= target_rows:
            yield flush()
            pending, rows = [], 0
    if pending:
        yield flush()


def _convert(fmt: _Format, inputs: Sequence[str | Path], out: str | Path, *, split: str, min_count: int,
             row_group_size: int, rows_per_file: int | None, progress: bool, options: dict,
             overwrite: bool = False, negative_dense: str = DEFAULT_NEGATIVE_DENSE) -> Manifest:
    if negative_dense not in NEGATIVE_DENSE:
        raise ValueError(f"--negative-dense must be one of {', '.join(NEGATIVE_DENSE)}, got {negative_dense!r}")
    fmt.negative_dense, fmt.clipped = negative_dense, {}
    with claim_output(out, overwrite=overwrite):
        return _build(fmt, inputs, out, split=split, min_count=min_count, row_group_size=row_group_size,
                      rows_per_file=rows_per_file, progress=progress, options=options, overwrite=overwrite)


def _build(fmt: _Format, inputs: Sequence[str | Path], out: str | Path, *, split: str, min_count: int,
           row_group_size: int, rows_per_file: int | None, progress: bool, options: dict, overwrite: bool) -> Manifest:
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no input files")
    for p in paths:
        if not p.is_file():
            raise DatasetError(f"{p}: input file not found")
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"--min-count must be a positive integer, got {min_count!r}")
    if row_group_size < 1:
        raise ValueError(f"--row-group-size must be positive, got {row_group_size}")
    mode = parse_split(split, len(paths))
    for p in paths:
        fmt.check(p)

    file_rows = None
    if mode != "files":
        file_rows = []
        with _bar(progress, f"{fmt.source}: counting rows", None) as bar:
            for p in paths:
                file_rows.append(fmt.count_rows(p))
                bar.update(file_rows[-1])
    router = _Router(fmt, paths, mode, file_rows)
    n_train_expected = router.sizes[0] if router.sizes else None
    if n_train_expected == 0:
        raise DatasetError(f"the train split is empty ({sum(file_rows or [])} input rows, --split {split})")

    # pass 1: value counts over the train rows
    counters = {s: ValueCounter() for s in fmt.sparse}
    train_rows = 0
    with _bar(progress, f"{fmt.source}: vocabularies (train)", n_train_expected) as bar:
        for _, path, first, batch in router.iterate(train_only=True, numeric=False):
            prep = fmt.prepare(batch, path, first, numeric=False)
            for s, arr in prep.single.items():
                counters[s].update(_as_string(arr))
            for s, m in prep.multi.items():
                counters[s].update(m.values)
            train_rows += batch.num_rows
            bar.update(batch.num_rows)
    if train_rows == 0:
        raise DatasetError(f"{paths[0]}: the train split has no rows")
    vocabs: dict[str, tuple[pa.Array, np.ndarray]] = {}
    for s in fmt.sparse:
        vocabs[s] = build_vocab(counters[s].result(), min_count)
    del counters
    num_embeddings = {s: len(vocabs[s][0]) + 1 for s in fmt.sparse}

    # pass 2: ids, dense transform, Parquet
    schema = output_schema(fmt.label, fmt.dense, fmt.sparse, fmt.multi_hot)
    with staged_output(out, overwrite=overwrite) as stage:
        writers = {sp: SplitWriter(stage, sp, schema, row_group_size=row_group_size, rows_per_file=rows_per_file)
                   for sp in SPLITS}
        id_counts = {s: IdCounter(num_embeddings[s]) for s in fmt.sparse}
        total = sum(router.sizes) if router.sizes else None
        try:
            with _bar(progress, f"{fmt.source}: writing", total) as bar:
                target = min(MAP_MAX_ROWS, max(MAP_MIN_ROWS, max(num_embeddings.values()) // 2))
                for sp, path, first, batch in _coalesce(iter(router), target):
                    prep = fmt.prepare(batch, path, first, numeric=True)
                    arrays: list[pa.Array] = [pa.array(prep.label, pa.float32())]
                    arrays += [pa.array(prep.dense[d], pa.float32()) for d in fmt.dense]
                    for s in fmt.sparse:
                        if s in prep.multi:
                            lists, flat = _multi_ids(prep.multi[s], vocabs[s][0])
                            arrays.append(lists)
                            if sp == "train":
                                id_counts[s].update(flat)
                        else:
                            ids = map_to_ids(_as_string(prep.single[s]), vocabs[s][0])
                            arrays.append(pa.array(ids, pa.int64()))
                            if sp == "train":
                                id_counts[s].update(ids)
                    writers[sp].write(pa.Table.from_arrays(arrays, schema=schema))
                    bar.update(batch.num_rows)
            infos = {sp: w.close() for sp, w in writers.items()}
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        if infos["train"].num_rows != train_rows:
            raise DatasetError(f"the train split has {infos['train'].num_rows} rows in the second pass but "
                               f"{train_rows} in the first; did an input change during the conversion?")
        for s in fmt.sparse:
            save_counts(stage, s, id_counts[s].counts)
            values, counts = vocabs[s]
            with atomic_path(stage / "vocab" / f"{s}.parquet") as tmp:
                pq.write_table(pa.table({"value": values, "count": pa.array(counts, pa.int64())}), tmp)
        splits = {sp: info for sp, info in infos.items() if sp == "train" or info.num_rows > 0}
        manifest = Manifest(
            label=fmt.label,
            dense=list(fmt.dense),
            sparse=[SparseField(s, num_embeddings[s], s in fmt.multi_hot) for s in fmt.sparse],
            splits=splits,
            source=fmt.source,
            extra={
                "inputs": [str(p) for p in paths],
                "split": split if isinstance(split, str) else ",".join(str(x) for x in split),
                "min_count": min_count,
                "row_group_size": row_group_size,
                "dense_transform": f"{NEGATIVE_DENSE[fmt.negative_dense]}; missing -> 0",
                "negative_dense": fmt.negative_dense,
                "negative_dense_clipped": dict(sorted(fmt.clipped.items())),
                "vocab_dir": "vocab",
                **options,
            },
        )
        write_manifest(stage, manifest)
    return manifest

# The entry points live in one module per format (convert_criteo.py, convert_avazu.py,
# convert_csv.py), which import the pipeline above. They are looked up here on first use
# (PEP 562), so ``from embdim.trainer.data.convert import convert_criteo`` keeps working without
# an import cycle.
_FORMAT_MODULES = {
    "convert_criteo": "convert_criteo", "CRITEO_LABEL": "convert_criteo", "CRITEO_DENSE": "convert_criteo",
    "CRITEO_SPARSE": "convert_criteo", "convert_avazu": "convert_avazu", "convert_csv": "convert_csv",
}


def __getattr__(name: str):
    module = _FORMAT_MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"embdim.trainer.data.{module}"), name)


__all__ = ["convert_criteo", "convert_avazu", "convert_csv", "CRITEO_DENSE", "CRITEO_SPARSE", "CRITEO_LABEL"]
