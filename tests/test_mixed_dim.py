"""The compact retrain path: IdRemapper -> KJT -> MixedDimEmbeddingBagCollection inside torchrec's DLRM.

The reference semantics of a plan: field f's embedding of a bag is ``sum_{i in bag} E_f[i]`` where
``E_f[i] = V_g[local(i)] P_g`` for the group g holding id i (``project``; ``P_g`` = identity at
width D), or ``E_f[i] = [V_g[local(i)], 0, ..., 0]`` (``pad``: the full-width row with its trailing
D - w dims masked to zero), and ``E_f[i] = 0`` for a pruned id. The tests expand a compact module into these full-width tables and
compare, single process and on 2 gloo ranks under DistributedModelParallel.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain

from embdim.embedding_methods.mixed_dim import (
    GroupedProjection,
    MixedDimEmbeddingBagCollection,
    build_retrain_module,
    features_to_kjt,
)
from embdim.embedding_methods.plan import FieldPlan, GroupPlan, SizePlan, save_plan
from embdim.embedding_methods.remap import IdRemapper, RemapError, retrain_feature_names
from tests.multiprocess import run_multiprocess
from tests.tolerance import assert_close_sums

D = 8
NUM_DENSE = 4


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny ops on a shared 2-core machine: intra-op threads spin against each other (100x slower).
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)
MULTI_HOT = {"d", "f"}


def i64(xs) -> np.ndarray:
    return np.asarray(list(xs), dtype=np.int64)


def toy_plan(layout: str = "project") -> SizePlan:
    """Split + pruned (a), whole at 4 (b), whole at D (c), multi-hot split (d), pruned (e), multi-hot pruned (f)."""
    return SizePlan(method="toy", embedding_dim=D, budget=0.5, layout=layout, fields=[
        FieldPlan("a", 50, [GroupPlan(8, i64(range(0, 10))), GroupPlan(4, i64(range(10, 40)))]),
        FieldPlan("b", 30, [GroupPlan(4)]),
        FieldPlan("c", 20, [GroupPlan(8)]),
        FieldPlan("d", 40, [GroupPlan(4, i64(range(0, 40, 2))), GroupPlan(8, i64(range(1, 30, 2)))]),
        FieldPlan("e", 10, []),
        FieldPlan("f", 25, [GroupPlan(4, i64(range(5, 25)))]),
    ])


def raw_batch(plan: SizePlan, batch_size: int, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    features = {}
    for f in plan.fields:
        if f.name in MULTI_HOT:
            lengths = rng.integers(0, 4, size=batch_size).astype(np.int32)  # includes empty bags
        else:
            lengths = np.ones(batch_size, dtype=np.int32)
        features[f.name] = (rng.integers(0, f.num_embeddings, size=int(lengths.sum())).astype(np.int64), lengths)
    return features


def expanded_tables(plan: SizePlan, module: MixedDimEmbeddingBagCollection) -> dict[str, torch.Tensor]:
    """Full-width ``[num_embeddings, D]`` table per field equivalent to the compact module: a pad
    group's rows are its table's rows with the trailing D - w dims zero (the masked full-width
    model), a projected group's rows are ``V P``."""
    weights = {c.feature_names[0]: module.ebc.embedding_bags[c.name].weight.detach() for c in module.inner_configs()}
    slot_of = {c.feature_names[0]: i for i, c in enumerate(module.inner_configs())}
    full = {}
    for f in plan.fields:
        table = torch.zeros(f.num_embeddings, D)
        for k, g in enumerate(f.groups):
            feature = retrain_feature_names(SizePlan("x", D, [f]))[k]
            P = None if module.projection is None else module.projection.slot_weight(slot_of[feature])
            rows = weights[feature] if P is None else weights[feature] @ P.detach()
            ids = torch.arange(f.num_embeddings) if g.ids is None else torch.from_numpy(g.ids)
            table[ids, :rows.shape[1]] = rows
        full[f.name] = table
    return full


def reference_pooled(full: dict[str, torch.Tensor], raw: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    out = {}
    for name, (values, lengths) in raw.items():
        rows = torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths))
        pooled = torch.zeros(len(lengths), D)
        pooled.index_add_(0, rows, full[name][torch.from_numpy(values)])
        out[name] = pooled
    return out


