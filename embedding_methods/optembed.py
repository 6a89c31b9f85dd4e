"""OptEmbed: learned row pruning plus an evolutionary search of per-field widths.

Lyu et al., "OptEmbed: Learning Optimal Embedding Table for Click-through Rate Prediction",
CIKM 2022 (arXiv 2208.04482); reference code github.com/fuyuanlyu/OptEmbed (``supernet.py``,
``evolution.py``, ``retrain.py``, ``models/layer.py``, ``models/modules_super.py``). The notes in
``docs/methods.md#optembed`` describe that code; this file follows it except where marked
"deviation".

Three phases:

1. Supernet (``OptEmbedSupernet``). A full-width table E (the child ``ebc``, which DMP shards),
   learnable per-field thresholds t, a row mask ``m = BinaryStep(||e||_p - t_f)`` per looked-up
   row and, in training, a random width per (sample, field) that keeps the first w dims (the
   paper's lower-triangular masks P[j]). Loss = task loss + alpha * sum_f exp(-t_f).
2. Evolution (``export_plan``). Freeze the row mask over the whole table, then run the genetic
   search of per-field widths (and row-keep levels, below) with validation AUC of the supernet
   as fitness. Every rank scores
   every candidate on its part of the validation split; one embedding lookup per batch serves all
   candidates (``candidate_logits``) and the binned AUC counts are summed across ranks
   (``CandidateAUC``).
3. Retrain (shared ``embedding_methods.mixed_dim``): one compact table per field with the kept rows
   at the searched width. ``Config.retrain_init`` says how it is initialised.

Files: this one holds the method (``OptEmbed``: config, budget, export, retrain start);
``optembed_supernet.py`` the masks, the supernet and the row norms; ``optembed_scoring.py``
``candidate_logits`` and ``CandidateAUC``; ``evolution.py`` the genetic search, which knows
nothing of OptEmbed.

Deviations from the reference code, all deliberate:

- Widths are drawn from {4, 8, ..., D} instead of {1, ..., D}: FBGEMM TBE needs multiples of 4.
- The evolution respects a parameter budget (the paper's fitness ignores memory), and its space
  reaches small budgets: a candidate is a width and a row-keep level per field (``keep_levels``):
  level k keeps the top k / keep_levels of the rows the field's threshold kept, by norm (the
  order the thresholds themselves prune in), so a budget is met by pruning rows as well as by
  narrowing. Every candidate is repaired into [0.95 b, b] before it is scored: random genes
  step down while it is over budget, then up while it is under 0.95 b and a step still fits.
  Half the first generation keeps every thresholded row (the paper's space), half draws the
  levels. The evolution always runs; what could not be met (no finite fitness, the best
  candidate under 0.95 b) is logged and listed in ``plan.extra["fallbacks"]``. The floor,
  checked before training, is every field at width 4 keeping 1 / keep_levels of its rows.
- Fixed reference bugs: the crossover point lies in [1, F-1] (the code draws it in
  [1, latent_dim]); mutation works on a copy of the parent (the code edits it in place); the
  narrowest width can be drawn; the best candidate ever seen is returned.
- Multi-hot fields: a pooled vector is a sum of rows, so a per-row mask cannot be applied on the
  pooled output. Their rows are not pruned during search (every row is kept in the plan); they
  still get searched widths (a per-field mask commutes with sum pooling, docs/torchrec-notes.md#per-id-masks).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from embdim.embedding_methods.base import (BudgetError, EmbeddingMethod, FieldSpec, SearchContext, TrainingSchedule,
                                           full_width_params)
# The supernet, the scoring and the generic evolution live in their own files; the names are
# imported here too (including the private ones the tests use), so that
# ``from embdim.embedding_methods.optembed import ...`` keeps working.
from embdim.embedding_methods.evolution import crossover, evolutionary_search, mutate, repair_to_budget  # noqa: F401
from embdim.embedding_methods.optembed_scoring import CandidateAUC, _sample_rank, candidate_logits
from embdim.embedding_methods.optembed_supernet import (WIDTH_STEP, BinaryStep, OptEmbedSupernet,  # noqa: F401
                                                        _norm_ranks, _row_norm, _RowAndWidthMask, _table_row_norms,
                                                        allowed_widths)
from embdim.embedding_methods.plan import FieldPlan, GroupPlan, SizePlan

__all__ = ["OptEmbed", "OptEmbedSupernet", "BinaryStep", "CandidateAUC", "RETRAIN_INITS", "WIDTH_STEP",
           "allowed_widths", "candidate_logits", "crossover", "evolutionary_search", "inherited_weights",
           "keep_counts", "mutate", "optembed_param_count", "repair_to_budget"]

logger = logging.getLogger(__name__)

RETRAIN_INITS = ("rewind", "inherit", "fresh")


def optembed_param_count(kept_rows: np.ndarray, widths: np.ndarray, embedding_dim: int, layout: str) -> np.ndarray:
    """Retrain parameters of width candidates: ``sum_f kept_f * w_f`` (``pad``), plus
    ``[w_f < D] * w_f * D`` under ``project``.

    The second term is the ``w_f -> D`` projection of a narrowed field; a field with no kept row is
    dropped and costs nothing.

    Args:
        kept_rows: ``[F]`` kept rows per field.
        widths: ``[..., F]`` widths.
        embedding_dim: D.
        layout: the plan layout (``pad`` stores no projection).
    """
    kept = np.asarray(kept_rows, dtype=np.int64)
    w = np.asarray(widths, dtype=np.int64)
    projection = np.where(w < embedding_dim, w * embedding_dim, 0) if layout == "project" else 0
    per_field = kept * w + projection
    return np.where(kept > 0, per_field, 0).sum(-1)


def keep_counts(levels: np.ndarray, kept_rows: np.ndarray, keep_levels: int) -> np.ndarray:
    """Rows a candidate keeps per field: the top ``floor(level * kept_f / keep_levels)`` of the
    field's thresholded rows by norm (``level = keep_levels`` keeps them all)."""
    return np.asarray(levels, dtype=np.int64) * np.asarray(kept_rows, dtype=np.int64) // keep_levels


