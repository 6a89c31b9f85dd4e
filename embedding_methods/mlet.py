"""MLET: multi-layer embedding training (Ghaemmaghami et al., arXiv 2006.05623; Deng et al., ACML 2023).

Search trains each table factorized: ``V_t`` in ``R^{n_t x k}`` with a per-table bias-free
``W_t`` in ``R^{d x k}``, ``e = W_t EmbeddingBag_sum(V_t, ids)`` (paper Sec. 3; dlrm_mlet
``create_linp``, identity activation), with k > d. Because sum pooling is linear,
``W_t sum_i v_i = sum_i (V_t W_t^T)_i``, so after training the table collapses exactly to
``V~_t = V_t W_t^T`` in ``R^{n_t x d}``: the retrain/inference model is a plain d-wide table
(paper Sec. 3, "the product can be computed once after training").

The model's embedding width d shrinks with the budget: d is the largest multiple of 4 with
d * N <= budget * D * N, i.e. d / D <= budget (the paper trains and serves a d-wide embedding;
its experiments use d = 4-16 through k = 64-128). Our DLRM still needs one width D for the dot
interaction, so under the default ``pad`` layout the d-wide vector is followed by D - d zeros:
nothing is stored beyond the collapsed d-wide tables, and the search model ``k -> d -> pad`` and
the collapsed model compute exactly the same thing. Under the ``project`` layout (``search.layout
= "project"``) we instead train the composite ``k -> d -> D`` with a learned ``P_t`` in
``R^{D x d}`` (MDE's projection, counted in the budget) and keep ``P_t`` in the retrain module.

Training memory is k/D times the full-width tables (docs/methods.md#mlet). Tables must not be
column-wise sharded in search: a CW shard holds part of k and its product is only a partial sum
(see ``collapse_shard``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from embdim.embedding_methods.base import EmbeddingMethod, FieldSpec, SearchContext, uniform_floor
from embdim.embedding_methods.fixed import fixed_width_for_budget, full_width_tables
from embdim.embedding_methods.mixed_dim import (
    GroupedProjection,
    MixedDimEmbeddingBagCollection,
    _ProjectedEmbeddingBagCollection,
)
from embdim.embedding_methods.plan import WIDTH_MULTIPLE, SizePlan, plan_file, uniform_plan
from embdim.errors import ConfigError
from embdim.io import atomic_path


def collapse_table(V: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``V W^T``: the d-wide table equivalent to table ``V [n, k]`` followed by ``W [d, k]`` (exact
    under sum pooling, paper Sec. 3)."""
    if V.dim() != 2 or W.dim() != 2 or V.shape[1] != W.shape[1]:
        raise ValueError(f"collapse_table: need V [n, k] and W [d, k], got {tuple(V.shape)} and {tuple(W.shape)}")
    return V @ W.T


def collapse_shard(rows: torch.Tensor, W: torch.Tensor, *, col_offset: int = 0) -> torch.Tensor:
    """Collapses one local shard of a sharded table ``V``: ``rows [r, c] -> [r, d]``.

    A table-wise or row-wise shard holds whole rows (``c == k``): the result is exactly the same
    rows of ``V W^T``, to be written at the same row offset of the d-wide retrain table. A
    column-wise shard holds columns ``[col_offset, col_offset + c)`` of k: the result is that
    shard's partial product, and the shards of one row must be summed across ranks.
    """
    if W.dim() != 2 or rows.dim() != 2 or col_offset < 0 or col_offset + rows.shape[1] > W.shape[1]:
        raise ValueError(f"collapse_shard: shard {tuple(rows.shape)} at column {col_offset} does not fit "
                         f"W {tuple(W.shape)}")
    return rows @ W[:, col_offset:col_offset + rows.shape[1]].T


