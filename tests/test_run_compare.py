"""``embdim run`` and ``embdim compare`` end to end on 2 gloo ranks: resume without redoing
finished phases, resume of an interrupted retrain from its checkpoint, and a compare grid whose
report matches the runs' metrics.json files and survives a failing cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embdim.launch import run_cli
from embdim.launch.main import main
from tests.tiny_data import tiny_run_flags, write_tiny_dataset
from embdim.trainer import report as rep

DIM = 16
BUDGET = 0.6  # reachable by fixed and mde on the tiny tables
# One epoch (test_phases.py runs two): each phase is a torchrun launch of 2 ranks on 2 shared cores.
SETS = tiny_run_flags(DIM, epochs=1)
TRAIN_ROWS = 2048
# 2 ranks x 64 rows per step, one epoch.
STEPS = TRAIN_ROWS // (2 * 64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runcmp") / "data"
    write_tiny_dataset(out, num_rows={"train": TRAIN_ROWS, "valid": 256, "test": 256})
    return out


def _run(tiny: Path, out: Path, *extra: str, method: str = "fixed") -> int:
    return main(["run", "--data", str(tiny), "--method", method, "--budget", str(BUDGET), "--out", str(out),
                 "--nproc-per-node", "2", *SETS, *extra])


@pytest.mark.slow
def test_run_end_to_end_then_rerun_redoes_nothing(tiny, tmp_path):
    run = tmp_path / "run"
    assert _run(tiny, run) == 0
    state = json.loads((run / "run_state.json").read_text())
    assert state["method"] == "fixed" and state["budget"] == BUDGET
    assert state["phases"]["search"]["status"] == "done" and state["phases"]["retrain"]["status"] == "done"
    assert state["search_seconds"] > 0 and state["retrain_seconds"] > 0
    metrics_path = run / "retrain" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == STEPS
    assert 0.0 <= metrics["test_auc"] <= 1.0 and metrics["compression_ratio"] > 1.0
    report = (run / "report.md").read_text()
    (row,) = rep.parse_table(report)
    assert row["method"] == "fixed" and row["status"] == "done"
    assert rep.parse_number(row["test AUC"]) == pytest.approx(metrics["test_auc"], abs=5e-5)

    before = {p: p.stat().st_mtime_ns for p in (run / "run_state.json", metrics_path, run / "plan.json",
                                               run / "report.md")}
    state_text = (run / "run_state.json").read_text()
    assert _run(tiny, run) == 0
    assert (run / "run_state.json").read_text() == state_text
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # No phase was launched again: the logs hold one attempt each.
    for phase in ("search", "retrain"):
        assert (run / "logs" / f"{phase}.log").read_text().count("\n=== ") == 1


def test_run_rejects_another_method_in_the_same_folder(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_state.json").write_text(json.dumps({"kind": "run", "method": "mde", "budget": BUDGET, "phases": {}}))
    assert _run(tiny, run) == 2
    err = capsys.readouterr().err
    assert "run_state.json" in err and "mde" in err


@pytest.mark.slow
def test_interrupted_retrain_resumes_from_its_checkpoint(tiny, tmp_path):
    run = tmp_path / "run"
    fail_at = STEPS // 2
    # fixed has a closed-form search (no training), so the injected fault hits the retrain only.
    code = _run(tiny, run, "--set", f"train.checkpoint_every={fail_at}", "--set", f"train.fail_at_step={fail_at}")
    assert code != 0
    state = json.loads((run / "run_state.json").read_text())
    assert state["phases"]["search"]["status"] == "done"
    assert state["phases"]["retrain"]["status"] == "failed"
    assert "injected failure" in state["phases"]["retrain"]["error"]
    assert not (run / "retrain" / "metrics.json").exists()
    assert (run / "retrain" / "ckpt" / f"step_{fail_at}").exists() or \
        any(str(fail_at) in p.name for p in (run / "retrain" / "ckpt").iterdir())
    assert "failed (retrain)" in (run / "report.md").read_text()
    plan_mtime = (run / "plan.json").stat().st_mtime_ns
    search_before = state["phases"]["search"]

    assert _run(tiny, run, "--set", f"train.checkpoint_every={fail_at}", "--set", "train.fail_at_step=-1") == 0
    state = json.loads((run / "run_state.json").read_text())
    assert state["phases"]["search"] == search_before  # not redone
    assert (run / "plan.json").stat().st_mtime_ns == plan_mtime
    assert state["phases"]["retrain"]["status"] == "done" and state["phases"]["retrain"]["attempts"] == 2
    assert "error" not in state["phases"]["retrain"]
    metrics = json.loads((run / "retrain" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == fail_at
    assert metrics["steps"] == STEPS  # the same count as an uninterrupted run
    assert "resumed from" in (run / "logs" / "retrain.log").read_text()
    (row,) = rep.parse_table((run / "report.md").read_text())
    assert row["status"] == "done"


@pytest.mark.slow
def test_compare_grid_report_and_failing_cell(tiny, tmp_path):
    out = tmp_path / "cmp"
    code = main(["compare", "--data", str(tiny), "--methods", "fixed,mde", "--budgets", f"{BUDGET},0.05",
                 "--out", str(out), "--nproc-per-node", "2", *SETS])
    assert code == 0
    rows = {(r["method"], r["budget"]): r for r in rep.parse_table((out / "report.md").read_text())}
    assert set(rows) == {("full", "1"), ("fixed", "0.6"), ("fixed", "0.05"), ("mde", "0.6"), ("mde", "0.05")}
    # MDE cannot shrink the tiny tables to 5%: a failed cell with the method's own message.
    assert rows[("mde", "0.05")]["status"].startswith("failed (search)")
    assert "budget" in rows[("mde", "0.05")]["status"]
    assert rows[("mde", "0.05")]["test AUC"] == rep.MISSING
    state = json.loads((out / "mde_b0.05" / "run_state.json").read_text())
    assert state["phases"]["search"]["status"] == "failed"
    assert "mde: budget 0.05 is below the floor of this method" in state["phases"]["search"]["error"]
    assert "the floor is" in rows[("mde", "0.05")]["status"]
    # Failed before any training: no checkpoint, no metrics.
    assert not (out / "mde_b0.05" / "ckpt").exists() and not (out / "mde_b0.05" / "metrics.json").exists()

    def check(row, metrics, ratio):
        assert row["status"] == "done"
        assert rep.parse_number(row["test AUC"]) == pytest.approx(metrics["test_auc"], abs=5e-5)
        assert rep.parse_number(row["test logloss"]) == pytest.approx(metrics["test_logloss"], abs=5e-5)
        assert rep.parse_number(row["embedding params"]) == metrics["embedding_params"]
        assert rep.parse_number(row["embedding bytes"]) == metrics["embedding_bytes"]
        assert rep.parse_number(row["compression"]) == pytest.approx(ratio, abs=5e-3)
        assert rep.parse_number(row["samples/s"]) == pytest.approx(metrics["samples_per_s"], abs=0.5)

    full = json.loads((out / "full" / "metrics.json").read_text())
    assert full["phase"] == "train"
    check(rows[("full", "1")], full, 1.0)
    assert rows[("full", "1")]["search s"] == rep.MISSING
    for method in ("fixed", "mde"):
        run = out / f"{method}_b0.6"
        metrics = json.loads((run / "retrain" / "metrics.json").read_text())
        assert metrics["full_embedding_params"] == full["embedding_params"]
        check(rows[(method, "0.6")], metrics, metrics["compression_ratio"])
        state = json.loads((run / "run_state.json").read_text())
        assert rep.parse_number(rows[(method, "0.6")]["retrain s"]) == pytest.approx(state["retrain_seconds"], abs=0.05)
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    import matplotlib.image

    assert matplotlib.image.imread(out / "pareto.png").shape[2] in (3, 4)


def test_error_message_prefers_the_cli_line_then_the_child_traceback():
    # The peer's consequential gloo error may even come first; the cause wins.
    log = ("[rank1]: RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:22939. This is typically\n"
           "[rank0]: Traceback (most recent call last):\n[rank0]:   File x\n"
           "[rank0]: RuntimeError: injected failure at step 8 on rank 0 (train.fail_at_step)\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \nlaunch.main FAILED\n")
    assert run_cli.error_message(log) == "RuntimeError: injected failure at step 8 on rank 0 (train.fail_at_step)"
    assert run_cli.error_message("noise\nembdim: error: mde: budget 0.05 is below the floor\n") == \
        "mde: budget 0.05 is below the floor"
    assert run_cli.error_message("nothing useful\n") == ""


def test_report_table_round_trips_escaped_pipes(tmp_path):
    row = rep.ReportRow(method="pme", budget=0.25, status="failed (search): a | b", run_dir=tmp_path,
                        test_auc=0.71234, embedding_params=1234567)
    (parsed,) = rep.parse_table(rep.render_table([row]))
    assert parsed["status"] == "failed (search): a | b"
    assert parsed["embedding params"] == "1,234,567" and parsed["test AUC"] == "0.7123"




def _finished_run(run_dir: Path, fraction: float, extra: dict) -> None:
    """A run folder as ``embdim run`` leaves it, with a compact model at ``fraction`` of full width."""
    full = 10_000
    (run_dir / "retrain").mkdir(parents=True)
    (run_dir / "run_state.json").write_text(json.dumps({
        "kind": "run", "phases": {"search": {"status": "done"}, "retrain": {"status": "done"}},
        "search_seconds": 1.0, "retrain_seconds": 2.0}))
    (run_dir / "retrain" / "metrics.json").write_text(json.dumps({
        "test_auc": 0.75, "test_logloss": 0.5, "embedding_params": round(fraction * full),
        "embedding_bytes": 4 * round(fraction * full), "compression_ratio": 1 / fraction, "samples_per_s": 100.0,
        "full_embedding_params": full, "embedding_fraction": round(fraction * full) / full}))
    (run_dir / "plan.json").write_text(json.dumps({"extra": extra}))


def test_a_plan_over_its_budget_is_never_done(tmp_path):
    over, within = tmp_path / "over", tmp_path / "within"
    _finished_run(over, 0.133, {"fallbacks": []})
    _finished_run(within, 0.0996, {"fallbacks": ["best candidate under 0.95 x budget"],
                                   "adaptations": ["pme: saliency_batches 100 -> 78"]})
    rows = [rep.run_row(over, "amtl", 0.1), rep.run_row(within, "pme", 0.1)]
    assert rows[0].status == "over budget (fraction 0.1330 > 0.1)" and not rows[0].done
    assert rows[0].test_auc == 0.75 and rows[0].notes is None  # the numbers are still shown
    assert rows[1].done and rows[1].embedding_fraction == pytest.approx(0.0996)
    assert rows[1].notes == "best candidate under 0.95 x budget; pme: saliency_batches 100 -> 78"
    parsed = {r["method"]: r for r in rep.parse_table(rep.render_table(rows))}
    assert parsed["amtl"]["status"] == "over budget (fraction 0.1330 > 0.1)" and parsed["amtl"]["fraction"] == "0.1330"
    assert parsed["pme"]["status"] == "done" and "saliency_batches 100 -> 78" in parsed["pme"]["notes"]
    assert not rep.over_budget(0.1, 0.1) and rep.over_budget(0.1001, 0.1) and not rep.over_budget(0.9, 1.0)
