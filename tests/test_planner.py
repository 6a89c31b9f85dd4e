"""The planner is told the card's real memory (TorchRec's Topology otherwise assumes 32 GB)."""

from __future__ import annotations

import types

import torch

import sharding.planner as planner


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
    try:
        planner.plan_model(torch.nn.Linear(1, 1), env, None)
    except RuntimeError as e:
        assert "stop after the topology" in str(e)
    assert seen["hbm_cap"] == 123 and seen["world_size"] == 2
