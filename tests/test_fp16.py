"""Half-precision tables (``model.table_dtype = "fp16"``): what the sharded TBE stores on 1 and 2
gloo ranks, bytes accounting, training, checkpoints and resume, and a retrain with fp16 compact
tables through the real entry point."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from embdim.launch.main import main
from tests.multiprocess import run_multiprocess
from tests.test_checkpoint import _load_dcp
from tests.test_train import DIM, FULL_PARAMS, _config, _sets, assert_pooled_sums, tiny  # noqa: F401 (tiny: fixture)
from tests.tiny_data import FIELDS


def _tbe_modules(model: torch.nn.Module) -> list:
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

    # A sharded collection keeps its lookups (which hold the TBEs) in a plain list, not as children.
    lookups = [lookup for m in model.modules() for lookup in getattr(m, "_lookups", None) or []]
    return [t for lookup in lookups for t in lookup.modules() if isinstance(t, SplitTableBatchedEmbeddingBagsCodegen)]


def _stored_bytes(tbe) -> int:
    """Bytes of the weights a TBE really holds (host on CPU, device / UVM on CUDA)."""
    return sum(t.numel() * t.element_size() for t in (tbe.weights_host, tbe.weights_dev, tbe.weights_uvm))


# ---------------------------------------------------------------------------- unsharded
def test_tables_modules_and_bytes_without_sharding(tiny):
    import numpy as np
    from torchrec.modules.embedding_configs import DataType

    from embdim.embedding_methods.mixed_dim import build_retrain_module, features_to_kjt
    from embdim.embedding_methods.plan import uniform_plan
    from embdim.trainer.config import ConfigError
    from embdim.trainer.data.manifest import load_manifest
    from embdim.trainer.model import build_model, embedding_size, table_configs, table_data_type

    assert table_data_type("fp16") == DataType.FP16 and table_data_type("fp32") == DataType.FP32
    with pytest.raises(ConfigError, match="model.table_dtype"):
        table_data_type("bf16")

    manifest = load_manifest(tiny)
    for dtype, torch_dtype, itemsize in (("fp32", torch.float32, 4), ("fp16", torch.float16, 2)):
        model = build_model(_config(f"model.table_dtype={dtype}").model, manifest, device=torch.device("cpu"))
        assert {c.data_type for c in table_configs(model)} == {table_data_type(dtype)}
        tables = [p for n, p in model.named_parameters() if "embedding_bags" in n]
        assert len(tables) == len(FIELDS) and {p.dtype for p in tables} == {torch_dtype}
        assert embedding_size(model) == (FULL_PARAMS, itemsize * FULL_PARAMS)

    # Compact tables: fp16 tables, fp32 projections (counted at 4 bytes).
    plan = uniform_plan("fixed", [("a", 10), ("b", 6)], DIM, [4, 8], layout="project")
    half = build_retrain_module(plan, device="cpu", data_type=DataType.FP16)
    full = build_retrain_module(plan, device="cpu")
    assert {c.data_type for c in half.inner_configs()} == {DataType.FP16}
    dense = [p for n, p in half.named_parameters() if not n.startswith("ebc.")]
    assert dense and {p.dtype for p in dense} == {torch.float32}
    tables, projections = plan.num_table_params(), plan.num_projection_params()
    assert projections > 0
    assert embedding_size(half) == (tables + projections, 2 * tables + 4 * projections)
    assert embedding_size(full) == (tables + projections, 4 * (tables + projections))
    # The unsharded fp16 module computes what the fp32 one computes with the same (rounded) weights.
    with torch.no_grad():
        for name, param in half.state_dict().items():
            full.state_dict()[name].copy_(param.float())
    kjt = features_to_kjt({"a": (np.array([1, 2, 9]), np.array([1, 2, 0])),
                           "b": (np.array([0, 5]), np.array([1, 1, 0]))})
    out_half, out_full = half(kjt).values(), full(kjt).values()
    assert out_half.dtype == torch.float32
    torch.testing.assert_close(out_half, out_full, rtol=1e-3, atol=1e-3)


def test_plan_summary_counts_fp16_table_bytes(tmp_path, capsys):
    from embdim.embedding_methods.plan import save_plan, summarize_plan, uniform_plan

    plan = uniform_plan("fixed", [("a", 1000), ("b", 600)], 16, [8, 16], layout="project")
    tables, projections, full = plan.num_table_params(), plan.num_projection_params(), plan.full_params()
    assert f"({(tables + projections) * 4 / 1024:.1f} KiB float32)" in summarize_plan(plan)
    text = summarize_plan(plan, table_dtype="fp16")
    assert f"({(2 * tables + 4 * projections) / 1024:.1f} KiB: fp16 tables, float32 projections)" in text
    assert f"full width: {full:,} ({2 * full / 1024:.1f} KiB fp16)" in text
    assert f"achieved fraction: {plan.achieved_fraction():.4f}" in text  # the budget stays in parameters
    with pytest.raises(ValueError, match="table_dtype"):
        summarize_plan(plan, table_dtype="int8")
    save_plan(plan, tmp_path)
    assert main(["plan", "show", str(tmp_path), "--table-dtype", "fp16"]) == 0
    assert "fp16 tables, float32 projections" in capsys.readouterr().out


# ---------------------------------------------------------------------------- sharded
def _sharded_body(rank: int, world_size: int, data: str) -> None:
    from fbgemm_gpu.split_embedding_configs import SparseType

    from embdim.sharding.planner import shard_model
    from embdim.sharding.state import all_reduce_sum, gather_table, local_shards, write_rows
    from embdim.trainer.config import ConfigError
    from embdim.trainer.data.manifest import load_manifest
    from embdim.sharding.distributed import init_distributed
    from embdim.trainer.model import build_model

    env = init_distributed()
    manifest = load_manifest(data)
    types = ("table_wise", "row_wise", "column_wise") if world_size > 1 else ("table_wise", "row_wise")
    for sharding_type in types:
        stored = {}
        for dtype in ("fp32", "fp16"):
            torch.manual_seed(0)
            config = _config(f"sharding.sharding_type={sharding_type}", f"model.table_dtype={dtype}")
            dmp = shard_model(build_model(config.model, manifest, device=env.device), env, config.sharding, config.optim,
                          config.data.batch_size)
            tbes = _tbe_modules(dmp)
            assert tbes, sharding_type
            stored[dtype] = int(all_reduce_sum(torch.tensor([float(sum(_stored_bytes(t) for t in tbes))])).item())
            if dtype == "fp32":
                continue
            # data_type reached the TBE: fp16 weights, fp32 optimizer state (Adagrad's momentum1).
            assert {t.weights_precision for t in tbes} == {SparseType.FP16}
            for tbe in tbes:
                states = [s for table in tbe.split_optimizer_states() for s in table]
                assert states and {s.dtype for s in states} == {torch.float32}
            references = {}
            for t, (name, rows, _) in enumerate(FIELDS):
                shards = list(local_shards(dmp, f"t_{name}"))
                assert all(block.dtype == torch.float16 for _, _, block in shards), (sharding_type, name)
                # Values exactly representable in fp16 (multiples of 1/64 below 16) read back exactly.
                reference = t + torch.arange(rows).unsqueeze(1) / 8 + torch.arange(DIM).unsqueeze(0) / 64
                write_rows(dmp, f"t_{name}", lambda r, c, b, ref=reference: ref[r: r + b.shape[0], c: c + b.shape[1]])
                full = gather_table(dmp, f"t_{name}")
                assert full.dtype == torch.float16 and torch.equal(full.float(), reference), (sharding_type, name)
                references[name] = reference.double()
            # Sharded lookups pool the fp16 rows in fp32: equal to the float64 sums of the rows.
            assert_pooled_sums(dmp, references, seed=rank, atol=1e-5)
        # Half the table bytes, really stored, summed over the ranks.
        assert stored == {"fp32": 4 * FULL_PARAMS, "fp16": 2 * FULL_PARAMS}, (sharding_type, stored)

    # Replicated tables are stepped by torch.optim in their own dtype: refused up front.
    config = _config("sharding.sharding_type=data_parallel", "model.table_dtype=fp16")
    with pytest.raises(ConfigError, match="model.table_dtype.*data_parallel"):
        shard_model(build_model(config.model, manifest, device=env.device), env, config.sharding, config.optim,
                          config.data.batch_size)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_sharded_tbe_stores_fp16_weights(tiny, world_size):
    run_multiprocess(_sharded_body, world_size=world_size, data=str(tiny))


# ---------------------------------------------------------------------------- end to end
def _train(data: Path, run: Path, *overrides: str, nproc: int = 2) -> int:
    return main(["launch", "--nproc-per-node", str(nproc), "--", "train", "--data", str(data), "--out", str(run),
                 *_sets(*overrides)])


@pytest.mark.slow
def test_fp16_training_checkpoint_and_resume(tiny, tmp_path, capfd):
    common = ["model.table_dtype=fp16", "sharding.sharding_type=row_wise", "train.epochs=2",
              "train.checkpoint_every=5", "train.keep_checkpoints=0"]
    straight, failed = tmp_path / "straight", tmp_path / "failed"
    assert _train(tiny, straight, *common) == 0, capfd.readouterr().out
    a = json.loads((straight / "metrics.json").read_text())
    assert a["config"]["model"]["table_dtype"] == "fp16"
    assert a["embedding_params"] == FULL_PARAMS and a["embedding_bytes"] == 2 * FULL_PARAMS
    assert a["valid_auc"] > 0.65 and a["test_auc"] > 0.65  # the planted signal is learnt
    assert all(math.isfinite(a[k]) and 0 < a[k] < 0.69 for k in ("valid_logloss", "test_logloss"))
    # The checkpoint holds fp16 tables (half the bytes) and the fused optimizer's fp32 state.
    saved = _load_dcp(straight / "ckpt" / "step_32", tmp_path)
    tables = {k: v for k, v in saved.items() if k.startswith("model/") and "embedding_bags" in k}
    assert len(tables) == len(FIELDS) and {v.dtype for v in tables.values()} == {torch.float16}
    assert sum(v.numel() * v.element_size() for v in tables.values()) == 2 * FULL_PARAMS
    momentum = [v for k, v in saved.items() if "momentum1" in k]
    assert len(momentum) == len(FIELDS) and {v.dtype for v in momentum} == {torch.float32}

    # Rank 1 fails after step 13; the rerun resumes from step 10 and ends bitwise where the
    # straight run ended: fp16 weights and optimizer state round-trip exactly.
    assert _train(tiny, failed, *common, "train.fail_at_step=13", "train.fail_rank=1") != 0
    assert (failed / "ckpt" / "latest").read_text().strip() == "step_10"
    assert _train(tiny, failed, *common) == 0
    b = json.loads((failed / "metrics.json").read_text())
    assert b["resumed_from_step"] == 10
    assert {k: a[k] for k in ("valid_auc", "test_auc", "test_logloss", "steps")} == \
        {k: b[k] for k in ("valid_auc", "test_auc", "test_logloss", "steps")}
    resumed = _load_dcp(failed / "ckpt" / "step_32", tmp_path)
    assert resumed.keys() == saved.keys()
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == resumed[key].dtype and torch.equal(value, resumed[key]), key

    # One rank loads the 2-rank fp16 checkpoint (DCP reshards it) and scores what two ranks scored.
    last = tmp_path / "one_rank"
    shutil.copytree(straight, last)
    (last / "metrics.json").unlink()
    assert _train(tiny, last, *common, nproc=1) == 0
    c = json.loads((last / "metrics.json").read_text())
    assert c["world_size"] == 1 and c["resumed_from_step"] == 32
    assert c["test_auc"] == pytest.approx(a["test_auc"], abs=1e-6)
    assert c["test_logloss"] == pytest.approx(a["test_logloss"], abs=1e-6)


@pytest.mark.slow
def test_retrain_with_fp16_compact_tables(tiny, tmp_path):
    from embdim.embedding_methods import load_compact_embedding, load_plan

    run = tmp_path / "fixed"
    sets = _sets("model.table_dtype=fp16", "train.epochs=2", "search.layout=project")
    launch = ["launch", "--nproc-per-node", "2", "--"]
    assert main([*launch, "search", "--data", str(tiny), "--method", "fixed", "--budget", "0.7",
                 "--out", str(run), *sets]) == 0
    assert main([*launch, "retrain", "--data", str(tiny), "--plan", str(run / "plan.json"),
                 "--out", str(run / "retrain"), *sets]) == 0
    plan = load_plan(run)
    tables, projections = plan.num_table_params(), plan.num_projection_params()
    assert projections > 0 and tables < FULL_PARAMS
    metrics = json.loads((run / "retrain" / "metrics.json").read_text())
    assert metrics["embedding_params"] == tables + projections
    assert metrics["embedding_bytes"] == 2 * tables + 4 * projections
    assert metrics["full_embedding_params"] == FULL_PARAMS
    assert metrics["test_auc"] > 0.6 and math.isfinite(metrics["test_logloss"])
    # The gathered compact tables are fp16; load_compact_embedding builds the (fp32, unsharded)
    # module and holds exactly the trained values.
    saved = torch.load(run / "retrain" / "compact_embedding.pt", weights_only=True)
    table_keys = [k for k in saved if k.startswith("ebc.embedding_bags.")]
    assert table_keys and {saved[k].dtype for k in table_keys} == {torch.float16}
    module = load_compact_embedding(run)
    state = module.state_dict()
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key

    # Start weights from a plan's init checkpoint (fp32, as MLET's collapse or OptEmbed's rows
    # are written) land in the fp16 shards rounded to nearest; with 0 epochs they are the result.
    import dataclasses

    from embdim.embedding_methods.plan import save_plan

    generator = torch.Generator().manual_seed(0)
    init = {k: torch.randn(v.shape, generator=generator) / 3 for k, v in state.items()}
    started = tmp_path / "started"
    save_plan(dataclasses.replace(plan, init_checkpoint="init.pt"), started)
    torch.save(init, started / "init.pt")
    assert main([*launch, "retrain", "--data", str(tiny), "--plan", str(started / "plan.json"),
                 "--out", str(started / "retrain"), *sets, "--set", "retrain.epochs=0"]) == 0
    result = torch.load(started / "retrain" / "compact_embedding.pt", weights_only=True)
    for key, value in init.items():
        expected = value.half() if key.startswith("ebc.embedding_bags.") else value
        assert result[key].dtype == expected.dtype and torch.equal(result[key], expected), key
