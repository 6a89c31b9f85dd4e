"""Quality benchmark (issue #5): every method x budget on one or more datasets, over several seeds.

For each dataset and seed the driver runs ``embdim compare`` (the full-width baseline plus the
method x budget grid) into ``OUT/<dataset>/seed<k>/`` with the seed set through the config
(``train.seed``: model initialisation and data order; ``optembed.seed``: OptEmbed's evolution, the
only method with a random generator of its own). Because ``compare`` resumes, rerunning the same
command finishes what is missing and retries failed cells; ``--no-run`` only re-aggregates.

It then aggregates across seeds, reading nothing but the files the runs wrote (through
``trainer.report``, the same readers ``compare``'s own report uses):

* per (dataset, method, budget): mean, sample standard deviation and n of test AUC and test
  logloss, the mean achieved embedding fraction and compression, the paired AUC difference to the
  full-width baseline of the same seed (mean, std, paired t statistic), and how many seeds failed
  and why. A failed cell (e.g. a budget the method cannot reach, which ``compare`` records as a
  failed search) stays failed: it never enters a mean as a zero.
* when the dataset's manifest carries a planted truth (``embdim data synth``: ``extra["planted"]``
  = per field a ``signal`` and a true ``rank``), how the chosen widths relate to it: per field the
  mean width of the plan (the field's width for per-field plans; for per-id plans the mean over
  ids weighted by their train-split counts, pruned ids counting as width 0), its Spearman rank
  correlation across fields with the planted signal and rank, the mean width of noise fields
  (signal 0) against signal fields, and a per-field table.

Writes ``OUT/quality.json`` and ``OUT/quality.md`` (atomically) and prints the Markdown.

``--synth-rows N`` first generates a synthetic dataset with ``embdim data synth`` into
``--synth-out`` (skipped when a dataset with the same generator options is already there) and adds
it to the datasets, so one command reproduces the synthetic rows.

Usage::

    python -m bench.bench_quality --data /tmp/c8k /tmp/a9k --out /tmp/quality --nproc-per-node 1 \\
        --set data.batch_size=256 --set model.embedding_dim=64 --set model.dense_arch_layer_sizes=[64,64]
    python -m bench.bench_quality --synth-rows 200000 --synth-out /tmp/synth200k --seeds 0,1 --out /tmp/qsynth
    python -m bench.bench_quality --data /tmp/c8k --out /tmp/quality --no-run     # re-aggregate only
"""

from __future__ import annotations

import argparse
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from embdim.embedding_methods import METHOD_NAMES
from embdim.embedding_methods.plan import FieldPlan, PlanError, SizePlan, load_plan
from bench import cpu_description
from embdim.launch.launcher import repo_env
from embdim.launch.run_cli import cell_dir, run_logged
from embdim.trainer import report as rep
from embdim.trainer.data.manifest import DatasetError, load_counts, load_manifest
from embdim.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
QUALITY_JSON = "quality.json"
QUALITY_MD = "quality.md"
DEFAULT_METHODS = ",".join(METHOD_NAMES)
DEFAULT_BUDGETS = "0.5,0.25,0.1"
DEFAULT_SEEDS = "0,1,2"
# Config keys the driver owns: one value per seed folder. A user --set of one of them would make
# every "seed" the same run.
SEED_KEYS = ("train.seed", "optembed.seed")
# A finished cell whose achieved fraction exceeds its budget by more than this (relative) is marked
# "over budget": PME solves to within 1% (pme.budget_tolerance) and the others land at or below it,
# so only a method whose budget did not bind (AMTL's soft penalty) trips it.
OVER_BUDGET_TOLERANCE = 0.02
# Two-sided 5% critical values of Student's t for df = 1..30 (df > 30: the normal 1.96). A paired
# difference counts as "beyond seed noise" when |mean / (std / sqrt(n))| exceeds the value for n-1.
_T_CRIT_95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
              2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
              2.045, 2.042)

# ``embdim data synth`` defaults of this driver: a small CPU run (tens of thousands of rows on
# 2 cores); every one is a flag, so a GPU host passes its own (e.g. 50M rows, a cap of 1e7).
SYNTH_DEFAULTS = {"seed": 0, "cardinality_cap": 5_000, "preset": "criteo", "multi_hot_fields": 0}


