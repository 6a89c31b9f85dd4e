"""The real logs in ../shared/data, converted and trained on 2 gloo ranks as a new user would:
``embdim data criteo|avazu`` then ``embdim launch --nproc-per-node 2 -- train``."""

from __future__ import annotations

import json

import pytest

from embdim.launch.main import main

pytestmark = pytest.mark.slow  # starts processes or runs over ~3 s (tests/test_markers.py)

SMALL = ["data.batch_size=128", "train.epochs=2", "train.progress_bar=false", "train.log_every=20"]


@pytest.mark.parametrize("source, files, min_auc", [
    ("criteo", ("criteo_kaggle_8k", ("train.txt", "valid.txt", "test.txt")), 0.62),
    ("avazu", ("avazu_9k", ("train.csv", "valid.csv", "test.csv")), 0.62),
])
def test_convert_then_train_on_two_ranks(shared_data, tmp_path, source, files, min_auc):
    folder, names = files
    data = tmp_path / "data"
    inputs = [str(shared_data / folder / n) for n in names]
    assert main(["data", source, "--input", *inputs, "--split", "files", "--out", str(data), "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["launch", "--nproc-per-node", "2", "--", "train", "--data", str(data), "--out", str(run),
                 *[a for s in SMALL for a in ("--set", s)]]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # 7-8k training rows are enough for a DLRM to rank clicks clearly better than chance.
    assert metrics["test_auc"] > min_auc, metrics["test_auc"]
    assert metrics["valid_auc"] > 0.6
