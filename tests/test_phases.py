"""End to end, per method: ``embdim search`` then ``embdim retrain`` on 2 gloo ranks through the
real entry point, and the retrained module plugged into an unmodified torchrec DLRM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from embdim.embedding_methods import METHOD_NAMES, load_plan
from embdim.launch.main import main
from embdim.trainer.config import ConfigError
from tests.tiny_data import FIELDS, tiny_run_flags, write_tiny_dataset

DIM = 16
BUDGET = 0.6
FULL_PARAMS = sum(n for _, n, _ in FIELDS) * DIM
SETS = tiny_run_flags(DIM, epochs=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phases") / "data"
    write_tiny_dataset(out, num_rows={"train": 4096, "valid": 512, "test": 512})
    return out


def _launch(*command: str) -> int:
    return main(["launch", "--nproc-per-node", "2", "--", *command])


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory) -> dict[str, Path]:
    """Search + retrain of every method (run once, shared by the assertions below)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method in METHOD_NAMES:
        run = root / method
        assert _launch("search", "--data", str(tiny), "--method", method, "--budget", str(BUDGET),
                       "--out", str(run), *SETS) == 0, f"search {method} failed"
        assert _launch("retrain", "--data", str(tiny), "--plan", str(run / "plan.json"),
                       "--out", str(run / "retrain"), *SETS) == 0, f"retrain {method} failed"
        out[method] = run
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_search_then_retrain(runs, method):
    run = runs[method]
    plan = load_plan(run / "plan.json")
    assert plan.method == method
    assert plan.full_params() == FULL_PARAMS
    # Every method meets the budget from below; the per-id methods (and OptEmbed's keep levels) fill it.
    assert plan.achieved_fraction() <= BUDGET, plan.achieved_fraction()
    if method in ("amtl", "pme", "optembed"):
        assert plan.achieved_fraction() >= 0.95 * BUDGET, plan.achieved_fraction()
    metrics = json.loads((run / "retrain" / "metrics.json").read_text())
    assert metrics["full_embedding_params"] == FULL_PARAMS
    assert metrics["embedding_params"] == plan.num_params() < FULL_PARAMS
    assert metrics["world_size"] == 2
    # The tiny data's planted per-id effects are strong: a model that learned anything is well above 0.5.
    assert metrics["test_auc"] > 0.6, metrics["test_auc"]
    assert (run / "retrain" / "compact_embedding.pt").exists()
    if method in ("fixed", "mde"):  # closed-form plans: no search training
        assert not (run / "metrics.json").exists()
    else:
        search_metrics = json.loads((run / "metrics.json").read_text())
        assert 0.0 <= search_metrics["test_auc"] <= 1.0
    if method in ("mlet", "optembed"):  # retrain starts from the searched weights
        assert (run / "plan_init.pt").exists() and plan.init_checkpoint == "plan_init.pt"
    if method == "mlet":
        # The collapse is MLET's final model (paper Sec. 3): the default retrain does not train it,
        # and being exact, it scores the test split as the factorized search model did.
        assert metrics["steps"] == 0 and metrics["epochs"] == 0
        assert abs(metrics["test_auc"] - search_metrics["test_auc"]) < 1e-6
        assert abs(metrics["test_logloss"] - search_metrics["test_logloss"]) < 1e-5
    else:
        assert metrics["steps"] > 0