def make_batch(plan: SizePlan, remapper: IdRemapper, batch_size: int, seed: int) -> Batch:
    """A learnable toy batch: the label is the sign of a planted per-id score summed over fields."""
    rng = np.random.default_rng(seed)
    raw = raw_batch(plan, batch_size, rng)
    planted = np.random.default_rng(1234)
    score = np.zeros(batch_size)
    for f in plan.fields:
        per_id = planted.normal(size=f.num_embeddings)
        values, lengths = raw[f.name]
        np.add.at(score, np.repeat(np.arange(batch_size), lengths), per_id[values])
    kjt = features_to_kjt(remapper(raw, batch_size), retrain_feature_names(plan))
    return Batch(dense_features=torch.from_numpy(rng.normal(size=(batch_size, NUM_DENSE)).astype(np.float32)),
                 sparse_features=kjt, labels=torch.from_numpy((score > 0).astype(np.float32)))


# --- remapper -------------------------------------------------------------------------------------


def test_remapper_single_and_multi_hot() -> None:
    plan = toy_plan()
    remap = IdRemapper(plan)
    raw = {
        "a": (np.array([3, 12, 45, 39], dtype=np.int64), np.ones(4, dtype=np.int32)),
        "b": (np.array([0, 29, 5, 5], dtype=np.int64), np.ones(4, dtype=np.int32)),
        "c": (np.array([1, 2, 3, 4], dtype=np.int64), np.ones(4, dtype=np.int32)),
        # bags: [0, 1, 31], [], [2, 2, 39, 3], [30]
        "d": (np.array([0, 1, 31, 2, 2, 39, 3, 30], dtype=np.int64), np.array([3, 0, 4, 1], dtype=np.int32)),
        "e": (np.array([1, 2, 3, 4], dtype=np.int64), np.ones(4, dtype=np.int32)),
        # bags: [4, 5], [24], [], [0, 1, 2]
        "f": (np.array([4, 5, 24, 0, 1, 2], dtype=np.int64), np.array([2, 1, 0, 3], dtype=np.int32)),
    }
    out = remap(raw, 4)
    assert list(out) == ["a@g0", "a@g1", "b", "c", "d@g0", "d@g1", "f"] == retrain_feature_names(plan)
    np.testing.assert_array_equal(out["a@g0"][0], [3])
    np.testing.assert_array_equal(out["a@g0"][1], [1, 0, 0, 0])
    np.testing.assert_array_equal(out["a@g1"][0], [2, 29])  # 12 -> 2, 39 -> 29; 45 is pruned
    np.testing.assert_array_equal(out["a@g1"][1], [0, 1, 0, 1])
    assert out["b"][0] is raw["b"][0]  # a whole field at one width passes through untouched
    # even ids -> group 0 row id/2; odd ids < 30 -> group 1 row (id-1)/2; 31, 39 are pruned
    np.testing.assert_array_equal(out["d@g0"][0], [0, 1, 1, 15])
    np.testing.assert_array_equal(out["d@g0"][1], [1, 0, 2, 1])
    np.testing.assert_array_equal(out["d@g1"][0], [0, 1])
    np.testing.assert_array_equal(out["d@g1"][1], [1, 0, 1, 0])
    np.testing.assert_array_equal(out["f"][0], [0, 19])  # 5 -> 0, 24 -> 19; 0..4 are pruned
    np.testing.assert_array_equal(out["f"][1], [1, 1, 0, 0])
    # Single-hot pruning-only field: a pruned id leaves an empty bag.
    single = IdRemapper(SizePlan("x", D, [FieldPlan("f", 25, [GroupPlan(4, i64(range(5, 25)))])]))
    values, lengths = single({"f": (np.array([7, 3, 24], dtype=np.int64), np.ones(3, dtype=np.int32))}, 3)["f"]
    np.testing.assert_array_equal(values, [2, 19])
    np.testing.assert_array_equal(lengths, [1, 0, 1])
    for values, lengths in out.values():
        assert values.dtype == np.int64 and lengths.dtype == np.int32


