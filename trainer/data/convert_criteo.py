"""The Criteo converter: Criteo Kaggle ``train.txt`` and Criteo 1TB ``day_N`` logs.

Tab-separated, no header, optionally compressed (``day_N.gz``). The shared pipeline (counting,
vocabularies, splitting, writing) is ``convert.py``'s; this file says which columns a Criteo log
has and how to parse them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.csv as pcsv

from embdim.trainer.data.convert import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MIN_COUNT,
    DEFAULT_NEGATIVE_DENSE,
    DEFAULT_SPLIT,
    _convert,
    _count_lines,
    _dense,
    _first_line,
    _Format,
    _labels,
    _Prepared,
    _string_types,
)
from embdim.trainer.data.manifest import DatasetError, Manifest
from embdim.trainer.data.writer import DEFAULT_ROW_GROUP_SIZE, DEFAULT_ROWS_PER_FILE

CRITEO_LABEL = "label"
CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
CRITEO_SPARSE = [f"C{i}" for i in range(1, 27)]


class _Criteo(_Format):
    source = "criteo"
    header_lines = 0
    label = CRITEO_LABEL
    dense = CRITEO_DENSE
    sparse = CRITEO_SPARSE
    multi_hot: list[str] = []
    columns = [CRITEO_LABEL, *CRITEO_DENSE, *CRITEO_SPARSE]

    def check(self, path: Path) -> None:
        line = _first_line(path)
        if not line:
            return
        n = line.count(b"\t") + 1
        if n != len(self.columns):
            raise DatasetError(
                f"{path}: line 1 has {n} tab-separated columns; Criteo logs have {len(self.columns)} "
                "(label, I1..I13, C1..C26) and no header")

    def raw_columns(self, numeric: bool) -> list[str]:
        return list(self.columns) if numeric else list(self.sparse)

    def count_rows(self, path: Path) -> int:
        return _count_lines(path)

    def iter_raw(self, path: Path, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        cols = list(columns) if columns is not None else list(self.columns)
        return self._csv_batches(
            path,
            pcsv.ReadOptions(column_names=self.columns, block_size=self.block_size),
            pcsv.ParseOptions(delimiter="\t", quote_char=False),
            pcsv.ConvertOptions(column_types=_string_types(cols), include_columns=cols, null_values=[""],
                                strings_can_be_null=True),
        )

    def prepare(self, batch: pa.RecordBatch, path: Path, first_row: int, numeric: bool) -> _Prepared:
        p = _Prepared(batch.num_rows)
        if numeric:
            p.label = _labels(batch.column(self.label), path, self.label, first_row, self.header_lines)
            for d in self.dense:
                p.dense[d] = _dense(batch.column(d), path, d, first_row, self.header_lines, self.negative_dense,
                                    self.clipped)
        for s in self.sparse:
            p.single[s] = batch.column(s)
        return p


def convert_criteo(inputs: Sequence[str | Path], out: str | Path, *, split: str = DEFAULT_SPLIT,
                   min_count: int = DEFAULT_MIN_COUNT, row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
                   rows_per_file: int | None = DEFAULT_ROWS_PER_FILE, block_size: int = DEFAULT_BLOCK_SIZE,
                   progress: bool = True, overwrite: bool = False,
                   negative_dense: str = DEFAULT_NEGATIVE_DENSE) -> Manifest:
    """Criteo Kaggle ``train.txt`` / Criteo 1TB ``day_N`` logs (tab-separated, no header; ``.gz`` ok).

    Columns label, I1..I13 (integers, may be empty or negative; stored as log(1 + max(x, 0)) by
    default, see ``negative_dense``; empty -> 0), C1..C26 (hex strings; empty -> OOV id 0).
    ``overwrite``: replace a dataset already at ``out``; ``negative_dense``: "clip", "signed-log"
    or "error" (see the module docstring).
    """
    return _convert(_Criteo(block_size), inputs, out, split=split, min_count=min_count,
                    row_group_size=row_group_size, rows_per_file=rows_per_file, progress=progress, options={},
                    overwrite=overwrite, negative_dense=negative_dense)
