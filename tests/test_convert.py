"""Converters (trainer/data/convert.py) checked against the raw text, parsed independently here."""

from __future__ import annotations

import argparse
import math
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embdim.trainer.data.convert import _count_lines, convert_avazu, convert_criteo, convert_csv
from embdim.trainer.data.manifest import DatasetError, load_counts, load_manifest
from embdim.trainer.data.writer import SplitWriter, ValueCounter, build_vocab, parse_split, split_sizes

CRITEO_FILES = ("train.txt", "valid.txt", "test.txt")
AVAZU_FILES = ("train.csv", "valid.csv", "test.csv")


# --------------------------------------------------------------------------------------------
# independent reference implementation (plain Python)


def vocab_ids(values: list[str | None], min_count: int) -> dict[str, int]:
    """value -> id: values seen >= min_count times, ids 1.. by descending count then value."""
    c = Counter(v for v in values if v not in (None, ""))
    kept = sorted((v for v, n in c.items() if n >= min_count), key=lambda v: (-c[v], v))
    return {v: i + 1 for i, v in enumerate(kept)}


def read_split(root: Path, split: str) -> pa.Table:
    m = load_manifest(root)
    return pa.concat_tables([pq.read_table(root / f) for f in m.splits[split].files])


def criteo_rows(path: Path) -> list[list[str]]:
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f]


def log_dense(text: str) -> float:
    return 0.0 if text == "" else math.log1p(max(float(text), 0.0))


# --------------------------------------------------------------------------------------------
# Criteo


@pytest.fixture
def criteo_dataset(shared_data, tmp_path):
    d = shared_data / "criteo_kaggle_8k"
    out = tmp_path / "criteo"
    m = convert_criteo([d / f for f in CRITEO_FILES], out, split="files", min_count=2, row_group_size=1000,
                       block_size=1 << 16, progress=False)
    raw = {s: criteo_rows(d / f) for s, f in zip(("train", "valid", "test"), CRITEO_FILES)}
    return out, m, raw


def test_criteo_rows_hand_checked(criteo_dataset):
    out, m, raw = criteo_dataset
    assert load_manifest(out).to_json() == m.to_json()
    assert m.source == "criteo" and m.label == "label"
    assert m.dense == [f"I{i}" for i in range(1, 14)]
    assert m.sparse_names == [f"C{i}" for i in range(1, 27)]
    for s in ("train", "valid", "test"):
        assert m.splits[s].num_rows == len(raw[s])

    train = raw["train"]
    vocabs = {j: vocab_ids([r[14 + j] for r in train], 2) for j in range(26)}
    for j, f in enumerate(m.sparse):
        assert f.num_embeddings == len(vocabs[j]) + 1, f.name
        assert not f.multi_hot

    tables = {s: read_split(out, s) for s in raw}
    assert tables["train"].schema.field("label").type == pa.float32()
    assert tables["train"].schema.field("I1").type == pa.float32()
    assert tables["train"].schema.field("C1").type == pa.int64()
    picks = {"train": [0, 1, 2, 17, 999, 1000, 3333, len(train) - 1], "valid": [0, 5, 408], "test": [0, 200, 390]}
    checked_rare = checked_frequent = checked_empty = 0
    for s, idx in picks.items():
        t = tables[s]
        for i in idx:
            line = raw[s][i]
            row = t.slice(i, 1).to_pylist()[0]
            assert row["label"] == float(line[0])
            for k in range(13):
                assert row[f"I{k + 1}"] == pytest.approx(log_dense(line[1 + k]), rel=1e-6, abs=1e-6), (s, i, k)
            for j in range(26):
                v = line[14 + j]
                want = vocabs[j].get(v, 0)
                assert row[f"C{j + 1}"] == want, (s, i, f"C{j + 1}", v)
                if v == "":
                    checked_empty += 1
                elif want == 0:
                    checked_rare += 1
                else:
                    checked_frequent += 1
    assert checked_rare > 0 and checked_frequent > 0 and checked_empty > 0

    # a negative dense value (Criteo I2 has some) maps to log(1 + 0) = 0
    neg = [(i, k) for i, r in enumerate(train) for k in range(13) if r[1 + k].startswith("-")]
    assert neg, "the sample has negative dense values"
    i, k = neg[0]
    assert tables["train"].column(f"I{k + 1}")[i].as_py() == 0.0

    # whole columns of two fields: same ids for the same value, rare values -> 0
    for j in (2, 25):
        got = tables["train"].column(f"C{j + 1}").to_pylist()
        assert got == [vocabs[j].get(r[14 + j], 0) for r in train]