def test_remapper_errors_and_pickle(tmp_path) -> None:
    plan = toy_plan()
    remap = IdRemapper(plan, cache_dir=tmp_path, mmap_min_rows=40)  # fields a and d get mmapped lookups
    raw = raw_batch(plan, 16, np.random.default_rng(0))
    clone = pickle.loads(pickle.dumps(remap))
    assert isinstance(clone._fields[0].lookup, np.memmap)
    for key, (values, lengths) in remap(raw, 16).items():
        np.testing.assert_array_equal(values, clone(raw, 16)[key][0])
        np.testing.assert_array_equal(lengths, clone(raw, 16)[key][1])
    bad = dict(raw, a=(np.array([50] * 16, dtype=np.int64), np.ones(16, dtype=np.int32)))
    with pytest.raises(RemapError, match=r"field 'a': id 50 is out of range \[0, 50\)"):
        remap(bad, 16)
    with pytest.raises(RemapError, match=r"lacks field\(s\) \['e'\]"):
        remap({k: v for k, v in raw.items() if k != "e"}, 16)
    with pytest.raises(RemapError, match="field 'd': lengths sum"):
        remap(dict(raw, d=(np.zeros(3, dtype=np.int64), np.ones(16, dtype=np.int32))), 16)


# --- module ---------------------------------------------------------------------------------------


def test_grouped_projection_matches_per_slot_matmul() -> None:
    torch.manual_seed(0)
    proj = GroupedProjection([4, 8, 4, 12, 4], [8, 8, 8, 8, 8])
    assert sorted(n for n, _ in proj.named_parameters()) == ["weight_12x8", "weight_4x8"]
    assert proj.num_params() == 3 * 4 * 8 + 12 * 8
    xs = [torch.randn(5, d) for d in [4, 8, 4, 12, 4]]
    ys = proj(xs)
    for i, (x, y) in enumerate(zip(xs, ys)):
        W = proj.slot_weight(i)
        torch.testing.assert_close(y, x if W is None else x @ W)
    bound = (6 / (4 + 8)) ** 0.5  # Xavier uniform, as MDE's projections
    assert proj.weight_4x8.abs().max() <= bound


@pytest.mark.parametrize("layout", ["project", "pad"])
def test_compact_module_equals_expanded_tables(layout: str) -> None:
    """With the same weights, the compact module equals the full-width model whose rows are the
    group rows projected (``project``) or masked to their width (``pad``), pruned ids zero."""
    plan = toy_plan(layout)
    torch.manual_seed(0)
    module = build_retrain_module(plan, device="cpu")
    assert module.layout == layout and (module.projection is None) == (layout == "pad")
    configs = module.embedding_bag_configs()
    assert [c.feature_names for c in configs] == [["a"], ["b"], ["c"], ["d"], ["e"], ["f"]]
    assert {c.embedding_dim for c in configs} == {D}
    assert module.extra_embedding_params() == plan.num_projection_params()
    inner_params = sum(c.num_embeddings * c.embedding_dim for c in module.inner_configs())
    assert inner_params + module.extra_embedding_params() == plan.num_params()
    assert sum(p.numel() for p in module.parameters()) == plan.num_params()
    if layout == "pad":
        assert plan.num_params() == plan.num_table_params() and plan.projection_share() == 0
    remap = IdRemapper(plan)
    full = expanded_tables(plan, module)
    for batch_size, seed in [(1, 0), (7, 1), (64, 2)]:
        raw = raw_batch(plan, batch_size, np.random.default_rng(seed))
        kt = module(features_to_kjt(remap(raw, batch_size), retrain_feature_names(plan)))
        assert kt.keys() == ["a", "b", "c", "d", "e", "f"] and kt.length_per_key() == [D] * 6
        got, want = kt.to_dict(), reference_pooled(full, raw)
        for name in want:
            assert_close_sums(got[name], want[name])
        assert torch.all(got["e"] == 0)


