"""AMTL: straight-through masks, twin networks, width penalty, export/grouping, warm start."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding_methods.amtl import (AMTL, AMTLMaskNet, amtl_from_baseline, amtl_warm_start_keys,
                                    cumulative_width_mask, straight_through_one_hot)
from embedding_methods.base import FieldSpec
from embedding_methods.grouping import field_plan_from_widths, widths_from_field_plan
from embedding_methods.mask_aware import LocalSearchContext, side_table_rows

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
        norm = lambda m: sum(float(p.grad.norm()) ** 2 for p in m.parameters()) ** 0.5  # noqa: E731
        return norm(net.h_aml[0]), norm(net.l_aml[0])

    h, l = grad_norms([0, 1, 2])  # alpha ~ 1
    assert h > 20 * l
    h, l = grad_norms(list(range(3, 100)))  # count 1: alpha = log 2 / log 100001 ~ 0.06
    assert l > 5 * h
    net.zero_grad()
    rows = torch.randn(2, D)
    (rows * net("f", rows, torch.zeros(2, 4))).sum().backward()  # never-seen ids: alpha = 0
    assert all(p.grad.abs().sum() == 0 for p in net.h_aml[0].parameters())


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
    head = module.mask_net.h_aml[0][-1]
    assert torch.equal(head.weight, torch.zeros_like(head.weight))
    assert int(head.bias.argmax()) == 1  # width 8


def _pin_heads(module, h_choice: int, l_choice: int) -> None:
    """Zero-weight output layers: alpha > 0.5 picks h_choice, the rest l_choice."""
    with torch.no_grad():
        for nets, choice in ((module.mask_net.h_aml, h_choice), (module.mask_net.l_aml, l_choice)):
            for mlp in nets:
                mlp[-1].weight.zero_()
                mlp[-1].bias.zero_()
                mlp[-1].bias[choice] = 5.0


def test_inherit_retrain_start_reproduces_the_masked_search_model() -> None:
    from embedding_methods.mixed_dim import build_retrain_module, features_to_kjt
    from embedding_methods.remap import IdRemapper, retrain_feature_names

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

    class Trainer:  # the two attributes warm_start reads
        def __init__(self) -> None:
            self.model = torch.nn.Module()
            self.model.dlrm = torch.nn.Module()
            self.model.dlrm.model = torch.nn.Module()
            self.model.dlrm.model.sparse_arch = torch.nn.Module()
            self.model.dlrm.model.sparse_arch.embedding_bag_collection = module
            self.sparse_module = module

    mapping = method.warm_start(Trainer(), tmp_path)  # a run folder: ckpt/latest is followed
    assert mapping == {f"model.{prefix}embedding_bags.t_a.weight": f"{prefix}ec.embeddings.t_a.weight",
                       f"model.{prefix}embedding_bags.t_b.weight": f"{prefix}ebc.embedding_bags.t_b.weight"}
    torch.testing.assert_close(module.ec.embeddings["t_a"].weight, baseline.embedding_bags["t_a"].weight)
    torch.testing.assert_close(module.ebc.embedding_bags["t_b"].weight, baseline.embedding_bags["t_b"].weight)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        method.warm_start(Trainer(), tmp_path / "nowhere")


def test_empty_pooled_collection_still_builds_on_meta() -> None:
    method = AMTL(AMTL.Config(pooled_single_hot=False), FIELDS, D)
    assert method.search_tables() == []
    module = method.build_search_module(EmbeddingBagCollection([], device=torch.device("meta")))
    assert module.ebc is None and all(p.is_meta for p in module.parameters())