def test_criteo_counts_and_row_groups(criteo_dataset):
    out, m, raw = criteo_dataset
    train = raw["train"]
    for j, f in enumerate(m.sparse):
        counts = load_counts(out, f.name)
        assert counts.dtype == np.int64 and len(counts) == f.num_embeddings
        assert counts.sum() == len(train)
        c = Counter(r[14 + j] for r in train)
        vocab = vocab_ids([r[14 + j] for r in train], 2)
        for v, i in vocab.items():
            assert counts[i] == c[v]
        assert counts[0] == len(train) - sum(c[v] for v in vocab)
        assert np.all(np.diff(counts[1:]) <= 0)  # ids ordered by descending train count
    for s in ("train", "valid", "test"):
        for rel in m.splits[s].files:
            md = pq.ParquetFile(out / rel).metadata
            sizes = [md.row_group(k).num_rows for k in range(md.num_row_groups)]
            assert all(n == 1000 for n in sizes[:-1]) and 0 < sizes[-1] <= 1000
    assert not list(out.parent.glob(".criteo.*")), "temporary folders left behind"


def test_criteo_fraction_split_is_contiguous(shared_data, tmp_path):
    d = shared_data / "criteo_kaggle_8k"
    inputs = [d / f for f in CRITEO_FILES]
    m = convert_criteo(inputs, tmp_path / "c", split="0.7,0.2,0.1", min_count=3, row_group_size=512,
                       block_size=1 << 15, progress=False)
    rows = [r for f in inputs for r in criteo_rows(f)]
    n = len(rows)
    a, b = round(n * 0.7), round(n * 0.9)
    assert (m.splits["train"].num_rows, m.splits["valid"].num_rows, m.splits["test"].num_rows) == (a, b - a, n - b)
    vocab = vocab_ids([r[14 + 4] for r in rows[:a]], 3)  # C5, from the train part only
    assert m.field("C5").num_embeddings == len(vocab) + 1
    for s, lo in (("train", 0), ("valid", a), ("test", b)):
        t = read_split(tmp_path / "c", s)
        for i in (0, t.num_rows // 2, t.num_rows - 1):
            line = rows[lo + i]
            assert t.column("label")[i].as_py() == float(line[0])
            assert t.column("C5")[i].as_py() == vocab.get(line[14 + 4], 0)


def test_output_independent_of_block_and_batch_sizes(shared_data, tmp_path, monkeypatch):
    import embdim.trainer.data.convert as convert

    d = shared_data / "criteo_kaggle_8k"
    kw = dict(split="0.8,0.1,0.1", min_count=2, row_group_size=777, progress=False)
    convert_criteo([d / "valid.txt", d / "test.txt"], tmp_path / "a", block_size=1 << 20, **kw)
    monkeypatch.setattr(convert, "MAP_MIN_ROWS", 50)
    monkeypatch.setattr(convert, "MAP_MAX_ROWS", 50)
    convert_criteo([d / "valid.txt", d / "test.txt"], tmp_path / "b", block_size=1 << 12, **kw)
    for s in ("train", "valid", "test"):
        assert read_split(tmp_path / "a", s).equals(read_split(tmp_path / "b", s))
    for f in convert.CRITEO_SPARSE:
        assert np.array_equal(load_counts(tmp_path / "a", f), load_counts(tmp_path / "b", f))


def test_criteo_gzip_inputs_match_plain(shared_data, tmp_path):
    import gzip

    d = shared_data / "criteo_kaggle_8k"
    gz = tmp_path / "valid.txt.gz"
    gz.write_bytes(gzip.compress((d / "valid.txt").read_bytes()))
    kw = dict(split="0.5,0.25,0.25", min_count=1, row_group_size=100, progress=False)
    convert_criteo([d / "valid.txt"], tmp_path / "plain", **kw)
    convert_criteo([gz], tmp_path / "gz", **kw)
    for s in ("train", "valid", "test"):
        assert read_split(tmp_path / "plain", s).equals(read_split(tmp_path / "gz", s))


def test_criteo_rejects_wrong_column_count(tmp_path):
    bad = tmp_path / "test.txt"
    bad.write_text("\t".join(["1"] * 13 + ["ab"] * 26) + "\n")  # Kaggle's unlabeled test.txt: 39 columns
    with pytest.raises(DatasetError, match=r"test\.txt: line 1 has 39 tab-separated columns"):
        convert_criteo([bad], tmp_path / "o", split="1,0,0", progress=False)


def test_count_lines_matches_the_csv_reader(tmp_path):
    cases = [b"a\n\nb\r\n\r\nc", b"\n\na\nb\n\n", b"", b"\r\n\r\nx\n\n\n\ny\r\n", b"x", b"x\ny\n"]
    for k, data in enumerate(cases):
        p = tmp_path / f"{k}.txt"
        p.write_bytes(data)
        want = len([ln for ln in data.replace(b"\r\n", b"\n").split(b"\n") if ln.strip(b"\r")])
        assert _count_lines(p) == want == _count_lines(p, chunk_size=1) == _count_lines(p, chunk_size=3), data


# --------------------------------------------------------------------------------------------
# Avazu


def test_avazu_hand_checked(shared_data, tmp_path):
    d = shared_data / "avazu_9k"
    out = tmp_path / "avazu"
    m = convert_avazu([d / f for f in AVAZU_FILES], out, split="files", min_count=2, row_group_size=700,
                      progress=False)
    raw = {}
    for s, f in zip(("train", "valid", "test"), AVAZU_FILES):
        lines = (d / f).read_text().splitlines()
        header = lines[0].split(",")
        raw[s] = [dict(zip(header, ln.split(","))) for ln in lines[1:]]
    cats = [c for c in header if c not in ("id", "click", "hour")]
    assert m.dense == [] and m.label == "click"
    assert m.sparse_names == ["hour_of_day", "weekday", *cats]

    def derived(r):
        t = datetime.strptime(r["hour"], "%y%m%d%H")
        return {"hour_of_day": str(t.hour), "weekday": str(t.weekday()), **{c: r[c] for c in cats}}

    train = [derived(r) for r in raw["train"]]
    vocabs = {f: vocab_ids([r[f] for r in train], 2) for f in m.sparse_names}
    for f in m.sparse:
        assert f.num_embeddings == len(vocabs[f.name]) + 1
        counts = load_counts(out, f.name)
        assert counts.sum() == len(train) and len(counts) == f.num_embeddings
    # 14102100 is Tuesday 2014-10-21, hour 0 (all rows of the sample share it)
    assert derived(raw["train"][0])["weekday"] == "1" and derived(raw["train"][0])["hour_of_day"] == "0"
    for s, idx in {"train": [0, 10, 4000, len(train) - 1], "valid": [0, 100], "test": [3, 431]}.items():
        t = read_split(out, s)
        assert "id" not in t.column_names and "hour" not in t.column_names
        assert t.num_rows == len(raw[s])
        for i in idx:
            r = raw[s][i]
            row = t.slice(i, 1).to_pylist()[0]
            assert row["click"] == float(r["click"])
            dr = derived(r)
            for f in m.sparse_names:
                assert row[f] == vocabs[f].get(dr[f], 0), (s, i, f)


def test_avazu_hour_features_vary(tmp_path):
    hdr = "id,click,hour,C1,site_id"
    hours = ["14102923", "14102100", "14102923", "14103005", "14102100", "14102923"]  # Wed 23h, Tue 0h, Thu 5h
    rows = [f"{i},{i % 2},{h},1005,s{i % 2}" for i, h in enumerate(hours)]
    (tmp_path / "a.csv").write_text("\n".join([hdr, *rows]) + "\n")
    m = convert_avazu([tmp_path / "a.csv"], tmp_path / "o", split="1,0,0", min_count=1, progress=False)
    t = read_split(tmp_path / "o", "train")
    # hour_of_day: "23" x3, "0" x2, "5" x1 -> ids 1, 2, 3; weekday: 2 (Wed) x3, 1 (Tue) x2, 3 (Thu) x1
    assert t.column("hour_of_day").to_pylist() == [1, 2, 1, 3, 2, 1]
    assert t.column("weekday").to_pylist() == [1, 2, 1, 3, 2, 1]
    assert m.field("hour_of_day").num_embeddings == 4 and set(m.splits) == {"train"}
    vocab = pq.read_table(tmp_path / "o" / "vocab" / "weekday.parquet").to_pydict()
    assert vocab == {"value": ["2", "1", "3"], "count": [3, 2, 1]}


# --------------------------------------------------------------------------------------------
# generic CSV / Parquet

CSV = """y,price,age,city,tags
1,10,3,paris,a|b
0,-5,,paris,
0,2.5,1,rome,b|c|zz
1,,7,paris,b
0,1,1,oslo,a| b
1,3,2,rome,c
0,4,2,lima,b|a
1,0,9,paris,q
"""


def test_csv_multi_hot_hand_checked(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text(CSV)
    out = tmp_path / "ds"
    m = convert_csv([src], out, label="y", dense=["price", "age"], sparse=["city"], multi_hot=["tags"],
                    split="0.5,0.25,0.25", min_count=2, row_group_size=2, progress=False)
    assert [(f.name, f.multi_hot) for f in m.sparse] == [("city", False), ("tags", True)]
    assert {s: i.num_rows for s, i in m.splits.items()} == {"train": 4, "valid": 2, "test": 2}
    # train rows 0-3: city paris x3, rome x1 -> paris=1 (rome rare -> 0); tags a1 b3 c1 zz1 -> b=1
    assert m.field("city").num_embeddings == 2 and m.field("tags").num_embeddings == 2
    train, valid, test = (read_split(out, s) for s in ("train", "valid", "test"))
    assert train.schema.field("tags").type == pa.list_(pa.int64())
    assert train.column("y").to_pylist() == [1.0, 0.0, 0.0, 1.0]
    np.testing.assert_allclose(train.column("price").to_numpy(),
                               [math.log1p(10), 0.0, math.log1p(2.5), 0.0], rtol=1e-6)
    np.testing.assert_allclose(train.column("age").to_numpy(), [math.log1p(3), 0.0, math.log1p(1), math.log1p(7)],
                               rtol=1e-6)
    assert train.column("city").to_pylist() == [1, 1, 0, 1]
    assert train.column("tags").to_pylist() == [[0, 1], [0], [1, 0, 0], [1]]
    assert valid.column("city").to_pylist() == [0, 0]  # oslo, rome: rare or unseen
    assert valid.column("tags").to_pylist() == [[0, 1], [0]]  # "a| b" -> a, b (trimmed)
    assert test.column("tags").to_pylist() == [[1, 0], [0]]
    counts = load_counts(out, "tags")
    assert counts.tolist() == [4, 3]  # train items: a, b, (empty row -> [0]), b, c, zz, b
    assert load_counts(out, "city").tolist() == [1, 3]


def test_parquet_input_matches_csv(tmp_path):
    import pyarrow.csv as pcsv

    src = tmp_path / "in.csv"
    src.write_text(CSV)
    t = pcsv.read_csv(src, convert_options=pcsv.ConvertOptions(column_types={"tags": pa.string(), "city": pa.string()}))
    pq.write_table(t, tmp_path / "in.parquet")
    kw = dict(label="y", dense=["price", "age"], sparse=["city"], multi_hot=["tags"], split="0.5,0.25,0.25",
              min_count=1, progress=False)
    convert_csv([src], tmp_path / "a", **kw)
    convert_csv([tmp_path / "in.parquet"], tmp_path / "b", **kw)
    for s in ("train", "valid", "test"):
        assert read_split(tmp_path / "a", s).equals(read_split(tmp_path / "b", s))


def test_csv_errors_name_file_and_column(tmp_path):
    src = tmp_path / "bad.csv"
    kw = dict(label="y", dense=["price"], sparse=["city"], progress=False, split="1,0,0")
    src.write_text("y,price,town\n1,2,x\n")
    with pytest.raises(DatasetError, match=r"bad\.csv.*'city' not found"):
        convert_csv([src], tmp_path / "o1", **kw)
    src.write_text("y,price,city\n1,2,x\n0,1,y\n2,3,x\n")
    with pytest.raises(DatasetError, match=r"bad\.csv: row 3 \(line 4\): label column 'y' holds '2'"):
        convert_csv([src], tmp_path / "o2", **kw)
    src.write_text("y,price,city\n1,2,x\n0,cheap,y\n")
    with pytest.raises(DatasetError, match=r"bad\.csv: dense column 'price' holds a non-numeric value, row 2"):
        convert_csv([src], tmp_path / "o3", **kw)
    for o in ("o1", "o2", "o3"):
        assert not (tmp_path / o).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_output_folder_policy(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text(CSV)
    kw = dict(label="y", dense=["price"], sparse=["city"], split="1,0,0", min_count=1, progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not an embdim dataset"):
        convert_csv([src], busy, **kw)
    assert (busy / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    convert_csv([src], tmp_path / "empty", **kw)
    with pytest.raises(DatasetError, match=r"already holds a dataset.*--overwrite"):  # no silent replacement
        convert_csv([src], tmp_path / "empty", **{**kw, "min_count": 2})
    assert load_manifest(tmp_path / "empty").extra["min_count"] == 1
    m = convert_csv([src], tmp_path / "empty", **{**kw, "min_count": 2}, overwrite=True)
    assert load_manifest(tmp_path / "empty").extra["min_count"] == 2 == m.extra["min_count"]
    # a crash (here: a bad label in the last row) leaves the previous dataset intact
    src.write_text(CSV + "7,1,1,x,a\n")
    with pytest.raises(DatasetError):
        convert_csv([src], tmp_path / "empty", **kw, overwrite=True)
    assert load_manifest(tmp_path / "empty").extra["min_count"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty", "in.csv"], "lock or staging files left"


# --------------------------------------------------------------------------------------------
# negative dense values, duplicated headers, compressed and binary inputs


def test_negative_dense_values_clip_signed_log_or_error(tmp_path, capsys):
    from embdim.launch.main import main

    src = tmp_path / "in.csv"
    src.write_text(CSV)  # price -5 in row 2 (line 3)
    kw = dict(label="y", dense=["price", "age"], sparse=["city"], split="1,0,0", min_count=1, progress=False)
    m = convert_csv([src], tmp_path / "clip", **kw)
    assert m.extra["negative_dense"] == "clip" and m.extra["negative_dense_clipped"] == {"price": 1}
    assert m.extra["dense_transform"].startswith("log(1 + max(x, 0))")
    assert read_split(tmp_path / "clip", "train").column("price")[1].as_py() == 0.0
    m = convert_csv([src], tmp_path / "signed", **kw, negative_dense="signed-log")
    assert m.extra["negative_dense_clipped"] == {}
    price = read_split(tmp_path / "signed", "train").column("price").to_numpy()
    np.testing.assert_allclose(price[:3], [math.log1p(10), -math.log1p(5), math.log1p(2.5)], rtol=1e-6)
    with pytest.raises(DatasetError, match=r"in\.csv: row 2 \(line 3\): dense column 'price' holds '-5'; negative"):
        convert_csv([src], tmp_path / "err", **kw, negative_dense="error")
    assert not (tmp_path / "err").exists()
    # The CLI's summary says what the default did.
    assert main(["data", "csv", "--input", str(src), "--out", str(tmp_path / "cli"), "--label", "y", "--dense",
                 "price,age", "--sparse", "city", "--split", "1,0,0", "--min-count", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "clipped 1 negative dense values to 0 (price: 1; --negative-dense" in out


@pytest.mark.parametrize("parquet", [False, True])
def test_duplicated_header_names_are_an_error(parquet, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("y,price,city,price\n1,1,a,2\n0,3,b,4\n")
    if parquet:
        table = pa.Table.from_arrays([pa.array([1, 0]), pa.array([1, 3]), pa.array(["a", "b"]), pa.array([2, 4])],
                                     names=["y", "price", "city", "price"])
        src = tmp_path / "in.parquet"
        pq.write_table(table, src)
    with pytest.raises(DatasetError, match=r"in\.(csv|parquet): the header names a column more than once "
                                           r"\('price' at columns \[2, 4\]\)"):
        convert_csv([src], tmp_path / "o", label="y", dense=["price"], sparse=["city"], split="1,0,0",
                    progress=False)


def _criteo_lines(n: int, seed: int = 0) -> bytes:
    """Criteo-shaped lines: label, 13 integers (some empty, some negative), 26 hex categories."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        dense = ["" if rng.random() < 0.1 else str(int(rng.integers(-2, 50))) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{int(rng.integers(0, 12)):08x}" for _ in range(26)]
        lines.append("\t".join([str(int(rng.random() < 0.3)), *dense, *cats]))
    return ("\n".join(lines) + "\n").encode()


def test_gzip_criteo_input_streams_like_plain_text(tmp_path):
    import gzip

    raw = _criteo_lines(600)
    plain = tmp_path / "day_0"
    plain.write_bytes(raw)
    (tmp_path / "day_0.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "day_0_renamed").write_bytes(gzip.compress(raw))  # detected by its bytes, not its name
    kw = dict(split="0.8,0.1,0.1", min_count=2, row_group_size=128, progress=False, block_size=1 << 12)
    ref = convert_criteo([plain], tmp_path / "plain", **kw)
    for name in ("day_0.gz", "day_0_renamed"):
        m = convert_criteo([tmp_path / name], tmp_path / f"o_{name}", **kw)
        assert {s: i.num_rows for s, i in m.splits.items()} == {s: i.num_rows for s, i in ref.splits.items()}
        assert m.extra["negative_dense_clipped"] == ref.extra["negative_dense_clipped"] != {}
        for s in ("train", "valid", "test"):
            assert read_split(tmp_path / f"o_{name}", s).equals(read_split(tmp_path / "plain", s))
    assert sum(i.num_rows for i in ref.splits.values()) == 600


def test_binary_input_is_named(tmp_path):
    import gzip

    rng = np.random.default_rng(0)
    junk = tmp_path / "junk.csv"
    junk.write_bytes(b"\xbd\x00" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    packed = tmp_path / "packed.tsv.gz"
    packed.write_bytes(gzip.compress(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()))
    with pytest.raises(DatasetError, match=r"junk\.csv: binary data, not CSV/TSV text"):
        convert_csv([junk], tmp_path / "o", label="y", sparse=["s"], progress=False)
    with pytest.raises(DatasetError, match=r"packed\.tsv\.gz: binary data inside the gzip compression"):
        convert_criteo([packed], tmp_path / "o", progress=False)
    with pytest.raises(DatasetError, match=r"junk\.csv: binary data"):
        convert_avazu([junk], tmp_path / "o", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.csv", "packed.tsv.gz"]


@pytest.mark.slow
def test_missing_label_column_exits_2_every_time(tmp_path):
    """A failing conversion used to abort at exit now and then ("terminate called without an
    active exception", exit 134): Arrow's threaded CSV reader released the header's Python file
    object on a pool thread while the interpreter finalized. Several concurrent runs (the race
    needs load) must all exit 2 with the one error line."""
    import subprocess
    import sys

    from embdim.launch.launcher import repo_env

    src = tmp_path / "in.csv"
    src.write_text(CSV)
    argv = [sys.executable, "-m", "embdim.launch.main", "data", "csv", "--input", str(src), "--label", "click",
            "--dense", "price", "--sparse", "city", "--no-progress"]
    procs = [subprocess.Popen([*argv, "--out", str(tmp_path / f"o{k}")], env=repo_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for k in range(4)]
    for p in procs:
        err = p.communicate(timeout=300)[1].decode()
        assert p.returncode == 2, err
        assert err.strip() == (f"embdim: error: {src}: label column 'click' not found; the file's columns are "
                               f"['y', 'price', 'age', 'city', 'tags']"), err


# --------------------------------------------------------------------------------------------
# shared helpers


def test_split_helpers():
    assert parse_split("files", 3) == "files"
    with pytest.raises(ValueError, match="exactly 3 inputs"):
        parse_split("files", 2)
    with pytest.raises(ValueError, match="sum to 1"):
        parse_split("0.8,0.1,0.2", 1)
    assert split_sizes(10, parse_split("0.8,0.1,0.1", 1)) == (8, 1, 1)
    assert split_sizes(8000, parse_split("0.7,0.2,0.1", 1)) == (5600, 1600, 800)
    assert split_sizes(3, parse_split("1,0,0", 1)) == (3, 0, 0)


def test_value_counter_merges_blocks():
    c = ValueCounter(merge_threshold=3)
    blocks = [["a", "b", None, "a"], ["c", "b", "b"], ["d", "e", "a", ""], ["b"]]
    for b in blocks:
        c.update(pa.array(b))
    values, counts = build_vocab(c.result(), 1)
    assert values.to_pylist() == ["b", "a", "", "c", "d", "e"] and counts.tolist() == [4, 3, 1, 1, 1, 1]
    values, counts = build_vocab(c.result(), 2)
    assert values.to_pylist() == ["b", "a"]


def test_split_writer_row_groups_and_files(tmp_path):
    schema = pa.schema([pa.field("x", pa.int64())])
    w = SplitWriter(tmp_path, "train", schema, row_group_size=4, rows_per_file=9)  # -> 8 rows per file
    for n in (3, 5, 1, 10):
        w.write(pa.table({"x": pa.array(np.arange(n), pa.int64())}))
    info = w.close()
    assert info.num_rows == 19 and info.files == [f"train/part-0000{i}.parquet" for i in range(3)]
    sizes = [[md.row_group(k).num_rows for k in range(md.num_row_groups)]
             for md in (pq.ParquetFile(tmp_path / f).metadata for f in info.files)]
    assert sizes == [[4, 4], [4, 4], [3]]
    assert not [p for p in (tmp_path / "train").iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------------------------
# CLI (launch/data_cli.py)


def _cli(argv: list[str]) -> int:
    from embdim.launch.data_cli import register

    parser = argparse.ArgumentParser(prog="embdim")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_criteo_and_csv(shared_data, tmp_path, capsys):
    d = shared_data / "criteo_kaggle_8k"
    rc = _cli(["data", "criteo", "--input", *[str(d / f) for f in CRITEO_FILES], "--out", str(tmp_path / "c"),
               "--split", "files", "--min-count", "2", "--row-group-size", "4096", "--no-progress"])
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert "train=7200" in line and "valid=409" in line and "test=391" in line and "26 sparse" in line
    assert load_manifest(tmp_path / "c").splits["train"].num_rows == 7200

    src = tmp_path / "in.tsv"
    src.write_text(CSV.replace(",", "\t"))
    rc = _cli(["data", "csv", "--input", str(src), "--out", str(tmp_path / "g"), "--label", "y",
               "--dense", "price,age", "--sparse", "city", "--multi-hot", "tags", "--delimiter", "\\t",
               "--split", "0.5,0.25,0.25", "--min-count", "1", "--no-progress"])
    assert rc == 0
    m = load_manifest(tmp_path / "g")
    assert m.field("tags").multi_hot and m.dense == ["price", "age"]
    with pytest.raises(DatasetError, match="not found"):
        _cli(["data", "csv", "--input", str(src), "--out", str(tmp_path / "h"), "--label", "nope",
              "--sparse", "city", "--no-progress"])
    assert _cli(["data"]) == 2


def test_cli_avazu_and_synth(shared_data, tmp_path, capsys):
    d = shared_data / "avazu_9k"
    assert _cli(["data", "avazu", "--input", *[str(d / f) for f in AVAZU_FILES], "--out", str(tmp_path / "a"),
                 "--split", "files", "--no-progress"]) == 0
    assert "train=8087" in capsys.readouterr().out
    assert _cli(["data", "synth", "--out", str(tmp_path / "s"), "--rows", "2000", "--seed", "5", "--workers", "1",
                 "--row-group-size", "256", "--cardinality-cap", "50", "--multi-hot-fields", "1",
                 "--no-progress"]) == 0
    m = load_manifest(tmp_path / "s")
    assert m.source == "synth" and max(f.num_embeddings for f in m.sparse) <= 51 and m.sparse[-1].multi_hot
    assert "train=1600" in capsys.readouterr().out
