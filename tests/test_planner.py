"""The planner is told the card's real memory (TorchRec's Topology otherwise assumes 32 GB)."""

from __future__ import annotations

import types

import pytest
import torch

import embdim.sharding.planner as planner


def test_device_memory_is_the_cards_total(monkeypatch):
    assert planner.device_memory(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=150_000_000_000))
    assert planner.device_memory(torch.device("cuda", 0)) == 150_000_000_000


def test_plan_model_passes_the_memory_to_the_topology(monkeypatch):
    seen = {}

    class Topology:
        def __init__(self, **kwargs):
            seen.update(kwargs)
            raise RuntimeError("stop after the topology")

    monkeypatch.setattr(planner, "Topology", Topology)
    monkeypatch.setattr(planner, "device_memory", lambda device: 123)
    env = types.SimpleNamespace(world_size=2, local_world_size=2, device=torch.device("cpu"))
    from embdim.sharding.config import ShardingConfig

    try:
        planner.plan_model(torch.nn.Linear(1, 1), env, ShardingConfig(), 1)
    except RuntimeError as e:
        assert "stop after the topology" in str(e)
    assert seen["hbm_cap"] == 123 and seen["world_size"] == 2


def test_half_precision_comms_reach_the_sharders():
    import pytest

    from embdim.trainer.config import ConfigError

    assert planner.get_sharders()[0].qcomm_codecs_registry is None
    registry = planner.get_sharders("bf16")[0].qcomm_codecs_registry
    assert set(registry) >= {"POOLED_EMBEDDINGS_ALL_TO_ALL", "POOLED_EMBEDDINGS_REDUCE_SCATTER"}
    with pytest.raises(ConfigError, match="sharding.comm_precision"):
        planner.get_sharders("fp8")


@pytest.mark.slow
def test_fp16_comms_train_close_to_fp32_but_not_equal(tmp_path):
    """2 gloo ranks, table-wise: the fp16 all-to-all changes the numbers (the codec is in the
    path) but not the result (logloss within 0.01)."""
    import json

    from embdim.launch.main import main
    from tests.tiny_data import tiny_run_flags, write_tiny_dataset

    data = tmp_path / "data"
    write_tiny_dataset(data, num_rows={"train": 2048, "valid": 256, "test": 256})
    scores = {}
    for precision in ("fp32", "fp16"):
        out = tmp_path / precision
        assert main(["launch", "--nproc-per-node", "2", "--", "train", "--data", str(data), "--out", str(out),
                     *tiny_run_flags(16, epochs=1), "--set", f"sharding.comm_precision={precision}",
                     "--set", "sharding.sharding_type=table_wise"]) == 0
        scores[precision] = json.loads((out / "metrics.json").read_text())["test_logloss"]
    assert scores["fp16"] != scores["fp32"]
    assert abs(scores["fp16"] - scores["fp32"]) < 0.01


def test_tables_with_fewer_rows_than_ranks_are_never_row_wise():
    """A one-row width group sharded row-wise on 2 ranks leaves one rank an empty shard, on which
    FBGEMM's CPU backward crashes: such tables keep their rows whole on one rank."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from embdim.trainer.config import ShardingConfig

    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="big", embedding_dim=8, num_embeddings=10, feature_names=["a"]),
        EmbeddingBagConfig(name="one", embedding_dim=8, num_embeddings=1, feature_names=["b"])],
        device=torch.device("meta"))
    model = torch.nn.Module()
    model.ebc = ebc
    row_wise = {"row_wise", "table_row_wise"}
    auto = planner.build_constraints(model, ShardingConfig(), "cpu", world_size=2)
    assert row_wise <= set(auto["big"].sharding_types) and not row_wise & set(auto["one"].sharding_types)
    assert auto["one"].sharding_types  # the other model-parallel types remain
    forced = planner.build_constraints(model, ShardingConfig(sharding_type="row_wise"), "cpu", world_size=2)
    assert forced["big"].sharding_types == ["row_wise"] and forced["one"].sharding_types == ["table_wise"]
    # One rank: nothing to split.
    assert planner.build_constraints(model, ShardingConfig(sharding_type="row_wise"), "cpu")["one"].sharding_types \
        == ["row_wise"]
