"""Size plans: exact round trip with id side files, validation errors naming file and field, `plan show`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from embdim.embedding_methods.plan import (
    FieldPlan,
    GroupPlan,
    PlanError,
    SizePlan,
    load_plan,
    save_plan,
    summarize_plan,
    uniform_plan,
)
from embdim.launch.plan_cli import register


def i64(xs) -> np.ndarray:
    return np.asarray(list(xs), dtype=np.int64)


def sample_plan() -> SizePlan:
    return SizePlan(
        method="optembed", embedding_dim=16, budget=0.25, init_checkpoint="inherit.pt", layout="project",
        extra={"evolution": [{"generation": 0, "auc": 0.71}], "threshold": [0.1, 0.2]},
        fields=[
            FieldPlan("C1", 100, [GroupPlan(16, i64(range(0, 100, 3))), GroupPlan(4, i64([1, 2, 50, 98]))]),
            FieldPlan("C2", 5000, [GroupPlan(8)]),
            FieldPlan("site id/x", 12, [GroupPlan(12, i64([0, 11]))]),  # name needs a safe file stem
            FieldPlan("C4", 9, []),
        ],
    )


def all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_round_trip_is_exact(tmp_path: Path) -> None:
    plan = sample_plan()
    path = save_plan(plan, tmp_path)
    assert path == tmp_path / "plan.json"
    assert all_files(tmp_path) == ["plan.json", "plan_ids/C1__g0.npy", "plan_ids/C1__g1.npy",
                                   "plan_ids/site_id_x__g0.npy"]  # no temporary files left behind
    loaded = load_plan(tmp_path)
    assert (loaded.method, loaded.embedding_dim, loaded.budget) == ("optembed", 16, 0.25)
    assert loaded.extra == plan.extra and loaded.init_checkpoint == "inherit.pt"
    assert [f.name for f in loaded.fields] == [f.name for f in plan.fields]
    for got, want in zip(loaded.fields, plan.fields):
        assert got.num_embeddings == want.num_embeddings and got.widths == want.widths
        for g, w in zip(got.groups, want.groups):
            if w.ids is None:
                assert g.ids is None
            else:
                assert g.ids.dtype == np.int64
                np.testing.assert_array_equal(g.ids, w.ids)
    doc = json.loads(path.read_text())
    assert doc["fields"][0]["groups"][1] == {"width": 4, "num_rows": 4, "ids": "plan_ids/C1__g1.npy"}
    assert doc["fields"][1]["groups"][0] == {"width": 8, "num_rows": 5000, "ids": None}
    # C1: 34 rows at 16 (no projection) + 4 rows at 4 (+ 4*16); C2: 5000 at 8 (+ 8*16); C3: 2 at 12 (+ 12*16)
    tables = 34 * 16 + 4 * 4 + 5000 * 8 + 2 * 12
    projections = 4 * 16 + 8 * 16 + 12 * 16
    assert (doc["num_table_params"], doc["num_projection_params"]) == (tables, projections)
    assert doc["num_params"] == loaded.num_params() == tables + projections
    assert doc["full_params"] == loaded.full_params() == (100 + 5000 + 12 + 9) * 16
    assert doc["achieved_fraction"] == pytest.approx((tables + projections) / ((100 + 5000 + 12 + 9) * 16))


def test_resave_removes_stale_side_files(tmp_path: Path) -> None:
    save_plan(sample_plan(), tmp_path / "plan.json")
    smaller = sample_plan()
    smaller.fields[0].groups = smaller.fields[0].groups[:1]
    save_plan(smaller, tmp_path / "plan.json")
    assert all_files(tmp_path) == ["plan.json", "plan_ids/C1__g0.npy", "plan_ids/site_id_x__g0.npy"]
    assert load_plan(tmp_path).fields[0].widths == [16]


def test_param_accounting_of_uniform_plan() -> None:
    plan = uniform_plan("fixed", [("a", 10), ("b", 5)], 8, [4, 8], layout="project")
    assert plan.num_table_params() == 10 * 4 + 5 * 8
    assert plan.num_projection_params() == 4 * 8  # b is already at D
    assert plan.full_params() == 15 * 8
    assert plan.achieved_fraction() == pytest.approx(112 / 120)


def _saved(tmp_path: Path) -> tuple[Path, dict]:
    path = save_plan(sample_plan(), tmp_path)
    return path, json.loads(path.read_text())


def _rewrite(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("case, pattern", [
    ("width", r"field 'C2': group 0: width must be a positive multiple of 4 \(FBGEMM TBE\), got 6"),
    ("wider", r"field 'C2': group 0: width 20 exceeds embedding_dim 16"),
    ("schema", r"schema_version 99; this embdim reads 1"),
    ("unknown_key", r"field 'C2': unknown key\(s\) \['colour'\]"),
    ("missing_key", r"field 'C2': missing key\(s\) \['num_embeddings'\]"),
    ("none_ids_split", r"field 'C1': group 0: ids=None \(all ids\) is only allowed for a field's single group"),
])
def test_load_rejects_bad_json(tmp_path: Path, case: str, pattern: str) -> None:
    path, doc = _saved(tmp_path)
    c2 = doc["fields"][1]
    if case == "width":
        c2["groups"][0]["width"] = 6
    elif case == "wider":
        c2["groups"][0]["width"] = 20
    elif case == "schema":
        doc["schema_version"] = 99
    elif case == "unknown_key":
        c2["colour"] = "red"
    elif case == "missing_key":
        del c2["num_embeddings"]
    elif case == "none_ids_split":
        doc["fields"][0]["groups"][0] = {"width": 16, "ids": None}
    _rewrite(path, doc)
    with pytest.raises(PlanError, match=pattern) as err:
        load_plan(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("case, pattern", [
    ("overlap", r"field 'C1': groups overlap: id 3 is in groups \[0, 1\]"),
    ("unsorted", r"field 'C1': group 1: ids must be sorted and unique; unsorted at position 2 \(50 then 2\)"),
    ("duplicate", r"field 'C1': group 1: ids must be sorted and unique; duplicate at position 1"),
    ("range", r"field 'C1': group 1: id 100 is out of range \[0, 100\)"),
    ("missing", r"field 'C1': group 1: ids side file .*C1__g1.npy not found"),
    ("rows", r"field 'C1': group 1: ids side file .*C1__g1.npy holds 3 rows but plan.json records num_rows=4"),
    ("dtype", r"field 'C1': group 1: ids must be a 1-D int64 array, got int32"),
])
def test_load_rejects_bad_side_files(tmp_path: Path, case: str, pattern: str) -> None:
    path, _ = _saved(tmp_path)
    side = tmp_path / "plan_ids" / "C1__g1.npy"
    if case == "missing":
        side.unlink()
    else:
        ids = {"overlap": [1, 2, 3, 98], "unsorted": [1, 50, 2, 98], "duplicate": [1, 1, 50, 98],
               "range": [1, 2, 50, 100], "rows": [1, 2, 50], "dtype": [1, 2, 50, 98]}[case]
        np.save(side, np.asarray(ids, dtype=np.int32 if case == "dtype" else np.int64))
    with pytest.raises(PlanError, match=pattern) as err:
        load_plan(path)
    assert str(path) in str(err.value)


def test_load_rejects_corrupt_or_missing_file(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(PlanError, match=rf"{path}: invalid JSON"):
        load_plan(path)
    with pytest.raises(PlanError, match="plan file not found"):
        load_plan(tmp_path / "nope.json")
    (tmp_path / "plan_ids" / "C1__g0.npy").write_bytes(b"not numpy")
    path.write_text(text)
    with pytest.raises(PlanError, match=r"field 'C1': group 0: cannot read ids side file"):
        load_plan(path)


def test_save_validates_before_writing(tmp_path: Path) -> None:
    plan = sample_plan()
    plan.fields[1].groups[0].width = 10
    with pytest.raises(PlanError, match=rf"{tmp_path / 'plan.json'}: field 'C2': group 0: width must be"):
        save_plan(plan, tmp_path)
    assert all_files(tmp_path) == []
    plan = sample_plan()
    plan.extra = {"fn": object()}
    with pytest.raises(PlanError, match="extra is not JSON serialisable"):
        save_plan(plan, tmp_path)
    clash = SizePlan("x", 8, [FieldPlan("a", 5, [GroupPlan(4, i64([0])), GroupPlan(4, i64([1]))]),
                              FieldPlan("a@g1", 5, [GroupPlan(4)])])
    with pytest.raises(PlanError, match=r"field 'a@g1': retrain feature name 'a@g1' clashes with field 'a'"):
        save_plan(clash, tmp_path)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="embdim")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_plan_show(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plan = sample_plan()
    save_plan(plan, tmp_path)
    assert _cli(["plan", "show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    total, full = plan.num_params(), plan.full_params()
    assert f"parameters: {total:,} = tables {plan.num_table_params():,} + projections {plan.num_projection_params():,}" in out
    assert f"({total * 4 / 1024:.1f} KiB float32)" in out
    assert f"full width: {full:,} ({full * 4 / 1024:.1f} KiB float32)" in out
    assert f"achieved fraction: {plan.achieved_fraction():.4f}    budget: 0.2500" in out
    # Histogram rows: 4 ids at 4, 5000 at 8, 2 at 12, 34 at 16, 100 - 38 + 12 - 2 + 9 pruned.
    hist = {line.split("|")[0].strip(): line for line in out.splitlines() if "|" in line}
    assert set(hist) == {"4", "8", "12", "16", "pruned"}
    assert "5,000 ( 97.6%)" in hist["8"] and " 81 (" in hist["pruned"]
    assert hist["8"].count("#") > hist["16"].count("#")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  C")}
    assert rows["C1"] == ["100", "38", f"{34 * 16 + 4 * 4 + 4 * 16:,}", "16:34", "4:4"]
    assert rows["C2"] == ["5,000", "5,000", f"{5000 * 8 + 8 * 16:,}", "8:5,000"]
    assert rows["C4"] == ["9", "0", "0", "(pruned)"]
    (tmp_path / "plan.json").write_text("{}")
    with pytest.raises(PlanError, match="missing key 'schema_version'"):
        _cli(["plan", "show", str(tmp_path / "plan.json")])


def test_summarize_plan_of_full_width_plan() -> None:
    text = summarize_plan(uniform_plan("fixed", [("a", 10)], 8, [8], layout="project"))
    assert "achieved fraction: 1.0000" in text and "pruned |" not in text


def test_layout_is_recorded_counted_and_shown(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """plan.json records the layout; pad counts tables only, project adds a w x D projection per
    narrow group; `plan show` prints the layout and the projections' share; a plan written before
    layouts existed loads as project (what it was built with)."""
    import dataclasses
    import json

    project = sample_plan()
    pad = dataclasses.replace(project, layout="pad")
    assert pad.num_params() == pad.num_table_params() == project.num_table_params()
    # C1: 4 + 16 (the 16-wide group needs none), C2: 8, site id/x: 12 -> D = 16.
    assert project.num_projection_params() == (4 + 8 + 12) * 16
    assert pad.projection_share() == 0 and project.projection_share() == pytest.approx(
        project.num_projection_params() / project.num_params())
    save_plan(pad, tmp_path / "pad")
    save_plan(project, tmp_path / "project")
    for plan, name in ((pad, "pad"), (project, "project")):
        doc = json.loads((tmp_path / name / "plan.json").read_text())
        assert doc["layout"] == name and doc["num_params"] == plan.num_params()
        assert load_plan(tmp_path / name).layout == name
        assert _cli(["plan", "show", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        assert f"layout: {name}" in out
        assert f"({plan.projection_share():.1%} in projections)" in out
    doc = json.loads((tmp_path / "pad" / "plan.json").read_text())
    for key in ("layout", "projection_share"):
        del doc[key]
    (tmp_path / "pad" / "plan.json").write_text(json.dumps(doc))
    assert load_plan(tmp_path / "pad").layout == "project"
    with pytest.raises(PlanError, match="layout must be one of"):
        dataclasses.replace(pad, layout="stretch").validate()