def _find_dlrm(model: nn.Module) -> DLRM:
    """The one torchrec ``DLRM`` (or subclass) in ``model`` (through DMP, DDP, DLRMTrain wrappers)."""
    found = [m for m in model.modules() if isinstance(m, DLRM)]
    if len(found) != 1:
        raise ValueError(f"bind_model needs a model holding exactly one torchrec DLRM, found {len(found)}")
    return found[0]


class OptEmbed(EmbeddingMethod):
    """OptEmbed (Lyu et al., CIKM 2022): row pruning by learned thresholds + evolved field widths.

    Args:
        config: ``OptEmbed.Config``.
        fields: the dataset's sparse fields.
        embedding_dim: the full width D (a multiple of 4).
    """

    name = "optembed"
    report_order = 3

    @dataclass(kw_only=True, slots=True)
    class Config:
        alpha: float = 1e-5
        """Weight of the threshold regulariser alpha * sum_f exp(-t_f) (README grid 1e-6..1e-4; Hetu 1e-5)."""
        threshold_lr: float = 1e-4
        """Learning rate of the plain-SGD threshold optimizer (README t_lr; Hetu thresh_lr 1e-4)."""
        norm: int = 1
        """Row norm compared with the thresholds: 1 (reference default) or 2."""
        threshold_init: float = 0.0
        """Initial threshold of every field (reference ``init_threshold(0)``)."""
        generations: int = 30
        """Evolution generations (the paper's T = 30)."""
        keep_num: int = 15
        """Elite kept per generation. The README says k = 15, the code has 0; we keep 15 (and, in
        any case, the best candidate ever seen is returned)."""
        mutation_num: int = 10
        """Children by mutation per generation (README and code: 10)."""
        crossover_num: int = 10
        """Children by crossover per generation (README and code: 10)."""
        mutation_prob: float = 0.1
        """Per-field mutation probability (README and code: 0.1)."""
        patience: int = 0
        """Stop the evolution after this many generations without a better candidate (0 = run all,
        as the paper does)."""
        keep_levels: int = 32
        """Row-keep levels searched with the widths: a candidate keeps, per row-pruned field, the
        top k / keep_levels of the rows its threshold kept (by norm), k in 1..keep_levels, so
        small budgets are met by pruning rows as well as by narrowing (deviation: the paper
        evolves widths only). 1 = widths only."""
        retrain_init: str = "rewind"
        """How the retrain model starts: "rewind" reloads the supernet's initial (step 0) weights,
        lottery-ticket style, as the official ``retrain.py`` does (the trainer must checkpoint them
        before the first step); "inherit" copies the searched supernet's kept rows (Hetu's choice);
        "fresh" initialises anew."""
        seed: int = 0
        """Seed of the evolution (identical on every rank, so all ranks score the same candidates)."""
        num_auc_bins: int = 65536
        """Histogram bins of the rank-mergeable candidate AUC (see ``CandidateAUC``)."""
        score_max_rows: int = 32768
        """Scoring stacks at most this many candidate x sample rows per dense forward (memory bound)."""

        def __post_init__(self) -> None:
            checks = [
                ("alpha", self.alpha >= 0, "must be >= 0"),
                ("threshold_lr", self.threshold_lr > 0, "must be positive"),
                ("norm", self.norm in (1, 2), "must be 1 or 2"),
                ("threshold_init", math.isfinite(self.threshold_init), "must be finite"),
                ("generations", self.generations > 0, "must be positive"),
                ("keep_num", self.keep_num >= 0, "must be >= 0"),
                ("mutation_num", self.mutation_num >= 0, "must be >= 0"),
                ("crossover_num", self.crossover_num >= 0, "must be >= 0"),
                ("mutation_num", self.mutation_num + self.crossover_num > 0,
                 "mutation_num + crossover_num must be positive"),
                ("mutation_prob", 0 < self.mutation_prob <= 1, "must be in (0, 1]"),
                ("patience", self.patience >= 0, "must be >= 0"),
                ("keep_levels", self.keep_levels >= 1, "must be >= 1"),
                ("retrain_init", self.retrain_init in RETRAIN_INITS, f"must be one of {list(RETRAIN_INITS)}"),
                ("num_auc_bins", self.num_auc_bins >= 2, "must be >= 2"),
                ("score_max_rows", self.score_max_rows > 0, "must be positive"),
            ]
            for key, ok, message in checks:
                if not ok:
                    raise ValueError(f"optembed.{key}: {message}, got {getattr(self, key)!r}")

    def __init__(self, config: "OptEmbed.Config", fields: list[FieldSpec], embedding_dim: int, *,
                 layout: str | None = None) -> None:
        super().__init__(config, fields, embedding_dim, layout=layout)
        self._model: DLRM | None = None

    @property
    def needs_initial_checkpoint(self) -> bool:
        """True when the trainer must save the supernet's step-0 weights (``retrain_init="rewind"``)."""
        return self.config.retrain_init == "rewind"

    def wants_retrain_init(self) -> bool:
        return self.config.retrain_init != "fresh"

    def retrain_init_state(self, searched: nn.Module, initial: nn.Module | None,
                           plan: SizePlan) -> dict[str, torch.Tensor] | None:
        """Kept rows' first w columns and ``[I_w | 0]`` projections (``inherited_weights``), from the
        step-0 supernet ("rewind", the official retrain.py's lottery-ticket reload) or the trained
        one ("inherit", as Hetu); None for "fresh"."""
        if self.config.retrain_init == "fresh":
            return None
        source = initial if self.config.retrain_init == "rewind" else searched
        if source is None:
            raise ValueError("optembed.retrain_init='rewind' needs the step-0 supernet; the trainer passed none")
        from embdim.embedding_methods.mixed_dim import build_retrain_module, table_name_for_feature
        from embdim.embedding_methods.plan import group_feature_name

        module = build_retrain_module(plan, device="cpu")
        tables = _supernet(source).ebc.embedding_bags
        with torch.no_grad():
            slots = [c.name for c in module.inner_configs()]
            for field_plan in plan.fields:
                full = tables[self.table_name(field_plan.name)].weight.detach()
                for k, group in enumerate(field_plan.groups):
                    feature = group_feature_name(field_plan.name, k, len(field_plan.groups))
                    table, projection = inherited_weights(full, group, self.embedding_dim)
                    name = table_name_for_feature(feature)
                    module.ebc.embedding_bags[name].weight.copy_(table)
                    if projection is not None and module.projection is not None:
                        module.projection.slot_weight(slots.index(name)).copy_(projection)
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    @staticmethod
    def table_name(field_name: str) -> str:
        """Name of a field's search table."""
        return f"t_{field_name}"

    def search_tables(self) -> list[EmbeddingBagConfig]:
        return [EmbeddingBagConfig(name=self.table_name(f.name), num_embeddings=f.num_embeddings,
                                   embedding_dim=self.embedding_dim, feature_names=[f.name],
                                   pooling=PoolingType.SUM) for f in self.fields]

    def build_search_module(self, ebc: EmbeddingBagCollection) -> OptEmbedSupernet:
        return OptEmbedSupernet(ebc, self.fields, norm=self.config.norm, threshold_init=self.config.threshold_init)

    def search_loss(self, module: nn.Module) -> torch.Tensor:
        return self.config.alpha * _supernet(module).regularizer()

    def extra_optimizers(self, module: nn.Module) -> list[torch.optim.Optimizer]:
        # Plain SGD without weight decay for the thresholds (reference ``get_optimizer``).
        return [torch.optim.SGD([_supernet(module).thresholds], lr=self.config.threshold_lr)]

    def extra_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        return [_supernet(module).thresholds]

    def bind_model(self, model: nn.Module) -> None:
        """Gives the method the DLRM whose sparse arch holds the search module (needed to score widths).

        Args:
            model: any module holding exactly one torchrec ``DLRM`` / ``DLRM_DCN`` (the DLRM itself,
                ``DLRMTrain``, the trainer's ``TrainModel`` or the DMP wrapping it).
        """
        self._model = _find_dlrm(model)

    def fit_schedule(self, schedule: TrainingSchedule) -> list[str]:
        """The evolution scores candidates on the validation split: a dataset without one fails
        here, before training, rather than after it. Nothing counts training steps."""
        if schedule.valid_rows <= 0:
            raise ValueError("optembed: the evolution scores width candidates on the validation split, and the "
                             "dataset has none (dataset.json splits); rebuild it with a valid split (embdim data ... "
                             "--split)")
        return []

    def budget_floor(self) -> tuple[float, str]:
        # Before training the thresholds are unknown: assume they keep every row (they can only
        # keep fewer, so this floor is always reachable at export).
        L = self.config.keep_levels
        kept = keep_counts(np.where([f.multi_hot for f in self.fields], L, 1),
                           [f.num_embeddings for f in self.fields], L)
        params = int(optembed_param_count(kept, np.full(len(self.fields), WIDTH_STEP), self.embedding_dim, self.layout))
        return (params / full_width_params(self.fields, self.embedding_dim),
                f"every field at width {WIDTH_STEP} keeping 1/{L} of its rows (optembed.keep_levels={L}), multi-hot "
                f"fields all of theirs, {self.layout} layout")

    def export_plan(self, module: nn.Module, context: SearchContext) -> SizePlan:
        """Frozen row masks over the full tables, then the budgeted evolution of field widths and
        row-keep levels.

        Collective: every rank must call it (row norms and AUC counts are all-reduced, and every
        rank joins every scoring forward through ``context.evaluate``). ``context.budget >= 1``
        means no budget.

        Args:
            module: the ``OptEmbedSupernet`` (its ``ebc`` may be sharded).
            context: the trainer's ``SearchContext``; ``evaluate`` passes batches with
                ``dense_features``, ``sparse_features`` (KJT) and ``labels``.
        """
        supernet = _supernet(module)
        if self._model is None:
            raise RuntimeError("optembed: call OptEmbed.bind_model(dlrm) before export_plan")
        if context.embedding_dim != self.embedding_dim:
            raise ValueError(f"optembed: context.embedding_dim={context.embedding_dim} but the method was built "
                             f"for {self.embedding_dim}")
        dim, config, num_fields = self.embedding_dim, self.config, len(self.fields)
        levels = config.keep_levels
        thresholds = supernet.thresholds.detach().double().cpu().numpy()
        device = supernet.thresholds.device

        ranks, kept_rows = [], []
        for i, f in enumerate(self.fields):
            row_norms = _table_row_norms(context, self.table_name(f.name), f.num_embeddings, config.norm, device)
            # Kept rows: ||E_r|| > t_f, as the reference's frozen ``calc_feature_mask``; ranked by
            # norm (highest first, ties by id, identically on every rank) for the keep levels.
            keep = row_norms > thresholds[i] if not f.multi_hot else np.ones(f.num_embeddings, dtype=bool)
            ranks.append(_norm_ranks(row_norms, keep))
            kept_rows.append(int(keep.sum()))
        kept_rows = np.array(kept_rows, dtype=np.int64)
        budget_params = (math.inf if context.budget >= 1.0
                         else context.budget * full_width_params(self.fields, dim))
        prunable = np.array([not f.multi_hot for f in self.fields])
        widths = allowed_widths(dim)
        gene_choices = ([widths] * num_fields
                        + [np.arange(1, levels + 1) if prune else np.array([levels]) for prune in prunable])

        def split(candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """``[P, 2F]`` candidates -> (widths [P, F], kept rows [P, F])."""
            candidates = np.atleast_2d(candidates)
            return candidates[:, :num_fields], keep_counts(candidates[:, num_fields:], kept_rows, levels)

        def param_count(candidates: np.ndarray) -> np.ndarray:
            candidate_widths, kept = split(candidates)
            return optembed_param_count(kept, candidate_widths, dim, self.layout)

        narrowest = np.array([g[0] for g in gene_choices], dtype=np.int64)
        if float(param_count(narrowest)[0]) > budget_params:
            raise BudgetError(self.name, context.budget, float(param_count(narrowest)[0]) / full_width_params(
                self.fields, dim), f"every field at width {WIDTH_STEP} keeping 1/{levels} of its thresholded rows")

        def initial(rng: np.random.Generator, i: int) -> np.ndarray:
            # Half the first generation is the paper's space (random widths, every thresholded
            # row kept), half draws the keep levels too; repair then brings both to the budget.
            genes = [rng.choice(widths) for _ in range(num_fields)]
            genes += [levels if (i % 2 == 0 or not prune) else rng.integers(1, levels + 1) for prune in prunable]
            return np.array(genes, dtype=np.int64)

        fitness_fn = self._fitness_fn(supernet, context, ranks, split)
        previous = supernet.apply_row_mask
        supernet.apply_row_mask = False  # the frozen keep masks replace it while scoring
        try:
            best, history = evolutionary_search(
                fitness_fn, num_fields=num_fields, allowed_widths=widths, param_count_fn=param_count,
                budget_params=budget_params, generations=config.generations, keep_num=config.keep_num,
                mutation_num=config.mutation_num, crossover_num=config.crossover_num,
                mutation_prob=config.mutation_prob, patience=config.patience, rng=np.random.default_rng(config.seed),
                gene_choices=gene_choices, min_params=0.95 * budget_params if math.isfinite(budget_params) else 0.0,
                initial=initial)
        finally:
            supernet.apply_row_mask = previous

        best_widths, best_kept = (a[0] for a in split(best))
        params = int(param_count(best)[0])
        fallbacks = []
        if not math.isfinite(history[-1]["best_fitness"]):
            fallbacks.append("no candidate got a finite validation AUC (a validation split with one class?): the "
                             "evolution kept the narrowest candidate")
        if math.isfinite(budget_params) and params < 0.95 * budget_params:
            fallbacks.append(f"the best candidate holds {params} parameters, {params / budget_params:.1%} of the budget: "
                             f"no width or keep-level step of its fields fits the rest")
        for note in fallbacks:
            logger.warning("OptEmbed: %s", note)

        field_plans = []
        for f, rank, width, count in zip(self.fields, ranks, best_widths, best_kept):
            keep = rank < count
            if not keep.any():
                groups = []
            else:
                ids = None if keep.all() else np.flatnonzero(keep).astype(np.int64)
                groups = [GroupPlan(width=int(width), ids=ids)]
            field_plans.append(FieldPlan(name=f.name, num_embeddings=f.num_embeddings, groups=groups))
        return SizePlan(
            method=self.name, embedding_dim=dim, fields=field_plans, layout=self.layout,
            budget=float(context.budget) if context.budget < 1.0 else None,
            extra={
                "thresholds": {f.name: float(t) for f, t in zip(self.fields, thresholds)},
                "thresholded_rows": {f.name: int(k) for f, k in zip(self.fields, kept_rows)},
                "kept_rows": {f.name: int(k) for f, k in zip(self.fields, best_kept)},
                "keep_levels": {f.name: int(k) for f, k in zip(self.fields, best[num_fields:])},
                "widths": {f.name: int(w) for f, w in zip(self.fields, best_widths)},
                "param_count": params,
                "best_fitness": history[-1]["best_fitness"] if history else None,
                "evolution_history": history,
                "fallbacks": fallbacks,
                "row_pruning_skipped": [f.name for f in self.fields if f.multi_hot],
                "norm": config.norm,
                "retrain_init": config.retrain_init,
            },
        )

    def _fitness_fn(self, supernet: OptEmbedSupernet, context: SearchContext, ranks: list[np.ndarray],
                    split: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> Callable[[np.ndarray], np.ndarray]:
        """Validation AUC of each candidate: one pass over each rank's validation part per generation."""
        dlrm, config = self._model, self.config
        device = supernet.thresholds.device
        order = [self.fields[[f.name for f in self.fields].index(n)] for n in dlrm.sparse_arch.sparse_feature_names]
        position = {f.name: i for i, f in enumerate(self.fields)}
        # Per-id norm ranks of the row-pruned (single-hot) fields, on the scoring device.
        rank_tables = {f.name: torch.from_numpy(ranks[i]).to(device) for i, f in enumerate(self.fields)
                       if not f.multi_hot}

        def fitness_fn(candidates: np.ndarray) -> np.ndarray:
            columns = [position[f.name] for f in order]
            candidate_widths, kept = split(candidates)
            widths = torch.as_tensor(candidate_widths[:, columns], dtype=torch.long, device=device)
            counts = torch.as_tensor(kept[:, columns], dtype=torch.long, device=device)
            auc = CandidateAUC(len(candidates), num_bins=config.num_auc_bins, device=device)

            def score_fn(batch: Any) -> None:
                supernet.eval()  # a training-mode supernet would draw random widths
                with torch.no_grad():
                    features = batch.sparse_features
                    pooled = supernet(features).to_dict()
                    jagged = features.to_dict() if rank_tables else {}
                    row_rank = {name: _sample_rank(jagged[name], table) for name, table in rank_tables.items()}
                    logits = candidate_logits(dlrm, batch.dense_features, pooled, widths, row_rank=row_rank,
                                              keep_counts=counts, max_rows=config.score_max_rows)
                    auc.update(logits, batch.labels)

            was_training = supernet.training
            try:
                context.evaluate(score_fn)
            finally:
                supernet.train(was_training)
            auc.load_state(context.all_reduce_sum(auc.state()))
            logger.info("OptEmbed: scored %d candidates; largest AUC binning error bound %.2e",
                        len(candidates), float(auc.error_bound().max()))
            return auc.compute().cpu().numpy()

        return fitness_fn


def _supernet(module: nn.Module) -> OptEmbedSupernet:
    if not isinstance(module, OptEmbedSupernet):
        raise ValueError(f"optembed: expected the OptEmbedSupernet search module, got {type(module).__name__}")
    return module

def inherited_weights(full_weight: torch.Tensor, group: GroupPlan,
                      embedding_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Start values of a retrain group taken from a supernet table (``retrain_init`` "inherit"/"rewind").

    The supernet trained each width w as the first w dims of a row, so the compact table takes the
    kept rows' first w columns and the ``w -> D`` projection starts as ``[I_w | 0]``: the retrain
    module then reproduces the masked supernet exactly. Pass the searched table for "inherit" (Hetu
    keeps the supernet weights) or the step-0 table for "rewind" (the official ``retrain.py``).

    Args:
        full_weight: ``[num_embeddings, D]`` supernet table (e.g. ``context.gather_table_rows``).
        group: the field's group in the plan.
        embedding_dim: D.

    Returns:
        ``(table [rows, w], projection [w, D])``; the projection is None when ``w == D``
        (the ``[in, out]`` layout of ``mixed_dim.GroupedProjection.slot_weight``).
    """
    rows = full_weight if group.ids is None else full_weight[torch.as_tensor(group.ids, device=full_weight.device)]
    table = rows[:, :group.width].clone()
    if group.width == embedding_dim:
        return table, None
    return table, torch.eye(group.width, embedding_dim, dtype=full_weight.dtype, device=full_weight.device)
