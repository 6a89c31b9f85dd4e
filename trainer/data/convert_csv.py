"""The generic converter: any CSV (with a header line) or Parquet input with declared columns.

The caller names the label, dense, single-hot and multi-hot columns. The shared pipeline
(counting, vocabularies, splitting, writing) is ``convert.py``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from embdim.trainer.data.convert import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MIN_COUNT,
    DEFAULT_NEGATIVE_DENSE,
    DEFAULT_SPLIT,
    _as_string,
    _check_unique,
    _convert,
    _dense,
    _Format,
    _is_parquet,
    _labels,
    _Prepared,
    _read_header,
    _split_multi,
    _string_types,
)
from embdim.trainer.data.manifest import DatasetError, Manifest
from embdim.trainer.data.writer import DEFAULT_ROW_GROUP_SIZE, DEFAULT_ROWS_PER_FILE


class _Generic(_Format):
    source = "csv"

    def __init__(self, block_size: int, *, label: str, dense: Sequence[str], sparse: Sequence[str],
                 multi_hot: Sequence[str], delimiter: str, multi_hot_separator: str) -> None:
        super().__init__(block_size)
        self.label = label
        self.dense = list(dense)
        self.multi_hot = list(multi_hot)
        self.sparse = [*sparse, *[m for m in multi_hot if m not in sparse]]
        self.delimiter = delimiter
        self.separator = multi_hot_separator
        names = [label, *self.dense, *self.sparse]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"column(s) {dupes} declared more than once (label/dense/sparse/multi-hot)")
        if not self.sparse:
            raise ValueError("declare at least one categorical column (--sparse or --multi-hot)")
        if len(delimiter) != 1:
            raise ValueError(f"--delimiter must be one character, got {delimiter!r}")
        if not multi_hot_separator:
            raise ValueError("--multi-hot-separator must not be empty")

    def _roles(self) -> list[tuple[str, str]]:
        return [(self.label, "label"), *[(d, "dense") for d in self.dense],
                *[(s, "multi-hot" if s in self.multi_hot else "sparse") for s in self.sparse]]

    def check(self, path: Path) -> None:
        if _is_parquet(path):
            try:
                names = pq.ParquetFile(path).schema_arrow.names
            except (pa.ArrowInvalid, OSError) as e:
                raise DatasetError(f"{path}: cannot read as Parquet: {e}") from None
            _check_unique(path, names)
        else:
            names = _read_header(path, self.delimiter)
        for col, role in self._roles():
            if col not in names:
                raise DatasetError(f"{path}: {role} column {col!r} not found; the file's columns are {names}")

    def raw_columns(self, numeric: bool) -> list[str]:
        return ([self.label, *self.dense] if numeric else []) + list(self.sparse)

    def header_lines_of(self, path: Path) -> int:
        return -1 if _is_parquet(path) else 1

    def iter_raw(self, path: Path, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        cols = list(columns) if columns is not None else self.raw_columns(numeric=True)
        if _is_parquet(path):
            return self._parquet_batches(path, cols)
        return self._csv_batches(
            path,
            pcsv.ReadOptions(block_size=self.block_size),
            pcsv.ParseOptions(delimiter=self.delimiter),
            pcsv.ConvertOptions(column_types=_string_types(cols), include_columns=cols, null_values=[""],
                                strings_can_be_null=True),
        )

    def _parquet_batches(self, path: Path, cols: list[str]) -> Iterator[pa.RecordBatch]:
        try:
            f = pq.ParquetFile(path)
            rows = max(1024, self.block_size // 64)
            for b in f.iter_batches(batch_size=rows, columns=cols):
                yield b
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{path}: cannot read as Parquet: {e}") from None

    def count_rows(self, path: Path) -> int:
        if _is_parquet(path):
            return pq.ParquetFile(path).metadata.num_rows
        return super().count_rows(path)

    def prepare(self, batch: pa.RecordBatch, path: Path, first_row: int, numeric: bool) -> _Prepared:
        p = _Prepared(batch.num_rows)
        h = self.header_lines_of(path)
        if numeric:
            p.label = _labels(batch.column(self.label), path, self.label, first_row, h)
            for d in self.dense:
                p.dense[d] = _dense(batch.column(d), path, d, first_row, h, self.negative_dense, self.clipped)
        for s in self.sparse:
            col = batch.column(s)
            if s in self.multi_hot:
                p.multi[s] = _split_multi(col, self.separator)
            else:
                if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                    raise DatasetError(f"{path}: sparse column {s!r} holds lists; declare it with --multi-hot")
                p.single[s] = _as_string(col)
        return p


def convert_csv(inputs: Sequence[str | Path], out: str | Path, *, label: str, dense: Sequence[str] = (),
                sparse: Sequence[str] = (), multi_hot: Sequence[str] = (), delimiter: str = ",",
                multi_hot_separator: str = "|", split: str = DEFAULT_SPLIT, min_count: int = DEFAULT_MIN_COUNT,
                row_group_size: int = DEFAULT_ROW_GROUP_SIZE, rows_per_file: int | None = DEFAULT_ROWS_PER_FILE,
                block_size: int = DEFAULT_BLOCK_SIZE, progress: bool = True, overwrite: bool = False,
                negative_dense: str = DEFAULT_NEGATIVE_DENSE) -> Manifest:
    """Any CSV (with a header line) or Parquet input with declared columns.

    ``label`` must hold 0/1; ``dense`` columns are numeric (log(1 + max(x, 0)) by default, see
    ``negative_dense``; empty -> 0);
    ``sparse`` columns are categorical (single-hot, int64 ids); ``multi_hot`` columns hold several
    values separated by ``multi_hot_separator`` (or are Parquet list columns) and become
    ``list<int64>`` (a row without values gets [0]).
    """
    if delimiter in ("\\t", "tab", "TAB"):
        delimiter = "\t"
    fmt = _Generic(block_size, label=label, dense=list(dense), sparse=list(sparse), multi_hot=list(multi_hot),
                   delimiter=delimiter, multi_hot_separator=multi_hot_separator)
    return _convert(fmt, inputs, out, split=split, min_count=min_count, row_group_size=row_group_size,
                    rows_per_file=rows_per_file, progress=progress, overwrite=overwrite, negative_dense=negative_dense,
                    options={"delimiter": delimiter, "multi_hot_separator": multi_hot_separator})