def _reference_projection(module: MixedDimEmbeddingBagCollection, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
    """The projection as it was computed before ``_ProjectPooled``: one matmul per slot (``x @ P``,
    identity at width D), the slots of a field summed in slot order, the fields concatenated."""
    outs = []
    for slots in module._output_slots:
        out = torch.zeros(next(iter(pooled.values())).shape[0], module.embedding_dim)
        for k, s in enumerate(slots):
            x, P = pooled[module._inner_features[s]], module.projection.slot_weight(s)
            y = x if P is None else x @ P
            out = y if k == 0 else out + y
        outs.append(out)
    return torch.cat(outs, dim=1)


def _mixed_plan() -> SizePlan:
    """D = 16, groups of widths 4, 8, 12 and 16 spread so that every write mode of
    ``_ProjectPooled`` occurs: 4 -> gathered, first writes (index_copy); 8 -> evenly spaced, some
    fields already written (zeroed output + baddbmm_); 12 -> gathered, all written (index_add);
    16 -> identity."""
    half = lambda w1, w2: [GroupPlan(w1, i64(range(0, 5))), GroupPlan(w2, i64(range(5, 10)))]  # noqa: E731
    return SizePlan("x", 16, [FieldPlan("p", 10, half(4, 8)), FieldPlan("q", 10, half(4, 8)),
                              FieldPlan("r", 10, half(4, 8)), FieldPlan("s", 10, half(8, 12)),
                              FieldPlan("t", 10, [GroupPlan(4)]), FieldPlan("u", 10, [GroupPlan(16)]),
                              FieldPlan("v", 10, half(4, 12)), FieldPlan("w", 10, half(4, 12))], layout="project")


@pytest.mark.parametrize("layout", ["toy", "mixed", "uniform", "identity", "shuffled", "mixed_shuffled",
                                    "uniform_shuffled", "identity_shuffled"])
def test_fused_projection_equals_per_slot_reference(layout: str, split_weight_grads: bool) -> None:
    """``_ProjectPooled`` (strided batched GEMMs straight into the output, fused backward) computes
    the old per-slot formula and its gradients, whatever the key order of the pooled output
    (strided views for evenly spaced slots, index gathers otherwise)."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    torch.manual_seed(0)
    if layout.startswith("uniform"):  # compact_fixed's shape: every field one group of one width
        plan = SizePlan("x", D, [FieldPlan(n, 9, [GroupPlan(4)]) for n in "pqrstu"], layout="project")
    elif layout.startswith("mixed"):
        plan = _mixed_plan()
    elif layout.startswith("identity"):  # every field whole at width D: no projection at all
        plan = SizePlan("x", D, [FieldPlan(n, 9, [GroupPlan(D)]) for n in "pqrstu"], layout="project")
    else:  # multi-group fields, a pruned field, an identity (width D) slot
        plan = toy_plan()
    module = build_retrain_module(plan, device="cpu")
    widths = {c.feature_names[0]: c.embedding_dim for c in module.inner_configs()}
    keys = list(widths)
    if layout.endswith("shuffled"):  # a sharded collection returns keys in shard order
        keys = [keys[i] for i in np.random.default_rng(3).permutation(len(keys))]
    values = torch.randn(11, sum(widths[k] for k in keys), requires_grad=True)
    kt = KeyedTensor(keys=keys, length_per_key=[widths[k] for k in keys], values=values)
    got = module.project_pooled(kt).values()
    coef = torch.randn_like(got)
    (got * coef).sum().backward()
    got_grads = [values.grad.clone()] + [p.grad.clone() for p in module.projection.parameters()]

    values.grad = None
    module.projection.zero_grad(set_to_none=True)
    want = _reference_projection(module, kt.to_dict())
    (want * coef).sum().backward()
    want_grads = [values.grad] + [p.grad for p in module.projection.parameters()]
    assert_close_sums(got, want)
    for g, w in zip(got_grads, want_grads):
        assert_close_sums(g, w)
    if layout.startswith("identity"):
        # No projection at all: the output is a copy of the pooled values. (A batched GEMM and
        # per-slot matmuls may add the same products in different orders: tolerances above.)
        assert torch.equal(got, want)
    if split_weight_grads and layout.startswith(("toy", "uniform", "mixed")):
        from embdim.embedding_methods import gemm

        assert gemm.split_rows(1, values.shape[0], gemm.multiprocessors(values.device)) > 1  # the split ran
    layouts = [layout for stages, _ in module._layouts.values() for _, layout in stages]
    modes = {g.mode for lay in layouts for g in lay.groups}
    if layout == "uniform":
        assert modes == {"write"} and all(g.in_step is not None for lay in layouts for g in lay.groups)
    assert all(lay.passthrough == (layout == "identity") for lay in layouts)  # no copy at all
    if layout == "mixed":
        assert [g.mode for g in layouts[0].groups] == ["index_copy", "add", "index_add"] and layouts[0].zero_init


def test_meta_module_and_bad_layouts() -> None:
    plan = toy_plan()
    module = build_retrain_module(plan)  # meta by default: DMP materialises it
    assert all(p.is_meta for p in module.parameters())
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

    t = EmbeddingBagConfig(name="t_x", embedding_dim=4, num_embeddings=3, feature_names=["x"])
    with pytest.raises(ValueError, match="lists feature 'y', which no inner table has"):
        MixedDimEmbeddingBagCollection([t], {"x": ["x", "y"]}, 8)
    with pytest.raises(ValueError, match=r"inner feature\(s\) \['x'\] belong to no output field"):
        MixedDimEmbeddingBagCollection([t], {"z": []}, 8)
    mean = EmbeddingBagConfig(name="t_m", embedding_dim=4, num_embeddings=3, feature_names=["m"], pooling=PoolingType.MEAN)
    with pytest.raises(ValueError, match="SUM pooling"):
        MixedDimEmbeddingBagCollection([mean], {"m": ["m"]}, 8)
    with pytest.raises(ValueError, match="prunes every field"):
        build_retrain_module(SizePlan("x", 8, [FieldPlan("a", 5, [])]))


@pytest.mark.parametrize("interaction,layout", [("dot", "project"), ("dcn", "project"), ("dot", "pad"),
                                                ("dcn", "pad")])
def test_unmodified_dlrm_trains_with_compact_module(interaction: str, layout: str) -> None:
    plan = toy_plan(layout)
    torch.manual_seed(0)
    ebc = build_retrain_module(plan, device="cpu")
    if interaction == "dot":
        dlrm = DLRM(embedding_bag_collection=ebc, dense_in_features=NUM_DENSE, dense_arch_layer_sizes=[8, D],
                    over_arch_layer_sizes=[16, 1])
    else:
        dlrm = DLRM_DCN(embedding_bag_collection=ebc, dense_in_features=NUM_DENSE, dense_arch_layer_sizes=[8, D],
                        over_arch_layer_sizes=[16, 1], dcn_num_layers=2, dcn_low_rank_dim=4)
    model = DLRMTrain(dlrm)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    remap = IdRemapper(plan)
    eval_batch = make_batch(plan, remap, 512, seed=10_000)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(model(eval_batch)[0])

    before = eval_loss()
    for step in range(60):
        loss, _ = model(make_batch(plan, remap, 128, seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.75 * before, (before, after)
    # Every table (and projection) was trained: each receives gradients through the DLRM.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ebc.parameters())


# --- 2 gloo ranks ---------------------------------------------------------------------------------


def _copy_into_sharded(dmp: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    """Writes a full (unsharded) state dict into a DMP model, shard by shard."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    with torch.no_grad():
        for key, value in dmp.state_dict().items():
            src = reference[key]
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    (r, c), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    shard.tensor.copy_(src[r:r + nr, c:c + nc])
            else:
                value.copy_(src)


def _sharded_body(rank: int, world_size: int, plan_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, table_wise
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from embdim.embedding_methods.plan import load_plan

    torch.set_num_threads(1)
    plan = load_plan(plan_dir)
    remap = IdRemapper(plan)
    lr = 0.1

    def dlrm(device: str) -> DLRMTrain:
        return DLRMTrain(DLRM(embedding_bag_collection=build_retrain_module(plan, device=device),
                              dense_in_features=NUM_DENSE, dense_arch_layer_sizes=[8, D], over_arch_layer_sizes=[16, 1]))

    torch.manual_seed(0)  # the same reference weights on both ranks
    reference = dlrm("cpu")
    model = dlrm("meta")
    ebc = model.model.sparse_arch.embedding_bag_collection.ebc
    apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": lr})
    # Table-wise over both ranks (sharded key order differs from config order) plus one
    # column-wise table (its D=8 columns split 4 + 4).
    per_param = {}
    for i, cfg in enumerate(ebc.embedding_bag_configs()):
        per_param[cfg.name] = column_wise(ranks=[0, 1]) if cfg.name == "t_c" else table_wise(rank=i % world_size)
    module_plan = construct_module_sharding_plan(ebc, per_param, local_size=world_size, world_size=world_size,
                                                 device_type="cpu")
    dmp = DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.group.WORLD), device=torch.device("cpu"),
        plan=ShardingPlan({"model.sparse_arch.embedding_bag_collection.ebc": module_plan}),
    )
    sharded = dmp.state_dict()
    table_keys = [k for k, v in sharded.items() if isinstance(v, ShardedTensor)]
    assert len(table_keys) == len(ebc.embedding_bag_configs()), table_keys
    _copy_into_sharded(dmp, reference.state_dict())

    # Forward: the sharded model equals the unsharded reference on this rank's batch.
    batches = [make_batch(plan, remap, 32, seed=100 * s + r) for s in range(3) for r in range(world_size)]
    mine = batches[rank]
    loss, (_, logits, _) = dmp(mine)
    ref_loss, (_, ref_logits, _) = reference(mine)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    emb = dmp.module.model.sparse_arch.embedding_bag_collection
    got = emb(mine.sparse_features).to_dict()
    want = reference.model.sparse_arch.embedding_bag_collection(mine.sparse_features).to_dict()
    assert list(got) == ["a", "b", "c", "d", "e", "f"]
    for name in want:
        assert_close_sums(got[name], want[name])

    # Backward: the fused SGD step on the sharded tables equals SGD on the reference tables with
    # the gradient of the mean of both ranks' losses: each table sees every rank's lookups, and
    # torchrec divides embedding gradients by the world size to match DDP's averaging of the
    # dense gradients (torchrec.distributed.comm_ops gradient division, on by default).
    loss.backward()
    ref_mean = sum(reference(b)[0] for b in batches[:world_size]) / world_size
    ref_mean.backward()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if ".ebc.embedding_bags." in name:
                p -= lr * p.grad
    for key in table_keys:
        full = reference.state_dict()[key]
        for shard in dmp.state_dict()[key].local_shards():
            (r, c), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            torch.testing.assert_close(shard.tensor, full[r:r + nr, c:c + nc], rtol=1e-4, atol=1e-6)

    # TrainPipelineSparseDist finds the inner EBC behind DLRM -> SparseArch -> our module.
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.SGD(params, lr=lr))
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device=torch.device("cpu"), execute_all_batches=True)
    steps = batches[world_size:]
    with torch.no_grad():
        expected_first = dmp(steps[rank])[0]
    it = iter(steps[rank::world_size])
    losses = []
    while True:
        try:
            out_loss, _, _ = pipeline.progress(it)
        except StopIteration:
            break
        losses.append(float(out_loss))
    assert len(pipeline._pipelined_modules) >= 1
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert losses[0] == pytest.approx(float(expected_first), rel=1e-5)
    pipeline.detach()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["project", "pad"])