class MLETEmbeddingBagCollection(_ProjectedEmbeddingBagCollection):
    """The MLET search module: k-wide tables, per-table ``W_t: k -> d``, then zero padding to D
    (``pad``) or ``P_t: d -> D`` if d < D (``project``).

    Args:
        ebc (EmbeddingBagCollection): the inner collection of k-wide tables, one feature each
            (DMP shards it; it may live on ``meta``).
        width (int): the retrain width d.
        embedding_dim (int): the output width D.
        init (str): init of ``W_t``: ``"normal"`` (dlrm_mlet ``--linp-init`` default) or ``"xavier"``.
        init_std (float): standard deviation of the normal init (dlrm_mlet default 0.25).
        layout (str): ``"pad"`` or ``"project"``, as the exported plan's.
    """

    def __init__(self, ebc: EmbeddingBagCollection, width: int, embedding_dim: int, *, init: str = "normal",
                 init_std: float = 0.25, layout: str = "pad") -> None:
        super().__init__()
        configs = ebc.embedding_bag_configs()
        self._init_layout(configs, {c.feature_names[0]: [c.feature_names[0]] for c in configs}, embedding_dim,
                          {c.feature_names[0]: c.num_embeddings for c in configs}, layout)
        if width % WIDTH_MULTIPLE or not 0 < width <= embedding_dim:
            raise ValueError(f"MLETEmbeddingBagCollection: width {width} must be a multiple of 4 in (0, {embedding_dim}]")
        for c in configs:
            if c.embedding_dim <= width:
                raise ValueError(f"MLETEmbeddingBagCollection: table {c.name!r} has width {c.embedding_dim}; "
                                 f"MLET needs inner width k > d={width}")
        self.width = int(width)
        device = ebc.device
        self.ebc = ebc
        self.down = GroupedProjection([c.embedding_dim for c in configs], [width] * len(configs), device=device,
                                      init=init, init_std=init_std)
        # project: identity (no parameter) when d == D. pad: no projection at all.
        self.projection = GroupedProjection([width] * len(configs), [embedding_dim] * len(configs),
                                            device=device) if layout == "project" else None

    def reset_parameters(self) -> None:
        self.down.reset_parameters()
        if self.projection is not None:
            self.projection.reset_parameters()

    def extra_embedding_params(self) -> int:
        return self.down.num_params() + (0 if self.projection is None else self.projection.num_params())

    def projection_stages(self) -> list[GroupedProjection]:
        """``W_t`` (k -> d), then ``P_t`` (d -> D; identity, passed through, when d == D) under
        ``project``; under ``pad`` only ``W_t`` (the padding follows the stages)."""
        return [self.down] if self.projection is None else [self.down, self.projection]

    def down_weight(self, slot: int) -> torch.Tensor:
        """``W_t`` of inner table ``slot`` in the paper's layout ``[d, k]``."""
        return self.down.slot_weight(slot).T

    def retrain_projection_state(self) -> dict[str, torch.Tensor]:
        """The projection entries of the collapsed retrain module's ``state_dict`` (``P_t``, if d < D).

        The retrain module built from the exported plan has the same ``GroupedProjection`` layout
        (same widths, tables in plan order), so its ``projection.*`` keys match these one to one.
        Empty under ``pad``.
        """
        if self.projection is None:
            return {}
        return {f"projection.{k}": v.detach().clone() for k, v in self.projection.state_dict().items()}


def collapse_module(search_module: MLETEmbeddingBagCollection) -> MixedDimEmbeddingBagCollection:
    """The d-wide ``MixedDimEmbeddingBagCollection`` equal to an unsharded MLET search module.

    Tables keep their names and the projections are copied, so the result's ``state_dict`` loads
    into ``build_retrain_module(plan)`` of the exported plan. Sharded search modules are collapsed
    shard by shard with ``collapse_shard`` instead.
    """
    if not isinstance(search_module.ebc, EmbeddingBagCollection):
        raise ValueError(f"collapse_module: needs an unsharded EmbeddingBagCollection, got "
                         f"{type(search_module.ebc).__name__}; collapse sharded tables with collapse_shard")
    configs = search_module.inner_configs()
    d = search_module.width
    tables = [EmbeddingBagConfig(name=c.name, embedding_dim=d, num_embeddings=c.num_embeddings,
                                 feature_names=list(c.feature_names), pooling=PoolingType.SUM) for c in configs]
    first = next(iter(search_module.ebc.parameters()))
    out = MixedDimEmbeddingBagCollection(
        tables, {f: [f] for f in search_module.feature_names}, search_module.embedding_dim, search_module.layout,
        device=first.device,
        num_embeddings_per_field={c.feature_names[0]: c.num_embeddings for c in configs},
    )
    with torch.no_grad():
        for slot, c in enumerate(configs):
            V = search_module.ebc.embedding_bags[c.name].weight
            out.ebc.embedding_bags[c.name].weight.copy_(collapse_table(V, search_module.down_weight(slot)))
        if out.projection is not None:
            out.projection.load_state_dict(search_module.projection.state_dict())
    return out


def save_collapsed_init(search_module: MLETEmbeddingBagCollection, plan: SizePlan, plan_path: str | Path) -> SizePlan:
    """Writes the collapsed weights beside the plan (``<stem>_init.pt``, atomic) and returns the plan
    with ``init_checkpoint`` pointing at them (save the returned plan afterwards)."""
    plan_path = plan_file(plan_path)
    name = f"{plan_path.stem}_init.pt"
    state = {k: v.detach().cpu() for k, v in collapse_module(search_module).state_dict().items()}
    with atomic_path(plan_path.parent / name) as tmp:
        torch.save(state, tmp)
    return dataclasses.replace(plan, init_checkpoint=name)


