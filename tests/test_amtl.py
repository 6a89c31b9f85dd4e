"""AMTL: straight-through masks, twin networks, width penalty, export/grouping, warm start."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embdim.embedding_methods.amtl import (AMTL, INITIAL_LOGIT, AMTLMaskNet, amtl_from_baseline, amtl_warm_start_keys,
                                    cumulative_width_mask, masked_rows, straight_through_one_hot)
from embdim.embedding_methods.base import FieldSpec
from embdim.embedding_methods.grouping import field_plan_from_widths, widths_from_field_plan
from embdim.embedding_methods.mask_aware import LocalSearchContext, side_features, side_table_rows
from tests.tolerance import assert_close_sums

D = 16
FIELDS = [FieldSpec("a", 40, multi_hot=True), FieldSpec("b", 30)]


def counts() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f.name: (rng.zipf(1.3, f.num_embeddings).clip(max=10_000) * (rng.random(f.num_embeddings) > 0.2))
            for f in FIELDS}


def search_module(method: AMTL, device: str = "cpu"):
    module = method.build_search_module(EmbeddingBagCollection(method.search_tables(), device=torch.device(device)))
    context = LocalSearchContext(module, FIELDS, D, counts())
    method.init_search_state(module, context)
    return module, context


def test_straight_through_is_hard_forward_soft_backward() -> None:
    logits = torch.randn(5, 4, requires_grad=True)
    probs = torch.softmax(logits / 0.5, dim=-1)
    t = straight_through_one_hot(probs)
    expected = torch.nn.functional.one_hot(probs.argmax(-1), 4).float()
    assert torch.equal(t, expected)  # exactly 0/1, no rounding residue
    weights = torch.randn(5, 4)
    (t * weights).sum().backward()
    ste_grad = logits.grad.clone()
    logits.grad = None
    (torch.softmax(logits / 0.5, dim=-1) * weights).sum().backward()
    torch.testing.assert_close(ste_grad, logits.grad)  # the soft softmax gradient
    assert ste_grad.abs().sum() > 0


def test_cumulative_mask_shape_values_and_gradient() -> None:
    choice = torch.nn.functional.one_hot(torch.tensor([0, 2, 3]), 4).float().requires_grad_(True)
    mask = cumulative_width_mask(choice)
    assert mask.shape == (3, D)
    for row, k in enumerate([0, 2, 3]):
        width = 4 * (k + 1)
        assert torch.equal(mask[row], (torch.arange(D) < width).float())
    # d m_j / d t_k = 1 exactly when k >= j // 4 (dim j survives every width beyond it).
    jac = torch.autograd.functional.jacobian(lambda c: cumulative_width_mask(c)[0], choice.detach()[:1])[:, 0, :]
    expected = (torch.arange(4)[None, :] >= (torch.arange(D) // 4)[:, None]).float()
    torch.testing.assert_close(jac, expected)


def test_frequent_ids_drive_h_aml_and_rare_ids_l_aml() -> None:
    torch.manual_seed(0)
    field_counts = np.concatenate([np.array([100_000, 90_000, 80_000]), np.ones(97, dtype=np.int64)])
    net = AMTLMaskNet([FieldSpec("f", 100)], D, hidden_sizes=[8], temperature=1.0, initial_width=D)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    side = torch.from_numpy(side_table_rows(field_counts))

    def grad_norms(ids: list[int]) -> tuple[float, float]:
        net.zero_grad()
        rows = torch.randn(len(ids), D)
        (rows * net("f", rows, side[ids])).sum().backward()
        # Every parameter is [2, F, ...]: index 0 the h-AML, 1 the l-AML.
        norm = lambda twin: sum(float(p.grad[twin, 0].norm()) ** 2 for p in net.parameters()) ** 0.5  # noqa: E731
        return norm(0), norm(1)

    h, l = grad_norms([0, 1, 2])  # alpha ~ 1
    assert h > 20 * l
    h, l = grad_norms(list(range(3, 100)))  # count 1: alpha = log 2 / log 100001 ~ 0.06
    assert l > 5 * h
    net.zero_grad()
    rows = torch.randn(2, D)
    (rows * net("f", rows, torch.zeros(2, 4))).sum().backward()  # never-seen ids: alpha = 0
    assert all(p.grad[0, 0].abs().sum() == 0 for p in net.parameters())  # h-AML of field 0


def test_width_penalty_lowers_expected_width() -> None:
    fractions = {}
    for name, weight in (("none", 0.0), ("penalty", 1.0)):
        torch.manual_seed(0)
        method = AMTL(AMTL.Config(penalty_weight=weight, mask_lr=0.05), FIELDS, D)
        module, context = search_module(method)
        optimizer = method.extra_optimizers(module)[0]
        start = float(module.mask_net.expected_param_fraction().detach())
        for _ in range(150):
            optimizer.zero_grad()
            method.search_loss(module).backward()
            optimizer.step()
        fractions[name] = float(module.mask_net.expected_param_fraction().detach())
        fractions[name + "_plan"] = method.export_plan(module, context).achieved_fraction()
    assert start > 0.7  # every id starts at full width (p = 0.71 on it)
    assert fractions["none"] == pytest.approx(start)  # no penalty, no task loss: nothing moves
    assert fractions["none_plan"] == 1.0
    assert fractions["penalty"] < 0.3 and fractions["penalty_plan"] < 0.5


def test_budget_hinge_is_active_only_above_the_budget() -> None:
    for budget, active in ((0.5, True), (0.9, False), (0.0, False)):  # 0 = unset: no hinge
        method = AMTL(AMTL.Config(penalty_weight=0.0, budget=budget, budget_weight=2.0), FIELDS, D)
        module, _ = search_module(method)
        fraction = module.mask_net.expected_param_fraction().detach()  # 0.71 + a share of 12-wide ids
        loss = method.search_loss(module)
        loss.backward()
        grads = sum(float(p.grad.abs().sum()) for p in method.extra_parameters(module))
        if active:
            torch.testing.assert_close(loss.detach(), 2.0 * (fraction - budget))
            assert grads > 0
        else:
            assert float(loss) == 0.0 and grads == 0.0


def test_export_and_grouping_round_trip() -> None:
    rng = np.random.default_rng(1)
    widths = rng.choice([4, 8, 12, 16], 200)
    widths[rng.random(200) < 0.1] = 0  # pruned ids (PME); AMTL never prunes
    field = field_plan_from_widths("f", widths)
    assert [g.width for g in field.groups] == [4, 8, 12, 16]
    assert all(np.all(np.diff(g.ids) > 0) for g in field.groups)
    np.testing.assert_array_equal(widths_from_field_plan(field), widths)
    # One width for every id -> the plan's "all ids" group.
    assert field_plan_from_widths("f", np.full(5, 8)).groups[0].ids is None
    # Capped groups: the smallest groups move up to the next wider width, never down.
    capped = widths_from_field_plan(field_plan_from_widths("f", widths, max_groups=2))
    assert len(np.unique(capped[capped > 0])) == 2 and np.all(capped >= widths) and np.all((capped == 0) == (widths == 0))

    # AMTL export: twin heads pinned so that ids with alpha > 0.5 pick 16 and the rest pick 8.
    method = AMTL(AMTL.Config(), FIELDS, D)
    module, context = search_module(method)
    _pin_heads(module, 3, 1)
    plan = method.export_plan(module, context)
    for f in FIELDS:
        alpha = side_table_rows(counts()[f.name])[:, 2]
        expected = np.where(alpha > 0.5, 16, 8)
        np.testing.assert_array_equal(widths_from_field_plan(plan.field(f.name)), expected)
    plan.validate()


def test_warm_start_maps_baseline_tables() -> None:
    torch.manual_seed(0)
    baseline = EmbeddingBagCollection([EmbeddingBagConfig(name=f"t_{f.name}", num_embeddings=f.num_embeddings,
                                                          embedding_dim=D, feature_names=[f.name]) for f in FIELDS])
    state = {f"model.sparse_arch.embedding_bag_collection.{k}": v for k, v in baseline.state_dict().items()}
    method = AMTL(AMTL.Config(), FIELDS, D)  # initial width D: masks are all ones at step 0
    module, _ = search_module(method)
    copied = amtl_from_baseline(module, state)
    assert copied == {f"model.sparse_arch.embedding_bag_collection.{k}": v
                      for k, v in amtl_warm_start_keys(module).items()}
    assert amtl_warm_start_keys(module) == {"embedding_bags.t_a.weight": "ec.embeddings.t_a.weight",
                                            "embedding_bags.t_b.weight": "ebc.embedding_bags.t_b.weight"}
    for source, target in amtl_warm_start_keys(module).items():
        torch.testing.assert_close(module.state_dict()[target], baseline.state_dict()[source])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=torch.tensor([1, 5, 5, 9, 3, 0, 7]),
                                              lengths=torch.tensor([3, 0, 1, 1, 1, 1]))
    torch.testing.assert_close(module(kjt).values(), baseline(kjt).values())  # unchanged model at step 0
    with pytest.raises(KeyError, match="embedding_bags.t_b.weight"):
        amtl_from_baseline(module, {k: v for k, v in state.items() if "t_b" not in k})


def test_config_validation_names_the_key() -> None:
    for kwargs, key in [({"temperature": 0.0}, "amtl.temperature"), ({"hidden_sizes": []}, "amtl.hidden_sizes"),
                        ({"budget": 1.5}, "amtl.budget"), ({"initial_width": 6}, "amtl.initial_width"),
                        ({"retrain_init": "rewind"}, "amtl.retrain_init")]:
        with pytest.raises(ValueError, match=key):
            AMTL.Config(**kwargs)
    with pytest.raises(ValueError, match="amtl.initial_width"):
        AMTL(AMTL.Config(initial_width=32), FIELDS, D)


def test_built_on_meta_then_materialised_like_dmp() -> None:
    method = AMTL(AMTL.Config(initial_width=8), FIELDS, D)
    module = method.build_search_module(EmbeddingBagCollection(method.search_tables(), device=torch.device("meta")))
    assert all(p.is_meta for p in module.parameters())
    # What DMP does to dense meta modules: allocate, then reset_parameters per module.
    for m in module.mask_net.modules():
        if any(p.is_meta for p in m.parameters(recurse=False)):
            m.to_empty(device="cpu", recurse=False)
            m.reset_parameters()
    net = module.mask_net
    head, head_bias = getattr(net, f"weight_{net.num_layers - 1}"), getattr(net, f"bias_{net.num_layers - 1}")
    assert torch.equal(head, torch.zeros_like(head))
    assert (head_bias.argmax(-1) == 1).all()  # width 8, in every net of every field


def _pin_heads(module, h_choice: int, l_choice: int) -> None:
    """Zero-weight output layers: alpha > 0.5 picks h_choice, the rest l_choice."""
    net = module.mask_net
    with torch.no_grad():
        getattr(net, f"weight_{net.num_layers - 1}").zero_()
        head_bias = getattr(net, f"bias_{net.num_layers - 1}")
        head_bias.zero_()
        head_bias[0, :, h_choice] = 5.0  # h-AML of every field
        head_bias[1, :, l_choice] = 5.0  # l-AML


def test_inherit_retrain_start_reproduces_the_masked_search_model() -> None:
    from embdim.embedding_methods.mixed_dim import build_retrain_module, features_to_kjt
    from embdim.embedding_methods.remap import IdRemapper, retrain_feature_names

    method = AMTL(AMTL.Config(retrain_init="inherit"), FIELDS, D)
    assert method.wants_retrain_init()
    module, context = search_module(method)
    _pin_heads(module, 3, 0)  # frequent ids 16 wide, the rest 4
    plan = method.export_plan(module, context)
    assert all(len(f.groups) == 2 for f in plan.fields)
    state = method.retrain_init_state(module, None, plan)
    retrain = build_retrain_module(plan, device="cpu")
    retrain.load_state_dict(state)

    raw = {"a": (np.array([1, 5, 5, 9, 0, 3, 39]), np.array([3, 0, 1, 3], dtype=np.int32)),
           "b": (np.array([3, 0, 7, 29]), np.array([1, 1, 1, 1], dtype=np.int32))}
    search_kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.from_numpy(np.concatenate([raw["a"][0], raw["b"][0]])),
        lengths=torch.from_numpy(np.concatenate([raw["a"][1], raw["b"][1]]).astype(np.int64)))
    kjt = features_to_kjt(IdRemapper(plan)(raw, 4), retrain_feature_names(plan))
    with torch.no_grad():
        searched, compact = module(search_kjt).to_dict(), retrain(kjt).to_dict()
    for name in ("a", "b"):
        torch.testing.assert_close(compact[name], searched[name])
    assert AMTL(AMTL.Config(), FIELDS, D).retrain_init_state(module, None, plan) is None


def test_warm_start_from_a_dcp_checkpoint(tmp_path) -> None:
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    baseline = EmbeddingBagCollection([EmbeddingBagConfig(name=f"t_{f.name}", num_embeddings=f.num_embeddings,
                                                          embedding_dim=D, feature_names=[f.name]) for f in FIELDS])
    prefix = "dlrm.model.sparse_arch.embedding_bag_collection."
    ckpt = tmp_path / "ckpt" / "step_7"
    dcp.save({"model": {prefix + k: v for k, v in baseline.state_dict().items()}}, checkpoint_id=str(ckpt))
    (tmp_path / "ckpt" / "latest").write_text("step_7\n")

    method = AMTL(AMTL.Config(), FIELDS, D)
    module, _ = search_module(method)

    from embdim.sharding.state import load_checkpoint_tables

    model = torch.nn.Module()  # the search module where the search model holds it
    model.dlrm = torch.nn.Module()
    model.dlrm.model = torch.nn.Module()
    model.dlrm.model.sparse_arch = torch.nn.Module()
    model.dlrm.model.sparse_arch.embedding_bag_collection = module

    class Context:  # the one context hook warm_start uses, as the search phase's context does it
        def load_tables(self, path, key_map):
            return load_checkpoint_tables(model, path, key_map)

    mapping = method.warm_start(module, Context(), tmp_path)  # a run folder: ckpt/latest is followed
    assert mapping == {f"model.{prefix}embedding_bags.t_a.weight": f"{prefix}ec.embeddings.t_a.weight",
                       f"model.{prefix}embedding_bags.t_b.weight": f"{prefix}ebc.embedding_bags.t_b.weight"}
    torch.testing.assert_close(module.ec.embeddings["t_a"].weight, baseline.embedding_bags["t_a"].weight)
    torch.testing.assert_close(module.ebc.embedding_bags["t_b"].weight, baseline.embedding_bags["t_b"].weight)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        method.warm_start(module, Context(), tmp_path / "nowhere")


def test_empty_pooled_collection_still_builds_on_meta() -> None:
    method = AMTL(AMTL.Config(pooled_single_hot=False), FIELDS, D)
    assert method.search_tables() == []
    module = method.build_search_module(EmbeddingBagCollection([], device=torch.device("meta")))
    assert module.ebc is None and all(p.is_meta for p in module.parameters())


# ------------------------------------------------------------------------------------------------
# The batched mask networks and the fused mask against the per-field formulas they replace


def _per_field_nets(net: AMTLMaskNet, hidden: list[int]) -> tuple[torch.nn.ModuleList, torch.nn.ModuleList]:
    """The old layout: one ``nn.Sequential`` (Linear, ReLU, ..., head) per net and field, built in
    the old order (every h-AML, then every l-AML; the zero-initialised heads draw nothing)."""
    k = len(net.widths)

    def mlp() -> torch.nn.Sequential:
        layers, width = [], 3
        for h in hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        with torch.random.fork_rng():
            head = torch.nn.Linear(width, k)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            head.bias[net.initial_choice] = INITIAL_LOGIT
        return torch.nn.Sequential(*layers, head)

    num_fields = len(net.field_index)
    return (torch.nn.ModuleList(mlp() for _ in range(num_fields)),
            torch.nn.ModuleList(mlp() for _ in range(num_fields)))


def _linears(mlp: torch.nn.Sequential) -> list[torch.nn.Linear]:
    return [m for m in mlp if isinstance(m, torch.nn.Linear)]


def _load_per_field(net: AMTLMaskNet, nets: tuple[torch.nn.ModuleList, torch.nn.ModuleList]) -> None:
    with torch.no_grad():
        for twin, mlps in enumerate(nets):
            for i, mlp in enumerate(mlps):
                for j, lin in enumerate(_linears(mlp)):
                    lin.weight.copy_(getattr(net, f"weight_{j}")[twin, i])
                    lin.bias.copy_(getattr(net, f"bias_{j}")[twin, i])


def _old_logits(nets, net: AMTLMaskNet, name: str, side: torch.Tensor) -> torch.Tensor:
    i = net.field_index[name]
    s, alpha = side[:, :3], side[:, 2:3]
    return alpha * nets[0][i](s) + (1 - alpha) * nets[1][i](s)


def test_stacked_mask_nets_init_like_the_per_field_modules() -> None:
    fields = [FieldSpec(n, 50) for n in "abcd"]
    torch.manual_seed(7)
    net = AMTLMaskNet(fields, D, hidden_sizes=[8, 6], temperature=1.0, initial_width=8)
    torch.manual_seed(7)
    nets = _per_field_nets(net, [8, 6])
    for twin, mlps in enumerate(nets):
        for i, mlp in enumerate(mlps):
            for j, lin in enumerate(_linears(mlp)):
                assert torch.equal(getattr(net, f"weight_{j}")[twin, i], lin.weight)
                assert torch.equal(getattr(net, f"bias_{j}")[twin, i], lin.bias)


@pytest.mark.parametrize("order", ["all", "subset"])
def test_batched_mask_nets_equal_the_per_field_formulas(order: str, split_weight_grads: bool) -> None:
    """``mask_rows`` (2F MLPs as one baddbmm per layer, ``masked_rows``) and the one-pass penalty
    give the values and gradients of the per-field formulas: ``rows * cumulative_width_mask(
    straight_through_one_hot(softmax(h / T)))`` field by field, and the per-field penalty sum."""
    fields = [FieldSpec(n, 60) for n in "abcde"]
    torch.manual_seed(0)
    net = AMTLMaskNet(fields, D, hidden_sizes=[8, 8], temperature=0.7, initial_width=D)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()  # non-trivial masks (the init picks D for every id)
    nets = _per_field_nets(net, [8, 8])
    _load_per_field(net, nets)
    rng = np.random.default_rng(0)
    field_counts = {f.name: rng.zipf(1.4, f.num_embeddings).clip(max=5000) * (rng.random(f.num_embeddings) > 0.3)
                    for f in fields}
    net.set_count_profiles(field_counts)
    names = [f.name for f in fields] if order == "all" else ["d", "a", "c"]  # key order of a sharded output
    batch = 9
    sides = torch.stack([torch.from_numpy(side_table_rows(field_counts[n])[rng.integers(0, 60, batch)])
                         for n in names], dim=1)  # [B, P, 4]
    rows = torch.randn(batch, len(names), D, requires_grad=True)
    coef = torch.randn(batch, len(names), D)

    got = net.mask_rows(names, rows, sides)
    penalty = net.expected_param_fraction()
    ((got * coef).sum() + 3.0 * penalty).backward()
    got_grads = [rows.grad.clone()] + [p.grad.clone() for p in net.parameters()]

    rows.grad = None
    want = []
    for j, n in enumerate(names):
        probs = torch.softmax(_old_logits(nets, net, n, sides[:, j]) / net.temperature, dim=-1)
        want.append(rows[:, j] * cumulative_width_mask(straight_through_one_hot(probs)))
    want = torch.stack(want, dim=1)
    widths = torch.as_tensor(net.widths, dtype=torch.float32)
    want_penalty = torch.zeros(())
    for f in fields:  # the old per-field penalty loop
        values, mult = np.unique(field_counts[f.name], return_counts=True)
        side = torch.from_numpy(side_features(values, field_counts[f.name]))
        probs = torch.softmax(_old_logits(nets, net, f.name, side) / net.temperature, dim=-1)
        want_penalty = want_penalty + (torch.from_numpy(mult.astype(np.float64)).float() * (probs @ widths)).sum()
    want_penalty = want_penalty / (sum(f.num_embeddings for f in fields) * D)
    ((want * coef).sum() + 3.0 * want_penalty).backward()

    assert torch.equal(got, want)  # the same 0/1 mask times the same rows
    torch.testing.assert_close(penalty, want_penalty, rtol=1e-5, atol=0)  # a sum of 300 positive terms
    torch.testing.assert_close(got_grads[0], rows.grad, rtol=0, atol=0)  # g * mask, exactly
    for g, (name, _) in zip(got_grads[1:], net.named_parameters()):
        kind, j = name.split("_")  # weight_<layer> / bias_<layer>
        ref = torch.stack([torch.stack([getattr(_linears(mlp)[int(j)], kind).grad for mlp in mlps]) for mlps in nets])
        assert_close_sums(g, ref)
    assert all(float(g.abs().sum()) > 0 for g in got_grads[1:])


def test_masked_rows_equals_the_composed_formula() -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, 3, 4, requires_grad=True)
    rows = torch.randn(6, 3, D, requires_grad=True)
    coef = torch.randn(6, 3, D)
    probs = torch.softmax(logits, -1)
    got = masked_rows(rows, probs)
    (got * coef).sum().backward()
    got_grads = logits.grad.clone(), rows.grad.clone()
    logits.grad = rows.grad = None
    want = rows * cumulative_width_mask(straight_through_one_hot(torch.softmax(logits, -1)))
    (want * coef).sum().backward()
    assert torch.equal(got, want)
    assert_close_sums(got_grads[0], logits.grad)
    assert torch.equal(got_grads[1], rows.grad)


def test_search_module_equals_per_id_reference() -> None:
    """The batched path of the search module (pooled single-hot fields masked together, multi-hot
    fields one by one through ``mask_rows``) against plain per-id indexing with the per-field mask
    ``rows * net(field, rows, side)`` and a sum per bag: outputs and mask-net gradients."""
    fields = [FieldSpec("a", 40, multi_hot=True), FieldSpec("b", 30), FieldSpec("c", 25)]
    method = AMTL(AMTL.Config(), fields, D)
    module = method.build_search_module(EmbeddingBagCollection(method.search_tables(), device=torch.device("cpu")))
    rng = np.random.default_rng(0)
    field_counts = {f.name: rng.zipf(1.3, f.num_embeddings).clip(max=10_000) for f in fields}
    context = LocalSearchContext(module, fields, D, field_counts)
    method.init_search_state(module, context)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in module.mask_net.parameters():
            p.normal_()
    bags = {"a": [[1, 5, 5], [], [9], [3, 0, 7]], "b": [[3], [0], [7], [29]], "c": [[24], [2], [2], [11]]}
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b", "c"], values=torch.tensor([i for n in "abc" for bag in bags[n] for i in bag]),
        lengths=torch.tensor([len(bag) for n in "abc" for bag in bags[n]]))
    coef = torch.randn(4, 3 * D)
    out = module(kjt).values()
    (out * coef).sum().backward()
    got_grads = [p.grad.clone() for p in module.mask_net.parameters()]
    module.mask_net.zero_grad(set_to_none=True)

    ref = []
    for f in fields:
        weight, side = module.full_table(f"t_{f.name}"), torch.from_numpy(side_table_rows(field_counts[f.name]))
        pooled = []
        for bag in bags[f.name]:
            ids = torch.tensor(bag, dtype=torch.long)
            rows = weight[ids]
            pooled.append((rows * module.mask_net(f.name, rows, side[ids])).sum(0))
        ref.append(torch.stack(pooled))
    ref = torch.cat(ref, dim=1)
    (ref * coef).sum().backward()
    assert_close_sums(out, ref)
    for got, p in zip(got_grads, module.mask_net.parameters()):
        assert_close_sums(got, p.grad)


def test_penalty_buckets_fields_by_distinct_counts() -> None:
    """A field with far more distinct counts than the others gets its own batched pass (no field
    pads to it), and the penalty still equals the per-field sum."""
    fields = [FieldSpec("a", 30), FieldSpec("b", 30), FieldSpec("big", 3000)]
    torch.manual_seed(0)
    net = AMTLMaskNet(fields, D, hidden_sizes=[8], temperature=1.0, initial_width=D)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    field_counts = {"a": np.arange(30) % 5, "b": np.arange(30) % 7, "big": np.arange(3000)}
    net.set_count_profiles(field_counts)
    assert [fields_ for fields_, _, _ in net._profile_buckets()] == [[0, 1], [2]]
    widths = torch.as_tensor(net.widths, dtype=torch.float32)
    want = torch.zeros(())
    for f in fields:
        values, mult = np.unique(field_counts[f.name], return_counts=True)
        probs = net.probs(f.name, torch.from_numpy(side_features(values, field_counts[f.name])))
        want = want + (torch.from_numpy(mult).float() * (probs @ widths)).sum()
    torch.testing.assert_close(net.expected_param_fraction(), want / (3060 * D), rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------ budget projection
def _random_profiles(seed: int, sizes: tuple[int, ...] = (50, 80), num_widths: int = 4) -> list:
    from embdim.embedding_methods.amtl import CountProfiles

    rng = np.random.default_rng(seed)
    profiles = []
    for n in sizes:
        counts = rng.zipf(1.5, n).clip(max=500)
        _, inverse, multiplicity = np.unique(counts, return_inverse=True, return_counts=True)
        logits = torch.from_numpy(rng.normal(0, 2, (len(multiplicity), num_widths)))
        profiles.append(CountProfiles(inverse.astype(np.int64), multiplicity.astype(np.int64),
                                      torch.log_softmax(logits, -1).numpy()))
    return profiles


def test_widths_for_budget_fills_the_budget_with_the_most_probable_widths() -> None:
    from embdim.embedding_methods.amtl import widths_for_budget

    profiles, widths = _random_profiles(0), np.array([4, 8, 12, 16])
    num_ids = sum(len(p.inverse) for p in profiles)

    def score(result: list[np.ndarray]) -> float:
        return sum(float(p.log_probs[p.inverse, w // 4 - 1].sum()) for p, w in zip(profiles, result))

    argmax = [widths[p.log_probs.argmax(1)][p.inverse] for p in profiles]
    argmax_params = sum(int(w.sum()) for w in argmax)
    previous = None
    for budget in (0.3, 0.4, 0.5, 0.7, 0.9):
        target = budget * num_ids * 16
        result, lam = widths_for_budget(profiles, widths, target)
        params = sum(int(w.sum()) for w in result)
        # At most the budget, and within one id's width change of it.
        assert target - 12 <= params <= target
        assert all(np.isin(w, widths).all() for w in result)
        # Ids of one count share their scores: outside the boundary profiles every id takes its
        # best width at the price lam, so no single-id change to a width of that price improves it.
        for p, w in zip(profiles, result):
            chosen = p.log_probs[p.inverse, w // 4 - 1] - lam * w
            best = (p.log_probs - lam * widths[None, :]).max(1)[p.inverse]
            assert (chosen >= best - 1e-9).mean() > 0.9
        if previous is not None:
            assert any((a != b).any() for a, b in zip(result, previous[1]))  # distinct budgets, distinct widths
            # Up to the argmax plan's size more budget buys probability; beyond it the budget is
            # filled anyway, by the widenings that cost the least probability.
            assert (score(result) >= previous[0]) == (target <= argmax_params)
        previous = (score(result), result)
    assert 0.3 * num_ids * 16 < argmax_params < 0.9 * num_ids * 16  # both regimes are exercised
    everything, _ = widths_for_budget(profiles, widths, num_ids * 16)
    assert all((w == 16).all() for w in everything)
    with pytest.raises(ValueError, match="below every id at width 4"):
        widths_for_budget(profiles, widths, num_ids * 4 - 1)
    # The argmax plan's own size as the budget gives the argmax back.
    result, _ = widths_for_budget(profiles, widths, sum(int(w.sum()) for w in argmax))
    assert score(result) == pytest.approx(score(argmax))


@pytest.mark.parametrize("layout", ["pad", "project"])
def test_export_meets_the_budget_and_distinct_budgets_give_distinct_plans(layout: str) -> None:
    method = AMTL(AMTL.Config(), FIELDS, D, layout=layout)
    torch.manual_seed(0)
    module, context = search_module(method)
    with torch.no_grad():  # a trained-looking head: widths depend on the counts
        net = module.mask_net
        torch.nn.init.normal_(getattr(net, f"weight_{net.num_layers - 1}"), std=1.0)
    argmax = method.searched_widths(module, context)
    plans = {}
    for budget in (0.4, 0.5, 0.7):
        context.budget = budget
        plan = method.export_plan(module, context)
        plan.validate()
        assert plan.layout == layout and plan.budget == budget
        assert 0.95 * budget <= plan.achieved_fraction() <= budget, (budget, plan.achieved_fraction())
        projection = plan.extra["budget_projection"]
        assert projection["fraction_after"] == plan.achieved_fraction()
        if layout == "pad":  # pad: every id's width is free; project may restrict the widths (and says so)
            assert plan.extra["fallbacks"] == [] and plan.num_params() == plan.num_table_params()
        moved = sum(int((widths_from_field_plan(fp) != a).sum()) for fp, a in zip(plan.fields, argmax))
        assert projection["ids_narrowed"] + projection["ids_widened"] == moved
        # AMTL prunes no id.
        assert all(fp.num_rows == f.num_embeddings for fp, f in zip(plan.fields, FIELDS))
        plans[budget] = [widths_from_field_plan(fp) for fp in plan.fields]
    assert not all((a == b).all() for a, b in zip(plans[0.4], plans[0.5]))
    assert not all((a == b).all() for a, b in zip(plans[0.5], plans[0.7]))
    # The floor: every id at width 4 (with one 4 -> D projection per field under project).
    floor, reason = method.budget_floor()
    assert floor == pytest.approx((4 * 70 + (2 * 4 * D if layout == "project" else 0)) / (70 * D))
    from embdim.embedding_methods.base import BudgetError

    with pytest.raises(BudgetError, match=r"^amtl: budget 0\.1 is below the floor of this method \(every id at width 4"):
        method.check_budget(0.1)


def test_searched_widths_equal_the_side_rows_argmax() -> None:
    """Scoring per distinct count gives every id the choice its own side row gives."""
    method = AMTL(AMTL.Config(), FIELDS, D)
    torch.manual_seed(1)
    module, context = search_module(method)
    with torch.no_grad():
        torch.nn.init.normal_(getattr(module.mask_net, f"weight_{module.mask_net.num_layers - 1}"), std=1.0)
    widths = method.searched_widths(module, context)
    for f, w in zip(FIELDS, widths):
        rows = torch.from_numpy(side_table_rows(counts()[f.name]))
        np.testing.assert_array_equal(w, module.mask_net.widths[module.mask_net.choices(f.name, rows).numpy()])