def test_sharded_equals_unsharded_and_pipelines(tmp_path, layout: str) -> None:
    save_plan(toy_plan(layout), tmp_path)
    run_multiprocess(_sharded_body, world_size=2, plan_dir=str(tmp_path))


@pytest.mark.parametrize("case", ["uniform", "uniform_shuffled", "split", "identity"])
def test_pad_layout_equals_zero_padding(case: str) -> None:
    """The pad step (strided copy for one w-wide slot per field in order, index_copy_ /
    index_add_ otherwise, nothing at all for D-wide fields in order) computes, forward and
    backward, each field's slots padded with zeros to D and summed."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    torch.manual_seed(0)
    if case.startswith("uniform"):
        plan = SizePlan("x", D, [FieldPlan(n, 9, [GroupPlan(4)]) for n in "pqr"], layout="pad")
    elif case == "identity":
        plan = SizePlan("x", D, [FieldPlan(n, 9, [GroupPlan(D)]) for n in "pqr"], layout="pad")
    else:
        plan = toy_plan("pad")
    module = build_retrain_module(plan, device="cpu")
    widths = {c.feature_names[0]: c.embedding_dim for c in module.inner_configs()}
    keys = list(widths)
    if case.endswith("shuffled"):
        keys = keys[::-1]
    values = torch.randn(5, sum(widths[k] for k in keys), dtype=torch.float64, requires_grad=True)
    got = module.project_pooled(KeyedTensor(keys=keys, length_per_key=[widths[k] for k in keys], values=values))
    pooled = dict(zip(keys, values.split([widths[k] for k in keys], dim=1)))
    want = torch.cat([sum((torch.nn.functional.pad(pooled[feature], (0, D - widths[feature]))
                           for feature in features), torch.zeros(5, D, dtype=torch.float64))
                      for features in [[module._inner_features[s] for s in slots] for slots in module._output_slots]],
                     dim=1)
    torch.testing.assert_close(got.values(), want)
    coef = torch.randn_like(want)
    (grad_got,) = torch.autograd.grad((got.values() * coef).sum(), values)
    (grad_want,) = torch.autograd.grad((want * coef).sum(), values)
    torch.testing.assert_close(grad_got, grad_want)
    ((_, pad),) = module._layouts.values()
    assert pad.passthrough == (case == "identity")
    assert bool(pad.uniform_width) == (case in ("uniform", "identity")) and pad.accumulate == (case == "split")
