"""PME: exact global threshold across shards, capacity transfer to a budget, SNIP saliency."""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embdim.embedding_methods.base import FieldSpec
from embdim.embedding_methods.grouping import compact_group_weights, snap_widths
from embdim.embedding_methods.mask_aware import LocalSearchContext, copy_into_table
from embdim.embedding_methods.plan import GroupPlan
from embdim.embedding_methods.pme import PME, float_from_sort_key, float_sort_keys, global_threshold


class ThreadAllReduce:
    """Sum over simulated ranks running in threads (a barrier per collective)."""

    def __init__(self, world_size: int) -> None:
        self.barrier = threading.Barrier(world_size)
        self.slots: list[Any] = [None] * world_size

    def for_rank(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = torch.stack(self.slots).sum(0)
            self.barrier.wait()
            return total
        return all_reduce


def run_ranks(world_size: int, fn: Callable[[int, Callable], Any]) -> list[Any]:
    reducer, results, errors = ThreadAllReduce(world_size), [None] * world_size, []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank, reducer.for_rank(rank))
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)
            reducer.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def test_float_sort_keys_order_like_floats() -> None:
    x = torch.tensor([-3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf"), -float("inf")])
    keys = float_sort_keys(x)
    order = torch.argsort(x, stable=True)
    assert torch.all(keys[order][1:] >= keys[order][:-1])
    assert keys[2] == keys[3]  # -0.0 == 0.0
    for v, k in zip(x.tolist(), keys.tolist()):
        assert float_from_sort_key(k) == v


@pytest.mark.parametrize("keep_count", [0, 1, 7, 250, 251, 252, 300, 599, 600, 1000])
def test_global_threshold_exact_across_two_shards_with_ties(keep_count: int) -> None:
    gen = torch.Generator().manual_seed(0)
    # Heavy ties: 200 exact zeros, 100 entries of 0.5, negatives, and random values.
    scores = torch.cat([torch.zeros(200), torch.full((100,), 0.5), -torch.rand(50, generator=gen),
                        torch.rand(250, generator=gen)])[torch.randperm(600, generator=gen)]
    shards = [scores[:350].reshape(35, 10), scores[350:].reshape(25, 10)]

    def rank_fn(rank: int, all_reduce: Callable) -> Any:
        # Two chunks per shard, re-read on every pass.
        return global_threshold(lambda: (shards[rank][:20], shards[rank][20:]), keep_count, all_reduce)

    t0, t1 = run_ranks(2, rank_fn)
    assert t0 == t1
    k = min(keep_count, 600)
    assert t0.total == 600 and t0.keep_count == k
    if 0 < k < 600:
        v = torch.sort(scores, descending=True).values[k - 1].item()
        assert t0.value == v
        assert t0.num_above == int((scores > v).sum()) and t0.num_tied == int((scores == v).sum())
        assert 0 < t0.num_tied_kept <= t0.num_tied


def _fields(scale: int = 1) -> list[FieldSpec]:
    return [FieldSpec("a", 600 * scale, multi_hot=True), FieldSpec("b", 400 * scale), FieldSpec("c", 300 * scale)]


def _module_with_saliency(method: PME, saliency: dict[str, torch.Tensor]) -> Any:
    module = method.build_search_module(EmbeddingBagCollection(method.search_tables(), device=torch.device("cpu")))
    for name, values in saliency.items():
        copy_into_table(module, f"acc_{name}", values)
    module.num_steps.fill_(method.required_search_steps)  # as after the saliency batches
    return module


def _saliency(fields: list[FieldSpec], dim: int, seed: int = 0, tie_fraction: float = 0.3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for f in fields:
        s = torch.rand(f.num_embeddings, dim, generator=gen).pow(4)
        s[torch.rand(f.num_embeddings, generator=gen) < tie_fraction] = 0.0  # rows never touched
        s[torch.rand(f.num_embeddings, dim, generator=gen) < 0.05] = 0.25  # exact ties
        out[f.name] = s
    return out


def _counts(fields: list[FieldSpec], seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f.name: rng.zipf(1.5, f.num_embeddings).clip(max=1000) * (rng.random(f.num_embeddings) > 0.1)
            for f in fields}


class _HalfShardContext(LocalSearchContext):
    """Rank r of 2 sees half of every accumulator: half of the rows (row-wise sharding) or half of
    the columns of every row (column-wise, so tied rows straddle both ranks), simulated."""

    def __init__(self, module: nn.Module, rank: int, all_reduce: Callable, split: str, **kwargs: Any) -> None:
        super().__init__(module, all_reduce_sum=all_reduce, **kwargs)
        self.rank, self.split = rank, split

    def local_rows(self, table_name: str):
        for first, rows in super().local_rows(table_name):
            if self.split == "rows":
                half = rows.shape[0] // 2
                yield (first, rows[:half]) if self.rank == 0 else (first + half, rows[half:])
            else:
                half = rows.shape[1] // 2
                yield first, (rows[:, :half] if self.rank == 0 else rows[:, half:])


@pytest.mark.parametrize("split", ["rows", "columns"])
@pytest.mark.parametrize("keep_count", [1000, 4321, 15000])
def test_kept_entries_exact_and_identical_on_two_shards(keep_count: int, split: str) -> None:
    fields, dim = _fields(), 16
    method = PME(PME.Config(saliency_batches=1), fields, dim)
    module = _module_with_saliency(method, _saliency(fields, dim))
    counts = _counts(fields)

    def rank_fn(rank: int, all_reduce: Callable) -> Any:
        ctx = _HalfShardContext(module, rank, all_reduce, split, fields=fields, embedding_dim=dim, counts=counts)
        return method.kept_entries(ctx, keep_count)

    (kept0, t0), (kept1, t1) = run_ranks(2, rank_fn)
    single, t = method.kept_entries(LocalSearchContext(module, fields, dim, counts), keep_count)
    assert t0 == t1 == t
    for a, b, c in zip(kept0, kept1, single):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert sum(int(k.sum()) for k in single) == keep_count  # exact, ties included
    for f, k in zip(fields, single):
        assert np.all(k[counts[f.name] == 0] == 0)  # never-seen ids are pruned
        assert np.all(k <= dim)
    if keep_count == 4321:
        assert t.value == 0.25 and t.num_tied_kept < t.num_tied  # the boundary falls inside the planted ties
    if keep_count == 15000:
        # More than the positive scores: the boundary falls among the zero-saliency (untouched)
        # rows, which go to more frequent ids first.
        assert t.value == 0.0 and 0 < t.num_tied_kept < t.num_tied
        all_counts = np.concatenate([counts[f.name] for f in fields])
        all_kept = np.concatenate(single)
        sal = torch.cat([_saliency(fields, dim)[f.name] for f in fields])
        zero_rows = (sal == 0).all(1).numpy() & (all_counts > 0)
        taken = all_counts[zero_rows & (all_kept > 0)]
        left = all_counts[zero_rows & (all_kept == 0)]
        assert len(taken) and len(left) and taken.min() >= left.max()


@pytest.mark.parametrize("budget", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("snap", ["nearest", "down", "up"])
@pytest.mark.parametrize("layout", ["pad", "project"])
def test_budget_binds_from_below_after_snapping(budget: float, snap: str, layout: str) -> None:
    # Large enough that one group's projection (w x 16 params) is a small step of the budget.
    fields, dim = _fields(scale=20), 16
    method = PME(PME.Config(saliency_batches=1, snap=snap), fields, dim, layout=layout)
    module = _module_with_saliency(method, _saliency(fields, dim, seed=2))
    plan = method.export_plan(module, LocalSearchContext(module, fields, dim, _counts(fields), budget=budget))
    # At most the budget, and within budget_tolerance (1%) below it.
    assert 0.99 * budget <= plan.achieved_fraction() <= budget
    assert plan.budget == budget and plan.method == "pme" and plan.layout == layout
    assert plan.extra["fallbacks"] == []
    if layout == "pad":
        assert plan.num_projection_params() == 0 and plan.num_params() == plan.num_table_params()
    for f in plan.fields:
        assert all(g.width % 4 == 0 for g in f.groups)
        assert len({g.width for g in f.groups}) == len(f.groups)


def test_capped_groups_still_meet_budget() -> None:
    fields, dim = _fields(scale=20), 16
    method = PME(PME.Config(saliency_batches=1, max_groups=2), fields, dim)
    module = _module_with_saliency(method, _saliency(fields, dim, seed=3))
    plan = method.export_plan(module, LocalSearchContext(module, fields, dim, _counts(fields), budget=0.3))
    assert all(len(f.groups) <= 2 for f in plan.fields)
    assert 0.98 * 0.3 <= plan.achieved_fraction() <= 0.3


class _TinyCTR(nn.Module):
    def __init__(self, sparse: nn.Module, num_fields: int, dim: int) -> None:
        super().__init__()
        self.sparse = sparse
        self.top = nn.Sequential(nn.Linear(num_fields * dim, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.top(self.sparse(kjt).values()).squeeze(1)


def test_saliency_equals_abs_weight_times_grad_by_plain_autograd() -> None:
    torch.manual_seed(0)
    fields, dim = [FieldSpec("a", 30, multi_hot=True), FieldSpec("b", 20)], 8
    method = PME(PME.Config(saliency_batches=2), fields, dim)
    sparse = method.build_search_module(EmbeddingBagCollection(method.search_tables(), device=torch.device("cpu")))
    context = LocalSearchContext(sparse, fields, dim, {f.name: np.ones(f.num_embeddings, np.int64) for f in fields})
    method.init_search_state(sparse, context)
    model = _TinyCTR(sparse, len(fields), dim)
    tables = {f.name: context.gather_table_rows(f"t_{f.name}") for f in fields}
    rng = np.random.default_rng(0)
    expected = {f.name: torch.zeros(f.num_embeddings, dim) for f in fields}
    for step in range(3):  # the third batch lies after the saliency window
        # Distinct ids within a batch: then sum_o |e g_o| = |e sum_o g_o| = |E * dL/dE|.
        a_ids = rng.permutation(30)[:9]
        a_lengths = [3, 0, 2, 4]
        b_ids = rng.permutation(20)[:4]
        labels = torch.tensor(rng.integers(0, 2, 4), dtype=torch.float32)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=torch.tensor(np.r_[a_ids, b_ids]),
                                                  lengths=torch.tensor(a_lengths + [1] * 4))
        loss = nn.functional.binary_cross_entropy_with_logits(model(kjt), labels)
        # Plain autograd reference: the tables as leaves, embedding_bag sum pooling, same dense net.
        if step < 2:
            leaves = {n: w.clone().requires_grad_(True) for n, w in tables.items()}
            offsets = torch.tensor([0, 3, 3, 5])
            pooled_a = nn.functional.embedding_bag(torch.tensor(a_ids), leaves["a"], offsets, mode="sum")
            pooled_b = leaves["b"][torch.tensor(b_ids)]
            ref_logits = model.top(torch.cat([pooled_a, pooled_b], dim=1)).squeeze(1)
            ref_loss = nn.functional.binary_cross_entropy_with_logits(ref_logits, labels)
            grads = torch.autograd.grad(ref_loss, list(leaves.values()))
            for (n, w), g in zip(leaves.items(), grads):
                expected[n] += (w.detach() * g).abs()
            torch.testing.assert_close(loss, ref_loss)
        loss.backward()
        model.top.zero_grad()  # the dense net is not trained here, so both sides see the same one
    for f in fields:
        torch.testing.assert_close(context.gather_table_rows(f"acc_{f.name}"), expected[f.name])
        # freeze_tables: the tables did not move while saliency was measured.
        torch.testing.assert_close(context.gather_table_rows(f"t_{f.name}"), tables[f.name])
    assert sparse.saliency_steps_done() == 2


def test_export_refuses_incomplete_saliency_and_bad_config() -> None:
    fields = _fields()
    method = PME(PME.Config(saliency_batches=5, warmup_steps=2), fields, 16)
    assert method.required_search_steps == 7
    module = method.build_search_module(EmbeddingBagCollection(method.search_tables(), device=torch.device("cpu")))
    module.num_steps.fill_(4)  # two of five saliency batches
    with pytest.raises(RuntimeError, match="only 2 of saliency_batches=5"):
        method.export_plan(module, LocalSearchContext(module, fields, 16, _counts(fields), budget=0.5))
    with pytest.raises(ValueError, match="pme.snap"):
        PME.Config(snap="floor")
    with pytest.raises(ValueError, match="pme.saliency_batches"):
        PME.Config(saliency_batches=0)
    with pytest.raises(ValueError, match="pme.retrain_init"):
        PME.Config(retrain_init="rewind", freeze_tables=False)


def test_snap_rules() -> None:
    sizes = np.array([0, 1, 2, 3, 4, 5, 6, 7, 16])
    np.testing.assert_array_equal(snap_widths(sizes, 16, "nearest"), [0, 0, 4, 4, 4, 4, 8, 8, 16])
    np.testing.assert_array_equal(snap_widths(sizes, 16, "down"), [0, 0, 0, 0, 4, 4, 4, 4, 16])
    np.testing.assert_array_equal(snap_widths(sizes, 16, "up"), [0, 4, 4, 4, 4, 8, 8, 8, 16])
    with pytest.raises(ValueError):
        snap_widths(np.array([17]), 16)


def test_rewind_keeps_most_salient_entries_packed_left() -> None:
    weight = torch.arange(24.0).reshape(3, 8)
    saliency = torch.tensor([[0, 9, 0, 0, 5, 0, 7, 1], [1] * 8, [0] * 8], dtype=torch.float32)
    table, projection = compact_group_weights(weight, GroupPlan(width=4, ids=np.array([0, 1, 2])), 8,
                                              column_scores=saliency)
    torch.testing.assert_close(table[0], weight[0, [1, 4, 6, 7]])  # top 4 by saliency, column order
    torch.testing.assert_close(table[1], weight[1, :4])  # all tied: lower columns
    torch.testing.assert_close(projection, torch.eye(4, 8))


def test_rewind_retrain_state_loads_into_the_compact_module() -> None:
    from embdim.embedding_methods.mixed_dim import build_retrain_module, table_name_for_feature

    fields, dim = _fields(), 16
    method = PME(PME.Config(saliency_batches=1, retrain_init="rewind"), fields, dim)
    assert method.wants_retrain_init()
    saliency = _saliency(fields, dim, seed=4)
    module = _module_with_saliency(method, saliency)
    plan = method.export_plan(module, LocalSearchContext(module, fields, dim, _counts(fields), budget=0.3))
    state = method.retrain_init_state(module, None, plan)
    retrain = build_retrain_module(plan, device="cpu")
    retrain.load_state_dict(state)  # strict: every table and projection present, right shapes
    field = plan.field("b")
    group = field.groups[-1]
    row, raw_id = len(group.ids) // 2, int(group.ids[len(group.ids) // 2])
    weight = module.full_table("t_b")
    kept_columns = torch.sort(torch.sort(saliency["b"][raw_id], descending=True, stable=True).indices[:group.width]).values
    name = table_name_for_feature(f"b@g{len(field.groups) - 1}")
    torch.testing.assert_close(retrain.ebc.embedding_bags[name].weight[row], weight[raw_id, kept_columns])
    assert PME(PME.Config(saliency_batches=1), fields, dim).retrain_init_state(module, None, plan) is None


@pytest.mark.parametrize("weak_field", [False, True])
@pytest.mark.parametrize("budget", [0.1, 0.3, 0.6, 0.9])
@pytest.mark.parametrize("layout", ["pad", "project"])
def test_tiny_tables_meet_budget_by_moving_single_ids(budget: float, weak_field: bool, layout: str) -> None:
    # 106 ids x 16: snapping moves blocks of ids, so no keep count alone lands within 1% below the
    # budget. pad: single ids move one width step (4 params) each, so the plan ends within a few
    # parameters. project: one group's projection (w x 16 params) is several percent of the
    # budget; ids move between present widths (and, when the threshold pruned a whole weak field,
    # a group opens there).
    fields, dim = [FieldSpec("c0", 40), FieldSpec("c1", 24), FieldSpec("c2", 12), FieldSpec("c3", 30, True)], 16
    method = PME(PME.Config(saliency_batches=1), fields, dim, layout=layout)
    saliency = _saliency(fields, dim, seed=5, tie_fraction=0.1)
    if weak_field:
        saliency["c0"] = (saliency["c0"] + 1e-3) * 1e-6  # all positive, all below the other fields
    module = _module_with_saliency(method, saliency)
    plan = method.export_plan(module, LocalSearchContext(module, fields, dim, _counts(fields), budget=budget))
    target = budget * plan.full_params()
    assert plan.num_params() <= target
    if layout == "pad":
        assert target - plan.num_params() < 4 + 0.01 * target and plan.extra["fallbacks"] == []
    elif budget >= 0.3:  # at 0.1 the projections alone are most of the budget
        assert plan.num_params() >= 0.98 * target
    plan.validate()


@pytest.mark.parametrize("warmup", [0, 30])
def test_saliency_steps_adapt_to_a_short_search(warmup: int) -> None:
    from embdim.embedding_methods.base import TrainingSchedule

    fields, dim = _fields(scale=1), 16
    # 200k synthetic rows on 2 ranks: 78 batches per epoch, fewer than the default S = 100.
    schedule = TrainingSchedule(steps_per_epoch=78, epochs=1, world_size=2, batch_size=1024)
    method = PME(PME.Config(warmup_steps=warmup), fields, dim)
    notes = method.fit_schedule(schedule)
    assert method.required_search_steps == 78 and method.config.saliency_batches >= 1
    assert method.config.warmup_steps == (0 if warmup == 0 else 30 * 78 // 130)
    assert len(notes) == 1 and "saliency_batches 100 -> " in notes[0] and "78 steps" in notes[0]
    assert ("warmup_steps 30 -> " in notes[0]) == bool(warmup) and method.adaptations == notes
    module = method.build_search_module(EmbeddingBagCollection(method.search_tables()))
    assert (module.saliency_start, module.saliency_stop) == (method.config.warmup_steps, 78)  # the fitted values
    # Enough steps (or max_steps capping more epochs): nothing changes.
    fitted = PME(PME.Config(), fields, dim)
    assert fitted.fit_schedule(TrainingSchedule(steps_per_epoch=78, epochs=2)) == [] and fitted.adaptations == []
    capped = PME(PME.Config(), fields, dim)
    assert capped.fit_schedule(TrainingSchedule(steps_per_epoch=78, epochs=3, max_steps=40))
    assert capped.config.saliency_batches == 40
    with pytest.raises(ValueError, match="train.epochs"):
        PME(PME.Config(), fields, dim).fit_schedule(TrainingSchedule(steps_per_epoch=78, epochs=0))