class MLET(EmbeddingMethod):
    """Factorized k-wide training collapsed to width d (exact), padded (or projected) to D."""

    name = "mlet"
    report_order = 2
    # The paper trains factorized and serves the collapse ``V W^T`` (Sec. 3); training the
    # collapsed table for more epochs is not part of MLET. Measured: a second pass over the same
    # data with fresh optimizer state overfits (H100, 480k rows: 0.7933 -> 0.7639 test AUC;
    # Criteo 8k: logloss 0.82), the one-epoch overfitting of CTR models.
    search_trains_compact_model = True

    @dataclass(kw_only=True)
    class Config:
        inner_dim: int = 0
        """Inner (training) width k of every table, a multiple of 4 above the retrain width
        (0 = 4 * D). The paper's gains grow with k (e.g. k = 64-128 for d = 4-16)."""
        width: int = 0
        """Retrain width d, a multiple of 4 at most D (0 = from ``budget``: the largest d whose
        plan fits it, i.e. d / D <= budget under ``pad``; else D)."""
        budget: float = 0.0
        """Fraction of the full-width parameters for the retrain model when ``width`` is 0
        (0 = none). It must be known before search because d shapes the search model."""
        init: str = "normal"
        """Init of W_t: "normal" (std ``init_std``, dlrm_mlet's default) or "xavier"."""
        init_std: float = 0.25
        """Standard deviation of the normal init of W_t."""

        def __post_init__(self) -> None:
            for key in ("inner_dim", "width"):
                v = getattr(self, key)
                if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v % WIDTH_MULTIPLE:
                    raise ConfigError(f"mlet.{key}: must be 0 or a positive multiple of {WIDTH_MULTIPLE}, got {v!r}")
            if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0 <= self.budget:
                raise ConfigError(f"mlet.budget: must be a number >= 0, got {self.budget!r}")
            if self.init not in ("normal", "xavier"):
                raise ConfigError(f"mlet.init: unknown {self.init!r}; choose from ['normal', 'xavier']")
            if not self.init_std > 0:
                raise ConfigError(f"mlet.init_std: must be positive, got {self.init_std!r}")

    def __init__(self, config: "MLET.Config", fields: list[FieldSpec], embedding_dim: int, *,
                 layout: str | None = None) -> None:
        super().__init__(config, fields, embedding_dim, layout=layout)
        if config.width > embedding_dim:
            raise ConfigError(f"mlet.width: {config.width} exceeds model.embedding_dim {embedding_dim}")
        cards = [f.num_embeddings for f in fields]
        if config.width:
            self.width = config.width
        elif 0 < config.budget < 1:
            # Raises the shared BudgetError below width 4's fraction: at construction, before training.
            self.width = fixed_width_for_budget(cards, embedding_dim, config.budget, self.layout, method=self.name)
        else:
            self.width = embedding_dim
        self.inner_dim = config.inner_dim or 4 * embedding_dim
        if self.inner_dim <= self.width:
            raise ConfigError(f"mlet.inner_dim: {self.inner_dim} must exceed the retrain width {self.width} (k > d)")

    def budget_floor(self) -> tuple[float, str]:
        return (uniform_floor([f.num_embeddings for f in self.fields], self.embedding_dim, self.layout),
                f"retrain width d = {WIDTH_MULTIPLE}, {self.layout} layout")

    def search_tables(self) -> list[EmbeddingBagConfig]:
        return full_width_tables(self.fields, self.inner_dim)

    def build_search_module(self, ebc: EmbeddingBagCollection) -> nn.Module:
        return MLETEmbeddingBagCollection(ebc, self.width, self.embedding_dim, init=self.config.init,
                                          init_std=self.config.init_std, layout=self.layout)

    def wants_retrain_init(self) -> bool:
        return True

    def retrain_init_state(self, searched: nn.Module, initial: nn.Module | None,
                           plan: SizePlan) -> dict[str, torch.Tensor]:
        """The collapsed tables ``V_t W_t^T`` and the kept d -> D projections: the retrain model
        starts out computing exactly what the factorized model computed (MLET paper, Sec. 3)."""
        return {k: v.detach().cpu() for k, v in collapse_module(searched).state_dict().items()}

    def export_plan(self, module: nn.Module, context: SearchContext) -> SizePlan:
        """Every field at width d with all ids. The plan's ``init_checkpoint`` is left unset: write
        the collapsed weights with ``save_collapsed_init`` (one device) or shard by shard with
        ``collapse_shard`` plus ``MLETEmbeddingBagCollection.retrain_projection_state``."""
        budget = self.config.budget if 0 < self.config.budget < 1 else context.budget
        return uniform_plan(
            self.name, [(f.name, f.num_embeddings) for f in self.fields], self.embedding_dim,
            [self.width] * len(self.fields), layout=self.layout, budget=budget if budget is not None and budget < 1 else None,
            extra={"inner_dim": self.inner_dim, "width": self.width, "init": self.config.init,
                   "collapse": "V_t W_t^T"},
        )
