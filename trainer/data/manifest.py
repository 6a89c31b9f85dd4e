"""The on-disk dataset format and its manifest, ``dataset.json``.

A dataset is a folder::

    DIR/
      dataset.json            # this manifest
      train/part-00000.parquet ...
      valid/part-00000.parquet ...
      test/part-00000.parquet ...
      counts/<field>.npy      # int64 [num_embeddings]: occurrences of each id in the train split

Parquet columns:

- the label column: float32, 0.0 or 1.0;
- one float32 column per dense feature (already log-transformed by the converters: log(1 + max(x, 0)));
- one column per sparse field holding contiguous ids in ``[0, num_embeddings)``: int64 for a
  single-hot field, ``list<int64>`` for a multi-hot one. Id 0 is the field's OOV id (values
  missing or rarer than the converter's ``--min-count``).

Row groups are the unit of streaming work; converters write groups of ``row_group_size`` rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from embdim.io import atomic_write_json

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
OOV_ID = 0


class DatasetError(ValueError):
    """A dataset folder or manifest is invalid; the message names the file and field."""


@dataclass
class SparseField:
    name: str
    """Column name, also the KJT key and the embedding table's feature name."""
    num_embeddings: int
    """Cardinality: ids lie in [0, num_embeddings); 0 is OOV."""
    multi_hot: bool = False
    """True when the column is list<int64> (several ids per row)."""


@dataclass
class SplitInfo:
    files: list[str]
    """Parquet files of the split, relative to the dataset folder, in order."""
    num_rows: int
    """Total rows in the split."""


@dataclass
class Manifest:
    label: str
    dense: list[str]
    sparse: list[SparseField]
    splits: dict[str, SplitInfo]
    source: str = ""
    """What produced the data ("synth", "criteo", "avazu", "csv")."""
    extra: dict = field(default_factory=dict)
    """Producer-specific metadata (the synthetic generator's planted truth, converter options)."""
    format_version: int = FORMAT_VERSION

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    def field(self, name: str) -> SparseField:
        for f in self.sparse:
            if f.name == name:
                return f
        raise DatasetError(f"dataset.json: no sparse field {name!r}; fields are {self.sparse_names}")

    def to_json(self) -> dict:
        return asdict(self)


def require_dataset(path: str | Path) -> Path:
    """A dataset folder given on the command line (``--data``), validated before any rank starts."""
    data = Path(path)
    if not data.is_dir():
        raise DatasetError(f"{data}: dataset folder not found (--data); make one with `embdim data synth --out {data}`")
    manifest = load_manifest(data)
    for f in manifest.sparse:  # id counts (used by AMTL, PME) must match the declared cardinalities
        if counts_path(data, f.name).exists():
            _read_counts(data, f, mmap=True)
    return data


def counts_path(dataset_dir: str | Path, field_name: str) -> Path:
    return Path(dataset_dir) / "counts" / f"{field_name}.npy"


def load_counts(dataset_dir: str | Path, field_name: str, mmap: bool = True) -> np.ndarray:
    """The train-split id counts of one field (memory-mapped by default, shared across processes)."""
    return _read_counts(dataset_dir, load_manifest(dataset_dir).field(field_name), mmap)


def _read_counts(dataset_dir: str | Path, f: SparseField, mmap: bool) -> np.ndarray:
    path = counts_path(dataset_dir, f.name)
    if not path.exists():
        raise DatasetError(f"{path}: missing id counts of field {f.name!r}")
    try:
        counts = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read the id counts of field {f.name!r}: {e}") from None
    if counts.shape != (f.num_embeddings,) or not np.issubdtype(counts.dtype, np.integer):
        raise DatasetError(f"{path}: id counts of field {f.name!r} have shape {counts.shape} and dtype {counts.dtype}, "
                           f"expected ({f.num_embeddings},) integers (num_embeddings in dataset.json)")
    return counts


def write_manifest(dataset_dir: str | Path, manifest: Manifest) -> None:
    atomic_write_json(Path(dataset_dir) / "dataset.json", manifest.to_json())


def load_manifest(dataset_dir: str | Path) -> Manifest:
    """Reads and validates ``DIR/dataset.json``; errors name the file and the field."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.exists():
        raise DatasetError(f"{path}: not found; is {dataset_dir} a dataset made by `embdim data`?")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    required = {"label", "dense", "sparse", "splits", "format_version"}
    missing = sorted(required - set(raw))
    if missing:
        raise DatasetError(f"{path}: missing key(s) {missing}")
    known = required | {"source", "extra"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise DatasetError(f"{path}: unknown key(s) {unknown}")
    if raw["format_version"] != FORMAT_VERSION:
        raise DatasetError(f"{path}: format_version {raw['format_version']!r}, this embdim reads {FORMAT_VERSION}")
    if not isinstance(raw["label"], str):
        raise DatasetError(f"{path}: 'label' must be a column name")
    if not isinstance(raw["dense"], list) or not all(isinstance(d, str) for d in raw["dense"]):
        raise DatasetError(f"{path}: 'dense' must be a list of column names")
    sparse = []
    for i, f in enumerate(raw["sparse"] if isinstance(raw["sparse"], list) else [None]):
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise DatasetError(f"{path}: sparse[{i}] must be an object with a 'name'")
        n = f.get("num_embeddings")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DatasetError(f"{path}: sparse field {f['name']!r}: num_embeddings must be a positive integer, got {n!r}")
        extra_keys = sorted(set(f) - {"name", "num_embeddings", "multi_hot"})
        if extra_keys:
            raise DatasetError(f"{path}: sparse field {f['name']!r}: unknown key(s) {extra_keys}")
        sparse.append(SparseField(name=f["name"], num_embeddings=n, multi_hot=bool(f.get("multi_hot", False))))
    if not sparse:
        raise DatasetError(f"{path}: 'sparse' lists no fields")
    names = [raw["label"], *raw["dense"], *[f.name for f in sparse]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DatasetError(f"{path}: column(s) {dupes} appear more than once")
    splits = {}
    if not isinstance(raw["splits"], dict):
        raise DatasetError(f"{path}: 'splits' must be an object")
    for name, s in raw["splits"].items():
        if name not in SPLITS:
            raise DatasetError(f"{path}: unknown split {name!r}; splits are {list(SPLITS)}")
        if not isinstance(s, dict) or not isinstance(s.get("files"), list) or not isinstance(s.get("num_rows"), int):
            raise DatasetError(f"{path}: split {name!r} needs 'files' (list) and 'num_rows' (int)")
        splits[name] = SplitInfo(files=[str(x) for x in s["files"]], num_rows=s["num_rows"])
    if "train" not in splits:
        raise DatasetError(f"{path}: no 'train' split")
    return Manifest(
        label=raw["label"], dense=list(raw["dense"]), sparse=sparse, splits=splits,
        source=str(raw.get("source", "")), extra=dict(raw.get("extra", {})),
        format_version=raw["format_version"],
    )
