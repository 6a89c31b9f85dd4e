"""Inputs checked before any training: the id counts a method reads, the plan's method, and the
column dataset.json names but a Parquet file lacks (named before the file's extra columns)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embdim.launch.main import main
from tests.cli_checks import one_error_line, set_flags
from tests.tiny_data import write_tiny_dataset

SETS = set_flags()


@pytest.fixture
def data(tmp_path) -> Path:
    out = tmp_path / "data"
    write_tiny_dataset(out, num_rows={"train": 256, "valid": 64, "test": 64})
    return out


@pytest.mark.parametrize("method", ["pme", "amtl"])
@pytest.mark.slow
def test_missing_counts_are_found_before_the_search_trains(method, data, tmp_path, capsys):
    (data / "counts" / "c1.npy").unlink()
    run = tmp_path / "run"
    assert main(["search", "--data", str(data), "--method", method, "--budget", "0.5", "--out", str(run), *SETS]) == 2
    err = one_error_line(capsys)
    assert "counts/c1.npy" in err and "'c1'" in err and method in err
    assert not run.exists()  # nothing trained, no metrics.json, no empty folder
    assert main(["run", "--data", str(data), "--method", method, "--budget", "0.5", "--out", str(run), *SETS]) == 2
    assert "counts/c1.npy" in one_error_line(capsys) and not run.exists()
    # A method that does not read them runs without.
    assert main(["search", "--data", str(data), "--method", "fixed", "--budget", "0.8", "--out", str(run), *SETS]) == 0


def test_plan_method_is_checked(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["search", "--data", str(data), "--method", "fixed", "--budget", "0.8", "--out", str(run), *SETS]) == 0
    raw = json.loads((run / "plan.json").read_text())
    raw["method"] = "fixd"
    (run / "plan.json").write_text(json.dumps(raw))
    capsys.readouterr()
    assert main(["retrain", "--data", str(data), "--plan", str(run / "plan.json"), "--out", str(run / "retrain"),
                 *SETS]) == 2
    err = one_error_line(capsys)
    assert "plan.json" in err and "method 'fixd'" in err and "fixed" in err
    assert not (run / "retrain").exists()
    assert main(["plan", "show", str(run)]) == 2
    assert "method 'fixd'" in one_error_line(capsys)


def test_renamed_dense_column_names_the_manifest_entry(data, tmp_path, capsys):
    raw = json.loads((data / "dataset.json").read_text())
    raw["dense"] = ["i0", "i1", "ix"]  # the file's column is i2
    (data / "dataset.json").write_text(json.dumps(raw))
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *SETS]) == 2
    err = one_error_line(capsys)
    assert "missing column 'ix' (dense feature in dataset.json)" in err and "['i2'] not in dataset.json" in err
