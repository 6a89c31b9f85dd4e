"""The bad-input catalog: every case exits non-zero with ONE clear message and writes nothing half-way.

Each case runs the user-facing command through ``launch.main.main`` on one process (no torchrun),
and checks: exit code 2; stderr is exactly one ``embdim: error: ...`` line naming the file / row
group / field / key at fault; no traceback; no metrics.json / plan.json / checkpoint /
dataset.json left for the failed command, and no half-built dataset folder (or staging folder).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embdim.launch.main import main
from tests.tiny_data import write_tiny_dataset

SMALL = ["data.batch_size=64", "data.eval_batch_size=128", "model.embedding_dim=8",
         "model.dense_arch_layer_sizes=[8]", "model.over_arch_layer_sizes=[8, 1]",
         "train.progress_bar=false", "train.log_every=0"]
SETS = [a for s in SMALL for a in ("--set", s)]
TRAIN_PART = "train/part-00000.parquet"


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad_input") / "data"
    write_tiny_dataset(out, num_rows={"train": 512, "valid": 128, "test": 128}, row_group_size=128)
    return out


@pytest.fixture(scope="module")
def base_plan(base, tmp_path_factory) -> Path:
    """A valid closed-form plan (fixed, no training) for the plan cases."""
    run = tmp_path_factory.mktemp("bad_input_plan") / "run"
    assert main(["search", "--data", str(base), "--method", "fixed", "--budget", "1.0", "--out", str(run),
                 *SETS]) == 0
    return run / "plan.json"


def _rewrite(data: Path, rel: str, fn: Callable[[pa.Table], pa.Table], row_group_size: int = 128) -> None:
    table = fn(pq.read_table(data / rel))
    pq.write_table(table, data / rel, row_group_size=row_group_size)


def _set_column(name: str, values_fn: Callable[[np.ndarray], np.ndarray]):
    def fn(table: pa.Table) -> pa.Table:
        i = table.schema.get_field_index(name)
        values = values_fn(table.column(name).to_numpy().copy())
        return table.set_column(i, name, pa.array(values, type=table.schema.field(name).type))
    return fn


def _at_row(row: int, value):
    def fn(values: np.ndarray) -> np.ndarray:
        values[row] = value
        return values
    return fn


def _edit_manifest(data: Path, fn: Callable[[dict], None]) -> None:
    raw = json.loads((data / "dataset.json").read_text())
    fn(raw)
    (data / "dataset.json").write_text(json.dumps(raw))


def _sparse(raw: dict, name: str) -> dict:
    return next(f for f in raw["sparse"] if f["name"] == name)


def _run(argv: list[str], capsys) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, f"exit code {code}; stderr: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("embdim: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


def _assert_no_run_artifacts(run: Path) -> None:
    for name in ("metrics.json", "plan.json", "compact_embedding.pt"):
        assert not (run / name).exists(), f"{run / name} left behind by a failed run"
    ckpt = run / "ckpt"
    assert not ckpt.exists() or not any(ckpt.iterdir()), f"{ckpt} holds checkpoints of a failed run"


def _assert_all(err: str, *needles: str) -> None:
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"


# ------------------------------------------------------------------------------------------ dataset (embdim train)
# (mutate(data_dir), expected substrings of the message; "{data}" is replaced by the data folder)
DATASET_CASES = {
    "missing-column": (lambda d: _rewrite(d, TRAIN_PART, lambda t: t.drop_columns(["c1"])),
                       [TRAIN_PART, "missing column 'c1'", "sparse field"]),
    "extra-column": (lambda d: _rewrite(d, TRAIN_PART, lambda t: t.append_column("c9", pa.array(
                         np.zeros(t.num_rows, np.int64)))),
                     [TRAIN_PART, "'c9'", "not in dataset.json"]),
    "label-float64": (lambda d: _rewrite(d, TRAIN_PART, lambda t: t.set_column(
                          0, "label", t.column("label").cast(pa.float64()))),
                      [TRAIN_PART, "'label'", "float64", "expected float32"]),
    "sparse-int32": (lambda d: _rewrite(d, TRAIN_PART, lambda t: t.set_column(
                         t.schema.get_field_index("c0"), "c0", t.column("c0").cast(pa.int32()))),
                     [TRAIN_PART, "'c0'", "int32", "expected int64"]),
    "multi-hot-declared-single": (lambda d: _edit_manifest(d, lambda r: _sparse(r, "c3").update(multi_hot=False)),
                                  [TRAIN_PART, "'c3'", "expected int64"]),
    "negative-id": (lambda d: _rewrite(d, TRAIN_PART, _set_column("c0", _at_row(10, -1))),
                    [TRAIN_PART, "row group 0", "'c0'", "[0, 40)", "row 10 has -1"]),
    "negative-id-in-first-batch": (lambda d: _rewrite(d, TRAIN_PART, _set_column("c0", _at_row(300, -1))),
                                   [TRAIN_PART, "row group 2", "'c0'", "[0, 40)", "row 44 has -1"]),
    "id-equals-cardinality": (lambda d: _rewrite(d, TRAIN_PART, _set_column("c2", _at_row(5, 12))),
                              [TRAIN_PART, "row group 0", "'c2'", "[0, 12)", "row 5 has 12"]),
    "id-beyond-cardinality": (lambda d: _rewrite(d, TRAIN_PART, _set_column("c1", _at_row(130, 10**9))),
                              [TRAIN_PART, "row group 1", "'c1'", "row 2 has 1000000000"]),
    "dense-nan": (lambda d: _rewrite(d, TRAIN_PART, _set_column("i1", _at_row(7, np.nan))),
                  [TRAIN_PART, "row group 0", "'i1'", "finite", "row 7 has nan"]),
    "dense-inf": (lambda d: _rewrite(d, TRAIN_PART, _set_column("i0", _at_row(400, -np.inf))),
                  [TRAIN_PART, "row group 3", "'i0'", "finite", "-inf"]),
    "label-2": (lambda d: _rewrite(d, TRAIN_PART, _set_column("label", _at_row(3, 2.0))),
                [TRAIN_PART, "'label'", "0 or 1", "row 3 has 2.0"]),
    "label-half": (lambda d: _rewrite(d, TRAIN_PART, _set_column("label", _at_row(200, 0.5))),
                   [TRAIN_PART, "row group 1", "'label'", "0 or 1", "0.5"]),
    "null-id": (lambda d: _rewrite(d, TRAIN_PART, lambda t: t.set_column(
                    t.schema.get_field_index("c0"), "c0",
                    pa.array([None] + t.column("c0").to_pylist()[1:], pa.int64()))),
                [TRAIN_PART, "'c0'", "null"]),
    "empty-parquet-file": (lambda d: (d / TRAIN_PART).write_bytes(b""),
                           [TRAIN_PART, "not a readable Parquet file"]),
    "truncated-parquet-file": (lambda d: (d / TRAIN_PART).write_bytes((d / TRAIN_PART).read_bytes()[:-100]),
                               [TRAIN_PART, "not a readable Parquet file"]),
    "parquet-zero-rows": (lambda d: _rewrite(d, TRAIN_PART, lambda t: t.slice(0, 0)),
                          ["dataset.json", "'train'", "num_rows=512", "hold 0 rows"]),
    "parquet-file-missing": (lambda d: (d / TRAIN_PART).unlink(), [TRAIN_PART, "not found", "'train'"]),
    "manifest-num-rows": (lambda d: _edit_manifest(d, lambda r: r["splits"]["train"].update(num_rows=600)),
                          ["dataset.json", "'train'", "num_rows=600", "512 rows"]),
    "manifest-cardinality-too-small": (lambda d: (_edit_manifest(d, lambda r: _sparse(r, "c0").update(num_embeddings=5)),
                                                  (d / "counts" / "c0.npy").unlink()),  # no counts to disagree
                                       ["part-00000.parquet", "'c0'", "[0, 5)", "num_embeddings in dataset.json"]),
    "manifest-cardinality-vs-counts": (lambda d: _edit_manifest(d, lambda r: _sparse(r, "c1").update(num_embeddings=99)),
                                       ["counts/c1.npy", "'c1'", "(24,)", "(99,)", "dataset.json"]),
    "counts-file-corrupt": (lambda d: (d / "counts" / "c2.npy").write_bytes(b"\x93NUMPY garbage"),
                            ["counts/c2.npy", "'c2'", "cannot read"]),
    "manifest-missing": (lambda d: (d / "dataset.json").unlink(), ["dataset.json", "not found"]),
    "manifest-invalid-json": (lambda d: (d / "dataset.json").write_text('{"label": "label",'),
                              ["dataset.json", "invalid JSON"]),
    "manifest-unknown-key": (lambda d: _edit_manifest(d, lambda r: r.update(labels="x")),
                             ["dataset.json", "unknown key", "'labels'"]),
    "manifest-missing-key": (lambda d: _edit_manifest(d, lambda r: r.pop("splits")),
                             ["dataset.json", "missing key", "'splits'"]),
    "manifest-bad-cardinality-type": (lambda d: _edit_manifest(d, lambda r: _sparse(r, "c2").update(num_embeddings="12")),
                                      ["dataset.json", "'c2'", "num_embeddings", "'12'"]),
    "manifest-num-rows-type": (lambda d: _edit_manifest(d, lambda r: r["splits"]["train"].update(num_rows="512")),
                               ["dataset.json", "'train'", "'num_rows' (int)"]),
    "manifest-no-train-split": (lambda d: _edit_manifest(d, lambda r: r["splits"].pop("train")),
                                ["dataset.json", "no 'train' split"]),
}


# "negative-id-in-first-batch" fails while TrainPipelineSparseDist pulls its first batches: the
# trainer must report it, not take it for a failed fx trace and fall back to the plain loop.
DATASET_PARAMS = list(DATASET_CASES)


@pytest.mark.parametrize("case", DATASET_PARAMS)
def test_bad_dataset(case, base, tmp_path, capsys):
    mutate, needles = DATASET_CASES[case]
    data = tmp_path / "data"
    shutil.copytree(base, data)
    mutate(data)
    run = tmp_path / "run"
    err = _run(["train", "--data", str(data), "--out", str(run), *SETS], capsys)
    _assert_all(err, *needles)
    _assert_no_run_artifacts(run)


def test_bad_first_batch_without_pipeline(base, tmp_path, capsys):
    """The same bad row group is reported when the plain training loop reads it."""
    data = tmp_path / "data"
    shutil.copytree(base, data)
    DATASET_CASES["negative-id-in-first-batch"][0](data)
    run = tmp_path / "run"
    err = _run(["train", "--data", str(data), "--out", str(run), *SETS, "--set", "train.pipeline=false"], capsys)
    _assert_all(err, *DATASET_CASES["negative-id-in-first-batch"][1])
    _assert_no_run_artifacts(run)


def test_data_folder_missing(tmp_path, capsys):
    err = _run(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")], capsys)
    _assert_all(err, "nope", "dataset folder not found", "embdim data synth")


def test_more_ranks_than_rows(base, tmp_path, capsys):
    """A train split too small for one batch per rank (here 1 rank x 1024 rows > 512 rows)."""
    run = tmp_path / "run"
    err = _run(["train", "--data", str(base), "--out", str(run), *SETS, "--set", "data.batch_size=1024"], capsys)
    _assert_all(err, "dataset.json", "'train'", "512 rows", "1024", "1 rank", "data.batch_size")
    _assert_no_run_artifacts(run)


# ------------------------------------------------------------------------------------------ config (TOML, --set)
CONFIG_CASES = {
    "toml-unknown-key": ("[train]\nepoch = 2\n", [], ["cfg.toml", "train.epoch", "accepts"]),
    "toml-unknown-section": ("[trainer]\nepochs = 2\n", [], ["cfg.toml", "trainer"]),
    "toml-wrong-type-str": ("[data]\nbatch_size = \"64\"\n", [], ["cfg.toml", "data.batch_size", "integer"]),
    "toml-wrong-type-bool": ("[train]\npipeline = 1\n", [], ["cfg.toml", "train.pipeline", "true or false"]),
    "toml-wrong-type-list": ("[model]\ndense_arch_layer_sizes = 8\n", [], ["cfg.toml", "dense_arch_layer_sizes", "list"]),
    "toml-section-not-table": ("model = 3\n", [], ["cfg.toml", "model", "table"]),
    "toml-syntax": ("[data\nbatch_size = 64\n", [], ["cfg.toml", "invalid TOML"]),
    "embedding-dim-not-multiple-of-4": ("[model]\nembedding_dim = 10\ndense_arch_layer_sizes = [10]\n", [],
                                        ["model.embedding_dim", "multiple of 4", "10"]),
    "invalid-value": ("[optim]\nsparse_optimizer = \"lamb\"\n", [], ["optim.sparse_optimizer", "lamb"]),
    "set-unknown-key": (None, ["optim.lr=0.1"], ["--set", "optim.lr"]),
    "set-no-equals": (None, ["train.epochs"], ["--set", "train.epochs", "section.key=value"]),
    "set-wrong-type": (None, ["train.epochs=two"], ["train.epochs", "integer", "two"]),
    "config-file-missing": ("MISSING", [], ["cfg.toml", "not found"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config(case, base, tmp_path, capsys):
    text, sets, needles = CONFIG_CASES[case]
    argv = ["train", "--data", str(base), "--out", str(tmp_path / "run")]
    if text is not None:
        cfg = tmp_path / "cfg.toml"
        if text != "MISSING":
            cfg.write_text(text)
        argv += ["--config", str(cfg)]
    for s in sets:
        argv += ["--set", s]
    err = _run(argv, capsys)
    _assert_all(err, *needles)
    _assert_no_run_artifacts(tmp_path / "run")


# ------------------------------------------------------------------------------------------ search flags
SEARCH_CASES = {
    "budget-zero": (["--method", "fixed", "--budget", "0"], ["--budget", "(0, 1]", "0.0"]),
    "budget-negative": (["--method", "fixed", "--budget", "-0.5"], ["--budget", "(0, 1]"]),
    "budget-above-one": (["--method", "fixed", "--budget", "1.5"], ["--budget", "(0, 1]", "1.5"]),
    "budget-nan": (["--method", "fixed", "--budget", "nan"], ["--budget", "(0, 1]", "nan"]),
    "budget-in-config": (["--method", "fixed", "--set", "search.budget=2.0"], ["search.budget", "2.0"]),
    "unknown-method": (["--method", "autodim", "--budget", "0.5"], ["autodim", "optembed", "pme"]),
    "method-section-unknown-key": (["--method", "optembed", "--set", "optembed.generation=3"],
                                   ["optembed.generation"]),
}


@pytest.mark.parametrize("case", list(SEARCH_CASES))
def test_bad_search(case, base, tmp_path, capsys):
    extra, needles = SEARCH_CASES[case]
    run = tmp_path / "run"
    err = _run(["search", "--data", str(base), "--out", str(run), *SETS, *extra], capsys)
    _assert_all(err, *needles)
    _assert_no_run_artifacts(run)


def test_demo_rejects_bad_method_before_generating_data(tmp_path, capsys):
    out = tmp_path / "demo"
    err = _run(["demo", "--out", str(out), "--rows", "1000", "--method", "autodim"], capsys)
    _assert_all(err, "autodim", "optembed")
    assert not (out / "data" / "dataset.json").exists()


def test_demo_rejects_bad_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    err = _run(["demo", "--out", str(out), "--rows", "1000", "--budget", "0"], capsys)
    _assert_all(err, "--budget", "(0, 1]")
    assert not (out / "data" / "dataset.json").exists()


# ------------------------------------------------------------------------------------------ plan.json (retrain, plan show)
def _group(raw: dict, field: str = "c0", k: int = 0) -> dict:
    return next(f for f in raw["fields"] if f["name"] == field)["groups"][k]


PLAN_CASES = {
    "plan-not-json": ({"text": "{\"schema_version\": 1, \"method\""}, ["plan.json", "invalid JSON"]),
    "plan-empty-file": ({"text": ""}, ["plan.json", "invalid JSON"]),
    "plan-binary": ({"bytes": b"\x89PNG\xff\xfe"}, ["plan.json", "not a text file"]),
    "plan-schema-version": ({"fn": lambda r: r.update(schema_version=7)}, ["plan.json", "schema_version 7"]),
    "plan-unknown-key": ({"fn": lambda r: r.update(widths=[4])}, ["plan.json", "unknown key", "'widths'"]),
    "plan-missing-fields": ({"fn": lambda r: r.pop("fields")}, ["plan.json", "missing key", "'fields'"]),
    "plan-width-not-multiple-of-4": ({"fn": lambda r: _group(r).update(width=6)},
                                     ["plan.json", "field 'c0'", "group 0", "multiple of 4", "6"]),
    "plan-width-above-dim": ({"fn": lambda r: _group(r).update(width=r["embedding_dim"] + 4)},
                             ["plan.json", "field 'c0'", "exceeds embedding_dim"]),
    "plan-dim-not-multiple-of-4": ({"fn": lambda r: r.update(embedding_dim=10)},
                                   ["plan.json", "embedding_dim", "multiple of 4", "10"]),
    "plan-budget-zero": ({"fn": lambda r: r.update(budget=0)}, ["plan.json", "budget", "(0, 1]"]),
    "plan-budget-above-one": ({"fn": lambda r: r.update(budget=1.5)}, ["plan.json", "budget", "(0, 1]", "1.5"]),
    "plan-width-string": ({"fn": lambda r: _group(r, "c1").update(width="8")},
                          ["plan.json", "field 'c1'", "group 0", "width", "'8'"]),
    "plan-ids-file-corrupt": ({"fn": lambda r: _group(r).update(ids="plan_ids/bad.npy"), "bad_ids": True},
                              ["plan.json", "field 'c0'", "bad.npy", "cannot read"]),
    "plan-missing-ids-file": ({"fn": lambda r: _group(r).update(ids="plan_ids/nope.npy")},
                              ["plan.json", "field 'c0'", "nope.npy", "not found"]),
    "plan-other-vocabulary": ({"fn": lambda r: r["fields"][0].update(num_embeddings=41)},
                              ["plan.json", "'c0'", "num_embeddings", "41", "40"]),
    "plan-other-fields": ({"fn": lambda r: r["fields"].pop()}, ["plan.json", "fields", "dataset.json"]),
    "plan-dim-differs-from-config": ({"fn": lambda r: r.update(embedding_dim=16)},
                                     ["model.embedding_dim", "16", "plan.json"]),
    "plan-file-missing": ({"missing": True}, ["plan.json", "not found"]),
}


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_bad_plan(case, base, base_plan, tmp_path, capsys):
    spec, needles = PLAN_CASES[case]
    plan_dir = tmp_path / "plan"
    shutil.copytree(base_plan.parent, plan_dir)
    plan = plan_dir / "plan.json"
    if spec.get("missing"):
        plan.unlink()
    elif "bytes" in spec:
        plan.write_bytes(spec["bytes"])
    elif "text" in spec:
        plan.write_text(spec["text"])
    else:
        raw = json.loads(plan.read_text())
        if spec.get("bad_ids"):
            (plan_dir / "plan_ids").mkdir(exist_ok=True)
            (plan_dir / "plan_ids" / "bad.npy").write_bytes(b"\x93NUMPY not really")
        spec["fn"](raw)
        plan.write_text(json.dumps(raw))
    run = tmp_path / "retrain"
    err = _run(["retrain", "--data", str(base), "--plan", str(plan), "--out", str(run), *SETS], capsys)
    _assert_all(err, *needles)
    _assert_no_run_artifacts(run)
    if case not in ("plan-other-vocabulary", "plan-other-fields", "plan-dim-differs-from-config", "plan-file-missing"):
        err = _run(["plan", "show", str(plan)], capsys)  # the inspector gives the same message
        _assert_all(err, *needles)


# ------------------------------------------------------------------------------------------ embdim data csv
CSV = "y,d0,s0,s1\n1,0.5,a,x\n0,1.5,b,y\n1,2.0,a,x\n0,,c,y\n1,3.0,a,z\n0,0.1,b,x\n1,0.2,a,y\n0,0.3,c,x\n"
CSV_FLAGS = ["--label", "y", "--dense", "d0", "--sparse", "s0,s1", "--min-count", "1", "--no-progress"]

CSV_CASES = {
    "csv-missing-column": (CSV, ["--label", "y", "--dense", "d0", "--sparse", "s0,s9", "--min-count", "1",
                                 "--no-progress"], ["in.csv", "'s9'", "not found"]),
    "csv-missing-label": (CSV, ["--label", "click", "--dense", "d0", "--sparse", "s0", "--no-progress"],
                          ["in.csv", "'click'", "not found"]),
    "csv-extra-field-in-row": (CSV.replace("0,1.5,b,y\n", "0,1.5,b,y,EXTRA\n"), CSV_FLAGS,
                               ["in.csv", "Expected 4 columns, got 5", "EXTRA"]),
    "csv-missing-field-in-row": (CSV.replace("0,1.5,b,y\n", "0,1.5,b\n"), CSV_FLAGS,
                                 ["in.csv", "Expected 4 columns, got 3"]),
    "csv-non-numeric-dense": (CSV.replace("1,3.0,a,z", "1,abc,a,z"), CSV_FLAGS, ["in.csv", "'d0'", "non-numeric"]),
    "csv-label-outside-0-1": (CSV.replace("1,3.0,a,z", "2,3.0,a,z"), CSV_FLAGS, ["in.csv", "'y'", "2"]),
    "csv-dense-inf": (CSV.replace("1,3.0,a,z", "1,inf,a,z"), CSV_FLAGS, ["in.csv", "row 5 (line 6)", "'d0'", "finite"]),
    "csv-empty-file": ("", CSV_FLAGS, ["in.csv", "empty"]),
    "csv-column-declared-twice": (CSV, ["--label", "y", "--dense", "d0", "--sparse", "s0,d0", "--no-progress"],
                                  ["'d0'", "more than once"]),
    "csv-no-sparse-column": (CSV, ["--label", "y", "--dense", "d0", "--no-progress"], ["categorical"]),
    "csv-bad-split": (CSV, [*CSV_FLAGS, "--split", "0.5,0.6,0.1"], ["split"]),
}


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_bad_csv(case, tmp_path, capsys):
    text, flags, needles = CSV_CASES[case]
    src = tmp_path / "in.csv"
    src.write_text(text)
    out = tmp_path / "out"
    err = _run(["data", "csv", "--input", str(src), "--out", str(out), *flags], capsys)
    _assert_all(err, *needles)
    assert not out.exists(), f"{out} left behind by a failed conversion"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"], "staging folder left behind"


def test_csv_input_missing(tmp_path, capsys):
    err = _run(["data", "csv", "--input", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "out"), *CSV_FLAGS],
               capsys)
    _assert_all(err, "nope.csv", "not found")
    assert not (tmp_path / "out").exists()


def test_csv_out_is_foreign_folder(tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_text(CSV)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _run(["data", "csv", "--input", str(src), "--out", str(out), *CSV_FLAGS], capsys)
    _assert_all(err, str(out), "refusing to overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


CATALOG_SIZE = 85  # BENCHMARKS.md (reliability) quotes this count


def test_catalog_size():
    """Every parametrized case plus the single-case tests above; keep CATALOG_SIZE in step."""
    n = (len(DATASET_CASES) + 3 + len(CONFIG_CASES) + len(SEARCH_CASES) + 2 + len(PLAN_CASES)
         + len(CSV_CASES) + 2)
    assert n == CATALOG_SIZE, n
