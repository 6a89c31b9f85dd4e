"""Fixed width: every field at one width w < D, padded (or projected) to D (the uniform baseline).

There is nothing to search: the plan is closed-form. ``search_tables`` are the plain full-width
tables and the search module is the collection itself, so a trainer that runs the search phase
anyway trains an ordinary full-width DLRM; ``requires_search_training = False`` lets it skip that.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from embdim.embedding_methods.base import (BudgetError, EmbeddingMethod, FieldSpec, SearchContext,
                                           uniform_floor)
from embdim.embedding_methods.mixed_dim import table_name_for_feature
from embdim.embedding_methods.plan import WIDTH_MULTIPLE, SizePlan, layout_projection_params, uniform_plan
from embdim.errors import ConfigError

__all__ = ["BudgetError", "FixedWidth", "fixed_width_for_budget", "full_width_tables", "uniform_params"]


def uniform_params(cardinalities: list[int], embedding_dim: int, width: int, layout: str) -> int:
    """Parameters when every field has ``width``: ``w * N``, plus ``F * w * D`` projections under
    ``project`` (none at w = D)."""
    return width * sum(cardinalities) + layout_projection_params([width] * len(cardinalities), embedding_dim, layout)


def fixed_width_for_budget(cardinalities: list[int], embedding_dim: int, budget: float, layout: str, *,
                           method: str = "fixed") -> int:
    """Largest multiple of 4 (at most D) whose uniform plan, as ``layout`` stores it, fits ``budget``.

    The reachable fractions are those of widths 4, 8, ..., D: multiples of 4 / D under ``pad``, so
    the plan lands below 0.95 x budget whenever no multiple of 4 / D lies in [0.95 b, b] (at
    D = 64, budget 0.1 gives width 4, fraction 0.0625). Raises ``BudgetError`` below width 4's.
    """
    target = budget * sum(cardinalities) * embedding_dim
    for width in range(embedding_dim, 0, -WIDTH_MULTIPLE):
        if uniform_params(cardinalities, embedding_dim, width, layout) <= target:
            return width
    raise BudgetError(method, budget, uniform_floor(cardinalities, embedding_dim, layout),
                      f"every field at width {WIDTH_MULTIPLE}, {layout} layout")


def full_width_tables(fields: list[FieldSpec], width: int) -> list[EmbeddingBagConfig]:
    """One ``t_<field>`` table per field, every id kept, at ``width``."""
    return [EmbeddingBagConfig(name=table_name_for_feature(f.name), embedding_dim=width,
                               num_embeddings=f.num_embeddings, feature_names=[f.name]) for f in fields]


class FixedWidth(EmbeddingMethod):
    """Every field at the same width (from the budget, else ``Config.width``)."""

    name = "fixed"
    report_order = 0
    requires_search_training = False

    @dataclass(kw_only=True)
    class Config:
        width: int = 0
        """Width of every field when the run has no budget; a multiple of 4 at most D
        (0 = D / 2 rounded down to a multiple of 4, at least 4). With a budget < 1 the width is
        the largest that fits it instead."""

        def __post_init__(self) -> None:
            if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 0 \
                    or self.width % WIDTH_MULTIPLE:
                raise ConfigError(f"fixed.width: must be 0 or a positive multiple of {WIDTH_MULTIPLE}, "
                                  f"got {self.width!r}")

    def __init__(self, config: "FixedWidth.Config", fields: list[FieldSpec], embedding_dim: int, *,
                 layout: str | None = None) -> None:
        super().__init__(config, fields, embedding_dim, layout=layout)
        if config.width > embedding_dim:
            raise ConfigError(f"fixed.width: {config.width} exceeds model.embedding_dim {embedding_dim}")

    def budget_floor(self) -> tuple[float, str]:
        return (uniform_floor([f.num_embeddings for f in self.fields], self.embedding_dim, self.layout),
                f"every field at width {WIDTH_MULTIPLE}, {self.layout} layout")

    def default_width(self) -> int:
        if self.config.width:
            return self.config.width
        return max(WIDTH_MULTIPLE, self.embedding_dim // 2 // WIDTH_MULTIPLE * WIDTH_MULTIPLE)

    def search_tables(self) -> list[EmbeddingBagConfig]:
        return full_width_tables(self.fields, self.embedding_dim)

    def build_search_module(self, ebc: EmbeddingBagCollection) -> nn.Module:
        return ebc

    def plan_for_budget(self, budget: float | None) -> SizePlan:
        """The plan for a budget (``None`` or >= 1: no budget, ``Config.width``)."""
        cards = [f.num_embeddings for f in self.fields]
        if budget is not None and budget < 1.0:
            width = fixed_width_for_budget(cards, self.embedding_dim, budget, self.layout)
        else:
            width, budget = self.default_width(), None
        return uniform_plan(self.name, [(f.name, f.num_embeddings) for f in self.fields], self.embedding_dim,
                            [width] * len(self.fields), layout=self.layout, budget=budget, extra={"width": width})

    def export_plan(self, module: nn.Module, context: SearchContext) -> SizePlan:
        return self.plan_for_budget(context.budget)
