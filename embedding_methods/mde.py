"""MDE: mixed-dimension embeddings by the alpha power rule (Ginart, Naumov, Mudigere, Yang, Zou;
ISIT 2021, arXiv 1909.11810).

Each table gets ``d_t = lambda * n_t^(-alpha)`` (the paper's "alpha power rule"), with
``lambda = D * n_min^alpha`` so the smallest table keeps the full width D (dlrm
``tricks/md_embedding_bag.py::md_solver`` with ``d0 = D``), followed by a bias-free Xavier
``d_t -> D`` projection. Tables with at most ``md_threshold`` rows keep D, as in dlrm's
``--md-threshold`` (200). Widths are rounded to multiples of 4 for FBGEMM TBE and clamped to
``[4, D]``. For a parameter budget, alpha is bisected (Hetu ``scheduler/md.py`` searches [0, 1];
we widen the bracket when needed) so that the parameters *including projections* fit it (tables
alone under ``search.layout = "pad"``). The plan is the largest of the alpha family at or below
the budget; that family is a step function of alpha, so on few or very unequal tables it can lie
below 0.95 x budget (see ``mde_widths``). Below the limit alpha -> inf the search fails before
training with the shared ``BudgetError``.

No search training: the plan is closed-form; the search module is the full-width collection.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from embdim.embedding_methods.base import BudgetError, EmbeddingMethod, SearchContext
from embdim.embedding_methods.fixed import full_width_tables
from embdim.embedding_methods.plan import WIDTH_MULTIPLE, SizePlan, layout_projection_params, uniform_plan
from embdim.errors import ConfigError


def _round_widths(raw: np.ndarray, embedding_dim: int, round_to_power_of_2: bool) -> np.ndarray:
    if round_to_power_of_2:  # md_solver's round_dim; powers of 2 >= 4 are multiples of 4
        rounded = 2.0 ** np.round(np.log2(np.maximum(raw, 1e-30)))
    else:
        rounded = WIDTH_MULTIPLE * np.round(raw / WIDTH_MULTIPLE)
    return np.clip(rounded, WIDTH_MULTIPLE, embedding_dim).astype(np.int64)


def mde_widths_for_alpha(cardinalities: list[int] | np.ndarray, embedding_dim: int, alpha: float, *,
                         md_threshold: int = 200, round_to_power_of_2: bool = False) -> np.ndarray:
    """Widths of the alpha power rule for a given temperature ``alpha >= 0``."""
    n = np.asarray(cardinalities, dtype=np.float64)
    widths = np.full(len(n), embedding_dim, dtype=np.int64)
    rule = n > md_threshold
    if rule.any():
        # d_t = lambda n_t^-alpha with lambda = D n_min^alpha, i.e. D (n_min / n_t)^alpha <= D.
        raw = embedding_dim * (n[rule].min() / n[rule]) ** alpha
        widths[rule] = _round_widths(raw, embedding_dim, round_to_power_of_2)
    return widths


def mde_params(cardinalities: list[int] | np.ndarray, embedding_dim: int, widths: np.ndarray,
               layout: str = "project") -> int:
    """Tables plus projections: ``sum_t n_t d_t + sum_{d_t < D} d_t D`` (``project``, MDE's own
    layout); tables alone under ``pad``."""
    n = np.asarray(cardinalities, dtype=np.int64)
    widths = np.asarray(widths, dtype=np.int64)
    return int((n * widths).sum()) + layout_projection_params(widths.tolist(), embedding_dim, layout)


def mde_floor_widths(cardinalities: list[int] | np.ndarray, embedding_dim: int, *,
                     md_threshold: int = 200) -> np.ndarray:
    """The limit alpha -> inf of the power rule: the smallest table above ``md_threshold`` and every
    table at or below it keep D, the rest reach width 4 (the narrowest plan MDE can make)."""
    n = np.asarray(cardinalities, dtype=np.int64)
    rule = n > md_threshold
    floor = np.full(len(n), embedding_dim, dtype=np.int64)
    if rule.any():
        floor[rule & (n > n[rule].min())] = WIDTH_MULTIPLE
    return floor


def mde_widths(cardinalities: list[int] | np.ndarray, embedding_dim: int, budget: float | None, *,
               md_threshold: int = 200, round_to_power_of_2: bool = False,
               alpha: float = 0.3, layout: str = "project") -> tuple[np.ndarray, float]:
    """MDE widths and the temperature used: ``alpha`` itself without a budget, else the smallest
    alpha whose plan, as ``layout`` stores it (projections included under ``project``), fits
    ``budget`` of the full-width parameters.

    The parameter count is non-increasing in alpha (every ``(n_min / n_t)^alpha`` is at most 1 and
    falls with alpha, and rounding is monotone), so bisection finds the boundary, and the plan is
    the largest of the alpha family at or below the budget. That family is a step function of
    alpha (widths are rounded to multiples of 4 and each table moves alone), so with few tables, or
    one table holding most rows, its largest fraction at or below the budget can lie under
    0.95 x budget: MDE's search space has a single parameter. Raises ``BudgetError`` when even the
    limit alpha -> inf (``mde_floor_widths``) is over budget.
    """
    n = np.asarray(cardinalities, dtype=np.int64)
    if n.ndim != 1 or len(n) == 0 or (n < 1).any():
        raise ValueError(f"mde_widths: cardinalities must be positive integers, got {cardinalities!r}")
    if budget is None:
        return mde_widths_for_alpha(n, embedding_dim, alpha, md_threshold=md_threshold,
                                    round_to_power_of_2=round_to_power_of_2), float(alpha)
    target = budget * int(n.sum()) * embedding_dim

    def params(a: float) -> int:
        w = mde_widths_for_alpha(n, embedding_dim, a, md_threshold=md_threshold,
                                 round_to_power_of_2=round_to_power_of_2)
        return mde_params(n, embedding_dim, w, layout)

    if params(0.0) <= target:
        return np.full(len(n), embedding_dim, dtype=np.int64), 0.0
    floor = mde_floor_widths(n, embedding_dim, md_threshold=md_threshold)
    if mde_params(n, embedding_dim, floor, layout) > target:
        raise BudgetError("mde", budget, mde_params(n, embedding_dim, floor, layout) / (n.sum() * embedding_dim),
                          _floor_reason(md_threshold, embedding_dim))
    lo, hi = 0.0, 1.0
    while params(hi) > target:  # terminates: (n_min / n_t)^alpha -> 0 gives the floor plan
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        if hi - lo <= 1e-9 * max(1.0, hi):
            break
        mid = 0.5 * (lo + hi)
        if params(mid) <= target:
            hi = mid
        else:
            lo = mid
    return mde_widths_for_alpha(n, embedding_dim, hi, md_threshold=md_threshold,
                                round_to_power_of_2=round_to_power_of_2), hi


def _floor_reason(md_threshold: int, embedding_dim: int) -> str:
    return (f"alpha -> infinity: the smallest table above md_threshold={md_threshold} and every table at or below "
            f"it keep D={embedding_dim}, the others width {WIDTH_MULTIPLE}, with their projections")


class MDE(EmbeddingMethod):
    """Mixed-dimension embeddings by the alpha power rule (closed form, no search training)."""

    name = "mde"
    report_order = 1
    default_layout = "project"  # MDE is defined with projections (Ginart et al. 2021, Sec. 3: E = V P)
    requires_search_training = False

    @dataclass(kw_only=True)
    class Config:
        alpha: float = 0.3
        """Temperature of the power rule when the run has no budget (dlrm ``--md-temperature``);
        with a budget < 1, alpha is found by bisection instead."""
        md_threshold: int = 200
        """Tables with at most this many rows keep the full width D (dlrm ``--md-threshold``)."""
        round_to_power_of_2: bool = False
        """Round widths to powers of 2 (md_solver's ``round_dim``) instead of multiples of 4."""

        def __post_init__(self) -> None:
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha >= 0:
                raise ConfigError(f"mde.alpha: must be a number >= 0, got {self.alpha!r}")
            if isinstance(self.md_threshold, bool) or not isinstance(self.md_threshold, int) or self.md_threshold < 0:
                raise ConfigError(f"mde.md_threshold: must be an integer >= 0, got {self.md_threshold!r}")
            if not isinstance(self.round_to_power_of_2, bool):
                raise ConfigError(f"mde.round_to_power_of_2: must be true or false, got {self.round_to_power_of_2!r}")

    def budget_floor(self) -> tuple[float, str]:
        n = [f.num_embeddings for f in self.fields]
        widths = mde_floor_widths(n, self.embedding_dim, md_threshold=self.config.md_threshold)
        return (mde_params(n, self.embedding_dim, widths, self.layout) / (sum(n) * self.embedding_dim),
                _floor_reason(self.config.md_threshold, self.embedding_dim))

    def search_tables(self) -> list[EmbeddingBagConfig]:
        return full_width_tables(self.fields, self.embedding_dim)

    def build_search_module(self, ebc: EmbeddingBagCollection) -> nn.Module:
        return ebc

    def plan_for_budget(self, budget: float | None) -> SizePlan:
        """The MDE plan for a budget (``None`` or >= 1: no budget, ``Config.alpha``)."""
        if budget is not None and budget >= 1.0:
            budget = None
        cards = [f.num_embeddings for f in self.fields]
        widths, alpha = mde_widths(cards, self.embedding_dim, budget, md_threshold=self.config.md_threshold,
                                   round_to_power_of_2=self.config.round_to_power_of_2, alpha=self.config.alpha,
                                   layout=self.layout)
        return uniform_plan(
            self.name, [(f.name, f.num_embeddings) for f in self.fields], self.embedding_dim, widths.tolist(),
            layout=self.layout, budget=budget,
            extra={"alpha": alpha, "md_threshold": self.config.md_threshold,
                   "round_to_power_of_2": self.config.round_to_power_of_2},
        )

    def export_plan(self, module: nn.Module, context: SearchContext) -> SizePlan:
        return self.plan_for_budget(context.budget)
