"""Converters on small logs that the tests write themselves (no real-data folder needed): Criteo TSV
(also gzipped), Avazu CSV and a generic CSV, through the Python API and the ``embdim data`` CLI,
each row checked against the plain-Python reference of ``tests/test_convert.py``."""

from __future__ import annotations

import gzip
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from embdim.launch.main import main
from embdim.trainer.data.convert import CRITEO_DENSE, CRITEO_SPARSE, convert_avazu, convert_criteo, convert_csv
from embdim.trainer.data.manifest import load_counts, load_manifest
from tests.test_convert import criteo_rows, log_dense, read_split, vocab_ids

SPLITS = ("train", "valid", "test")


def write_criteo(folder: Path, rows: dict[str, int], seed: int = 0) -> dict[str, Path]:
    """Criteo-style TSV splits: label, I1..I13 (some empty, some negative), C1..C26 (hex strings
    from small vocabularies, some empty), no header."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in rows.items():
        lines = []
        for _ in range(n):
            dense = ["" if rng.random() < 0.15 else str(int(rng.integers(-3, 500))) for _ in CRITEO_DENSE]
            cats = ["" if rng.random() < 0.1 else f"{int(rng.zipf(1.6)) % (j + 5):08x}"
                    for j in range(len(CRITEO_SPARSE))]
            lines.append("\t".join([str(int(rng.random() < 0.3)), *dense, *cats]))
        paths[split] = folder / f"{split}.txt"
        paths[split].write_text("\n".join(lines) + "\n")
    return paths


def test_criteo_tsv_written_here(tmp_path):
    paths = write_criteo(tmp_path / "raw", {"train": 300, "valid": 60, "test": 40})
    out = tmp_path / "criteo"
    m = convert_criteo([paths[s] for s in SPLITS], out, split="files", min_count=2, row_group_size=64,
                       block_size=1 << 12, progress=False)
    raw = {s: criteo_rows(paths[s]) for s in SPLITS}
    assert m.source == "criteo" and m.dense == list(CRITEO_DENSE) and m.sparse_names == list(CRITEO_SPARSE)
    assert {s: m.splits[s].num_rows for s in SPLITS} == {"train": 300, "valid": 60, "test": 40}
    vocabs = [vocab_ids([r[14 + j] for r in raw["train"]], 2) for j in range(26)]
    assert [f.num_embeddings for f in m.sparse] == [len(v) + 1 for v in vocabs]
    seen = Counter()
    for s in SPLITS:
        table = read_split(out, s).to_pydict()
        for i, line in enumerate(raw[s]):  # every row, every column
            assert table["label"][i] == float(line[0])
            for k, name in enumerate(CRITEO_DENSE):
                assert table[name][i] == pytest.approx(log_dense(line[1 + k]), rel=1e-6, abs=1e-6), (s, i, name)
            for j, name in enumerate(CRITEO_SPARSE):
                value = line[14 + j]
                want = vocabs[j].get(value, 0)
                assert table[name][i] == want, (s, i, name, value)
                seen["empty" if value == "" else "rare" if want == 0 else "kept"] += 1
            seen["negative"] += any(v.startswith("-") for v in line[1:14])
    assert all(seen[k] > 0 for k in ("empty", "rare", "kept", "negative")), seen
    for j, name in enumerate(CRITEO_SPARSE):  # train-split id counts, ids by descending count
        counts = load_counts(out, name)
        c = Counter(r[14 + j] for r in raw["train"])
        assert counts.sum() == 300 and all(counts[i] == c[v] for v, i in vocabs[j].items())

    # The same logs gzipped convert to the same dataset; a fraction split cuts contiguously.
    gz = []
    for s in SPLITS:
        gz.append(tmp_path / f"{s}.txt.gz")
        gz[-1].write_bytes(gzip.compress(paths[s].read_bytes()))
    zipped = tmp_path / "zipped"
    assert convert_criteo(gz, zipped, split="files", min_count=2, row_group_size=64, progress=False).sparse == m.sparse
    for s in SPLITS:
        assert read_split(zipped, s).equals(read_split(out, s))
    cut = convert_criteo([paths["train"]], tmp_path / "cut", split="0.5,0.3,0.2", min_count=1, progress=False)
    assert {s: cut.splits[s].num_rows for s in SPLITS} == {"train": 150, "valid": 90, "test": 60}
    vocab = vocab_ids([r[14] for r in raw["train"][:150]], 1)
    assert read_split(tmp_path / "cut", "valid").column("C1").to_pylist() == \
        [vocab.get(r[14], 0) for r in raw["train"][150:240]]


AVAZU_COLUMNS = ("id", "click", "hour", "C1", "banner_pos", "site_id", "device_type", "C14")


def write_avazu(path: Path, n: int, seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        day, hour = int(rng.integers(21, 31)), int(rng.integers(0, 24))
        rows.append({"id": str(10**12 + 7 * i + seed), "click": str(int(rng.random() < 0.2)),
                     "hour": f"1410{day:02d}{hour:02d}", "C1": str(1000 + int(rng.integers(0, 4))),
                     "banner_pos": str(int(rng.zipf(2.0)) % 5), "site_id": f"{int(rng.integers(0, 12)):08x}",
                     "device_type": "" if rng.random() < 0.05 else str(int(rng.integers(0, 3))),
                     "C14": str(int(rng.zipf(1.5)) % 40)})
    lines = [",".join(AVAZU_COLUMNS), *(",".join(r[c] for c in AVAZU_COLUMNS) for r in rows)]
    path.write_text("\n".join(lines) + "\n")
    return rows


def test_avazu_csv_written_here(tmp_path):
    raw = {s: write_avazu(tmp_path / f"{s}.csv", n, seed) for s, n, seed in (("train", 250, 0), ("valid", 50, 1),
                                                                             ("test", 40, 2))}
    out = tmp_path / "avazu"
    m = convert_avazu([tmp_path / f"{s}.csv" for s in SPLITS], out, split="files", min_count=2, row_group_size=32,
                      block_size=1 << 12, progress=False)
    assert m.source == "avazu" and m.label == "click" and m.dense == []
    # id is dropped; hour becomes hour-of-day and weekday; the other columns stay categorical.
    assert m.sparse_names == ["hour_of_day", "weekday", "C1", "banner_pos", "site_id", "device_type", "C14"]

    def derived(row: dict[str, str]) -> dict[str, str]:
        when = datetime.strptime(row["hour"], "%y%m%d%H")
        return {**row, "hour_of_day": str(when.hour), "weekday": str(when.weekday())}

    train = [derived(r) for r in raw["train"]]
    vocabs = {f: vocab_ids([r[f] for r in train], 2) for f in m.sparse_names}
    assert [f.num_embeddings for f in m.sparse] == [len(vocabs[f]) + 1 for f in m.sparse_names]
    for s in SPLITS:
        table = read_split(out, s).to_pydict()
        assert table["click"] == [float(r["click"]) for r in raw[s]]
        for f in m.sparse_names:
            assert table[f] == [vocabs[f].get(derived(r)[f], 0) for r in raw[s]], (s, f)
    assert load_counts(out, "weekday").sum() == 250


def test_generic_csv_written_here(tmp_path):
    rng = np.random.default_rng(3)
    lines = ["clicked;bid;user;tags"]
    rows = []
    for _ in range(120):
        drawn = rng.integers(0, 6, rng.integers(0, 4))
        row = {"clicked": str(int(rng.random() < 0.4)), "bid": "" if rng.random() < 0.1 else f"{rng.random() * 9:.3f}",
               "user": f"u{int(rng.zipf(1.7)) % 30}", "tags": "|".join(f"t{int(t)}" for t in drawn)}
        rows.append(row)
        lines.append(";".join(row.values()))
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "generic"
    m = convert_csv([tmp_path / "log.csv"], out, label="clicked", dense=["bid"], sparse=["user"], multi_hot=["tags"],
                    delimiter=";", split="0.75,0.25,0", min_count=2, row_group_size=16, progress=False)
    assert {s: i.num_rows for s, i in m.splits.items() if i.num_rows} == {"train": 90, "valid": 30}
    train = rows[:90]
    users = vocab_ids([r["user"] for r in train], 2)
    tags = vocab_ids([t for r in train for t in r["tags"].split("|") if t], 2)
    for s, part in (("train", rows[:90]), ("valid", rows[90:])):
        table = read_split(out, s).to_pydict()
        assert table["clicked"] == [float(r["clicked"]) for r in part]
        np.testing.assert_allclose(table["bid"], [log_dense(r["bid"]) for r in part], rtol=1e-6)
        assert table["user"] == [users.get(r["user"], 0) for r in part]
        # A row without tags gets [0] (the OOV id), as the converter documents.
        assert table["tags"] == [[tags.get(t, 0) for t in r["tags"].split("|")] if r["tags"] else [0] for r in part]


def test_data_cli_on_logs_written_here(tmp_path, capsys):
    paths = write_criteo(tmp_path / "raw", {"train": 80, "valid": 20, "test": 20}, seed=5)
    assert main(["data", "criteo", "--input", *[str(paths[s]) for s in SPLITS], "--out", str(tmp_path / "c"),
                 "--split", "files", "--min-count", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "train=80" in printed and "valid=20" in printed and "26 sparse" in printed
    write_avazu(tmp_path / "a.csv", 100, seed=4)
    assert main(["data", "avazu", "--input", str(tmp_path / "a.csv"), "--out", str(tmp_path / "a"),
                 "--split", "0.8,0.1,0.1", "--no-progress"]) == 0
    assert "train=80" in capsys.readouterr().out
    assert load_manifest(tmp_path / "a").sparse_names[:2] == ["hour_of_day", "weekday"]
