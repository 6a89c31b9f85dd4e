"""Synthetic generator (trainer/data/synth.py): determinism, shape, Zipf skew, planted truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embdim.trainer.data.manifest import load_counts, load_manifest
from embdim.trainer.data.synth import (
    FORMULA_VERSION,
    PRESETS,
    RANKS,
    field_contribution,
    generate_synthetic,
    latent,
    scaled_cardinalities,
    zipf_ids,
)

ROWS = 40_000
OPTIONS = dict(num_rows=ROWS, seed=3, row_group_size=4096, multi_hot_fields=2, num_files=5, progress=False)


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Mann-Whitney AUC with ties averaged."""
    score = np.asarray(score, np.float64)
    label = np.asarray(label) > 0.5
    _, inv, cnt = np.unique(score, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(cnt) - (cnt - 1) / 2.0
    ranks = avg_rank[inv]
    npos, nneg = label.sum(), (~label).sum()
    return float((ranks[label].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def chi2_independence(ids: np.ndarray, label: np.ndarray, top: int = 20) -> tuple[float, int]:
    """Pearson chi-square of (id bucket x label): the ``top`` most frequent ids + one bucket for the rest."""
    vals, cnt = np.unique(ids, return_counts=True)
    head = np.sort(vals[np.argsort(-cnt, kind="stable")[:top]])
    bucket = np.where(np.isin(ids, head), np.searchsorted(head, ids), len(head))
    n = np.bincount(bucket, minlength=len(head) + 1).astype(np.float64)
    pos = np.bincount(bucket, weights=label, minlength=len(head) + 1)
    n, pos = n[n > 0], pos[n > 0]
    p = label.mean()
    stat = ((pos - n * p) ** 2 / (n * p) + ((n - pos) - n * (1 - p)) ** 2 / (n * (1 - p))).sum()
    return float(stat), len(n) - 1


def read_split(root: Path, split: str) -> pa.Table:
    m = load_manifest(root)
    return pa.concat_tables([pq.read_table(root / f) for f in m.splits[split].files])


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    generate_synthetic(out, workers=1, **OPTIONS)
    return out


def test_identical_bytes_across_worker_counts(synth, tmp_path):
    other = tmp_path / "ds2"
    generate_synthetic(other, workers=2, **OPTIONS)
    files = sorted(p.relative_to(synth) for p in synth.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".parquet"]) == 5
    for f in files:
        assert (synth / f).read_bytes() == (other / f).read_bytes(), f
    # a different seed gives different data
    third = tmp_path / "ds3"
    generate_synthetic(third, workers=1, **{**OPTIONS, "seed": 4})
    assert (third / "train/part-00000.parquet").read_bytes() != (synth / "train/part-00000.parquet").read_bytes()


def test_shape_and_splits(synth):
    m = load_manifest(synth)
    assert m.source == "synth" and m.label == "label"
    assert m.dense == [f"I{i}" for i in range(1, 14)]
    assert m.sparse_names == [f"C{i}" for i in range(1, 27)]
    assert [f.multi_hot for f in m.sparse] == [False] * 24 + [True, True]
    assert {s: i.num_rows for s, i in m.splits.items()} == {"train": 32_000, "valid": 4_000, "test": 4_000}
    assert [len(m.splits[s].files) for s in ("train", "valid", "test")] == [3, 1, 1]
    cards = scaled_cardinalities(PRESETS["criteo"], ROWS)
    assert [f.num_embeddings for f in m.sparse] == [c + 1 for c in cards]
    assert max(cards) <= ROWS // 2
    t = read_split(synth, "train")
    assert t.schema.field("label").type == pa.float32() and t.schema.field("I1").type == pa.float32()
    assert t.schema.field("C1").type == pa.int64() and t.schema.field("C26").type == pa.list_(pa.int64())
    y = t.column("label").to_numpy()
    assert set(np.unique(y)) == {0.0, 1.0} and 0.2 <= y.mean() <= 0.3
    dense = np.stack([t.column(d).to_numpy() for d in m.dense])
    assert dense.min() >= 0 and np.isfinite(dense).all() and (dense == 0).mean() > 0.05  # log1p of counts, some missing
    for f in m.sparse:
        col = t.column(f.name).combine_chunks()
        ids = (col.flatten() if f.multi_hot else col).to_numpy()
        assert ids.min() >= 0 and ids.max() < f.num_embeddings
        if f.multi_hot:
            lengths = pc_lengths(col)
            assert lengths.min() == 1 and lengths.max() == m.extra["multi_hot_max_len"]
    for rel in m.splits["train"].files:
        md = pq.ParquetFile(synth / rel).metadata
        sizes = [md.row_group(k).num_rows for k in range(md.num_row_groups)]
        assert all(n == 4096 for n in sizes[:-1]) and 0 < sizes[-1] <= 4096


def pc_lengths(col: pa.ListArray) -> np.ndarray:
    return np.diff(col.offsets.to_numpy())


def test_counts_consistent(synth):
    m = load_manifest(synth)
    t = read_split(synth, "train")
    for f in m.sparse:
        counts = load_counts(synth, f.name)
        assert counts.dtype == np.int64 and len(counts) == f.num_embeddings
        col = t.column(f.name).combine_chunks()
        ids = (col.flatten() if f.multi_hot else col).to_numpy()
        np.testing.assert_array_equal(counts, np.bincount(ids, minlength=f.num_embeddings))
        if not f.multi_hot:
            assert counts.sum() == m.splits["train"].num_rows
        assert counts[0] < 0.02 * counts.sum()  # OOV is rare


def test_zipf_skew(synth):
    m = load_manifest(synth)
    big = max((f for f in m.sparse if not f.multi_hot), key=lambda f: f.num_embeddings)
    counts = load_counts(synth, big.name)[1:]
    seen = counts[counts > 0]
    assert counts[0] == counts.max()  # id 1 is the most frequent
    assert counts.max() > 100 * np.median(seen)
    # the head is heavy: the top 1% of ids hold a large share of the rows
    top = np.sort(counts)[::-1]
    assert top[: len(top) // 100].sum() > 0.4 * counts.sum()


def test_planted_truth_recorded(synth):
    m = load_manifest(synth)
    planted = m.extra["planted"]
    assert set(planted) == set(m.sparse_names)
    assert m.extra["seed"] == 3 and m.extra["formula_version"] == FORMULA_VERSION
    assert m.extra["planted_model"]["seed"] == 3 and m.extra["planted_model"]["formula_version"] == FORMULA_VERSION
    noise = [n for n, p in planted.items() if p["signal"] == 0]
    assert len(noise) >= 3
    for n, p in planted.items():
        assert p["rank"] in RANKS
        assert (p["rank"] == 0) == (p["signal"] == 0), n
        assert len(p["direction"]) == p["rank"]
        assert 1.05 <= p["zipf_exponent"] <= 1.2
    assert len({p["rank"] for p in planted.values()} - {0}) >= 3
    assert len({p["signal"] for p in planted.values()} - {0.0}) > 5  # weak and strong fields
    pairs = m.extra["planted_model"]["pairs"]
    assert pairs
    for pair in pairs:
        f, g = pair["fields"]
        assert planted[f]["signal"] and planted[g]["signal"]  # noise fields interact with nothing
        assert pair["dims"] == min(planted[f]["rank"], planted[g]["rank"])


def test_noise_fields_carry_no_signal_strong_fields_do(synth):
    m = load_manifest(synth)
    planted = m.extra["planted"]
    train, ev = read_split(synth, "train"), pa.concat_tables([read_split(synth, "valid"), read_split(synth, "test")])
    ytr, yev = train.column("label").to_numpy(), ev.column("label").to_numpy()
    single = [f for f in m.sparse if not f.multi_hot]

    def target_encoded_auc(f) -> float:
        """AUC on valid+test of the per-id mean label estimated on train (smoothed)."""
        ids = train.column(f.name).to_numpy()
        cnt = np.bincount(ids, minlength=f.num_embeddings)
        pos = np.bincount(ids, weights=ytr, minlength=f.num_embeddings)
        te = (pos + 20 * ytr.mean()) / (cnt + 20)
        return auc(te[ev.column(f.name).to_numpy()], yev)

    strong = max(single, key=lambda f: planted[f.name]["signal"])
    contribution = field_contribution(m.extra, strong.name, train.column(strong.name).to_numpy())
    assert auc(contribution, ytr) > 0.57
    assert target_encoded_auc(strong) > 0.54
    noise = [f for f in single if planted[f.name]["signal"] == 0]
    assert noise
    for f in noise:
        assert abs(target_encoded_auc(f) - 0.5) < 0.035, f.name
        assert not field_contribution(m.extra, f.name, train.column(f.name).to_numpy()).any()
    # independence test on all rows: noise fields' ids are independent of the label
    every = pa.concat_tables([train, ev])
    y = every.column("label").to_numpy()
    for f in noise:
        stat, df = chi2_independence(every.column(f.name).to_numpy(), y)
        assert stat < df + 5 * np.sqrt(2 * df), (f.name, stat, df)
    stat, df = chi2_independence(every.column(strong.name).to_numpy(), y)
    assert stat > df + 10 * np.sqrt(2 * df), (strong.name, stat, df)
    # multi-hot: the bag-mean contribution recomputed from the recorded truth carries signal too
    mh = [f for f in m.sparse if f.multi_hot and planted[f.name]["signal"] > 0]
    for f in mh:
        bags = train.column(f.name).to_pylist()[:5000]
        assert auc(field_contribution(m.extra, f.name, bags), ytr[:5000]) > 0.5


def test_primitives_scale_to_huge_cardinalities():
    rng = np.random.default_rng(0)
    n = 100_000_000
    ids = zipf_ids(rng.random(200_000), n, 1.1)
    assert ids.min() >= 1 and ids.max() <= n and ids.max() > 1_000_000
    # P(id = k) = (k^-a - (k+1)^-a) / (1 - (n+1)^-a) for the bounded power law with a = 1.1 - 1
    expect = lambda k: (k ** -0.1 - (k + 1) ** -0.1) / (1 - (n + 1) ** -0.1)  # noqa: E731
    for k in (1, 2, 10):
        assert abs((ids == k).mean() - expect(k)) < 4 * np.sqrt(expect(k) / len(ids)), k
    assert (ids == 1).mean() > 50 * (ids == 100).mean()
    probe = np.array([0, 1, 2, n - 1, n], np.int64)
    u = latent(7, 3, probe, 16)
    assert u.shape == (5, 16) and not u[0].any() and np.isfinite(u).all()
    np.testing.assert_array_equal(u[3], latent(7, 3, np.array([n - 1]), 16)[0])  # a pure function of the id
    assert not np.allclose(u[1], latent(8, 3, np.array([1]), 16)[0])  # and of the seed
    z = latent(0, 0, np.arange(1, 200_001), 2)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    cards = scaled_cardinalities(PRESETS["criteo-1tb"], 10**9)
    assert cards == PRESETS["criteo-1tb"]  # large enough: no scaling
    small = scaled_cardinalities(PRESETS["criteo"], 1000, cap=300)
    assert max(small) == 300 and min(small) >= 2


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        generate_synthetic(tmp_path / "x", num_rows=100, preset="nope", progress=False)
    with pytest.raises(ValueError, match="multi_hot_fields"):
        generate_synthetic(tmp_path / "x", num_rows=100, multi_hot_fields=27, progress=False)
    with pytest.raises(ValueError, match="at least 3 files"):
        generate_synthetic(tmp_path / "x", num_rows=100, num_files=2, progress=False)
    assert not (tmp_path / "x").exists()


def test_custom_cardinalities_and_multi_hot_only(tmp_path):
    m = generate_synthetic(tmp_path / "c", num_rows=3000, seed=1, workers=1, cardinalities=[5, 1000, 3],
                           multi_hot_fields=1, multi_hot_max_len=3, row_group_size=1000, progress=False)
    assert [(f.name, f.num_embeddings, f.multi_hot) for f in m.sparse] == [("C1", 6, False), ("C2", 1001, False),
                                                                         ("C3", 4, True)]
    assert m.extra["preset"] == "custom" and len(m.extra["planted"]) == 3
    t = read_split(tmp_path / "c", "train")
    lengths = pc_lengths(t.column("C3").combine_chunks())
    assert set(np.unique(lengths)) == {1, 2, 3}
    assert load_counts(tmp_path / "c", "C3").sum() == lengths.sum()