@pytest.mark.slow
def test_compact_module_trains_in_unmodified_dlrm(runs, tiny):
    """The retrained module stands in for the EmbeddingBagCollection of torchrec's own DLRM."""
    from torchrec.models.dlrm import DLRM

    from embdim.embedding_methods import IdRemapper, load_compact_embedding
    from embdim.trainer.data.reader import ParquetBatchReader

    run = runs["optembed"]
    module = load_compact_embedding(run)
    saved = torch.load(run / "retrain" / "compact_embedding.pt", weights_only=True)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    torch.manual_seed(0)
    model = DLRM(embedding_bag_collection=module, dense_in_features=3, dense_arch_layer_sizes=[16, DIM],
                 over_arch_layer_sizes=[16, 1])
    reader = ParquetBatchReader(tiny, "train", batch_size=256, shuffle=True, seed=0,
                                feature_transform=IdRemapper(load_plan(run)))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for epoch in range(3):
        reader.set_epoch(epoch)
        for batch in reader:
            logits = model(batch.dense_features, batch.sparse_features).squeeze(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8


@pytest.mark.slow
def test_retrain_rejects_plan_of_another_dataset(runs, tmp_path, capsys):
    other = tmp_path / "other"
    write_tiny_dataset(other, num_rows={"train": 512, "valid": 128, "test": 128})
    import embdim.embedding_methods.plan as plan_mod

    plan = load_plan(runs["fixed"] / "plan.json")
    plan.fields[0].num_embeddings += 1  # a plan made for a different vocabulary
    plan.fields[0].groups[0].ids = None
    bad = tmp_path / "bad" / "plan.json"
    plan_mod.save_plan(plan, bad)
    code = main(["retrain", "--data", str(other), "--plan", str(bad), "--out", str(tmp_path / "r"), *SETS])
    assert code == 2
    err = capsys.readouterr().err
    assert "plan.json" in err and FIELDS[0][0] in err and "num_embeddings" in err


def test_unknown_method_names_the_choices(tiny, tmp_path, capsys):
    code = main(["search", "--data", str(tiny), "--method", "autodim", "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert "autodim" in err and "optembed" in err and "pme" in err


@pytest.mark.slow
def test_amtl_warm_starts_from_a_trained_baseline(tiny, tmp_path):
    """``embdim search --method amtl --init-from`` adds the layer to an already trained model."""
    base = tmp_path / "base"
    assert _launch("train", "--data", str(tiny), "--out", str(base), *SETS) == 0
    base_auc = json.loads((base / "metrics.json").read_text())["test_auc"]
    run = tmp_path / "amtl"
    # One search step at tiny learning rates: the warm-started model's AUC is then the baseline's
    # (the mask nets start with every id at full width), far above a cold start after one step.
    warm = [*SETS, "--set", "train.max_steps=1", "--set", "optim.sparse_lr=1e-6", "--set", "optim.dense_lr=1e-6",
            "--set", "amtl.mask_lr=1e-6"]
    assert _launch("search", "--data", str(tiny), "--method", "amtl", "--budget", str(BUDGET),
                   "--init-from", str(base), "--out", str(run), *warm) == 0
    warm_auc = json.loads((run / "metrics.json").read_text())["test_auc"]
    cold = tmp_path / "cold"
    assert _launch("search", "--data", str(tiny), "--method", "amtl", "--budget", str(BUDGET),
                   "--out", str(cold), *warm) == 0
    cold_auc = json.loads((cold / "metrics.json").read_text())["test_auc"]
    assert warm_auc > cold_auc + 0.05, (warm_auc, cold_auc, base_auc)
    assert abs(warm_auc - base_auc) < 0.05, (warm_auc, base_auc)
    assert load_plan(run / "plan.json").method == "amtl"


@pytest.mark.slow
def test_resumed_optembed_search_still_rewinds(tiny, tmp_path):
    """A search killed mid-way and rerun resumes from its checkpoint and still rewinds the retrain
    start to the step-0 supernet (OptEmbed's default retrain_init="rewind")."""
    from embdim.embedding_methods.mixed_dim import table_name_for_feature
    from embdim.embedding_methods.plan import group_feature_name

    run = tmp_path / "oe"
    args = ["search", "--data", str(tiny), "--method", "optembed", "--budget", str(BUDGET), "--out", str(run),
            *SETS, "--set", "train.checkpoint_every=8"]
    assert _launch(*args, "--set", "train.fail_at_step=10") != 0
    assert (run / "search_step0.pt").exists() and not (run / "plan.json").exists()
    step0 = torch.load(run / "search_step0.pt", weights_only=True)
    assert _launch(*args, "--set", "train.fail_at_step=-1") == 0
    assert torch.load(run / "search_step0.pt", weights_only=True).keys() == step0.keys()
    init = torch.load(run / "plan_init.pt", weights_only=True)
    plan = load_plan(run)
    for field in plan.fields:
        full = step0[f"ebc.embedding_bags.t_{field.name}.weight"]
        for k, group in enumerate(field.groups):
            table = table_name_for_feature(group_feature_name(field.name, k, len(field.groups)))
            rows = full if group.ids is None else full[torch.as_tensor(group.ids)]
            torch.testing.assert_close(init[f"ebc.embedding_bags.{table}.weight"], rows[:, :group.width])


def test_retrain_epochs_follow_the_method_unless_set():
    from embdim.trainer.config import TrainConfig
    from embdim.trainer.phases import RetrainConfig, RunConfig, retrain_epochs

    config = RunConfig(train=TrainConfig(epochs=3))
    assert retrain_epochs(config, "mlet", from_plan=True) == 0       # the collapse is the final model
    assert retrain_epochs(config, "mlet", from_plan=False) == 3      # fresh tables must be trained
    assert retrain_epochs(config, "optembed", from_plan=True) == 3
    tuned = RunConfig(train=TrainConfig(epochs=3), retrain=RetrainConfig(epochs=1))
    assert retrain_epochs(tuned, "mlet", from_plan=True) == 1
    with pytest.raises(ConfigError, match="retrain.epochs"):
        RetrainConfig(epochs=-2)
