"""``bench/bench_quality.py``: its statistics and plan-width helpers directly, and the driver end to
end on the tiny dataset (2 methods, one budget that one of them cannot reach, 2 seeds, 1 rank),
checking the aggregation against the runs' own metrics.json and plan.json files."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench import bench_quality as bq
from embdim.embedding_methods.plan import FieldPlan, GroupPlan, SizePlan, load_plan, save_plan
from tests.tiny_data import FIELDS, tiny_run_flags, write_tiny_dataset
from embdim.trainer.data.manifest import load_counts, load_manifest, write_manifest

DIM = 16
# On the tiny tables (D=16) the narrowest uniform plan (width 4, pad layout) is 0.25 of full width,
# so fixed fails at 0.2 with its budget message while PME's per-id widths reach it.
BUDGET = 0.2
SEEDS = (0, 1)
# A planted truth for the tiny fields (tiny_data plants per-id effects but records no per-field
# truth): one noise field and a strictly increasing signal, so every correlation is defined.
PLANTED = {"c0": {"signal": 0.0, "rank": 0}, "c1": {"signal": 0.4, "rank": 2},
           "c2": {"signal": 0.9, "rank": 4}, "c3": {"signal": 1.7, "rank": 8}}


# ---------------------------------------------------------------------------- statistics
def test_rankdata_averages_ties():
    assert bq.rankdata([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert bq.rankdata([3.0, 1.0, 2.0]).tolist() == [3.0, 1.0, 2.0]
    assert bq.rankdata([5, 5, 5]).tolist() == [2.0, 2.0, 2.0]


def test_spearman_of_a_known_permutation():
    x = np.arange(8)
    perm = np.array([2, 0, 1, 5, 3, 4, 7, 6])
    n = len(x)
    # Without ties Spearman is 1 - 6 sum d^2 / (n (n^2 - 1)).
    expected = 1 - 6 * float(((x - perm) ** 2).sum()) / (n * (n * n - 1))
    assert bq.spearman(x, perm) == pytest.approx(expected)
    assert bq.spearman(x, x[::-1]) == pytest.approx(-1.0)
    assert bq.spearman(x * 10.0, np.exp(x)) == pytest.approx(1.0)  # ranks only: any monotone map
    # With ties: the Pearson correlation of the average ranks.
    a, b = [1, 2, 2, 3], [1, 3, 2, 4]
    ra, rb = np.array([1, 2.5, 2.5, 4]), np.array([1, 3, 2, 4])
    assert bq.spearman(a, b) == pytest.approx(float(np.corrcoef(ra, rb)[0, 1]))
    # Undefined: a constant side (a uniform plan) or a single point.
    assert bq.spearman([4, 4, 4], [1, 2, 3]) is None
    assert bq.spearman([1], [2]) is None
    with pytest.raises(ValueError):
        bq.spearman([1, 2], [1, 2, 3])


def test_summarize_and_paired_difference():
    s = bq.summarize([0.7, None, 0.8, 0.9])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.8) and s["std"] == pytest.approx(0.1)
    assert bq.summarize([0.5]) == {"mean": 0.5, "std": None, "n": 1}
    assert bq.summarize([]) == {"mean": None, "std": None, "n": 0}
    d = bq.paired_difference([0.01, 0.02, 0.03])
    assert d["t"] == pytest.approx(0.02 / (0.01 / math.sqrt(3)))
    # t = 3.46 with 2 degrees of freedom: below the 5% critical value 4.303, so within seed noise.
    assert bq.t_critical_95(2) == pytest.approx(4.303) and d["significant"] is False
    assert bq.paired_difference([0.01, 0.0101, 0.0099])["significant"] is True
    assert bq.paired_difference([0.01, -0.01, 0.005])["significant"] is False
    assert bq.paired_difference([0.01])["t"] is None


# ---------------------------------------------------------------------------- plan widths
def _per_id_plan() -> SizePlan:
    # Field a: a per-field width; field b: ids 0..5 split 8 -> {0, 3}, 4 -> {1, 4}, pruned {2, 5}.
    return SizePlan(method="pme", embedding_dim=16, fields=[
        FieldPlan("a", 4, [GroupPlan(width=12)]),
        FieldPlan("b", 6, [GroupPlan(width=8, ids=np.array([0, 3], np.int64)),
                           GroupPlan(width=4, ids=np.array([1, 4], np.int64))]),
    ])


def test_field_mean_width_reads_groups_side_files_and_weights_by_counts(tmp_path):
    path = save_plan(_per_id_plan(), tmp_path / "plan.json")
    assert (tmp_path / "plan_ids").is_dir()  # the id groups live in side files
    plan = load_plan(path)
    assert bq.per_id_widths(plan.field("b")).tolist() == [8, 4, 0, 8, 4, 0]
    counts_b = np.array([10, 5, 100, 0, 5, 0])
    widths = bq.plan_mean_widths(plan, {"a": np.array([1, 1, 1, 1]), "b": counts_b})
    assert widths["a"] == 12.0
    # (10*8 + 5*4 + 100*0 + 5*4) / 120: the frequent pruned id pulls the field down.
    assert widths["b"] == pytest.approx((80 + 20 + 20) / 120)
    # Without counts (or a field never seen in training) the plain mean over ids.
    assert bq.plan_mean_widths(plan)["b"] == pytest.approx(24 / 6)
    assert bq.field_mean_width(plan.field("b"), np.zeros(6, np.int64)) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="counts"):
        bq.field_mean_width(plan.field("b"), np.ones(5))


def test_truth_correlations_separates_noise_and_signal_fields():
    planted = {"x": {"signal": 0.0, "rank": 0}, "y": {"signal": 0.5, "rank": 2}, "z": {"signal": 1.0, "rank": 8}}
    t = bq.truth_correlations({"x": 4.0, "y": 8.0, "z": 16.0, "unplanted": 64.0}, planted)
    assert t["spearman_signal"] == pytest.approx(1.0) and t["spearman_rank"] == pytest.approx(1.0)
    assert t["noise_mean_width"] == 4.0 and t["signal_mean_width"] == 12.0
    assert bq.truth_correlations({"x": 8.0, "y": 8.0, "z": 8.0}, planted)["spearman_signal"] is None


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_planted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quality") / "tiny"
    write_tiny_dataset(out, num_rows={"train": 2048, "valid": 256, "test": 256})
    manifest = load_manifest(out)
    manifest.extra["planted"] = PLANTED
    write_manifest(out, manifest)
    return out


@pytest.mark.slow
def test_driver_end_to_end(tiny_planted, tmp_path):
    out = tmp_path / "q"
    argv = ["--data", str(tiny_planted), "--methods", "fixed,pme", "--budgets", str(BUDGET),
            "--seeds", ",".join(map(str, SEEDS)), "--nproc-per-node", "1", "--out", str(out), "--quiet",
            *tiny_run_flags(DIM, epochs=1)]
    assert bq.main(argv) == 0
    doc = json.loads((out / bq.QUALITY_JSON).read_text())
    entry = doc["datasets"]["tiny"]
    assert entry["seeds_run"] == list(SEEDS)
    assert {s: r["exit_code"] for s, r in entry["compare_runs"].items()} == {"0": 0, "1": 0}
    for seed in SEEDS:  # the seed went into every phase's config
        state = json.loads((out / "tiny" / f"seed{seed}" / f"pme_b{BUDGET}" / "run_state.json").read_text())
        assert f"train.seed={seed}" in state["settings"]["set"]
        assert json.loads((out / "tiny" / f"seed{seed}" / "full" / "metrics.json").read_text())["config"]["train"]["seed"] == seed

    # Means and standard deviations recomputed from the runs' metrics.json files.
    full = [json.loads((out / "tiny" / f"seed{s}" / "full" / "metrics.json").read_text()) for s in SEEDS]
    pme = [json.loads((out / "tiny" / f"seed{s}" / f"pme_b{BUDGET}" / "retrain" / "metrics.json").read_text()) for s in SEEDS]
    base = entry["baseline"]
    assert base["n_done"] == 2
    assert base["test_auc"]["mean"] == pytest.approx(np.mean([m["test_auc"] for m in full]))
    assert base["test_auc"]["std"] == pytest.approx(np.std([m["test_auc"] for m in full], ddof=1))
    cells = {(c["method"], c["budget"]): c for c in entry["cells"]}
    cell = cells[("pme", BUDGET)]
    assert cell["n_done"] == 2 and cell["n_failed"] == 0
    for key in ("test_auc", "test_logloss"):
        assert cell[key]["mean"] == pytest.approx(np.mean([m[key] for m in pme]))
        assert cell[key]["std"] == pytest.approx(np.std([m[key] for m in pme], ddof=1))
        assert cell[key]["n"] == 2
    assert cell["embedding_fraction"]["mean"] == pytest.approx(np.mean([m["embedding_fraction"] for m in pme]))
    assert cell["compression_ratio"]["mean"] == pytest.approx(np.mean([m["compression_ratio"] for m in pme]))
    diffs = [p["test_auc"] - f["test_auc"] for p, f in zip(pme, full)]
    assert cell["auc_diff_to_full"]["mean"] == pytest.approx(np.mean(diffs))
    assert cell["auc_diff_to_full"]["std"] == pytest.approx(np.std(diffs, ddof=1))
    assert cell["over_budget"] is False

    # The unreachable budget: failed on both seeds with the method's reason, no numbers (not zeros).
    failed = cells[("fixed", BUDGET)]
    assert failed["n_done"] == 0 and failed["n_failed"] == 2
    assert failed["test_auc"] == {"mean": None, "std": None, "n": 0}
    assert failed["embedding_fraction"]["mean"] is None
    (failure,) = failed["failures"]
    assert failure["seeds"] == list(SEEDS) and "fixed: budget 0.2 is below the floor of this method" in failure["status"]
    md = (out / bq.QUALITY_MD).read_text()
    (fixed_row,) = [line for line in md.splitlines() if line.startswith(f"| fixed | {BUDGET} | 0/2 |")]
    assert "failed 2/2" in fixed_row and "| 0/2 | — |" in fixed_row
    (pme_row,) = [line for line in md.splitlines() if line.startswith(f"| pme | {BUDGET} | 2/2 |")]
    assert f"{cell['test_auc']['mean']:.4f} ± {cell['test_auc']['std']:.4f}" in pme_row

    # Planted truth: PME's per-id plans read through load_plan and weighted by the train counts.
    truth = cell["planted_truth"]
    assert truth["n_plans"] == 2
    counts = {name: np.asarray(load_counts(tiny_planted, name)) for name, _, _ in FIELDS}
    names = [name for name, _, _ in FIELDS]
    rhos = []
    for seed in SEEDS:
        plan = load_plan(out / "tiny" / f"seed{seed}" / f"pme_b{BUDGET}" / "plan.json")
        widths = {}
        for f in plan.fields:
            per_id = np.zeros(f.num_embeddings)
            for g in f.groups:
                per_id[slice(None) if g.ids is None else g.ids] = g.width
            widths[f.name] = float(np.average(per_id, weights=counts[f.name]))
        assert truth["per_seed"][str(seed)]["mean_widths"] == pytest.approx(widths)
        rho = bq.spearman([widths[n] for n in names], [PLANTED[n]["signal"] for n in names])
        assert truth["per_seed"][str(seed)]["spearman_signal"] == (pytest.approx(rho) if rho is not None else None)
        rhos.append(rho)
        assert truth["per_seed"][str(seed)]["noise_mean_width"] == pytest.approx(widths["c0"])
        assert truth["per_seed"][str(seed)]["signal_mean_width"] == pytest.approx(np.mean([widths[n] for n in names[1:]]))
    assert cells[("fixed", BUDGET)]["planted_truth"]["n_plans"] == 0  # no plan: no truth row
    # The reference a size-only rule gets: planted signal against the tables' sizes.
    assert entry["planted_reference"]["spearman_signal_cardinality"] == pytest.approx(
        bq.spearman([PLANTED[n]["signal"] for n in names], [n_emb for _, n_emb, _ in FIELDS]))
    assert "Per-field mean width" in md and "| c3 | 1.7 | 8 |" in md

    # --no-run re-aggregates from the files alone: the same numbers, nothing launched.
    assert bq.main([*argv, "--no-run"]) == 0
    doc2 = json.loads((out / bq.QUALITY_JSON).read_text())
    for key in ("baseline", "cells", "phase_seconds"):
        assert doc2["datasets"]["tiny"][key] == entry[key]
    assert "compare_runs" not in doc2["datasets"]["tiny"]


def test_driver_owns_the_seed_keys(tiny_planted, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bq.main(["--data", str(tiny_planted), "--out", str(tmp_path), "--set", "train.seed=3"])
    assert e.value.code == 2 and "--seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bq.main(["--data", str(tiny_planted), "--out", str(tmp_path), "--methods", "fixed,nope"])


@pytest.mark.slow
def test_synthetic_dataset_is_generated_once_and_checked(tmp_path):
    args = argparse.Namespace(synth_out=str(tmp_path / "synth"), synth_rows=2000, synth_seed=0,
                              synth_cardinality_cap=50, synth_preset="criteo", synth_multi_hot_fields=0)
    path = bq.ensure_synth(args, echo=False)
    manifest = load_manifest(path)
    assert manifest.extra["num_rows"] == 2000 and manifest.extra["cardinality_cap"] == 50
    assert set(manifest.extra["planted"]) == set(manifest.sparse_names)
    mtime = (path / "dataset.json").stat().st_mtime_ns
    assert bq.ensure_synth(args, echo=False) == path and (path / "dataset.json").stat().st_mtime_ns == mtime
    args.synth_seed = 1  # another dataset than the one in the folder: refused, not silently reused
    with pytest.raises(bq.DatasetError, match="seed"):
        bq.ensure_synth(args, echo=False)
