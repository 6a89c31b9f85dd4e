"""Closed-form methods: MDE's alpha power rule under a budget, the fixed-width baseline, the registry."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from embdim import embedding_methods
from embdim.embedding_methods import get_method
from embdim.embedding_methods.base import FieldSpec
from embdim.embedding_methods.fixed import BudgetError, FixedWidth, fixed_width_for_budget, uniform_params
from embdim.embedding_methods.mde import MDE, mde_floor_widths, mde_params, mde_widths, mde_widths_for_alpha
from embdim.embedding_methods.mixed_dim import build_retrain_module
from embdim.trainer.config import ConfigError

# Criteo Kaggle's 26 cardinalities after min-count filtering (order of magnitude), tiny to 1e7.
CRITEO = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
          5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
D = 16


@dataclass
class _Context:
    """The part of SearchContext that closed-form methods read."""

    budget: float
    embedding_dim: int = D


def _fields(cards: list[int]) -> list[FieldSpec]:
    return [FieldSpec(name=f"C{i + 1}", num_embeddings=n) for i, n in enumerate(cards)]


def test_power_rule_by_hand() -> None:
    # D (n_min / n)^alpha with n_min = 1000 (100 <= md_threshold keeps D): 16, 5.06, 1.6 -> 16, 4, 4.
    widths = mde_widths_for_alpha([100, 1000, 10_000, 100_000], 16, 0.5, md_threshold=200)
    assert widths.tolist() == [16, 16, 4, 4]
    # alpha 0.2: 16, 10.1, 6.4 -> nearest multiples of 4: 16, 12, 8.
    assert mde_widths_for_alpha([100, 1000, 10_000, 100_000], 16, 0.2).tolist() == [16, 16, 12, 8]
    assert mde_widths_for_alpha([100, 1000, 10_000, 100_000], 16, 0.2, round_to_power_of_2=True).tolist() == [16, 16, 8, 8]
    assert mde_params([1000, 10_000], 16, np.array([16, 4])) == 1000 * 16 + 10_000 * 4 + 4 * 16


@pytest.mark.parametrize("budget", [0.9, 0.6, 0.45, 0.35, 0.3])
def test_budget_is_met_tightly_and_widths_are_monotone(budget: float) -> None:
    widths, alpha = mde_widths(CRITEO, D, budget, md_threshold=200)
    target = budget * sum(CRITEO) * D
    assert mde_params(CRITEO, D, widths) <= target  # projections included
    assert alpha > 0
    # Tight: a slightly cooler temperature would overshoot, so alpha is the boundary.
    assert mde_params(CRITEO, D, mde_widths_for_alpha(CRITEO, D, alpha - 1e-6)) > target
    assert all(w % 4 == 0 and 4 <= w <= D for w in widths)
    order = np.argsort(CRITEO, kind="stable")
    sorted_widths = widths[order]
    assert all(a >= b for a, b in zip(sorted_widths, sorted_widths[1:])), "a bigger table got wider"
    assert all(w == D for n, w in zip(CRITEO, widths) if n <= 200)
    assert widths[CRITEO.index(min(n for n in CRITEO if n > 200))] == D  # lambda: smallest table keeps D


def test_budget_edge_cases() -> None:
    widths, alpha = mde_widths(CRITEO, D, 1.0)
    assert alpha == 0.0 and widths.tolist() == [D] * len(CRITEO)
    widths, alpha = mde_widths(CRITEO, D, None, alpha=0.3)
    assert alpha == 0.3 and widths.tolist() == mde_widths_for_alpha(CRITEO, D, 0.3).tolist()
    with pytest.raises(BudgetError, match=r"^mde: budget 0.1 is below the floor of this method \(alpha -> infinity: "
                                          r".*the floor is 0\.25\d\d$") as raised:
        mde_widths(CRITEO, D, 0.1)
    floor = mde_params(CRITEO, D, mde_floor_widths(CRITEO, D)) / (sum(CRITEO) * D)
    assert raised.value.floor == pytest.approx(floor) and raised.value.method == "mde"
    assert MDE(MDE.Config(), _fields(CRITEO), D).budget_floor()[0] == pytest.approx(floor)
    # The floor is reachable: the budget right at it gives the floor plan.
    widths, _ = mde_widths(CRITEO, D, floor)
    assert mde_params(CRITEO, D, widths) == mde_params(CRITEO, D, mde_floor_widths(CRITEO, D))
    with pytest.raises(ValueError, match="cardinalities must be positive"):
        mde_widths([10, 0], D, 0.5)


def test_mde_counts_what_its_layout_stores() -> None:
    cards = [5000, 2000, 800, 400, 300]  # small tables: projections are a visible share of the budget
    project = MDE(MDE.Config(), _fields(cards), D).plan_for_budget(0.3)
    pad = MDE(MDE.Config(), _fields(cards), D, layout="pad").plan_for_budget(0.3)
    assert project.layout == "project" and pad.layout == "pad" and pad.num_projection_params() == 0
    assert project.num_params() == mde_params(cards, D, [f.widths[0] for f in project.fields]) <= 0.3 * project.full_params()
    assert pad.num_params() <= 0.3 * pad.full_params()
    # Without projections to pay for, the same budget buys smaller alpha (wider tables).
    assert pad.extra["alpha"] < project.extra["alpha"] and pad.num_table_params() > project.num_table_params()
    # The plan is the largest of the alpha family at or below the budget: any smaller alpha overshoots.
    for plan, layout in ((project, "project"), (pad, "pad")):
        for alpha in np.linspace(0.0, plan.extra["alpha"], 50, endpoint=False):
            widths = mde_widths_for_alpha(cards, D, alpha)
            assert mde_params(cards, D, widths, layout) > 0.3 * plan.full_params()


def test_mde_method_plan_builds_matching_module() -> None:
    method = MDE(MDE.Config(md_threshold=200), _fields(CRITEO[:8]), D)
    plan = method.export_plan(module=None, context=_Context(budget=0.5))
    assert plan.method == "mde" and plan.budget == 0.5
    assert plan.achieved_fraction() <= 0.5
    assert plan.extra["alpha"] == pytest.approx(mde_widths(CRITEO[:8], D, 0.5)[1])
    module = build_retrain_module(plan, device="meta")
    inner = sum(c.num_embeddings * c.embedding_dim for c in module.inner_configs())
    assert inner + module.extra_embedding_params() == plan.num_params()
    no_budget = method.export_plan(module=None, context=_Context(budget=1.0))
    assert no_budget.budget is None and no_budget.extra["alpha"] == 0.3
    assert [f.widths[0] for f in no_budget.fields] == mde_widths_for_alpha(CRITEO[:8], D, 0.3).tolist()
    # No search training: the full-width collection is the search module itself.
    tables = method.search_tables()
    assert [t.embedding_dim for t in tables] == [D] * 8
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    assert method.build_search_module(ebc) is ebc and method.requires_search_training is False


def test_fixed_width() -> None:
    cards = [1000, 50, 7]
    # w * N + F * w * D <= budget * N * D; N = 1057, F = 3, D = 16
    assert fixed_width_for_budget(cards, D, 0.5, "project") == 4 * int(0.5 * 1057 * 16 / (1057 + 48) // 4)
    assert fixed_width_for_budget(cards, D, 0.5, "pad") == 8
    for layout in ("pad", "project"):
        for budget in (0.3, 0.5, 0.77, 0.99):
            w = fixed_width_for_budget(cards, D, budget, layout)
            assert uniform_params(cards, D, w, layout) <= budget * 1057 * D < uniform_params(cards, D, w + 4, layout)
    with pytest.raises(BudgetError, match=r"fixed: budget 0.2 is below the floor of this method \(every field at "
                                          r"width 4, project layout\); the floor is 0.2614"):
        fixed_width_for_budget(cards, D, 0.2, "project")
    with pytest.raises(BudgetError, match="the floor is 0.2500"):  # pad: width 4 of D = 16
        fixed_width_for_budget(cards, D, 0.2, "pad")
    method = FixedWidth(FixedWidth.Config(), _fields(cards), D)
    assert method.layout == "pad"
    plan = method.export_plan(None, _Context(budget=0.5))
    assert plan.layout == "pad" and plan.num_projection_params() == 0
    assert {f.widths[0] for f in plan.fields} == {fixed_width_for_budget(cards, D, 0.5, "pad")}
    assert plan.achieved_fraction() <= 0.5
    assert [f.widths for f in method.export_plan(None, _Context(budget=1.0)).fields] == [[8]] * 3  # D / 2
    assert FixedWidth(FixedWidth.Config(width=12), _fields(cards), D).plan_for_budget(None).fields[0].widths == [12]


def test_configs_validate() -> None:
    with pytest.raises(ConfigError, match="fixed.width"):
        FixedWidth.Config(width=6)
    with pytest.raises(ConfigError, match="exceeds model.embedding_dim"):
        FixedWidth(FixedWidth.Config(width=32), _fields([10]), D)
    with pytest.raises(ConfigError, match="mde.alpha"):
        MDE.Config(alpha=-0.1)
    with pytest.raises(ConfigError, match="mde.md_threshold"):
        MDE.Config(md_threshold=-1)


def test_registry() -> None:
    assert get_method("mde") is MDE and get_method("fixed") is FixedWidth
    assert tuple(embedding_methods.METHODS) == embedding_methods.METHOD_NAMES
    assert set(embedding_methods.METHOD_NAMES) >= {"fixed", "mde", "mlet", "optembed", "amtl", "pme"}
    choices = re.escape(str(sorted(embedding_methods.METHOD_NAMES)))
    with pytest.raises(ValueError, match=rf"unknown method 'autodim'; choose from {choices}"):
        get_method("autodim")


@pytest.mark.parametrize("name", embedding_methods.METHOD_NAMES)
def test_every_method_checks_its_constructor_arguments(name) -> None:
    cls = get_method(name)
    fields = [FieldSpec(name="a", num_embeddings=10), FieldSpec(name="b", num_embeddings=20)]
    other = FixedWidth.Config() if name != "fixed" else MDE.Config()
    with pytest.raises(ValueError, match=rf"^{name}: config must be {cls.__name__}\.Config"):
        cls(other, fields, 16)
    with pytest.raises(ValueError, match=rf"^{name}: no sparse fields"):
        cls(cls.Config(), [], 16)
    with pytest.raises(ValueError, match=rf"^{name}: embedding_dim must be a positive multiple of 4, got 6"):
        cls(cls.Config(), fields, 6)
    assert cls(cls.Config(), fields, 16).embedding_dim == 16