# ---------------------------------------------------------------------------- statistics
def rankdata(values: Sequence[float]) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy.stats.rankdata's "average")."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"rankdata: expected a 1-D sequence, got shape {x.shape}")
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of the first member of each tie group
    return (first + (counts + 1) / 2.0)[inverse.reshape(-1)]


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson correlation of the average ranks); ``None`` when it is
    undefined: fewer than 2 points, or one side constant (e.g. a uniform plan's widths)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman: expected two 1-D sequences of one length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return None
    rx, ry = rankdata(x) - (len(x) + 1) / 2.0, rankdata(y) - (len(y) + 1) / 2.0
    denominator = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if denominator == 0.0:
        return None
    return float(rx @ ry) / denominator


def summarize(values: Iterable[float | None]) -> dict[str, Any]:
    """{"mean", "std" (sample, ddof 1; None for n < 2), "n"} of the values that are not None."""
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))],
                   dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None, "n": int(len(v))}


def t_critical_95(df: int) -> float:
    if df < 1:
        raise ValueError(f"t_critical_95: df must be >= 1, got {df}")
    return _T_CRIT_95[df - 1] if df <= len(_T_CRIT_95) else 1.96


def paired_difference(diffs: Sequence[float]) -> dict[str, Any]:
    """Mean, std and n of per-seed differences, the paired t statistic and whether it is beyond
    seed noise at 5% (two-sided). With n < 2 or zero spread there is no test (``t`` None)."""
    s = summarize(diffs)
    s["t"], s["significant"] = None, False
    if s["n"] >= 2 and s["std"]:
        s["t"] = s["mean"] / (s["std"] / math.sqrt(s["n"]))
        s["significant"] = abs(s["t"]) > t_critical_95(s["n"] - 1)
    return s


# ---------------------------------------------------------------------------- plans
def per_id_widths(field_plan: FieldPlan) -> np.ndarray:
    """``[num_embeddings]`` width of every raw id of the field (0 = pruned, its output is zero)."""
    widths = np.zeros(field_plan.num_embeddings, dtype=np.int64)
    for group in field_plan.groups:
        if group.ids is None:  # the field's single group holding every id
            widths[:] = group.width
        else:
            widths[group.ids] = group.width
    return widths


def field_mean_width(field_plan: FieldPlan, counts: np.ndarray | None = None) -> float:
    """The width a field gets on average: its one width for a per-field plan; for a per-id plan
    the mean over ids weighted by their train-split counts (what a looked-up row gets on average;
    an unweighted mean would be dominated by the long tail of rare ids), falling back to the plain
    mean over ids when there are no counts or the field was never seen."""
    groups = field_plan.groups
    if len(groups) == 1 and groups[0].ids is None:
        return float(groups[0].width)
    widths = per_id_widths(field_plan)
    if counts is not None:
        counts = np.asarray(counts, dtype=np.float64)
        if counts.shape != widths.shape:
            raise ValueError(f"field {field_plan.name!r}: counts have shape {counts.shape}, the plan has "
                             f"{field_plan.num_embeddings} ids")
        total = counts.sum()
        if total > 0:
            return float(counts @ widths / total)
    return float(widths.mean()) if len(widths) else 0.0


