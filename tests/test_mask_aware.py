"""MaskAwareEmbedding: per-id masks before pooling, side table, saliency accumulator, sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embdim.embedding_methods.base import FieldSpec
from embdim.embedding_methods.mask_aware import (SIDE_WIDTH, LocalSearchContext, MaskAwareEmbedding, copy_into_table,
                                          segment_sum, side_table_rows)
from tests.multiprocess import run_multiprocess

D = 8
FIELDS = [FieldSpec("a", 20, multi_hot=True), FieldSpec("b", 15, multi_hot=True), FieldSpec("c", 10)]


class TinyMask(nn.Module):
    """A mask depending on the row and its side features, with parameters to differentiate."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D + SIDE_WIDTH, D)

    def forward(self, field_name: str, rows: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        scale = {"a": 1.0, "b": -0.5, "c": 2.0}[field_name]
        return torch.sigmoid(scale * self.lin(torch.cat([rows, side], dim=1)))


def make_counts(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f.name: rng.integers(0, 50, f.num_embeddings) for f in FIELDS}


def kjt_of(bags: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    keys = [f.name for f in FIELDS]
    values = torch.tensor([i for k in keys for bag in bags[k] for i in bag], dtype=torch.long)
    lengths = torch.tensor([len(bag) for k in keys for bag in bags[k]], dtype=torch.long)
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)


def make_bags(seed: int, batch_size: int = 6) -> dict[str, list[list[int]]]:
    """Multi-hot a, b (empty bags and repeated ids included) and single-hot c."""
    rng = np.random.default_rng(seed)
    bags: dict[str, list[list[int]]] = {}
    for f in FIELDS:
        if f.multi_hot:
            bags[f.name] = [[int(i) for i in rng.integers(0, f.num_embeddings, rng.integers(0, 4))]
                            for _ in range(batch_size)]
        else:
            bags[f.name] = [[int(rng.integers(0, f.num_embeddings))] for _ in range(batch_size)]
    bags["a"][0] = [3, 3, 7]  # a repeated id inside one bag
    bags["b"][1] = []
    return bags


def make_kjt(seed: int) -> tuple[KeyedJaggedTensor, dict[str, list[list[int]]]]:
    bags = make_bags(seed)
    return kjt_of(bags), bags


def build(pooled_single_hot: bool, *, use_saliency: bool = False, seed: int = 0, **kwargs) -> MaskAwareEmbedding:
    torch.manual_seed(seed)
    module = MaskAwareEmbedding(FIELDS, D, mask_fn=TinyMask(), use_side=True, use_saliency=use_saliency,
                                pooled_single_hot=pooled_single_hot, **kwargs)
    context = LocalSearchContext(module, FIELDS, D, make_counts())
    module.fill_side_tables(context, context.counts)
    if use_saliency:
        module.zero_accumulators(context)
    return module


def table(module: MaskAwareEmbedding, name: str) -> torch.Tensor:
    return LocalSearchContext(module, FIELDS, D, {}).gather_table_rows(name)


@pytest.mark.parametrize("pooled_single_hot", [False, True])
def test_per_id_masks_match_dense_reference(pooled_single_hot: bool) -> None:
    module = build(pooled_single_hot)
    kjt, bags = make_kjt(1)
    out = module(kjt).to_dict()
    (out["a"] * 1.0 + out["b"] * 2.0 + out["c"] * 3.0).pow(2).sum().backward()
    got_grads = [p.grad.clone() for p in module.mask_net.parameters()]

    # Reference: plain indexing of the full tables, the mask per looked-up id, sum per bag.
    reference_net = TinyMask()
    reference_net.load_state_dict(module.mask_net.state_dict())
    ref = {}
    for f in FIELDS:
        weight, side = table(module, f"t_{f.name}"), table(module, f"side_{f.name}")
        pooled = []
        for bag in bags[f.name]:
            ids = torch.tensor(bag, dtype=torch.long)
            rows = weight[ids]
            pooled.append((rows * reference_net(f.name, rows, side[ids])).sum(0))
        ref[f.name] = torch.stack(pooled)
    for name in ref:
        torch.testing.assert_close(out[name], ref[name])
    (ref["a"] * 1.0 + ref["b"] * 2.0 + ref["c"] * 3.0).pow(2).sum().backward()
    for got, p in zip(got_grads, reference_net.parameters()):
        torch.testing.assert_close(got, p.grad)
    assert out["b"][1].abs().sum() == 0  # the empty bag pools to zero


def test_single_hot_pooled_path_equals_unpooled() -> None:
    unpooled, pooled = build(False), build(True)
    assert pooled.ebc is not None and "c" in pooled.pooled_names and "c" not in unpooled.pooled_names
    copy_into_table(pooled, "t_c", table(unpooled, "t_c"))
    for name in ("t_a", "t_b"):
        copy_into_table(pooled, name, table(unpooled, name))
    pooled.mask_net.load_state_dict(unpooled.mask_net.state_dict())
    kjt, _ = make_kjt(2)
    outs = []
    for module in (unpooled, pooled):
        kt = module(kjt)
        kt.values().sin().sum().backward()
        outs.append((kt.to_dict()["c"], [p.grad for p in module.mask_net.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b)


def test_side_table_rows_and_lookup() -> None:
    counts = np.array([0, 5, 5, 1, 2])
    rows = side_table_rows(counts)
    np.testing.assert_allclose(rows[:, 0], np.log1p(counts), rtol=1e-6)
    np.testing.assert_allclose(rows[:, 1], [4 / 5, 0, 0, 3 / 5, 2 / 5], rtol=1e-6)  # share of ids with a larger count
    np.testing.assert_allclose(rows[:, 2], np.log1p(counts) / np.log1p(5), rtol=1e-6)
    assert np.all(rows[:, 3] == 0)
    np.testing.assert_allclose(side_table_rows(counts, start=1, stop=4), rows[1:4])

    module = build(False)
    kjt, bags = make_kjt(3)
    side_before = table(module, "side_a").clone()
    looked_up = module.side(kjt)
    full = side_table_rows(make_counts()["a"])
    ids = [i for bag in bags["a"] for i in bag]
    np.testing.assert_allclose(looked_up["a"].values().detach().numpy(), full[ids], rtol=1e-6)
    # The side table is never trained: its output is detached in the module's forward.
    module(kjt).values().sum().backward()
    assert module.side.embeddings["side_a"].weight.grad is None
    torch.testing.assert_close(table(module, "side_a"), side_before)


def test_side_table_must_be_filled() -> None:
    module = MaskAwareEmbedding(FIELDS, D, mask_fn=TinyMask(), use_side=True)
    with pytest.raises(RuntimeError, match="init_search_state"):
        module(make_kjt(0)[0])


def test_saliency_accumulator_sums_abs_e_grad_per_row() -> None:
    torch.manual_seed(0)
    module = MaskAwareEmbedding(FIELDS, D, use_saliency=True, saliency_start=1, saliency_steps=1,
                                freeze_tables_from=1, pooled_single_hot=True)
    context = LocalSearchContext(module, FIELDS, D, make_counts())
    module.zero_accumulators(context)
    weights = {f.name: table(module, f"t_{f.name}").clone() for f in FIELDS}
    coef = {f.name: torch.randn(6, D) for f in FIELDS}

    def step(seed: int) -> dict[str, list[list[int]]]:
        kjt, bags = make_kjt(seed)
        out = module(kjt).to_dict()
        sum((out[n] * coef[n]).sum() for n in out).backward()
        return bags

    step(4)  # step 0: before the saliency window, nothing accumulates, the tables get gradients
    assert all(table(module, f"acc_{f.name}").abs().sum() == 0 for f in FIELDS)
    assert module.ec.embeddings["t_a"].weight.grad.abs().sum() > 0
    module.ec.embeddings["t_a"].weight.grad = None
    module.ebc.embedding_bags["t_c"].weight.grad = None
    bags = step(5)  # step 1: inside the window
    step(6)  # step 2: after it, nothing more is added
    assert module.saliency_steps_done() == 1
    for f in FIELDS:
        expected = torch.zeros(f.num_embeddings, D)
        for b, bag in enumerate(bags[f.name]):
            for i in bag:  # dL/de of every occurrence in bag b is coef[b] (sum pooling)
                expected[i] += (weights[f.name][i] * coef[f.name][b]).abs()
        torch.testing.assert_close(table(module, f"acc_{f.name}"), expected)
    # Frozen from step 1 on: the tables received zero gradients since.
    assert module.ec.embeddings["t_a"].weight.grad.abs().sum() == 0
    assert module.ebc.embedding_bags["t_c"].weight.grad.abs().sum() == 0


def test_tables_frozen_from_the_start_have_no_backward_and_the_same_saliency() -> None:
    """PME's default (frozen from step 0): the main tables' gradient path is cut, not gated to
    zero; the accumulated saliency is the gated path's, and the tables receive no gradient."""
    acc, grads = {}, {}
    for freeze_from in (0, 1):  # 1: gated (frozen from step 1, the step measured below)
        torch.manual_seed(0)
        module = MaskAwareEmbedding(FIELDS, D, use_saliency=True, saliency_start=1, saliency_steps=1,
                                    freeze_tables_from=freeze_from, pooled_single_hot=True)
        module.zero_accumulators(LocalSearchContext(module, FIELDS, D, make_counts()))
        module.num_steps.fill_(1)  # inside the saliency window, past the freeze of either module
        coef = torch.randn(6, len(FIELDS) * D, generator=torch.Generator().manual_seed(3))
        out = module(make_kjt(5)[0])
        assert "SaliencyTapBackward" in _backward_node_names(out.values())
        (out.values() * coef).sum().backward()
        acc[freeze_from] = {f.name: table(module, f"acc_{f.name}").clone() for f in FIELDS}
        grads[freeze_from] = [module.ec.embeddings["t_a"].weight.grad, module.ebc.embedding_bags["t_c"].weight.grad]
    for f in FIELDS:
        assert acc[0][f.name].abs().sum() > 0
        torch.testing.assert_close(acc[0][f.name], acc[1][f.name], rtol=0, atol=0)
    assert grads[0] == [None, None] and all(float(g.abs().sum()) == 0 for g in grads[1])


def test_repeated_ids_are_summed() -> None:
    module = MaskAwareEmbedding([FieldSpec("a", 5, multi_hot=True)], 4, use_saliency=True, saliency_steps=1)
    context = LocalSearchContext(module, module.fields, 4, {})
    module.zero_accumulators(context)
    with torch.no_grad():
        module.ec.embeddings["t_a"].weight.fill_(1.0)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a"], values=torch.tensor([1, 1, 3]), lengths=torch.tensor([3]))
    pooled = module(kjt).values()  # [1, 4] = rows 1 + 1 + 3
    (pooled * torch.tensor([[1.0, 2.0, 5.0, 0.0]])).sum().backward()
    acc = table(module, "acc_a")
    torch.testing.assert_close(acc[1], torch.tensor([2.0, 4.0, 10.0, 0.0]))  # two occurrences summed
    torch.testing.assert_close(acc[3], torch.tensor([1.0, 2.0, 5.0, 0.0]))
    assert acc[[0, 2, 4]].abs().sum() == 0


def test_segment_sum_matches_loop_and_fallback() -> None:
    values = torch.randn(7, 4, requires_grad=True)
    lengths = torch.tensor([2, 0, 5])
    expected = torch.stack([values[:2].sum(0), torch.zeros(4), values[2:].sum(0)])
    torch.testing.assert_close(segment_sum(values, lengths), expected)
    from embdim.embedding_methods import mask_aware

    mask_aware._segment_reduce_ok[("cpu", torch.float32)] = False
    try:
        torch.testing.assert_close(segment_sum(values, lengths), expected)
    finally:
        mask_aware._segment_reduce_ok.clear()


# ------------------------------------------------------------------------------------------------
# Two gloo ranks: sharded (table-wise and row-wise) == unsharded


class _Wrapper(nn.Module):
    def __init__(self, sparse: nn.Module) -> None:
        super().__init__()
        self.sparse = sparse
        self.scale = nn.Parameter(torch.ones(1))  # a dense parameter, so DMP's DDP has one

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.sparse(kjt).values() * self.scale


def _shard(sparse: nn.Module, world_size: int):
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from embdim.sharding.planner import RowWiseEmbeddingBagCollectionSharder, RowWiseEmbeddingCollectionSharder

    # Mixed on purpose: table-wise on either rank and row-wise (the CPU row-wise sharders of
    # sharding/planner.py), for the main, side and accumulator tables alike.
    kinds = {"a": lambda: table_wise(rank=1), "b": row_wise, "c": row_wise}
    side_kinds = {"a": row_wise, "b": lambda: table_wise(rank=0), "c": lambda: table_wise(rank=1)}
    model = _Wrapper(sparse)
    # The trainer's rule: a table without a fused optimizer gets the sparse one (side and acc
    # already carry theirs; the sharder accepts exactly one).
    for child in (sparse.ec, sparse.ebc, sparse.side, sparse.acc, sparse.side_pooled, sparse.acc_pooled):
        params = [] if child is None else [p for p in child.parameters() if not hasattr(p, "_optimizer_classes")]
        if params:
            apply_optimizer_in_backward(torch.optim.SGD, params, {"lr": 0.1})
    ec_sharder, ebc_sharder = RowWiseEmbeddingCollectionSharder(), RowWiseEmbeddingBagCollectionSharder()
    plan = {}
    for child, prefix, kind_of in (("ec", "t_", kinds), ("side", "side_", side_kinds), ("acc", "acc_", kinds),
                                   ("ebc", "t_", kinds), ("side_pooled", "side_", side_kinds),
                                   ("acc_pooled", "acc_", kinds)):
        module = getattr(sparse, child)
        if module is None:
            continue
        bags = isinstance(module, EmbeddingBagCollection)
        configs = module.embedding_bag_configs() if bags else module.embedding_configs()
        sharder = ebc_sharder if bags else ec_sharder
        plan[f"sparse.{child}"] = construct_module_sharding_plan(
            module, {c.name: kind_of[c.name[len(prefix):]]() for c in configs}, sharder=sharder,
            local_size=world_size, world_size=world_size, device_type="cpu")
    return DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                    device=torch.device("cpu"), plan=ShardingPlan(plan),
                                    sharders=[ec_sharder, ebc_sharder])


def _sharded_body(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    from embdim.embedding_methods.amtl import AMTL
    from embdim.embedding_methods.pme import PME

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    counts = make_counts()
    bags = [make_bags(10 + r) for r in range(world_size)]
    # The reference sees the ranks' batches as one (its step counter must advance once, too).
    combined = kjt_of({f.name: [bag for b in bags for bag in b[f.name]] for f in FIELDS})
    batch_size = len(bags[0]["c"])
    for method in (AMTL(AMTL.Config(), FIELDS, D), PME(PME.Config(saliency_batches=1), FIELDS, D)):
        # Unsharded reference on CPU; the sharded twin built on meta, as the trainer does.
        torch.manual_seed(0)
        ref = method.build_search_module(EmbeddingBagCollection(method.search_tables(), device=torch.device("cpu")))
        # 0.75 at D = 8: the plans that fill it mix widths 4 and 8 (0.5 is every id at 4).
        ref_ctx = LocalSearchContext(ref, FIELDS, D, counts, budget=0.75)
        method.init_search_state(ref, ref_ctx)
        if ref.mask_fn is not None:
            with torch.no_grad():  # non-trivial masks: random output layers instead of the zero init
                for p in ref.mask_net.parameters():
                    p.normal_()
        meta = method.build_search_module(EmbeddingBagCollection(method.search_tables(), device=torch.device("meta")))
        dmp = _shard(meta, world_size)
        sharded = dmp.module.sparse
        ctx = LocalSearchContext(sharded, FIELDS, D, counts, budget=0.75, all_reduce_sum=all_reduce,
                                 owns_replicated=rank == 0)
        method.init_search_state(sharded, ctx)
        # Really sharded: row-wise tables hold part of the rows here, table-wise ones live on one rank.
        assert sum(rows.shape[0] for _, rows in ctx.local_rows("t_b")) < FIELDS[1].num_embeddings
        assert len(list(ctx.local_rows("t_a"))) == (rank == 1)
        for name in sharded.main_table_names():
            copy_into_table(sharded, name, ref_ctx.gather_table_rows(name))
        if ref.mask_fn is not None:
            sharded.mask_net.load_state_dict(ref.mask_net.state_dict())

        out = dmp(kjt_of(bags[rank]))
        out.pow(2).sum().backward()
        ref_out = ref(combined).values()
        torch.testing.assert_close(out, ref_out[rank * batch_size:(rank + 1) * batch_size])
        # DDP averages the dense gradients over ranks; the reference averages the ranks' losses.
        (ref_out.pow(2).sum() / world_size).backward()
        if ref.mask_fn is not None:
            for got, want in zip(sharded.mask_net.parameters(), ref.mask_net.parameters()):
                torch.testing.assert_close(got.grad, want.grad)
        else:
            # TorchRec divides sparse gradients by the world size, the reference averages losses:
            # both accumulate the mean saliency of the ranks' batches.
            for f in FIELDS:
                name = f"acc_{f.name}"
                torch.testing.assert_close(ctx.gather_table_rows(name), ref_ctx.gather_table_rows(name))
        plan, ref_plan = method.export_plan(sharded, ctx), method.export_plan(ref, ref_ctx)
        assert max(len(f.groups) for f in plan.fields) > 1  # a non-trivial plan
        for f, g in zip(plan.fields, ref_plan.fields):
            assert [x.width for x in f.groups] == [x.width for x in g.groups]
            for x, y in zip(f.groups, g.groups):
                assert (x.ids is None and y.ids is None) or np.array_equal(x.ids, y.ids)


@pytest.mark.slow
def test_sharded_matches_unsharded_gloo() -> None:
    run_multiprocess(_sharded_body, world_size=2)


def test_sharding_constraints_cover_every_table_and_forbid_replication() -> None:
    module = build(True, use_saliency=True)
    constraints = module.sharding_constraints()
    assert set(constraints) == {"t_a", "t_b", "t_c", "side_a", "side_b", "side_c", "acc_a", "acc_b", "acc_c"}
    assert all("data_parallel" not in v and "column_wise" not in v and "row_wise" in v for v in constraints.values())


class _FieldMask(nn.Module):
    """Like TinyMask, for any field name (scale from the name's first letter)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D + SIDE_WIDTH, D)

    def forward(self, field_name: str, rows: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        scale = (ord(field_name[0]) - 100) / 3.0
        return torch.sigmoid(scale * self.lin(torch.cat([rows, side], dim=1)))


@pytest.mark.parametrize("key_order", ["config", "shuffled"])
def test_pooled_fields_tapped_and_masked_together_equal_per_id_reference(key_order: str) -> None:
    """Several pooled single-hot fields (side and accumulator rows from their EBCs) masked and
    tapped in one pass equal per-id indexing: outputs, mask gradients and accumulated saliency,
    also when the collections return their keys in different orders (sharded collections do)."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    fields = [FieldSpec("a", 20, multi_hot=True), FieldSpec("c", 10), FieldSpec("d", 12), FieldSpec("e", 9)]
    torch.manual_seed(0)
    module = MaskAwareEmbedding(fields, D, mask_fn=_FieldMask(), use_side=True, use_saliency=True, saliency_steps=1)
    counts = {f.name: np.random.default_rng(1).integers(0, 50, f.num_embeddings) for f in fields}
    context = LocalSearchContext(module, fields, D, counts)
    module.fill_side_tables(context, context.counts)
    module.zero_accumulators(context)
    assert module.acc_pooled is not None and module.side_pooled is not None
    rng = np.random.default_rng(2)
    bags = {f.name: ([[int(i) for i in rng.integers(0, f.num_embeddings, rng.integers(0, 3))] for _ in range(5)]
                     if f.multi_hot else [[int(rng.integers(0, f.num_embeddings))] for _ in range(5)]) for f in fields}
    keys = [f.name for f in fields]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.tensor([i for k in keys for bag in bags[k] for i in bag], dtype=torch.long),
        lengths=torch.tensor([len(bag) for k in keys for bag in bags[k]], dtype=torch.long))
    weights = {f.name: table(module, f"t_{f.name}").clone() for f in fields}

    def reorder(kt: KeyedTensor) -> KeyedTensor:
        if key_order == "config":
            return kt
        order = [2, 0, 1]  # e, c, d
        parts = kt.to_dict()
        new_keys = [kt.keys()[i] for i in order]
        return KeyedTensor(keys=new_keys, length_per_key=[kt.length_per_key()[i] for i in order],
                           values=torch.cat([parts[k] for k in new_keys], dim=1))

    lookups = [module.ebc(kjt), module.ec(kjt), module.side(kjt), module.acc(kjt),
               module.side_pooled(kjt), module.acc_pooled(kjt)]
    for i in (0, 4, 5):
        lookups[i] = reorder(lookups[i])
    coef = torch.randn(5, len(keys) * D)
    out = module.mask_and_pool(*lookups)
    assert out.keys() == keys
    (out.values() * coef).sum().backward()
    got_grads = [p.grad.clone() for p in module.mask_net.parameters()]

    reference_net = _FieldMask()
    reference_net.load_state_dict(module.mask_net.state_dict())
    ref, saliency = [], {}
    for j, f in enumerate(fields):
        side = table(module, f"side_{f.name}")
        acc = torch.zeros(f.num_embeddings, D)
        pooled = []
        for b, bag in enumerate(bags[f.name]):
            ids = torch.tensor(bag, dtype=torch.long)
            rows = weights[f.name][ids]
            pooled.append((rows * reference_net(f.name, rows, side[ids])).sum(0))
            with torch.no_grad():  # dL/d(row) of each occurrence: coef * mask (product rule on rows * mask(rows))
                r = rows.clone().requires_grad_(True)
                with torch.enable_grad():
                    ((r * reference_net(f.name, r, side[ids])).sum(0) * coef[b, j * D:(j + 1) * D]).sum().backward()
                acc.index_add_(0, ids, (rows * r.grad).abs())
        ref.append(torch.stack(pooled))
        saliency[f.name] = acc
    ref = torch.cat(ref, dim=1)
    torch.testing.assert_close(out.values(), ref)
    reference_net.zero_grad()
    (ref * coef).sum().backward()
    for got, p in zip(got_grads, reference_net.parameters()):
        torch.testing.assert_close(got, p.grad)
    for f in fields:
        torch.testing.assert_close(table(module, f"acc_{f.name}"), saliency[f.name])


def _backward_node_names(tensor: torch.Tensor) -> list[str]:
    seen, stack, names = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("with_unpooled", [False, True])
def test_output_in_field_order_from_shard_ordered_lookups_without_per_field_selects(with_unpooled: bool) -> None:
    """A sharded lookup returns its keys in shard order; putting the fields back in config order
    is one unbind (backward: one stack), not a select per field (backward: F zero-filled
    [B, F, D] gradients summed), and gives the same values and table gradients."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    fields = [FieldSpec("c", 10), FieldSpec("d", 12), FieldSpec("e", 9)]
    if with_unpooled:
        fields.insert(1, FieldSpec("a", 20, multi_hot=True))
    module = MaskAwareEmbedding(fields, D, use_saliency=True, saliency_steps=1)
    bags = {f.name: [[i, (3 * i) % f.num_embeddings][: 1 + (f.multi_hot and i % 2)] for i in range(5)]
            for f in fields}
    keys = [f.name for f in fields]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.tensor([i for k in keys for bag in bags[k] for i in bag], dtype=torch.long),
        lengths=torch.tensor([len(bag) for k in keys for bag in bags[k]], dtype=torch.long))
    pooled = module.ebc(kjt)
    parts = pooled.to_dict()
    shard_order = list(reversed(pooled.keys()))
    reordered = KeyedTensor(keys=shard_order, length_per_key=[D] * len(shard_order),
                            values=torch.cat([parts[k] for k in shard_order], dim=1))
    ec_out = module.ec(kjt) if module.ec is not None else None
    acc_out = module.acc(kjt) if module.acc is not None else None
    out = module.mask_and_pool(reordered, ec_out, None, acc_out, None, module.acc_pooled(kjt))
    assert out.keys() == [f.name for f in fields]
    nodes = _backward_node_names(out.values())
    assert "SelectBackward0" not in nodes and "UnbindBackward0" in nodes
    for f in fields:
        if not f.multi_hot:
            torch.testing.assert_close(out[f.name], parts[f.name])
