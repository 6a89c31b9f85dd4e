"""The Avazu converter: Avazu CTR logs (CSV with a header: id, click, hour, C1, ..., C21).

``hour`` (YYMMDDHH) becomes the fields ``hour_of_day`` and ``weekday``. The shared pipeline
(counting, vocabularies, splitting, writing) is ``convert.py``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from embdim.trainer.data.convert import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MIN_COUNT,
    DEFAULT_SPLIT,
    _convert,
    _count_lines,
    _Format,
    _labels,
    _Prepared,
    _read_header,
    _string_types,
    _where,
)
from embdim.trainer.data.manifest import DatasetError, Manifest
from embdim.trainer.data.writer import DEFAULT_ROW_GROUP_SIZE, DEFAULT_ROWS_PER_FILE


class _Avazu(_Format):
    source = "avazu"
    header_lines = 1
    label = "click"
    dense: list[str] = []
    multi_hot: list[str] = []
    derived = ["hour_of_day", "weekday"]

    def __init__(self, block_size: int) -> None:
        super().__init__(block_size)
        self.categorical: list[str] | None = None  # raw categorical columns, from the first file

    @property
    def sparse(self) -> list[str]:  # type: ignore[override]
        return [*self.derived, *(self.categorical or [])]

    def check(self, path: Path) -> None:
        names = _read_header(path, ",")
        for c in ("click", "hour"):
            if c not in names:
                raise DatasetError(f"{path}: column {c!r} not found in the header; Avazu logs have "
                                   f"id, click, hour, C1, banner_pos, ...; got {names}")
        cats = [n for n in names if n not in ("id", "click", "hour")]
        if self.categorical is None:
            clash = sorted(set(cats) & set(self.derived))
            if clash:
                raise DatasetError(f"{path}: column(s) {clash} clash with the derived hour features")
            self.categorical = cats
        else:
            missing = [c for c in self.categorical if c not in names]
            if missing:
                raise DatasetError(f"{path}: column {missing[0]!r} not found (it is in the first input); got {names}")

    def raw_columns(self, numeric: bool) -> list[str]:
        assert self.categorical is not None
        return (["click"] if numeric else []) + ["hour", *self.categorical]

    def count_rows(self, path: Path) -> int:
        return max(0, _count_lines(path) - 1)  # less the header line

    def iter_raw(self, path: Path, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        cols = list(columns) if columns is not None else self.raw_columns(numeric=True)
        return self._csv_batches(
            path,
            pcsv.ReadOptions(block_size=self.block_size),
            pcsv.ParseOptions(delimiter=","),
            pcsv.ConvertOptions(column_types=_string_types(cols), include_columns=cols, null_values=[""],
                                strings_can_be_null=True),
        )

    def prepare(self, batch: pa.RecordBatch, path: Path, first_row: int, numeric: bool) -> _Prepared:
        assert self.categorical is not None
        p = _Prepared(batch.num_rows)
        if numeric:
            p.label = _labels(batch.column("click"), path, "click", first_row, self.header_lines)
        hour = batch.column("hour")
        try:
            ts = pc.strptime(hour, format="%y%m%d%H", unit="s")
        except pa.ArrowInvalid:
            bad = None
            for i, v in enumerate(hour.to_pylist()):
                if v is not None and not (len(v) == 8 and v.isdigit()):
                    bad = i
                    break
            at = f", {_where(path, first_row + bad, 1)}: {hour[bad].as_py()!r}" if bad is not None else ""
            raise DatasetError(f"{path}: column 'hour' must be YYMMDDHH{at}") from None
        p.single["hour_of_day"] = pc.cast(pc.hour(ts), pa.string())
        p.single["weekday"] = pc.cast(pc.day_of_week(ts), pa.string())  # Monday = 0
        for c in self.categorical:
            p.single[c] = batch.column(c)
        return p


def convert_avazu(inputs: Sequence[str | Path], out: str | Path, *, split: str = DEFAULT_SPLIT,
                  min_count: int = DEFAULT_MIN_COUNT, row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
                  rows_per_file: int | None = DEFAULT_ROWS_PER_FILE, block_size: int = DEFAULT_BLOCK_SIZE,
                  progress: bool = True, overwrite: bool = False) -> Manifest:
    """Avazu CTR logs (CSV with header: id, click, hour, C1, banner_pos, site_id, ..., C21).

    ``id`` is dropped; ``hour`` (YYMMDDHH) becomes the categorical fields ``hour_of_day`` (0..23)
    and ``weekday`` (Monday = 0); every other column is categorical. No dense features.
    """
    return _convert(_Avazu(block_size), inputs, out, split=split, min_count=min_count,
                    row_group_size=row_group_size, rows_per_file=rows_per_file, progress=progress, options={},
                    overwrite=overwrite)
