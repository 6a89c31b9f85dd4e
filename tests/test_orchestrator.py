"""The run orchestration (trainer/orchestrator.py) and the demo (trainer/demo.py) with a phase
runner injected in place of torchrun: which phases run, what run_state.json records on success,
failure and a missing artifact, and what the demo prints. No process is started here; the real
runs are tests/test_run_compare.py (slow)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from embdim.trainer import report as rep
from embdim.trainer.config import ConfigError
from embdim.trainer.demo import DEMO_SETTINGS, run_demo
from embdim.trainer.orchestrator import PhaseFailed, RunState, execute_run


class FakeRunner:
    """Records every phase; ``write`` makes a phase produce its completed artifact, ``fail``
    makes it raise ``PhaseFailed`` as launch.launcher.run_phase does on a non-zero exit."""

    def __init__(self, write: bool = True, fail: str | None = None) -> None:
        self.calls: list[tuple[str, list[str], int]] = []
        self.write, self.fail = write, fail

    def __call__(self, name, command, nproc, log_path, echo, *, env=None, say=None) -> None:
        self.calls.append((name, command, nproc))
        if name == self.fail:
            raise PhaseFailed(name, 3, "RuntimeError: boom", log_path)
        if not self.write:
            return
        out = Path(command[command.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        if name == "search":
            (out / "plan.json").write_text("{}")  # never parsed here: a rerun is not simulated
            (out / "metrics.json").write_text(json.dumps({"test_auc": 0.75}))
        else:
            (out / "metrics.json").write_text(json.dumps(
                {"test_auc": 0.71, "valid_auc": 0.72, "test_logloss": 0.5, "embedding_params": 250,
                 "embedding_bytes": 1000, "full_embedding_params": 1000, "compression_ratio": 4.0,
                 "samples_per_s": 1e4}))


def _args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(data=str(tmp_path / "data"), config=None, set=["train.epochs=1"], nproc_per_node=2)


def test_execute_run_runs_both_phases_and_records_them(tmp_path):
    runner, said = FakeRunner(), []
    run = tmp_path / "run"
    row = execute_run(_args(tmp_path), "fixed", 0.5, run, echo=False, say=said.append, run_phase=runner)
    assert [(n, c[0], p) for n, c, p in runner.calls] == [("search", "search", 2), ("retrain", "retrain", 2)]
    search = runner.calls[0][1]
    assert search[search.index("--method") + 1] == "fixed" and search[search.index("--budget") + 1] == "0.5"
    assert search[search.index("--set") + 1] == "train.epochs=1"
    state = json.loads((run / rep.RUN_STATE).read_text())
    assert state["kind"] == "run" and state["method"] == "fixed" and state["budget"] == 0.5
    assert {p: i["status"] for p, i in state["phases"].items()} == {"search": "done", "retrain": "done"}
    assert state["settings"] == {"config": None, "set": ["train.epochs=1"]}
    assert row.status == "done" and row.test_auc == 0.71 and row.embedding_fraction == 0.25
    assert "| fixed |" in (run / rep.REPORT).read_text()
    assert any(m.startswith("retrain: done in") for m in said)


def test_a_failing_phase_is_recorded_and_stops_the_run(tmp_path):
    runner = FakeRunner(fail="search")
    run = tmp_path / "run"
    with pytest.raises(PhaseFailed, match="boom"):
        execute_run(_args(tmp_path), "mde", 0.5, run, echo=False, say=lambda m: None, run_phase=runner)
    assert [n for n, _, _ in runner.calls] == ["search"]
    info = json.loads((run / rep.RUN_STATE).read_text())["phases"]["search"]
    assert info["status"] == "failed" and info["error"] == "RuntimeError: boom" and info["attempts"] == 1
    assert (run / rep.REPORT).exists()  # the report says which phase failed


def test_exit_0_without_the_artifact_is_a_failure(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(PhaseFailed, match="completed artifact is missing"):
        execute_run(_args(tmp_path), "mde", 0.5, run, echo=False, say=lambda m: None,
                    run_phase=FakeRunner(write=False))
    assert json.loads((run / rep.RUN_STATE).read_text())["phases"]["search"]["status"] == "failed"


def test_run_state_refuses_a_folder_of_another_run(tmp_path):
    RunState(tmp_path, {"kind": "run", "method": "fixed", "budget": 0.5}).record("search", "done", 1.0)
    with pytest.raises(ConfigError, match="method='fixed', not 'mde'"):
        RunState(tmp_path, {"kind": "run", "method": "mde", "budget": 0.5})


def test_demo_runs_two_cpu_ranks_and_prints_the_auc(tmp_path, capsys):
    data = tmp_path / "demo" / "data"
    data.mkdir(parents=True)
    (data / "dataset.json").write_text("{}")  # the demo only looks for it; the phases are fake
    stale = tmp_path / "demo" / "run" / "retrain"
    stale.mkdir(parents=True)
    runner = FakeRunner()
    assert run_demo(tmp_path / "demo", method="mde", budget=0.3, run_phase=runner) == 0
    assert [(n, p) for n, _, p in runner.calls] == [("search", 2), ("retrain", 2)]
    search = runner.calls[0][1]
    assert search[search.index("--method") + 1] == "mde" and search[search.index("--budget") + 1] == "0.3"
    assert [search[i + 1] for i, a in enumerate(search) if a == "--set"] == DEMO_SETTINGS
    out = capsys.readouterr().out
    assert "reusing the dataset" in out
    assert "full-width search model: test AUC 0.7500" in out
    assert "compact model: test AUC 0.7100 (valid AUC 0.7200) with 250 of 1,000 embedding parameters (4.0x" in out
    # A failing phase: exit code 1 and the error; the run folder was started afresh.
    assert run_demo(tmp_path / "demo", method="mde", budget=0.3, run_phase=FakeRunner(fail="retrain")) == 1
    assert "embdim: error: demo retrain failed" in capsys.readouterr().err
    assert not stale.exists()


@pytest.mark.slow  # the synthetic data alone takes about 5 s on the shared 2-core machine
def test_demo_generates_its_dataset(tmp_path, capsys):
    assert run_demo(tmp_path / "demo", rows=300, method="mde", budget=0.3, run_phase=FakeRunner()) == 0
    manifest = json.loads((tmp_path / "demo" / "data" / "dataset.json").read_text())
    assert sum(s["num_rows"] for s in manifest["splits"].values()) == 300
    assert "generating 300 synthetic Criteo-shaped rows" in capsys.readouterr().out


def test_demo_checks_its_arguments_before_writing(tmp_path):
    with pytest.raises(ConfigError, match="--budget"):
        run_demo(tmp_path / "d", budget=0.0, run_phase=FakeRunner())
    with pytest.raises(ValueError, match="unknown method"):
        run_demo(tmp_path / "d", method="autodim", run_phase=FakeRunner())
    assert not (tmp_path / "d").exists()