def plan_mean_widths(plan: SizePlan, counts: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """{field: mean width} of a plan (``field_mean_width``), in the plan's field order."""
    counts = counts or {}
    return {f.name: field_mean_width(f, counts.get(f.name)) for f in plan.fields}


def truth_correlations(widths: dict[str, float], planted: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How one plan's per-field mean widths relate to the planted truth of the fields both know."""
    names = [n for n in widths if n in planted]
    w = [widths[n] for n in names]
    signal = [float(planted[n]["signal"]) for n in names]
    rank = [float(planted[n]["rank"]) for n in names]
    noise = [widths[n] for n in names if planted[n]["signal"] == 0]
    signal_w = [widths[n] for n in names if planted[n]["signal"] != 0]
    return {
        "spearman_signal": spearman(w, signal),
        "spearman_rank": spearman(w, rank),
        "noise_mean_width": float(np.mean(noise)) if noise else None,
        "signal_mean_width": float(np.mean(signal_w)) if signal_w else None,
    }


# ---------------------------------------------------------------------------- runs
@dataclass
class Dataset:
    name: str  # the folder name under OUT
    path: Path
    planted: dict[str, dict[str, Any]] | None
    fields: list[str]
    num_embeddings: dict[str, int] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)


def _dataset_names(paths: list[Path]) -> list[str]:
    """Folder names under OUT: the dataset folders' names, made unique by their position if needed."""
    names = [p.resolve().name or "data" for p in paths]
    if len(set(names)) != len(names):
        names = [f"{n}.{i}" for i, n in enumerate(names)]
    return names


def load_datasets(paths: list[Path]) -> list[Dataset]:
    out = []
    for path, name in zip(paths, _dataset_names(paths)):
        manifest = load_manifest(path)  # DatasetError naming the file
        planted = manifest.extra.get("planted") or None
        ds = Dataset(name=name, path=path, planted=planted, fields=manifest.sparse_names,
                     num_embeddings={f.name: f.num_embeddings for f in manifest.sparse})
        if planted:
            # Counts are only needed to weight per-id plans against the planted truth.
            ds.counts = {f: np.asarray(load_counts(path, f)) for f in ds.fields}
        out.append(ds)
    return out


def seed_dir(out: Path, dataset: Dataset, seed: int) -> Path:
    return out / dataset.name / f"seed{seed}"


def compare_command(args: argparse.Namespace, dataset: Dataset, seed: int, out: Path) -> list[str]:
    """The ``embdim compare`` command line of one (dataset, seed)."""
    cmd = [sys.executable, "-m", "embdim.launch.main", "compare", "--data", str(dataset.path), "--methods", args.methods,
           "--budgets", args.budgets, "--nproc-per-node", str(args.nproc_per_node), "--out", str(out)]
    if args.config:
        cmd += ["--config", str(args.config)]
    for s in args.set:
        cmd += ["--set", s]
    for key in SEED_KEYS:
        cmd += ["--set", f"{key}={seed}"]
    return cmd


def run_compare(cmd: list[str], log_path: Path, echo: bool) -> tuple[int, float]:
    """Runs one compare, its output appended to ``log_path`` (and echoed); returns (exit code, s)."""
    start = time.perf_counter()
    code = run_logged(cmd, log_path, shlex.join(cmd), echo=echo, cwd=ROOT)
    return code, time.perf_counter() - start


# ---------------------------------------------------------------------------- aggregation
def _fraction(row: rep.ReportRow) -> float | None:
    return None if not row.compression_ratio else 1.0 / row.compression_ratio


def _seed_rows(sdir: Path, methods: list[str], budgets: list[float]) -> tuple[rep.ReportRow, dict]:
    """The baseline row and {(method, budget): row} of one compare folder; an unreadable folder
    becomes a row saying so, as in ``compare``'s own report."""
    def safe(build, method, budget, run_dir):
        try:
            return build()
        except rep.ReportError as e:
            return rep.ReportRow(method=method, budget=budget, status=f"unreadable: {e}", run_dir=run_dir)

    base = safe(lambda: rep.baseline_row(sdir / "full"), rep.BASELINE_METHOD, 1.0, sdir / "full")
    cells = {(m, b): safe(lambda m=m, b=b: rep.run_row(cell_dir(sdir, m, b), m, b), m, b, cell_dir(sdir, m, b))
             for m in methods for b in budgets}
    return base, cells


def _classify(row: rep.ReportRow) -> str:
    if row.done:
        return "done"
    if row.status.startswith("not run"):
        return "missing"
    return "failed"


def _aggregate_rows(rows: dict[int, rep.ReportRow], base: dict[int, rep.ReportRow], budget: float | None) -> dict:
    """Statistics of one cell over seeds ({seed: row}); ``base`` = the baselines by seed (for the
    paired difference; None for the baseline itself)."""
    done = {s: r for s, r in rows.items() if r.done}
    failures: dict[str, list[int]] = {}
    for s, r in sorted(rows.items()):
        kind = _classify(r)
        if kind != "done":
            failures.setdefault(r.status, []).append(s)
    out: dict[str, Any] = {
        "seeds": sorted(rows),
        "done_seeds": sorted(done),
        "n_done": len(done),
        "n_failed": sum(_classify(r) == "failed" for r in rows.values()),
        "n_missing": sum(_classify(r) == "missing" for r in rows.values()),
        "failures": [{"status": status, "seeds": seeds} for status, seeds in failures.items()],
        "test_auc": summarize(r.test_auc for r in done.values()),
        "test_logloss": summarize(r.test_logloss for r in done.values()),
        "embedding_params": summarize(r.embedding_params for r in done.values()),
        "embedding_fraction": summarize(_fraction(r) for r in done.values()),
        "compression_ratio": summarize(r.compression_ratio for r in done.values()),
        "search_seconds": summarize(r.search_seconds for r in rows.values()),
        "retrain_seconds": summarize(r.retrain_seconds for r in rows.values()),
        "per_seed": {str(s): {"status": r.status, "test_auc": r.test_auc, "test_logloss": r.test_logloss,
                              "embedding_params": r.embedding_params, "embedding_fraction": _fraction(r),
                              "run_dir": str(r.run_dir)} for s, r in sorted(rows.items())},
    }
    if base is not None:
        diffs = [done[s].test_auc - base[s].test_auc for s in sorted(done) if s in base and base[s].done]
        out["auc_diff_to_full"] = paired_difference(diffs)
    frac = out["embedding_fraction"]["mean"]
    out["over_budget"] = bool(budget is not None and frac is not None and frac > budget * (1 + OVER_BUDGET_TOLERANCE))
    return out


def _cell_truth(dataset: Dataset, run_dirs: dict[int, Path]) -> dict | None:
    """Planted-truth statistics of one (method, budget) over the seeds whose search left a plan."""
    if not dataset.planted:
        return None
    per_seed, widths_by_seed = {}, {}
    for seed, run_dir in sorted(run_dirs.items()):
        plan_path = run_dir / "plan.json"
        if not plan_path.exists():
            continue
        try:
            plan = load_plan(plan_path)
        except PlanError as e:
            per_seed[str(seed)] = {"error": str(e)}
            continue
        widths = plan_mean_widths(plan, dataset.counts)
        widths_by_seed[seed] = widths
        per_seed[str(seed)] = {**truth_correlations(widths, dataset.planted), "mean_widths": widths}
    if not widths_by_seed:
        return {"n_plans": 0, "per_seed": per_seed}
    fields = [f for f in dataset.fields if f in dataset.planted]
    mean_widths = {f: float(np.mean([w[f] for w in widths_by_seed.values()])) for f in fields}
    ok = [v for v in per_seed.values() if "error" not in v]
    return {
        "n_plans": len(widths_by_seed),
        # Per seed (what one run's plan gives), then over the seed-mean widths (the expected plan).
        "spearman_signal": summarize(v["spearman_signal"] for v in ok),
        "spearman_rank": summarize(v["spearman_rank"] for v in ok),
        "noise_mean_width": summarize(v["noise_mean_width"] for v in ok),
        "signal_mean_width": summarize(v["signal_mean_width"] for v in ok),
        "mean_widths": mean_widths,
        "of_mean_widths": truth_correlations(mean_widths, dataset.planted),
        "per_seed": per_seed,
    }


def aggregate(out: Path, datasets: list[Dataset], methods: list[str], budgets: list[float],
              seeds: list[int]) -> dict[str, Any]:
    """Everything ``quality.json`` holds about the runs, read from OUT/<dataset>/seed<k>/."""
    result: dict[str, Any] = {}
    for ds in datasets:
        base_rows, cell_rows = {}, {}
        present = []
        for seed in seeds:
            sdir = seed_dir(out, ds, seed)
            if not sdir.exists():
                continue
            present.append(seed)
            base_rows[seed], cells = _seed_rows(sdir, methods, budgets)
            for key, row in cells.items():
                cell_rows.setdefault(key, {})[seed] = row
        cells_out = []
        for m in methods:
            for b in budgets:
                rows = cell_rows.get((m, b), {})
                cell = {"method": m, "budget": b, **_aggregate_rows(rows, base_rows, b)}
                truth = _cell_truth(ds, {s: cell_dir(seed_dir(out, ds, s), m, b) for s in rows})
                if truth is not None:
                    cell["planted_truth"] = truth
                cells_out.append(cell)
        phase_seconds = 0.0
        for seed in present:
            for row in [base_rows[seed], *(cell_rows[k][seed] for k in cell_rows if seed in cell_rows[k])]:
                phase_seconds += (row.search_seconds or 0.0) + (row.retrain_seconds or 0.0)
        entry: dict[str, Any] = {
            "path": str(ds.path),
            "seeds_run": present,
            "baseline": {"method": rep.BASELINE_METHOD, "budget": 1.0, **_aggregate_rows(base_rows, None, None)},
            "cells": cells_out,
            "phase_seconds": phase_seconds,
        }
        if ds.planted:
            entry["planted"] = {f: {"signal": ds.planted[f]["signal"], "rank": ds.planted[f]["rank"],
                                    "cardinality": ds.planted[f].get("cardinality")}
                                for f in ds.fields if f in ds.planted}
            # What a width rule that sees only the table sizes (MDE's) can get: if the planted
            # signal happens to follow the cardinalities, a high rho proves no learning.
            names = list(entry["planted"])
            sizes = [ds.num_embeddings[f] for f in names]
            entry["planted_reference"] = {
                "spearman_signal_cardinality": spearman([entry["planted"][f]["signal"] for f in names], sizes),
                "spearman_rank_cardinality": spearman([entry["planted"][f]["rank"] for f in names], sizes),
            }
        result[ds.name] = entry
    return result


# ---------------------------------------------------------------------------- Markdown
def _pm(stat: dict[str, Any], digits: int = 4) -> str:
    if stat["mean"] is None:
        return rep.MISSING
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _num(value: float | None, fmt: str) -> str:
    return rep.MISSING if value is None else format(value, fmt)


def _cell_status(cell: dict[str, Any]) -> str:
    seeds = len(cell["seeds"])
    parts = []
    if cell["n_done"]:
        parts.append(f"done {cell['n_done']}/{seeds}")
    for failure in cell["failures"]:
        kind = "missing" if failure["status"].startswith("not run") else "failed"
        parts.append(f"{kind} {len(failure['seeds'])}/{seeds}: {failure['status']}")
    if cell.get("over_budget"):
        parts.append(f"over budget (fraction {cell['embedding_fraction']['mean']:.4f} > {cell['budget']:g})")
    return rep.format_cell("status", "; ".join(parts) or "no runs")


def _diff_cell(cell: dict[str, Any]) -> str:
    d = cell.get("auc_diff_to_full")
    if not d or d["mean"] is None:
        return rep.MISSING
    text = f"{d['mean']:+.4f}" + (f" ± {d['std']:.4f}" if d["std"] is not None else "")
    if d["t"] is not None:
        text += f" (t={d['t']:+.1f}{'*' if d['significant'] else ''})"
    return text


QUALITY_COLUMNS = ["method", "budget", "n", "test AUC", "Δ AUC vs full (paired)", "test logloss", "fraction",
                   "compression", "status"]


def render_quality_table(entry: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(QUALITY_COLUMNS) + " |", "|" + "|".join("---" for _ in QUALITY_COLUMNS) + "|"]
    for cell in [entry["baseline"], *entry["cells"]]:
        frac = cell["embedding_fraction"]["mean"]
        comp = cell["compression_ratio"]["mean"]
        lines.append("| " + " | ".join([
            cell["method"], f"{cell['budget']:g}", f"{cell['n_done']}/{len(cell['seeds'])}",
            _pm(cell["test_auc"]), _diff_cell(cell) if cell is not entry["baseline"] else rep.MISSING,
            _pm(cell["test_logloss"]), _num(frac, ".4f"), rep.MISSING if comp is None else f"{comp:.2f}x",
            _cell_status(cell),
        ]) + " |")
    return "\n".join(lines) + "\n"


def _best_budget(cells: list[dict[str, Any]], method: str, fixed: float | None) -> dict[str, Any] | None:
    """The cell whose per-field widths the truth table shows: ``fixed`` when given, else the budget
    with the highest mean test AUC among those with a plan."""
    candidates = [c for c in cells if c["method"] == method and c.get("planted_truth", {}).get("n_plans")]
    if fixed is not None:
        candidates = [c for c in candidates if c["budget"] == fixed]
    if not candidates:
        return None
    return max(candidates, key=lambda c: (c["test_auc"]["mean"] is not None, c["test_auc"]["mean"] or 0.0))


def render_truth(entry: dict[str, Any], methods: list[str], truth_budget: float | None) -> str:
    planted = entry["planted"]
    n_noise = sum(1 for p in planted.values() if p["signal"] == 0)
    lines = [f"Planted truth: {len(planted)} fields, {n_noise} noise (signal 0). Mean width of a field: its width "
             "(per-field plans) or the train-count-weighted mean over its ids (per-id plans; pruned ids count "
             "as 0). ρ = Spearman across fields, per seed then mean ± std; \"—\" = undefined (every field "
             "the same width)."]
    ref = entry.get("planted_reference")
    if ref:
        lines += ["", "For reference, across fields ρ(planted signal, cardinality) = "
                  f"{_num(ref['spearman_signal_cardinality'], '.2f')} and ρ(planted rank, cardinality) = "
                  f"{_num(ref['spearman_rank_cardinality'], '.2f')}: a width rule that looks only at table sizes "
                  "(MDE: the larger the table, the narrower) correlates with the truth through these alone, with the "
                  "opposite sign."]
    lines += ["",
             "| method | budget | plans | ρ(width, signal) | ρ(width, rank) | noise fields mean width | "
             "signal fields mean width |", "|---|---|---|---|---|---|---|"]
    for cell in entry["cells"]:
        t = cell.get("planted_truth")
        if not t or not t["n_plans"]:
            continue
        lines.append(f"| {cell['method']} | {cell['budget']:g} | {t['n_plans']} | {_pm(t['spearman_signal'], 2)} | "
                     f"{_pm(t['spearman_rank'], 2)} | {_pm(t['noise_mean_width'], 1)} | "
                     f"{_pm(t['signal_mean_width'], 1)} |")
    chosen = {m: _best_budget(entry["cells"], m, truth_budget) for m in methods}
    chosen = {m: c for m, c in chosen.items() if c is not None}
    if chosen:
        how = f"budget {truth_budget:g}" if truth_budget is not None else "per method the budget with the best mean test AUC"
        lines += ["", f"Per-field mean width (mean over seeds), {how}:", ""]
        heads = [f"{m} (b={c['budget']:g})" for m, c in chosen.items()]
        lines.append("| field | signal | rank | cardinality | " + " | ".join(heads) + " |")
        lines.append("|---|---|---|---|" + "|".join("---" for _ in heads) + "|")
        order = sorted(planted, key=lambda f: (-planted[f]["signal"], f))
        for f in order:
            p = planted[f]
            ws = [f"{c['planted_truth']['mean_widths'][f]:.1f}" for c in chosen.values()]
            lines.append(f"| {f} | {p['signal']:g} | {p['rank']} | {_num(p.get('cardinality'), ',')} | "
                         + " | ".join(ws) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    parts = ["# Quality benchmark", "",
             f"Command: `{doc['command']}`", "",
             f"Machine: {doc['machine']}; date {doc['date']}. Methods: {', '.join(s['methods'])}; budgets: "
             f"{', '.join(f'{b:g}' for b in s['budgets'])}; seeds: {', '.join(map(str, s['seeds']))} (seed keys "
             f"{', '.join(SEED_KEYS)}); ranks per phase: {s['nproc_per_node']}; settings: "
             f"{' '.join(s['set']) or '(defaults)'}" + (f"; config `{s['config']}`" if s["config"] else "") + ".", "",
             "Mean ± sample std over the seeds that finished (n = finished/seeds). Δ AUC vs full: the cell's "
             "test AUC minus the full-width baseline's of the same seed, mean ± std, with the paired t "
             "statistic; * = beyond seed noise (two-sided 5%). A failed cell (e.g. an unreachable budget) is "
             "reported as failed, never as a zero. fraction = embedding params / full-width params.", ""]
    for name, entry in doc["datasets"].items():
        parts += [f"## {name}", "", f"Data: `{entry['path']}`; seeds run: {entry['seeds_run']}; "
                  f"phase wall time summed over runs: {entry['phase_seconds']:.0f} s.", "",
                  render_quality_table(entry)]
        if entry.get("planted"):
            parts += [render_truth(entry, doc["settings"]["methods"], doc["settings"]["truth_budget"])]
    return "\n".join(parts)


# ---------------------------------------------------------------------------- synthetic data
def ensure_synth(args: argparse.Namespace, echo: bool) -> Path:
    """``embdim data synth`` into --synth-out unless a dataset with the same options is there."""
    out = Path(args.synth_out)
    # The manifest records "no cap" as null; the flag spells it 0.
    cap = args.synth_cardinality_cap or None
    wanted = {"num_rows": args.synth_rows, "seed": args.synth_seed, "cardinality_cap": cap,
              "preset": args.synth_preset, "multi_hot_fields": args.synth_multi_hot_fields}
    if (out / "dataset.json").exists():
        extra = load_manifest(out).extra
        found = {k: extra.get(k) for k in wanted}
        if found != wanted:
            raise DatasetError(f"{out}: holds a dataset generated with {found}, not {wanted}; give another "
                               f"--synth-out (or delete it)")
        if echo:
            print(f"quality: reusing the synthetic dataset in {out}", flush=True)
        return out
    cmd = [sys.executable, "-m", "embdim.launch.main", "data", "synth", "--out", str(out), "--rows", str(args.synth_rows),
           "--seed", str(args.synth_seed), "--preset", args.synth_preset,
           "--multi-hot-fields", str(args.synth_multi_hot_fields), "--no-progress"]
    if cap:
        cmd += ["--cardinality-cap", str(cap)]
    if echo:
        print(f"quality: {shlex.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=repo_env(), capture_output=not echo, text=True)
    if proc.returncode != 0:
        raise DatasetError(f"embdim data synth failed with exit code {proc.returncode}: "
                           f"{(proc.stderr or '').strip()[-2000:]}")
    return out


# ---------------------------------------------------------------------------- main
def machine() -> str:
    text = cpu_description()
    try:
        import torch

        if torch.cuda.is_available():
            text = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}; " + text
    except ImportError:
        pass
    return text


def _parse_list(text: str, flag: str, convert) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{flag}: empty list")
    try:
        values = [convert(t) for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag}: expected a comma-separated list, got {text!r}") from None
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{flag}: duplicate entries in {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from embdim.launch.phases_cli import add_config_arguments

    p = argparse.ArgumentParser(prog="python -m bench.bench_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=[], metavar="DIR", help="dataset folder(s) made by `embdim data`")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated methods (default %(default)s)")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help="comma-separated budgets (default %(default)s)")
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help="comma-separated seeds (default %(default)s)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="ranks per phase, passed to compare (default 1)")
    p.add_argument("--out", required=True, help="benchmark folder: <dataset>/seed<k>/, quality.md, quality.json")
    p.add_argument("--no-run", action="store_true", help="only aggregate the runs already in --out")
    p.add_argument("--truth-budget", type=float, default=None,
                   help="budget of the per-field planted-truth table (default: per method the best mean AUC)")
    p.add_argument("--quiet", action="store_true", help="do not echo compare's output (it is in the logs)")
    add_config_arguments(p)
    g = p.add_argument_group("synthetic data (embdim data synth)")
    g.add_argument("--synth-rows", type=int, default=None, help="generate (or reuse) a synthetic dataset of N rows")
    g.add_argument("--synth-out", default=None, help="its folder (default OUT/data/synth<N>)")
    g.add_argument("--synth-seed", type=int, default=SYNTH_DEFAULTS["seed"], help="generator seed (default %(default)s)")
    g.add_argument("--synth-cardinality-cap", type=int, default=SYNTH_DEFAULTS["cardinality_cap"],
                   help="maximum ids per field (default %(default)s; 0 = the generator's scaling by rows only)")
    g.add_argument("--synth-preset", default=SYNTH_DEFAULTS["preset"], choices=["criteo", "criteo-1tb"])
    g.add_argument("--synth-multi-hot-fields", type=int, default=SYNTH_DEFAULTS["multi_hot_fields"],
                   help="the last N fields multi-hot (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        methods = _parse_list(args.methods, "--methods", str)
        budgets = _parse_list(args.budgets, "--budgets", float)
        seeds = _parse_list(args.seeds, "--seeds", int)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    from embdim.embedding_methods import METHOD_NAMES

    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHOD_NAMES)}")
    if any(not 0 < b <= 1 for b in budgets):
        parser.error(f"--budgets: each must be in (0, 1], got {budgets}")
    if args.nproc_per_node < 1:
        parser.error(f"--nproc-per-node: must be positive, got {args.nproc_per_node}")
    owned = [s for s in args.set if s.split("=", 1)[0].strip() in SEED_KEYS]
    if owned:
        parser.error(f"--set {owned[0]}: the driver sets {', '.join(SEED_KEYS)} per seed; use --seeds")
    out = Path(args.out)
    echo = not args.quiet
    paths = [Path(d) for d in args.data]
    try:
        if args.synth_rows is not None:
            if args.synth_rows < 10:
                parser.error(f"--synth-rows: must be at least 10, got {args.synth_rows}")
            args.synth_out = args.synth_out or str(out / "data" / f"synth{args.synth_rows}")
            if args.no_run and not (Path(args.synth_out) / "dataset.json").exists():
                parser.error(f"--no-run: no synthetic dataset in {args.synth_out}")
            paths.append(ensure_synth(args, echo) if not args.no_run else Path(args.synth_out))
        if not paths:
            parser.error("give --data DIR ... and/or --synth-rows N")
        datasets = load_datasets(paths)
    except DatasetError as e:
        print(f"bench_quality: error: {e}", file=sys.stderr)
        return 2

    runs: dict[str, dict[str, Any]] = {}
    if not args.no_run:
        for ds in datasets:
            for seed in seeds:
                sdir = seed_dir(out, ds, seed)
                cmd = compare_command(args, ds, seed, sdir)
                if echo:
                    print(f"quality: {ds.name} seed {seed}: {shlex.join(cmd[1:])}", flush=True)
                code, seconds = run_compare(cmd, out / ds.name / f"seed{seed}.log", echo)
                runs.setdefault(ds.name, {})[str(seed)] = {"exit_code": code, "wall_seconds": round(seconds, 1)}
                if echo:
                    print(f"quality: {ds.name} seed {seed}: compare exit {code} after {seconds:.0f} s", flush=True)

    result = aggregate(out, datasets, methods, budgets, seeds)
    for name, info in runs.items():
        result[name]["compare_runs"] = info
    now = datetime.now(timezone.utc)
    doc = {
        "command": shlex.join(["python", "-m", "bench.bench_quality", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "date": now.date().isoformat(),
        "generated_at": now.isoformat(timespec="seconds"),
        "settings": {"methods": methods, "budgets": budgets, "seeds": seeds, "nproc_per_node": args.nproc_per_node,
                     "set": list(args.set), "config": args.config, "seed_keys": list(SEED_KEYS),
                     "truth_budget": args.truth_budget},
        "datasets": result,
    }
    text = render_markdown(doc)
    atomic_write_json(out / QUALITY_JSON, doc)
    atomic_write_text(out / QUALITY_MD, text)
    print(text, flush=True)
    print(f"quality: wrote {out / QUALITY_MD} and {out / QUALITY_JSON}", flush=True)
    # Failed cells are results; only a missing baseline (no reference at all) fails the benchmark.
    return 0 if all(e["baseline"]["n_done"] for e in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
