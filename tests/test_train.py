"""Sharded training on 2 gloo ranks: planner and shard helpers, trainer hooks, and end-to-end
training through the real entry point (``embdim launch ... -- train``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from embdim.launch.main import main
from tests.multiprocess import run_multiprocess
from tests.tiny_data import FIELDS, write_tiny_dataset

pytestmark = pytest.mark.slow  # starts processes or runs over ~3 s (tests/test_markers.py)

DIM = 8
TINY = ["data.batch_size=64", "data.eval_batch_size=128", "model.embedding_dim=8",
        "model.dense_arch_layer_sizes=[16, 8]", "model.over_arch_layer_sizes=[16, 1]",
        "train.log_every=8", "train.progress_bar=false", "optim.dense_lr=0.01"]
REQUIRED_KEYS = {"auc", "logloss", "valid_auc", "valid_logloss", "test_auc", "test_logloss", "embedding_params",
                 "embedding_bytes", "samples_per_s", "train_seconds", "steps", "world_size", "config"}
FULL_PARAMS = sum(n for _, n, _ in FIELDS) * DIM


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "data"
    write_tiny_dataset(out)
    return out


def _config(*overrides: str):
    from embdim.trainer.config import load_config

    return load_config(overrides=[*TINY, *overrides])


# ---------------------------------------------------------------------------- planner and state
def _sharding_body(rank: int, world_size: int, data: str) -> None:
    from embdim.sharding.planner import plan_summary, shard_model, table_placement
    from embdim.sharding.state import all_reduce_sum, gather_table, local_shards, table_shape, write_rows
    from embdim.trainer.config import ConfigError
    from embdim.trainer.data.manifest import load_manifest
    from embdim.sharding.distributed import init_distributed
    from embdim.trainer.model import build_model

    env = init_distributed()
    assert (env.rank, env.world_size, env.backend) == (rank, world_size, "gloo")
    manifest = load_manifest(data)
    assert all_reduce_sum(torch.tensor([rank + 1.0])).item() == 3.0

    for sharding_type in ("table_wise", "row_wise"):
        torch.manual_seed(0)
        config = _config(f"sharding.sharding_type={sharding_type}")
        dmp = shard_model(build_model(config.model, manifest, device=env.device), env, config.sharding, config.optim,
                          config.data.batch_size)
        placement = table_placement(dmp.plan)
        assert set(placement) == {f"t_{name}" for name, _, _ in FIELDS}
        assert {p["sharding_type"] for p in placement.values()} == {sharding_type}
        assert sharding_type in plan_summary(dmp.plan)
        references = {}
        for t, (name, rows, _) in enumerate(FIELDS):
            table = f"t_{name}"
            assert table_shape(dmp, table) == (rows, DIM)
            # Every element is held by exactly one rank.
            coverage = torch.zeros(rows, DIM)
            for row, col, block in local_shards(dmp, table):
                coverage[row: row + block.shape[0], col: col + block.shape[1]] += 1
            assert torch.equal(all_reduce_sum(coverage), torch.ones(rows, DIM)), (sharding_type, table)
            # Write a known pattern through the local shards: value = 1000 t + 10 row + col / 10.
            reference = 1000.0 * t + 10.0 * torch.arange(rows).unsqueeze(1) + torch.arange(DIM).unsqueeze(0) / 10
            write_rows(dmp, table, lambda r, c, b, ref=reference: ref[r: r + b.shape[0], c: c + b.shape[1]].clone())
            assert torch.equal(gather_table(dmp, table), reference), (sharding_type, table)
            references[name] = reference
        # The sharded lookups see the written values: pooled sums equal the unsharded computation.
        assert_pooled_sums(dmp, references, seed=rank, atol=1e-3)

    # FBGEMM's CPU kernel has no fused Adam: the error names the key up front.
    config = _config("optim.sparse_optimizer=adam")
    with pytest.raises(ConfigError, match="optim.sparse_optimizer"):
        shard_model(build_model(config.model, manifest, device=env.device), env, config.sharding, config.optim,
                          config.data.batch_size)


def assert_pooled_sums(dmp: nn.Module, references: dict[str, torch.Tensor], *, seed: int, atol: float) -> None:
    """Pools 5 random bags (0-2 ids) per field through the sharded sparse module and compares each
    with the sum of the reference rows (in the references' dtype); the pooled output is fp32."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 3, (len(FIELDS) * 5,), generator=generator)
    values = torch.cat([torch.randint(0, rows, (int(n),), generator=generator)
                        for (_, rows, _), n in zip([f for f in FIELDS for _ in range(5)], lengths)])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[n for n, _, _ in FIELDS], values=values, lengths=lengths)
    pooled = dmp.module.sparse_module(kjt).to_dict()
    for name, jt in kjt.to_dict().items():
        expected = torch.stack([references[name][ids].sum(0) for ids in jt.to_dense()])
        assert pooled[name].dtype == torch.float32, (name, pooled[name].dtype)
        torch.testing.assert_close(pooled[name].to(expected.dtype), expected, rtol=0, atol=atol)


def test_sharding_plan_and_state_helpers(tiny):
    run_multiprocess(_sharding_body, world_size=2, data=str(tiny))


