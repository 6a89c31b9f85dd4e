"""OptEmbed: BinaryStep, the supernet's masks, batched candidate scoring, binned AUC, evolution, export."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embdim.embedding_methods.base import FieldSpec
from embdim.embedding_methods.plan import GroupPlan
from embdim.embedding_methods.optembed import (
    BinaryStep,
    CandidateAUC,
    OptEmbed,
    OptEmbedSupernet,
    allowed_widths,
    candidate_logits,
    crossover,
    evolutionary_search,
    inherited_weights,
    mutate,
    optembed_param_count,
    repair_to_budget,
)
from tests.tolerance import assert_close_sums

D = 16


def make_method(fields: list[FieldSpec], **overrides: Any) -> OptEmbed:
    return OptEmbed(OptEmbed.Config(**overrides), fields, D)


def make_supernet(method: OptEmbed, seed: int = 0) -> OptEmbedSupernet:
    torch.manual_seed(seed)
    return method.build_search_module(EmbeddingBagCollection(tables=method.search_tables()))


def table_weight(supernet: OptEmbedSupernet, field_name: str) -> torch.Tensor:
    return supernet.ebc.embedding_bags[OptEmbed.table_name(field_name)].weight


def make_kjt(fields: list[FieldSpec], ids: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    """KJT from per-field lists of per-sample id lists (key-major layout)."""
    values, lengths = [], []
    for f in fields:
        for bag in ids[f.name]:
            values.extend(bag)
            lengths.append(len(bag))
    return KeyedJaggedTensor.from_lengths_sync(keys=[f.name for f in fields], values=torch.tensor(values),
                                               lengths=torch.tensor(lengths))


def random_single_hot(fields: list[FieldSpec], batch_size: int, gen: torch.Generator) -> dict[str, list[list[int]]]:
    return {f.name: [[int(torch.randint(f.num_embeddings, (1,), generator=gen))] for _ in range(batch_size)]
            for f in fields}


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    positives = labels > 0.5
    num_pos, num_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


# --------------------------------------------------------------------------------------------- masks


def test_binary_step_forward_and_piecewise_gradient() -> None:
    z = torch.tensor([0.1, 0.5, 1.5, -0.2, -0.7, 0.0, 1.0, -1.2, 0.4], requires_grad=True)
    out = BinaryStep.apply(z)
    assert out.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    (out * 3.0).sum().backward()
    # g(z) = 2 - 4|z| on |z| <= 0.4, 0.4 on (0.4, 1], 0 beyond; scaled by the upstream 3.
    expected = 3.0 * torch.tensor([1.6, 0.4, 0.0, 1.2, 0.4, 2.0, 0.4, 0.0, 0.4])
    torch.testing.assert_close(z.grad, expected)


def test_thresholds_get_gradient_and_regularizer_raises_them() -> None:
    fields = [FieldSpec("a", 6), FieldSpec("b", 6), FieldSpec("m", 6, multi_hot=True)]
    method = make_method(fields, alpha=0.5, threshold_lr=0.1)
    supernet = make_supernet(method)
    with torch.no_grad():
        for f in fields:  # every row's L1 norm is 0.5 * D = 8; thresholds at 7.5 put z = 0.5 in (0, 1]
            table_weight(supernet, f.name).fill_(0.5)
        supernet.thresholds.fill_(7.5)
    supernet.train()
    kjt = make_kjt(fields, {"a": [[0], [1]], "b": [[2], [3]], "m": [[0, 1], [2]]})
    supernet(kjt).values().sum().backward()
    grad = supernet.thresholds.grad
    assert grad[0] < 0 and grad[1] < 0  # raising t lowers the mask, which lowers the sum
    assert grad[2] == 0  # multi-hot rows are not pruned during search

    supernet.thresholds.grad = None
    (optimizer,) = method.extra_optimizers(supernet)
    assert method.extra_parameters(supernet) == [supernet.thresholds]
    before = supernet.thresholds.detach().clone()
    method.search_loss(supernet).backward()
    optimizer.step()
    after = supernet.thresholds.detach()
    # d/dt of alpha * exp(-t) is -alpha * exp(-t): one SGD step raises t by lr * alpha * exp(-t).
    step = 0.1 * 0.5 * torch.exp(-before[:2])
    torch.testing.assert_close(after[:2], before[:2] + step)
    assert bool((after[:2] > before[:2]).all())
    assert after[2] == before[2]


@pytest.mark.parametrize("norm", [1, 2])
def test_row_below_threshold_is_zeroed(norm: int) -> None:
    fields = [FieldSpec("a", 8), FieldSpec("b", 8)]
    method = make_method(fields, norm=norm)
    supernet = make_supernet(method).eval()
    weight_a = table_weight(supernet, "a").detach()
    norms = weight_a.abs().sum(1) if norm == 1 else weight_a.norm(dim=1)
    cut = float(norms.sort().values[3:5].mean())  # between the 4th and 5th smallest norms
    with torch.no_grad():
        supernet.thresholds.copy_(torch.tensor([cut, -1.0]))
    ids = list(range(8))
    out = supernet(make_kjt(fields, {"a": [[i] for i in ids], "b": [[i] for i in ids]})).to_dict()
    below = norms <= cut
    assert int(below.sum()) == 4
    assert bool((out["a"][below] == 0).all())
    torch.testing.assert_close(out["a"][~below], weight_a[~below])
    torch.testing.assert_close(out["b"], table_weight(supernet, "b").detach())


def _composed_training_mask(supernet: OptEmbedSupernet, pooled: torch.Tensor, keys: list[str]) -> torch.Tensor:
    """The training-mode mask as it was written before ``_RowAndWidthMask``: each step its own
    autograd node (``_row_norm``, ``BinaryStep``, ``where``, two ``[B, F, D]`` products)."""
    from embdim.embedding_methods.optembed import _row_norm

    batch = pooled.shape[0]
    x = pooled.reshape(batch, len(keys), D)
    index = supernet._field_index(keys)
    prune_rows, widths = supernet._constants()
    z = _row_norm(x, supernet.norm) - supernet.thresholds[index]
    row_mask = torch.where(prune_rows[index], BinaryStep.apply(z), torch.ones_like(z))
    x = x * row_mask.unsqueeze(-1)
    draw = torch.randint(len(widths), (batch, len(keys)))
    x = x * (torch.arange(D) < widths[draw].unsqueeze(-1)).to(x.dtype)
    return x.reshape(batch, len(keys) * D)


@pytest.mark.parametrize("norm", [1, 2])
def test_fused_training_mask_equals_the_composed_formula(norm: int) -> None:
    """``_RowAndWidthMask`` (the training step's mask in one autograd node) gives the values of the
    composed formula bit for bit and its gradients (pooled values and thresholds)."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    fields = [FieldSpec("a", 8), FieldSpec("b", 8), FieldSpec("m", 8, multi_hot=True), FieldSpec("c", 8)]
    supernet = make_supernet(make_method(fields, norm=norm)).train()
    keys = ["b", "m", "a", "c"]  # a sharded collection's key order
    torch.manual_seed(5)
    pooled = torch.randn(64, len(keys) * D)
    rows = pooled.reshape(64, len(keys), D)
    norms = rows.abs().sum(-1) if norm == 1 else rows.norm(dim=-1)
    with torch.no_grad():  # thresholds near the median norm: rows on both sides, slopes of every piece
        supernet.thresholds.copy_(norms.median(0).values[[keys.index(f.name) for f in fields]] + 0.3)
    coef = torch.randn(64, len(keys) * D)
    results = []
    for fused in (True, False):
        values = pooled.clone().requires_grad_(True)
        supernet.thresholds.grad = None
        torch.manual_seed(11)  # the same width draw
        if fused:
            out = supernet.mask_pooled(KeyedTensor(keys=keys, length_per_key=[D] * len(keys), values=values)).values()
        else:
            out = _composed_training_mask(supernet, values, keys)
        (out * coef).sum().backward()
        results.append((out.detach(), values.grad, supernet.thresholds.grad.clone()))
    (out_f, gv_f, gt_f), (out_c, gv_c, gt_c) = results
    assert torch.equal(out_f, out_c)
    pruned = (out_f.reshape(64, len(keys), D) == 0).all(-1)
    assert 0 < int(pruned.sum()) < pruned.numel() and not pruned[:, 1].any()  # some rows pruned, never "m"
    assert_close_sums(gv_f, gv_c)
    torch.testing.assert_close(gt_f, gt_c, rtol=1e-5, atol=1e-5)
    assert float(gt_f[:2].abs().sum()) > 0 and gt_f[2] == 0  # the multi-hot field's threshold gets none


def test_dim_mask_keeps_a_prefix_of_allowed_widths() -> None:
    fields = [FieldSpec("a", 4), FieldSpec("b", 4)]
    method = make_method(fields)
    supernet = make_supernet(method)
    with torch.no_grad():
        for f in fields:
            table_weight(supernet, f.name).fill_(1.0)  # norm D > threshold 0: no row is pruned
    batch = 400
    kjt = make_kjt(fields, {f.name: [[i % 4] for i in range(batch)] for f in fields})
    supernet.train()
    x = supernet(kjt).values().reshape(batch, 2, D)
    widths = (x != 0).sum(-1)
    # The kept dims are exactly the first w (a prefix), w drawn only from {4, 8, 12, 16}.
    prefix = torch.arange(D) < widths.unsqueeze(-1)
    assert bool((x == prefix.float()).all())
    assert set(widths.flatten().tolist()) == {4, 8, 12, 16}
    supernet.eval()
    assert bool((supernet(kjt).values() == 1).all())  # eval: no dim mask
    supernet.set_candidate_widths([8, 12])
    x = supernet(kjt).values().reshape(batch, 2, D)
    assert (x != 0).sum(-1)[:, 0].unique().tolist() == [8] and (x != 0).sum(-1)[:, 1].unique().tolist() == [12]
    with pytest.raises(ValueError, match="multiples of 4"):
        supernet.set_candidate_widths([6, 12])


def test_multi_hot_rows_are_kept_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    fields = [FieldSpec("a", 5), FieldSpec("m", 5, multi_hot=True)]
    method = make_method(fields)
    with caplog.at_level(logging.WARNING, logger="embdim.embedding_methods.optembed"):
        supernet = make_supernet(method).eval()
    assert sum("multi-hot" in r.message for r in caplog.records) == 1
    with torch.no_grad():
        supernet.thresholds.fill_(1e6)  # would prune every row
    kjt = make_kjt(fields, {"a": [[0], [1]], "m": [[0, 1, 2], [3]]})
    out = supernet(kjt).to_dict()
    assert bool((out["a"] == 0).all())
    torch.testing.assert_close(out["m"], supernet.ebc(kjt).to_dict()["m"])


def test_meta_construction_and_fx_trace_keep_the_collection_call_visible() -> None:
    fields = [FieldSpec("a", 6), FieldSpec("b", 5)]
    method = make_method(fields, threshold_init=0.3)
    meta = method.build_search_module(EmbeddingBagCollection(tables=method.search_tables(), device="meta"))
    assert meta.thresholds.is_meta
    # What DMP's init does with a meta parameter: allocate it on the device, then reset_parameters().
    meta.thresholds = torch.nn.Parameter(torch.empty_like(meta.thresholds, device="cpu"))
    meta.reset_parameters()
    torch.testing.assert_close(meta.thresholds.detach(), torch.full((2,), 0.3))

    from torchrec.fx import Tracer

    supernet = make_supernet(method)
    dlrm = make_dlrm("dot", supernet).eval()
    # The train pipeline traces the model with the (sharded) collection as a leaf; the masking
    # must be one opaque node after it and the traced model must compute the same logits.
    graph = Tracer(leaf_modules=["EmbeddingBagCollection"]).trace(dlrm)
    targets = [n.target for n in graph.nodes if n.op in ("call_module", "call_function")]
    assert "sparse_arch.embedding_bag_collection.ebc" in targets
    assert any(getattr(t, "__name__", "") == "_mask_pooled" for t in targets)
    traced = torch.fx.GraphModule(dlrm, graph)
    gen = torch.Generator().manual_seed(0)
    kjt = make_kjt(fields, random_single_hot(fields, 5, gen))
    dense = torch.randn(5, 3, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(traced(dense, kjt), dlrm(dense, kjt))


# ------------------------------------------------------------------------------------------ scoring


def make_dlrm(kind: str, supernet: OptEmbedSupernet, num_dense: int = 3) -> torch.nn.Module:
    torch.manual_seed(1)
    if kind == "dot":
        return DLRM(embedding_bag_collection=supernet, dense_in_features=num_dense,
                    dense_arch_layer_sizes=[8, D], over_arch_layer_sizes=[8, 1])
    return DLRM_DCN(embedding_bag_collection=supernet, dense_in_features=num_dense, dense_arch_layer_sizes=[8, D],
                    over_arch_layer_sizes=[8, 1], dcn_num_layers=2, dcn_low_rank_dim=4)


@pytest.mark.parametrize("kind", ["dot", "dcn"])
def test_candidate_logits_equal_separate_forwards(kind: str) -> None:
    fields = [FieldSpec("a", 10), FieldSpec("b", 12), FieldSpec("c", 7)]
    method = make_method(fields)
    supernet = make_supernet(method)
    dlrm = make_dlrm(kind, supernet).eval()
    weight_a = table_weight(supernet, "a").detach()
    with torch.no_grad():
        supernet.thresholds.copy_(torch.tensor([float(weight_a.abs().sum(1).median()), -1.0, -1.0]))
    gen = torch.Generator().manual_seed(0)
    batch = 9
    ids = random_single_hot(fields, batch, gen)
    kjt = make_kjt(fields, ids)
    dense = torch.randn(batch, 3, generator=gen)
    widths = torch.tensor([[4, 8, 16], [16, 16, 16], [12, 4, 4], [8, 8, 8], [4, 16, 12]])
    with torch.no_grad():
        # Reference: the supernet's own row mask and candidate widths, one full DLRM forward each.
        expected = []
        for w in widths.tolist():
            supernet.set_candidate_widths(w)
            expected.append(dlrm(dense, kjt).squeeze(-1))
        supernet.set_candidate_widths(None)
        # Batched: no row mask in the module, the per-sample keep flags passed instead.
        supernet.apply_row_mask = False
        pooled = supernet(kjt).to_dict()
        keep_a = weight_a.abs().sum(1) > supernet.thresholds[0]
        row_keep = {"a": keep_a[torch.tensor([bag[0] for bag in ids["a"]])]}
        assert not bool(row_keep["a"].all())
        got = candidate_logits(dlrm, dense, pooled, widths, row_keep, max_rows=2 * batch)  # 3 chunks
    assert_close_sums(got, torch.stack(expected))


@pytest.mark.parametrize("kind", ["dot", "dcn"])
def test_candidate_logits_with_per_candidate_row_pruning(kind: str) -> None:
    """Candidate p keeps the rows whose norm rank is below its keep count: the same logits as a
    DLRM forward over tables whose other rows are zeroed."""
    from embdim.embedding_methods.optembed import _norm_ranks, _sample_rank

    fields = [FieldSpec("a", 10), FieldSpec("b", 12), FieldSpec("c", 7, multi_hot=True)]
    method = make_method(fields)
    supernet = make_supernet(method)
    dlrm = make_dlrm(kind, supernet).eval()
    supernet.apply_row_mask = False
    gen = torch.Generator().manual_seed(3)
    batch = 11
    ids = random_single_hot(fields[:2], batch, gen)
    ids["c"] = [[int(x) for x in torch.randint(7, (2,), generator=gen)] for _ in range(batch)]
    kjt = make_kjt(fields, ids)
    dense = torch.randn(batch, 3, generator=gen)
    norms = {f.name: table_weight(supernet, f.name).detach().abs().sum(1).numpy() for f in fields[:2]}
    thresholded = {"a": norms["a"] > np.median(norms["a"]), "b": np.ones(12, dtype=bool)}
    ranks = {n: _norm_ranks(norms[n], thresholded[n]) for n in ("a", "b")}
    widths = torch.tensor([[4, 8, 16], [16, 16, 16], [12, 4, 4], [8, 8, 8]])
    counts = torch.tensor([[5, 12, 7], [0, 3, 7], [2, 12, 7], [4, 1, 7]])  # rows kept of a, b (c: all)
    with torch.no_grad():
        jagged = kjt.to_dict()
        row_rank = {n: _sample_rank(jagged[n], torch.from_numpy(ranks[n])) for n in ("a", "b")}
        got = candidate_logits(dlrm, dense, supernet(kjt).to_dict(), widths, row_rank=row_rank, keep_counts=counts,
                               max_rows=2 * batch)
        expected = []
        originals = {n: table_weight(supernet, n).detach().clone() for n in ("a", "b")}
        for w, n in zip(widths.tolist(), counts.tolist()):
            for name, count in zip(("a", "b"), n):
                keep = torch.from_numpy(ranks[name] < count)
                table_weight(supernet, name).copy_(originals[name] * keep.unsqueeze(1))
            supernet.set_candidate_widths(w)
            expected.append(dlrm(dense, kjt).squeeze(-1))
        for name, weight in originals.items():
            table_weight(supernet, name).copy_(weight)
        supernet.set_candidate_widths(None)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-6)
    # The ranks order the thresholded rows by norm; the others rank last.
    a = ranks["a"]
    assert sorted(a[thresholded["a"]].tolist()) == list(range(int(thresholded["a"].sum())))
    assert (a[~thresholded["a"]] == thresholded["a"].sum()).all()
    assert norms["a"][a == 0][0] == norms["a"][thresholded["a"]].max()


def test_candidate_auc_matches_exact_auc_and_merges() -> None:
    rng = np.random.default_rng(0)
    num = 6000
    labels = (rng.random(num) < 0.3).astype(np.float32)
    logits = np.stack([labels * s + rng.normal(size=num) - 1.0 for s in (0.0, 0.5, 2.0)]).astype(np.float32)
    whole = CandidateAUC(3)
    whole.update(torch.from_numpy(logits), torch.from_numpy(labels))
    exact = [exact_auc(row.astype(np.float64), labels) for row in logits]
    binned = whole.compute().numpy()
    np.testing.assert_allclose(binned, exact, atol=1e-3)
    assert np.all(np.abs(binned - exact) <= whole.error_bound().numpy() + 1e-12)
    assert binned[2] > binned[1] > binned[0] - 0.05

    # Two "ranks" with half the data each: the summed state gives the same counts and AUCs.
    first, second = CandidateAUC(3), CandidateAUC(3)
    first.update(torch.from_numpy(logits[:, :2500]), torch.from_numpy(labels[:2500]))
    second.update(torch.from_numpy(logits[:, 2500:]), torch.from_numpy(labels[2500:]))
    merged = CandidateAUC(3)
    merged.load_state(first.state() + second.state())
    assert torch.equal(merged.state(), whole.state())
    assert torch.equal(merged.compute(), whole.compute())

    one_class = CandidateAUC(1)
    one_class.update(torch.zeros(1, 4), torch.zeros(4))
    assert math.isnan(float(one_class.compute()[0]))


# ---------------------------------------------------------------------------------------- evolution


def test_mutation_and_crossover_operators() -> None:
    rng = np.random.default_rng(0)
    widths = allowed_widths(32)
    parent = np.full(6, 32, dtype=np.int64)
    drawn = set()
    for _ in range(300):
        child = mutate(parent, widths, 0.1, rng)
        assert not np.array_equal(child, parent)  # a mutation always changes something
        drawn.update(child.tolist())
    assert np.all(parent == 32)  # the parent is copied, never edited (reference bug)
    assert 4 in drawn  # the narrowest width can be drawn (reference draws from [1, D))

    a, b = np.arange(1, 6) * 4, np.arange(6, 11) * 4
    points = set()
    for _ in range(200):
        child, point = crossover(a, b, rng)
        assert 1 <= point <= 4  # in [1, F-1], not [1, latent_dim]
        assert np.array_equal(child, np.concatenate([a[:point], b[point:]]))
        points.add(point)
    assert points == {1, 2, 3, 4}

    # Width and keep-level genes of a field travel together (gene g of field f at g * F + f).
    a, b = np.array([4, 8, 12, 1, 2, 3]), np.array([16, 16, 16, 9, 9, 9])
    for _ in range(20):
        child, point = crossover(a, b, rng, num_units=3)
        assert point in (1, 2)
        for f in range(3):
            source = a if f < point else b
            assert child[f] == source[f] and child[3 + f] == source[3 + f]
    # Per-gene choices: a gene with one choice never moves.
    genes = [widths] * 3 + [np.arange(1, 5)] * 2 + [np.array([4])]
    parent = np.array([32, 32, 32, 4, 4, 4])
    for _ in range(100):
        child = mutate(parent, genes, 0.5, rng)
        assert child[5] == 4 and all(np.isin(c, g) for c, g in zip(child, genes))


def test_repair_grows_candidates_into_the_budget_window() -> None:
    rng = np.random.default_rng(0)
    rows = np.array([1000, 300, 50])
    genes = [allowed_widths(16)] * 3 + [np.arange(1, 9)] * 3

    def params(c: np.ndarray) -> np.ndarray:
        c = np.atleast_2d(c)
        return optembed_param_count(c[:, 3:] * rows // 8, c[:, :3], 16, "pad")

    budget = 0.1 * rows.sum() * 16
    for _ in range(50):
        start = np.array([rng.choice(g) for g in genes])
        repaired = repair_to_budget(start, genes, params, budget, rng, min_params=0.95 * budget)
        assert 0.95 * budget <= params(repaired)[0] <= budget
    # Without min_params: the reference's repair, only shrinking.
    small = np.array([4, 4, 4, 1, 1, 1])
    assert np.array_equal(repair_to_budget(small, genes, params, budget, rng), small)


def planted_problem(seed: int) -> tuple[Callable, Callable, float, np.ndarray]:
    """AUC-like fitness peaking at a planted width vector that fits the budget exactly."""
    rng = np.random.default_rng(100 + seed)
    num_fields, dim = 10, 32
    rows = rng.integers(50, 2000, size=num_fields)
    planted = rng.choice(allowed_widths(dim), size=num_fields)

    def param_count(c: np.ndarray) -> np.ndarray:
        return optembed_param_count(rows, c, dim, "project")

    importance = rng.uniform(0.5, 2.0, size=num_fields)

    def fitness(c: np.ndarray) -> np.ndarray:
        return 0.8 - 1e-3 * ((np.asarray(c) - planted) / 4.0) ** 2 @ importance

    return fitness, param_count, float(param_count(planted[None])[0]), planted


def test_evolution_beats_random_search_within_budget() -> None:
    wins, evo_total, random_total = 0, 0.0, 0.0
    for seed in range(4):
        fitness, param_count, budget, planted = planted_problem(seed)
        widths = allowed_widths(32)
        evaluated: list[np.ndarray] = []

        def counted(cands: np.ndarray) -> np.ndarray:
            assert np.all(param_count(cands) <= budget)  # every scored candidate is within budget
            assert np.all(np.isin(cands, widths))
            for c in cands:  # the cache means no candidate is scored twice
                assert not any(np.array_equal(c, e) for e in evaluated)
            evaluated.extend(cands)
            return fitness(cands)

        best, history = evolutionary_search(
            counted, num_fields=10, allowed_widths=widths, param_count_fn=param_count, budget_params=budget,
            generations=15, keep_num=5, mutation_num=10, crossover_num=10, mutation_prob=0.1, patience=0,
            rng=np.random.default_rng(seed))
        assert param_count(best[None])[0] <= budget
        evo_best = float(fitness(best[None])[0])
        assert evo_best == max(float(fitness(e[None])[0]) for e in evaluated) == history[-1]["best_fitness"]

        rng = np.random.default_rng(1000 + seed)
        random_cands = np.stack([repair_to_budget(rng.choice(widths, size=10), widths, param_count, budget, rng)
                                 for _ in range(len(evaluated))])
        random_best = float(fitness(random_cands).max())
        wins += evo_best >= random_best
        evo_total += evo_best
        random_total += random_best
    assert wins == 4 and evo_total > random_total


def test_evolution_is_deterministic_keeps_best_ever_and_stops_early() -> None:
    fitness, param_count, budget, _ = planted_problem(0)
    noise = np.random.default_rng(5)
    noisy_cache: dict = {}

    def noisy(cands: np.ndarray) -> np.ndarray:
        # Fixed per-candidate noise, so the search sees plateaus and worse children.
        for c in cands:
            noisy_cache.setdefault(tuple(c), float(noise.normal(0, 0.05)))
        return fitness(cands) + np.array([noisy_cache[tuple(c)] for c in cands])

    kwargs = dict(num_fields=10, allowed_widths=allowed_widths(32), param_count_fn=param_count,
                  budget_params=budget, generations=12, keep_num=0, mutation_num=6, crossover_num=6,
                  mutation_prob=0.2, patience=0)
    best_a, history_a = evolutionary_search(fitness, rng=np.random.default_rng(3), **kwargs)
    best_b, history_b = evolutionary_search(fitness, rng=np.random.default_rng(3), **kwargs)
    assert np.array_equal(best_a, best_b) and history_a == history_b
    _, history_c = evolutionary_search(fitness, rng=np.random.default_rng(4), **kwargs)
    assert history_c != history_a

    # keep_num=0: the population forgets its best; the returned candidate is still the best seen.
    best, history = evolutionary_search(noisy, rng=np.random.default_rng(3), **kwargs)
    assert noisy_cache[tuple(best)] + float(fitness(best[None])[0]) == max(
        noisy_cache[c] + float(fitness(np.array(c)[None])[0]) for c in noisy_cache)
    assert all(h["best_fitness"] >= h["population_best"] for h in history)
    assert any(h["best_fitness"] > h["population_best"] for h in history)

    # A constant fitness never improves after generation 0: patience 2 stops after 3 generations.
    _, history = evolutionary_search(lambda c: np.zeros(len(c)), rng=np.random.default_rng(0),
                                     **{**kwargs, "patience": 2})
    assert len(history) == 3

    with pytest.raises(ValueError, match="narrowest"):
        evolutionary_search(fitness, rng=np.random.default_rng(0), **{**kwargs, "budget_params": 10.0})


# ------------------------------------------------------------------------------------------- export


@dataclass
class Batch:
    dense_features: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor


class FakeContext:
    """``SearchContext`` over an unsharded EBC on one process: rows come in row and column shards."""

    def __init__(self, budget: float, fields: list[FieldSpec], supernet: OptEmbedSupernet, dlrm: torch.nn.Module,
                 batches: list[Batch]) -> None:
        self.budget = budget
        self.embedding_dim = D
        self.fields = fields
        self.supernet = supernet
        self.dlrm = dlrm
        self.batches = batches
        self.num_evaluations = 0

    def local_rows(self, table_name: str) -> Iterator[tuple[int, torch.Tensor]]:
        weight = self.supernet.ebc.embedding_bags[table_name].weight.detach()
        half = weight.shape[0] // 2
        yield 0, weight[:half]  # a row-wise shard
        yield half, weight[half:, : D // 2]  # a column-wise split of the other rows
        yield half, weight[half:, D // 2:]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather_table_rows(self, table_name: str) -> torch.Tensor:
        return self.supernet.ebc.embedding_bags[table_name].weight.detach()

    def evaluate(self, score_fn: Callable[[Any], None]) -> None:
        self.num_evaluations += 1
        self.dlrm.eval()
        for batch in self.batches:
            score_fn(batch)

    def counts(self, field_name: str) -> np.ndarray:
        field = next(f for f in self.fields if f.name == field_name)
        return np.zeros(field.num_embeddings, dtype=np.int64)


EXPORT_FIELDS = [FieldSpec("a", 20), FieldSpec("b", 30), FieldSpec("c", 40), FieldSpec("m", 10, multi_hot=True)]


def export_setup(budget: float) -> tuple[OptEmbed, OptEmbedSupernet, torch.nn.Module, FakeContext, dict]:
    method = make_method(EXPORT_FIELDS, generations=4, keep_num=3, mutation_num=4, crossover_num=4)
    supernet = make_supernet(method)
    dlrm = make_dlrm("dot", supernet)
    cuts = {}
    with torch.no_grad():
        for i, f in enumerate(EXPORT_FIELDS):
            norms = table_weight(supernet, f.name).abs().sum(1).sort().values
            middle = f.num_embeddings // 2
            cuts[f.name] = float((norms[middle - 1] + norms[middle]) / 2)  # half of the rows fall below
            supernet.thresholds[i] = cuts[f.name]
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = random_single_hot(EXPORT_FIELDS[:3], 64, gen)
        ids["m"] = [[int(x) for x in torch.randint(10, (2,), generator=gen)] for _ in range(64)]
        batches.append(Batch(torch.randn(64, 3, generator=gen), make_kjt(EXPORT_FIELDS, ids),
                             (torch.rand(64, generator=gen) < 0.4).float()))
    method.bind_model(dlrm)
    return method, supernet, dlrm, FakeContext(budget, EXPORT_FIELDS, supernet, dlrm, batches), cuts


def _candidate_auc_by_zeroed_rows(method: OptEmbed, supernet: OptEmbedSupernet, dlrm: torch.nn.Module,
                                  context: FakeContext, plan) -> float:
    """The validation AUC of a plan computed independently of ``candidate_logits``: the supernet
    with its pruned rows zeroed and the plan's widths, one DLRM forward per batch."""
    originals = {}
    with torch.no_grad():
        for f, fp in zip(EXPORT_FIELDS, plan.fields):
            weight = table_weight(supernet, f.name)
            originals[f.name] = weight.detach().clone()
            keep = torch.zeros(f.num_embeddings, dtype=torch.bool)
            for g in fp.groups:
                keep[torch.as_tensor(g.ids) if g.ids is not None else slice(None)] = True
            weight.mul_(keep.unsqueeze(1))
        dlrm.eval()
        supernet.apply_row_mask = False
        supernet.set_candidate_widths([fp.groups[0].width if fp.groups else 4 for fp in plan.fields])
        logits = torch.cat([dlrm(b.dense_features, b.sparse_features).squeeze(-1) for b in context.batches])
        supernet.set_candidate_widths(None)
        supernet.apply_row_mask = True
        for name, weight in originals.items():
            table_weight(supernet, name).copy_(weight)
    labels = torch.cat([b.labels for b in context.batches])
    return exact_auc(logits.double().numpy(), labels.numpy())


def _check_kept_rows(supernet: OptEmbedSupernet, cuts: dict, plan) -> None:
    """Every field keeps the highest-norm rows among those its threshold kept."""
    for f, fp in zip(EXPORT_FIELDS, plan.fields):
        if not fp.groups:
            continue
        (group,) = fp.groups
        assert group.width % 4 == 0 and 4 <= group.width <= D
        norms = table_weight(supernet, f.name).detach().abs().sum(1).numpy()
        above = norms > cuts[f.name] if not f.multi_hot else np.ones_like(norms, dtype=bool)
        kept = np.arange(f.num_embeddings) if group.ids is None else group.ids
        assert above[kept].all() and len(kept) == plan.extra["kept_rows"][f.name]
        dropped = above & ~np.isin(np.arange(f.num_embeddings), kept)
        if dropped.any():
            assert norms[kept].min() >= norms[dropped].max()
        if f.multi_hot:
            assert group.ids is None


@pytest.mark.parametrize("budget", [0.4, 0.1])
def test_export_plan_end_to_end(budget: float) -> None:
    method, supernet, dlrm, context, cuts = export_setup(budget=budget)
    plan = method.export_plan(supernet, context)
    plan.validate()
    assert plan.method == "optembed" and plan.embedding_dim == D and plan.budget == budget
    # The evolution ran, and its candidates (widths and keep levels) land in [0.95 b, b].
    assert 0.95 * budget <= plan.achieved_fraction() <= budget
    assert plan.extra["param_count"] == plan.num_params()
    assert plan.extra["fallbacks"] == [] and plan.extra["row_pruning_skipped"] == ["m"]
    history = plan.extra["evolution_history"]
    assert len(history) == 4 and all(0.95 * budget * plan.full_params() <= h["best_params"] for h in history)
    # One data pass per generation that has unscored candidates (scores are cached).
    assert context.num_evaluations == len({h["num_scored"] for h in history}) >= 1
    assert supernet.apply_row_mask  # restored after scoring
    _check_kept_rows(supernet, cuts, plan)
    assert any(g.width < D for fp in plan.fields for g in fp.groups)  # the budget forced narrowing
    if budget == 0.1:
        # Below every field at width 4 with its thresholded rows (0.25 + ...): rows are pruned too.
        thresholded = sum(plan.extra["thresholded_rows"].values())
        assert sum(plan.extra["kept_rows"].values()) < thresholded
        assert 4 * thresholded > 0.1 * plan.full_params()
    # The fitness of the chosen candidate is the supernet's own validation AUC with its widths and rows.
    auc = _candidate_auc_by_zeroed_rows(method, supernet, dlrm, context, plan)
    assert abs(plan.extra["best_fitness"] - auc) < 1e-3


def test_budget_below_the_floor_fails_before_training() -> None:
    from embdim.embedding_methods.base import BudgetError

    method = make_method(EXPORT_FIELDS, keep_levels=8)
    floor, reason = method.budget_floor()
    # a, b, c keep 1/8 of their rows at width 4, the multi-hot m all of its 10.
    assert floor == pytest.approx(4 * (20 // 8 + 30 // 8 + 40 // 8 + 10) / (100 * D))
    method.check_budget(floor)
    with pytest.raises(BudgetError, match=r"^optembed: budget 0\.01 is below the floor of this method \(every field "
                                          r"at width 4 keeping 1/8 of its rows .*the floor is 0\.05"):
        method.check_budget(0.01)
    with pytest.raises(ValueError, match="optembed.keep_levels"):
        OptEmbed.Config(keep_levels=0)


def test_a_dataset_without_validation_split_fails_before_training() -> None:
    from embdim.embedding_methods.base import TrainingSchedule

    method = make_method(EXPORT_FIELDS)
    assert method.fit_schedule(TrainingSchedule(steps_per_epoch=10, epochs=1, valid_rows=100)) == []
    with pytest.raises(ValueError, match="validation split"):
        method.fit_schedule(TrainingSchedule(steps_per_epoch=10, epochs=1, valid_rows=0))


def test_export_plan_needs_a_bound_model_and_config_is_validated() -> None:
    method = make_method(EXPORT_FIELDS)
    supernet = make_supernet(method)
    with pytest.raises(RuntimeError, match="bind_model"):
        method.export_plan(supernet, FakeContext(0.5, EXPORT_FIELDS, supernet, None, []))
    with pytest.raises(ValueError, match="optembed.norm"):
        OptEmbed.Config(norm=3)
    with pytest.raises(ValueError, match="optembed.retrain_init"):
        OptEmbed.Config(retrain_init="warm")
    with pytest.raises(ValueError, match="optembed.mutation_prob"):
        OptEmbed.Config(mutation_prob=0.0)
    with pytest.raises(ValueError, match="multiple of 4"):
        OptEmbed(OptEmbed.Config(), EXPORT_FIELDS, 10)
    assert OptEmbed(OptEmbed.Config(), EXPORT_FIELDS, D).needs_initial_checkpoint
    assert not OptEmbed(OptEmbed.Config(retrain_init="inherit"), EXPORT_FIELDS, D).needs_initial_checkpoint


def test_inherited_weights_reproduce_the_masked_supernet() -> None:
    weight = torch.randn(10, D)
    ids = np.array([1, 4, 7], dtype=np.int64)
    table, projection = inherited_weights(weight, GroupPlan(width=8, ids=ids), D)
    masked = weight[torch.from_numpy(ids)] * (torch.arange(D) < 8).float()
    torch.testing.assert_close(table @ projection, masked)
    table, projection = inherited_weights(weight, GroupPlan(width=D, ids=None), D)
    assert projection is None and torch.equal(table, weight)