# ---------------------------------------------------------------------------- trainer hooks
class StandInSparse(nn.Module):
    """Stands in for the EBC in DLRM (the later search phase's shape): real EBC as a child, a
    dense scalar that only the aux loss uses, and extra embedding parameters it reports."""

    def __init__(self, tables, untraceable: bool = False) -> None:
        super().__init__()
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
        self.scale = nn.Parameter(torch.zeros(()))
        self.untraceable = untraceable

    def embedding_bag_configs(self):
        return self.ebc.embedding_bag_configs()

    def extra_embedding_params(self) -> int:
        return 7

    def forward(self, features):
        # Control flow on a tensor value cannot be fx-traced: the train pipeline must fall back.
        if self.untraceable and features.values().numel() >= 0:
            return self.ebc(features)
        return self.ebc(features)


def _aux_loss(module: StandInSparse) -> torch.Tensor:
    return (module.scale - 3.0) ** 2


def _hooks_body(rank: int, world_size: int, data: str, run_dir: str) -> None:
    from embdim.sharding.distributed import init_distributed
    from embdim.trainer.loop import Trainer

    env = init_distributed()
    lr, steps = 0.1, 8
    for untraceable in (False, True):
        trainer = Trainer(
            _config(f"train.max_steps={steps}"), data, f"{run_dir}/{untraceable}", env=env,
            sparse_module_factory=lambda tables, u=untraceable: StandInSparse(tables, u),
            aux_loss_fn=_aux_loss,
            extra_optimizers=lambda m: [torch.optim.SGD([m.scale], lr=lr)],
        )
        assert isinstance(trainer.sparse_module, StandInSparse)
        metrics = trainer.fit()
        assert metrics["steps"] == steps
        assert metrics["pipelined_modules"] == (0 if untraceable else 1)
        assert metrics["embedding_params"] == FULL_PARAMS + 7
        # d/ds (s - 3)^2 = 2 (s - 3): SGD gives s_k = 3 - 3 (1 - 2 lr)^k when only the aux loss
        # and the extra optimizer touch s (the dense Adam would move it differently).
        expected = 3.0 - 3.0 * (1 - 2 * lr) ** steps
        assert abs(trainer.sparse_module.scale.item() - expected) < 1e-5, trainer.sparse_module.scale.item()
        assert metrics["valid_auc"] is not None and metrics["valid_auc"] > 0.55

    # Data-parallel tables are plain replicated parameters outside the fused optimizer: the
    # trainer gives them the sparse optimizer (not the dense one).
    trainer = Trainer(_config("sharding.sharding_type=data_parallel", "optim.sparse_optimizer=sgd",
                              "optim.sparse_lr=0.5", "train.max_steps=1"), data, f"{run_dir}/dp", env=env)
    optims = dict(trainer.optimizer.optimizers)
    tables = set(optims["replicated_tables"].params)
    assert len(tables) == len(FIELDS) and all("embedding_bags" in k for k in tables)
    assert not tables & set(optims["dense"].params)
    assert isinstance(optims["replicated_tables"]._optimizer, torch.optim.SGD)
    assert optims["replicated_tables"].param_groups[0]["lr"] == 0.5
    before = {k: p.detach().clone() for k, p in optims["replicated_tables"].params.items()}
    trainer.fit()
    assert all(not torch.equal(before[k], p) for k, p in optims["replicated_tables"].params.items())


def test_trainer_aux_loss_extra_optimizer_and_fallback(tiny, tmp_path):
    run_multiprocess(_hooks_body, world_size=2, data=str(tiny), run_dir=str(tmp_path))


# ---------------------------------------------------------------------------- end to end
def _sets(*overrides: str) -> list[str]:
    return [a for o in (*TINY, *overrides) for a in ("--set", o)]


@pytest.mark.parametrize("sharding_type, interaction", [("table_wise", "dot"), ("row_wise", "dcn")])
def test_train_end_to_end(tiny, tmp_path, capfd, sharding_type, interaction):
    run = tmp_path / "run"
    code = main(["launch", "--nproc-per-node", "2", "--", "train", "--data", str(tiny), "--out", str(run),
                 *_sets("train.epochs=2", "train.tensorboard=true", f"sharding.sharding_type={sharding_type}",
                        f"model.interaction={interaction}")])
    out = capfd.readouterr().out
    assert code == 0, out
    metrics = json.loads((run / "metrics.json").read_text())
    assert REQUIRED_KEYS <= set(metrics)
    assert metrics["world_size"] == 2 and metrics["steps"] == 2 * 2048 // (2 * 64)
    assert metrics["valid_auc"] > 0.65 and metrics["test_auc"] > 0.65  # planted signal is learnt
    assert metrics["auc"] == metrics["test_auc"] and metrics["logloss"] == metrics["test_logloss"]
    assert 0 < metrics["valid_logloss"] < 0.69
    assert metrics["embedding_params"] == FULL_PARAMS and metrics["embedding_bytes"] == 4 * FULL_PARAMS
    assert metrics["samples_per_s"] > 0 and metrics["train_seconds"] > 0
    assert metrics["config"]["model"]["interaction"] == interaction
    assert {p["sharding_type"] for p in metrics["sharding_plan"].values()} == {sharding_type}
    assert metrics["pipelined_modules"] == 1
    assert [h["step"] for h in metrics["history"]] == [16, 32]  # validation after each epoch
    assert "train step 8 epoch 0: loss" in out and "samples/s" in out  # the log line
    assert (run / "ckpt" / "latest").read_text().strip() == "step_32"
    assert any((run / "tensorboard").iterdir())
