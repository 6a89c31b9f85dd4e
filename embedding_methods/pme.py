"""PME: pruning-based multi-size embedding (per-id widths from saliency at initialisation).

Liu, Song, Li, Choi, Chen, Hu, "Pruning-based Multi-size Embedding", Frontiers in Big Data 2023
(doi 10.3389/fdata.2023.1195742). No code was found; this follows the "Implementable algorithm" of
``docs/methods.md#pme`` (an interpretation consistent with the abstract):

1. Full table E [N, D] per field (the search module's ``ec`` / ``ebc``).
2. Saliency ``s_ij = |E_ij * dL/dE_ij|`` (SNIP connection sensitivity) accumulated over
   ``saliency_batches`` training batches, after ``warmup_steps`` ordinary steps (0 = at
   initialisation, the paper's setting), into a sharded accumulator table on the shard that owns
   the row (``mask_aware.SaliencyTap``).
3. One global threshold over every entry of every table for the budget, found exactly across
   shards by histogram refinement (``global_threshold``).
4. Capacity transfer: an id's size is its number of surviving entries, snapped to a multiple of 4
   (FBGEMM TBE); size 0 prunes the id.
5. Ids of equal size form one group of the plan (``embedding_methods.grouping``); retrain builds a
   compact table per group, zero-padded to D (``pad``, the default: the plan's size is the number
   of surviving entries, as the paper counts it) or projected to D (``project``).

Choices the paper leaves open, and the defaults here (all in ``PME.Config``):

- Criterion: SNIP ``|e * g|``, summed over occurrences (an id seen twice in a batch adds both terms;
  ``sum |e g_o|`` rather than ``|e sum g_o|``, because the TBE backward sums per occurrence) and
  over batches. One-shot: a single pruning step, no iteration.
- S = 100 batches at initialisation (docs/methods.md#pme: 1-100; more batches touch more ids). When
  the search trains fewer steps than ``warmup_steps + saliency_batches`` (a small dataset, few
  epochs or ``train.max_steps``), both are scaled down to fit before training (``fit_schedule``),
  with a logged note recorded in ``plan.extra["adaptations"]``.
- The tables are frozen from the first saliency step on (``freeze_tables``): saliency is measured
  at one point, and "rewind" then reads the values it was measured at.
- Entries never touched in the saliency batches score 0. Ties at the threshold (these zeros
  included, when the budget exceeds the touched entries) are broken by the id's train count (more
  frequent ids first), then field order, then id: a frequency prior for what saliency did not see.
- Ids never seen in training (count 0) are pruned (``prune_unseen``).
- The search phase must run ``required_search_steps`` = warmup + S training steps; later steps
  change nothing the export reads (tables frozen, accumulator closed). The dense network keeps
  training during the S batches (its optimizer is the trainer's).
- Snapping rule "nearest" (1 -> 0, 2 -> 4, 6 -> 8). Snapping moves the parameter count away from
  the budget, so the kept-entry count is re-solved (secant steps with a bisection fallback) until the
  plan's parameters (projections included under ``project``) are at most the budget and within
  ``budget_tolerance`` below it. When no kept-entry count lands there, single ids then move
  (``_repair_to_budget``), the ones snapping cut (or raised) most first: one width step (4
  parameters) at a time under ``pad``, so the plan ends within a few parameters of the budget;
  between the widths a field already has under ``project``, where a new group costs a projection.
- Retrain from a fresh init (``retrain_init="fresh"``), or "rewind": each id keeps the initial values
  of its w most salient entries, packed left, with projection ``[I_w | 0]``.

Distributed contract: ``export_plan`` is collective; ``local_rows`` must yield every stored entry on
exactly one rank. TorchRec divides sparse gradients by the world size by default, so the accumulator
holds the saliency averaged over ranks' batches: a constant factor that leaves the order unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from embdim.embedding_methods.base import EmbeddingMethod, SearchContext, TrainingSchedule, full_width_params
from embdim.embedding_methods.grouping import (SNAP_RULES, retrain_init_state_from_tables,
                                        size_plan_from_widths, snap_widths)
from embdim.embedding_methods.mask_aware import MaskAwareEmbedding, acc_table_name, main_table_name
from embdim.embedding_methods.plan import WIDTH_MULTIPLE, SizePlan

logger = logging.getLogger(__name__)

RETRAIN_INITS = ("fresh", "rewind")
_FLOAT_KEY_LOW, _FLOAT_KEY_BITS = -(1 << 31), 32
_ROW_KEY_BITS = 62

AllReduce = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------
# Exact global selection by histogram refinement (docs/torchrec-notes.md#global-thresholds)


def float_sort_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like the float32 values (``-0.0`` and ``0.0`` share a key).

    Non-negative floats order like their bit patterns; negative ones in reverse, hence the flip.
    Working on keys makes the refinement exact: it ends on one representable float, never on a
    float interval.
    """
    bits = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits + (1 << 31)))


def float_from_sort_key(key: int) -> float:
    bits = key if key >= 0 else -key - (1 << 31)
    return float(torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)[0])


def kth_smallest_key(chunks: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor | None]]], k: int,
                     all_reduce_sum: AllReduce, *, low: int, num_bits: int, bits_per_round: int = 12,
                     device: torch.device | str = "cpu") -> tuple[int, int, int]:
    """The key K of the k-th smallest element (weights count as multiplicities) across ranks.

    Every rank iterates its own ``(keys, weights)`` chunks (all keys in ``[low, low + 2^num_bits)``);
    each round builds a histogram of ``2^bits_per_round`` equal power-of-two bins over the current
    range on every rank, all-reduces it, and narrows the range to the bin holding the k-th element,
    until the bin is one key wide. ``ceil(num_bits / bits_per_round)`` rounds and as many passes over
    the local data; every rank ends with the same answer.

    Args:
        chunks: a zero-argument callable returning a fresh iterable of ``(int64 keys, int64
            weights or None)`` (called once per round).
        k: 1-based rank, ``1 <= k <= total weight``.
        all_reduce_sum: sums a tensor over ranks.
        low, num_bits: the key range ``[low, low + 2^num_bits)``.
        bits_per_round: log2 of the bins per round.
        device: where the histograms live (NCCL needs them on the GPU).

    Returns:
        ``(K, weight of keys < K, weight of keys == K)``.
    """
    below, width_bits = 0, num_bits
    while True:
        bits = min(bits_per_round, width_bits)
        shift = width_bits - bits
        hist = torch.zeros(1 << bits, dtype=torch.int64, device=device)
        high = low + (1 << width_bits)
        for keys, weights in chunks():
            keys = keys.to(device)
            inside = (keys >= low) & (keys < high)
            bins = (keys[inside] - low) >> shift
            w = torch.ones_like(bins) if weights is None else weights.to(device, torch.int64)[inside]
            hist.index_add_(0, bins, w)
        hist = all_reduce_sum(hist)
        cumulative = below + torch.cumsum(hist, 0)
        j = int(torch.searchsorted(cumulative, torch.tensor([k], dtype=torch.int64, device=device))[0])
        if j >= hist.numel():
            raise ValueError(f"k={k} exceeds the total weight {int(cumulative[-1])} in the key range")
        below = int(cumulative[j] - hist[j])
        low += j << shift
        width_bits = shift
        if width_bits == 0:
            return low, below, int(hist[j])


@dataclass(frozen=True)
class GlobalThreshold:
    """The outcome of ``global_threshold``: keep every score above ``value`` and ``num_tied_kept``
    of the ``num_tied`` scores equal to it, exactly ``keep_count`` in all."""

    value: float
    num_above: int
    num_tied: int
    num_tied_kept: int
    total: int

    @property
    def keep_count(self) -> int:
        return self.num_above + self.num_tied_kept


def global_threshold(local_scores: Callable[[], Iterable[torch.Tensor]], keep_count: int,
                     all_reduce_sum: AllReduce, *, bits_per_round: int = 12,
                     device: torch.device | str = "cpu") -> GlobalThreshold:
    """Threshold that keeps exactly the ``keep_count`` largest scores spread over all ranks.

    Histogram refinement over float keys (``kth_smallest_key``): three rounds of 4096 bins find the
    exact float32 value v of the ``keep_count``-th largest score. Scores ``> v`` are kept; of the
    scores ``== v`` exactly ``keep_count - #(> v)`` are kept, which makes the count exact under ties.
    *Which* tied entries: the caller decides, deterministically and identically on every rank (PME
    orders tied rows by a global row key, see ``PME``).

    Args:
        local_scores: zero-argument callable returning a fresh iterable of this rank's score tensors
            (any shape; called once per round, so it can re-read live shards).
        keep_count: how many scores to keep over all ranks (clamped to ``[0, total]``).
        all_reduce_sum: sums a tensor over ranks (identity on one rank).
        bits_per_round: log2 of the histogram bins per round.
        device: where histograms live.
    """
    def chunks() -> Iterator[tuple[torch.Tensor, None]]:
        for s in local_scores():
            s = s.detach().reshape(-1)
            if bool(torch.isnan(s).any()):
                raise ValueError("global_threshold: scores contain NaN")
            # Descending order of scores = ascending order of the negated keys.
            yield -float_sort_keys(s) - 1, None

    local_total = sum(int(s.numel()) for s in local_scores())
    total = int(all_reduce_sum(torch.tensor([local_total], dtype=torch.int64, device=device))[0])
    if keep_count <= 0:
        return GlobalThreshold(math.inf, 0, 0, 0, total)
    if keep_count >= total:
        return GlobalThreshold(-math.inf, total, 0, 0, total)
    key, below, at = kth_smallest_key(chunks, keep_count, all_reduce_sum, low=_FLOAT_KEY_LOW,
                                      num_bits=_FLOAT_KEY_BITS, bits_per_round=bits_per_round, device=device)
    return GlobalThreshold(value=float_from_sort_key(-key - 1), num_above=below, num_tied=at,
                           num_tied_kept=keep_count - below, total=total)


# ------------------------------------------------------------------------------------------------
# The method


def _check(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"pme.{key}: {message}, got {value!r}")


@dataclass
class _Chunk:
    field: int
    first: int  # first row of the chunk within its field
    scores: torch.Tensor  # [n, d] accumulated saliency (a column-wise shard holds part of d)
    eligible: torch.Tensor  # [n] bool
    row_keys: torch.Tensor  # [n] int64 tie-break order


class _AccChunks:
    """Re-readable chunks of this rank's accumulator shards, with eligibility and tie keys.

    Tie key of a row: ``rank of its count among the distinct counts (descending) * total_rows +
    its global row`` (fields in order), unique per row: more frequent ids first, then field, then id.
    Calling the object starts a fresh pass over the live shards.
    """

    def __init__(self, method: "PME", context: SearchContext) -> None:
        self.method, self.context = method, context
        self.counts = [np.asarray(context.counts(f.name)) for f in method.fields]
        num_rows = np.array([f.num_embeddings for f in method.fields], dtype=np.int64)
        self.field_offsets = np.concatenate([[0], np.cumsum(num_rows)[:-1]]).astype(np.int64)
        self.total_rows = int(num_rows.sum())
        self.neg_unique = -np.unique(np.concatenate(self.counts))[::-1].astype(np.int64)  # ascending
        if len(self.neg_unique) * self.total_rows >= 1 << _ROW_KEY_BITS:
            raise ValueError("pme: too many rows x distinct counts for 62-bit tie keys")

    def __call__(self) -> Iterator[_Chunk]:
        config = self.method.config
        for i, f in enumerate(self.method.fields):
            for first, rows in self.context.local_rows(acc_table_name(f.name)):
                step = max(1, config.chunk_entries // max(1, rows.shape[1]))
                for a in range(0, rows.shape[0], step):
                    scores = rows[a:a + step].detach()
                    lo, hi = first + a, first + a + scores.shape[0]
                    c = self.counts[i][lo:hi]
                    rank = np.searchsorted(self.neg_unique, -c)  # position among descending counts
                    keys = rank.astype(np.int64) * self.total_rows + self.field_offsets[i] + np.arange(lo, hi)
                    eligible = c > 0 if config.prune_unseen else np.ones(len(c), dtype=bool)
                    yield _Chunk(i, lo, scores, torch.from_numpy(eligible).to(scores.device),
                                 torch.from_numpy(keys).to(scores.device))


class PME(EmbeddingMethod):
    """PME (Liu et al., Front. Big Data 2023): SNIP saliency at init, global threshold, capacity transfer.

    Args:
        config (PME.Config): see the fields (and the module docstring for the defaults' reasons).
        fields (list[FieldSpec]): the dataset's sparse fields.
        embedding_dim (int): the full width D (a multiple of 4).
    """

    name = "pme"
    report_order = 5

    @dataclass(kw_only=True, slots=True)
    class Config:
        saliency_batches: int = 100
        """S: training batches whose saliency is accumulated (docs/methods.md#pme: 1-100)."""
        warmup_steps: int = 0
        """Ordinary training steps before the saliency batches (0 = at initialisation)."""
        freeze_tables: bool = True
        """Block table updates from the first saliency step on (saliency at one point; "rewind"
        reads those values). Exact for sgd / adagrad / rowwise_adagrad; Adam keeps moving rows by
        momentum left from warmup steps."""
        snap: str = "nearest"
        """Size -> width rule: "nearest" (half up), "down" or "up" (multiples of 4)."""
        budget_tolerance: float = 0.01
        """Stop re-solving the kept-entry count once the plan's parameters are at most the budget
        and within this relative distance below it."""
        max_budget_iterations: int = 30
        """At most this many threshold solves for the budget."""
        max_groups: int = 0
        """At most this many width groups per field (0 = no cap); extra groups merge up."""
        prune_unseen: bool = True
        """Prune ids with train count 0 whatever their (zero) saliency."""
        retrain_init: str = "fresh"
        """"fresh" or "rewind" (initial values of each id's w most salient entries, see module doc)."""
        histogram_bits: int = 12
        """log2 of the histogram bins per refinement round (12: 4096 bins, 3 rounds for float32)."""
        chunk_entries: int = 1 << 22
        """Entries read per chunk of a local shard while counting (bounds temporary memory)."""
        pooled_single_hot: bool = True
        """Look single-hot fields up with a pooled EBC (one vector per bag; exact for one id)."""

        def __post_init__(self) -> None:
            _check(self.saliency_batches > 0, "saliency_batches", "must be positive", self.saliency_batches)
            _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0", self.warmup_steps)
            _check(self.snap in SNAP_RULES, "snap", f"must be one of {list(SNAP_RULES)}", self.snap)
            _check(0 < self.budget_tolerance < 1, "budget_tolerance", "must be in (0, 1)", self.budget_tolerance)
            _check(self.max_budget_iterations > 0, "max_budget_iterations", "must be positive",
                   self.max_budget_iterations)
            _check(self.max_groups >= 0, "max_groups", "must be >= 0", self.max_groups)
            _check(self.retrain_init in RETRAIN_INITS, "retrain_init", f"must be one of {list(RETRAIN_INITS)}",
                   self.retrain_init)
            # "rewind" reads the saliency-time values from the (frozen) search tables at export.
            _check(self.retrain_init != "rewind" or self.freeze_tables, "retrain_init",
                   "'rewind' needs freeze_tables = true", self.retrain_init)
            _check(1 <= self.histogram_bits <= 20, "histogram_bits", "must be in [1, 20]", self.histogram_bits)
            _check(self.chunk_entries > 0, "chunk_entries", "must be positive", self.chunk_entries)

    @property
    def required_search_steps(self) -> int:
        """Training steps the search phase must run: warmup plus the saliency batches."""
        return self.config.warmup_steps + self.config.saliency_batches

    def fit_schedule(self, schedule: TrainingSchedule) -> list[str]:
        """Scales ``warmup_steps`` and ``saliency_batches`` down together (at least one saliency
        batch) when the search trains fewer steps than they need, e.g. the default S = 100 on an
        epoch of 78 batches. Fails naming ``train.epochs`` when the search trains no step."""
        cfg, total = self.config, schedule.total_steps
        need = cfg.warmup_steps + cfg.saliency_batches
        if need <= total:
            return []
        if total < 1:
            raise ValueError(f"train.epochs: pme needs at least one search training step (saliency batches), the "
                             f"search trains none ({schedule.describe()})")
        warmup = cfg.warmup_steps * total // need
        saliency = max(1, total - warmup)
        warmup = total - saliency
        self.config = dataclasses.replace(cfg, warmup_steps=warmup, saliency_batches=saliency)
        changes = [f"saliency_batches {cfg.saliency_batches} -> {saliency}"]
        if warmup != cfg.warmup_steps:
            changes.append(f"warmup_steps {cfg.warmup_steps} -> {warmup}")
        note = (f"pme: {', '.join(changes)}: the search trains {total} steps ({schedule.describe()}), fewer than "
                f"warmup_steps + saliency_batches = {need}")
        self.adaptations.append(note)
        return [note]

    # -- search ---------------------------------------------------------------------------------

    def search_tables(self) -> list[EmbeddingBagConfig]:
        """The pooled single-hot tables (may be empty); unpooled and accumulator tables are built inside."""
        return [EmbeddingBagConfig(name=main_table_name(f.name), num_embeddings=f.num_embeddings,
                                   embedding_dim=self.embedding_dim, feature_names=[f.name])
                for f in self.fields if self.config.pooled_single_hot and not f.multi_hot]

    def build_search_module(self, ebc: EmbeddingBagCollection) -> MaskAwareEmbedding:
        device = ebc.device if ebc is not None else None  # meta when the trainer builds it
        cfg = self.config
        return MaskAwareEmbedding(
            self.fields, self.embedding_dim, use_saliency=True, saliency_start=cfg.warmup_steps,
            saliency_steps=cfg.saliency_batches, freeze_tables_from=cfg.warmup_steps if cfg.freeze_tables else -1,
            pooled_single_hot=cfg.pooled_single_hot, ebc=ebc, device=device)

    def init_search_state(self, module: nn.Module, context: SearchContext) -> None:
        """Zeroes this rank's accumulator shards, unless a resumed search already accumulated."""
        module = _search_module(module)
        if int(module.num_steps) <= module.saliency_start:
            module.zero_accumulators(context)

    # -- export ---------------------------------------------------------------------------------

    def kept_entries(self, context: SearchContext, keep_count: int, *,
                     device: torch.device | str = "cpu") -> tuple[list[np.ndarray], GlobalThreshold]:
        """Surviving entries per id of every field when exactly ``keep_count`` accumulated scores
        are kept over all ranks (collective; identical result on every rank).

        Scores above the global threshold are kept; of the tied ones, rows in tie-key order (see
        ``_AccChunks``) take all their tied entries until the count is met and the boundary row takes
        the rest. Only per-row counts matter for capacity transfer, so a row split column-wise over
        ranks needs no further order. Ineligible rows (``prune_unseen``) keep nothing and are not
        counted.

        Returns:
            ``([num_embeddings] int64 per field, the threshold)``.
        """
        return self._kept_entries(_AccChunks(self, context), keep_count, context, device)

    def _kept_entries(self, chunks: "_AccChunks", keep_count: int, context: SearchContext,
                      device: torch.device | str) -> tuple[list[np.ndarray], GlobalThreshold]:
        field_offsets, total_rows = chunks.field_offsets, chunks.total_rows
        threshold = global_threshold(lambda: (c.scores[c.eligible] for c in chunks()), keep_count,
                                     context.all_reduce_sum, bits_per_round=self.config.histogram_bits, device=device)
        v = threshold.value
        boundary_key, boundary_extra = None, 0
        if threshold.num_tied_kept > 0:
            def tie_chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
                for c in chunks():
                    ties = (c.scores == v).sum(1) * c.eligible
                    has = ties > 0
                    yield c.row_keys[has], ties[has].to(torch.int64)
            boundary_key, below, _ = kth_smallest_key(tie_chunks, threshold.num_tied_kept, context.all_reduce_sum,
                                                      low=0, num_bits=_ROW_KEY_BITS,
                                                      bits_per_round=self.config.histogram_bits, device=device)
            boundary_extra = threshold.num_tied_kept - below
        kept = [torch.zeros(f.num_embeddings, dtype=torch.int64, device=device) for f in self.fields]
        for c in chunks():
            count = (c.scores > v).sum(1)
            if boundary_key is not None:
                count = count + torch.where(c.row_keys < boundary_key, (c.scores == v).sum(1), 0)
            kept[c.field][c.first:c.first + count.shape[0]] += (count * c.eligible).to(device)
        kept = [context.all_reduce_sum(k) for k in kept]
        if boundary_key is not None:
            # Added after the reduction, identically on every rank: the boundary row may be split
            # over ranks (column-wise), and its partial count must be added exactly once.
            global_row = boundary_key % total_rows
            i = int(np.searchsorted(field_offsets, global_row, side="right") - 1)
            kept[i][int(global_row - field_offsets[i])] += boundary_extra
        return [k.cpu().numpy() for k in kept], threshold

    def export_plan(self, module: nn.Module, context: SearchContext) -> SizePlan:
        """Global threshold for the budget, capacity transfer, snapping, grouping. Collective."""
        module = _search_module(module)
        cfg, dim = self.config, self.embedding_dim
        if context.embedding_dim != dim:
            raise ValueError(f"pme: context.embedding_dim={context.embedding_dim}, the method has {dim}")
        done = module.saliency_steps_done()
        if done < cfg.saliency_batches:
            raise RuntimeError(f"pme: only {done} of saliency_batches={cfg.saliency_batches} batches were "
                               f"accumulated; run the search for required_search_steps={self.required_search_steps} "
                               f"training steps")
        device = module.num_steps.device
        chunks = _AccChunks(self, context)
        names = [f.name for f in self.fields]
        full = full_width_params(self.fields, dim)
        budget = min(float(context.budget), 1.0)
        target = budget * full

        def make_plan(widths: list[np.ndarray]) -> SizePlan:
            return size_plan_from_widths(self.name, dim, names, widths, layout=self.layout, max_groups=cfg.max_groups,
                                         budget=budget if budget < 1 else None)

        def evaluate(keep: int) -> tuple[SizePlan, GlobalThreshold, list[np.ndarray]]:
            kept, threshold = self._kept_entries(chunks, keep, context, device)
            return make_plan([snap_widths(k, dim, cfg.snap) for k in kept]), threshold, kept

        eligible_total = global_threshold(lambda: (c.scores[c.eligible] for c in chunks()), 0,
                                          context.all_reduce_sum, device=device).total
        # Params P(keep) grow with keep, but snapping makes the slope anything from ~0 ("down",
        # when kept entries are spread thin) to ~4 ("up"), and projections add steps when a width
        # group appears. Root finding: scale by P / keep until the target is bracketed, then
        # secant steps inside the bracket, bisecting when one side stalls (Illinois-style). The
        # budget binds from below: the answer is the largest plan at or under the target.
        keep = min(max(int(round(target)), 1), eligible_total)
        low, high = (0, 0), None  # (keep, params) with params <= target / > target
        best: tuple[int, SizePlan, GlobalThreshold, list[np.ndarray]] | None = None  # the largest plan <= target
        over: tuple[int, SizePlan, GlobalThreshold, list[np.ndarray]] | None = None  # the smallest plan > target
        iterations, last_side = 0, None
        for iterations in range(1, cfg.max_budget_iterations + 1):
            plan, threshold, kept = evaluate(keep)
            params = plan.num_params()
            side = "low" if params <= target else "high"
            if side == "low":
                if best is None or params > best[0]:
                    best = (params, plan, threshold, kept)
                if target - params <= cfg.budget_tolerance * target:
                    break
                low = (keep, params)
                if keep >= eligible_total:
                    break  # everything eligible is kept and the budget is still not used up
            else:
                if over is None or params < over[0]:
                    over = (params, plan, threshold, kept)
                high = (keep, params)
            if high is None:
                proposal = int(round(keep * target / max(params, 1))) if params > 0 else 2 * keep
                proposal = min(max(proposal, keep + 1), eligible_total)
            elif high[0] - low[0] <= 1:
                break  # the target sits in a step of P
            elif side == last_side:
                proposal = (low[0] + high[0]) // 2
            else:
                proposal = low[0] + int(round((target - low[1]) * (high[0] - low[0]) / max(high[1] - low[1], 1)))
                proposal = min(max(proposal, low[0] + 1), high[0] - 1)
            keep, last_side = proposal, side
        params, plan, threshold, kept = best if best is not None else over  # type: ignore[misc]
        moved = 0
        if params > target or target - params > cfg.budget_tolerance * target:
            # No kept-entry count lands in [(1 - tolerance) target, target]: snapping moves whole
            # groups of ids at once. Move single ids (pad: one width step of 4 parameters each).
            eligible = [np.asarray(context.counts(f.name)) > 0 if cfg.prune_unseen
                        else np.ones(f.num_embeddings, dtype=bool) for f in self.fields]
            counts = [np.asarray(context.counts(f.name)) for f in self.fields]
            plan, moved = _repair_to_budget(plan, kept, eligible, counts, target, cfg.budget_tolerance, make_plan)
            params = plan.num_params()
        fallbacks = []
        if params > target or target - params > cfg.budget_tolerance * target:
            fallbacks.append(f"plan has {params} parameters for a budget of {target:.0f} "
                             f"({100 * (params - target) / max(target, 1):+.2f}%) after {iterations} threshold solves "
                             f"and {moved} single-id moves")
            logger.warning("pme: %s", fallbacks[-1])
        plan.extra = {
            "config": asdict(cfg),
            "criterion": "snip |E * dL/dE|",
            "saliency_batches": done,
            "keep_count": threshold.keep_count,
            "threshold": threshold.value,
            "tied_at_threshold": threshold.num_tied,
            "eligible_entries": eligible_total,
            "budget_solves": iterations,
            "ids_moved_to_budget": moved,
            "retrain_init": cfg.retrain_init,
            "fallbacks": fallbacks,
        }
        logger.info("pme: kept %d entries (threshold %.3g), achieved fraction %.4f for budget %.4f",
                    threshold.keep_count, threshold.value, plan.achieved_fraction(), budget)
        return plan

    def wants_retrain_init(self) -> bool:
        return self.config.retrain_init == "rewind"

    def retrain_init_state(self, searched: nn.Module, initial: nn.Module | None,
                           plan: SizePlan) -> dict[str, torch.Tensor] | None:
        """``retrain_init="rewind"``: each id keeps the values its w most salient entries had when
        saliency was measured (the search tables, frozen since with ``freeze_tables``), packed left,
        ties to the lower column; each group's projection starts as ``[I_w | 0]``. ``searched`` is
        an unsharded copy of the search module with every table gathered, accumulators included
        (``MaskAwareEmbedding.table_names()``). None for "fresh"."""
        if self.config.retrain_init == "fresh":
            return None
        module = _search_module(searched)
        tables = {f.name: module.full_table(main_table_name(f.name)) for f in plan.fields}
        saliency = {f.name: module.full_table(acc_table_name(f.name)) for f in plan.fields}
        return retrain_init_state_from_tables(plan, tables, column_scores=saliency)


def _repair_to_budget(plan: SizePlan, kept: list[np.ndarray], eligible: list[np.ndarray], counts: list[np.ndarray],
                      target: float, tolerance: float,
                      make_plan: Callable[[list[np.ndarray]], SizePlan]) -> tuple[SizePlan, int]:
    """Greedy fix-up of a plan over the target, or under it by more than the tolerance.

    Snapping moves ids in blocks, so no kept-entry count may land in ``[(1 - tolerance) target,
    target]``. Each round moves single ids, each at most once:

    - over budget: ids move down, those that snapping raised most first (``width - kept``), then
      rarer ids, until the plan fits (the move that crosses the target is taken);
    - under budget: eligible ids move up, those that snapping cut most first (``kept - width``),
      then more frequent ids, while the summed cost still fits the gap.

    Under ``pad`` a move is one width step (4 <-> 8, 4 -> 0 prunes, 0 -> 4 revives): every move
    costs 4 parameters and new groups cost nothing, so the plan ends within a few parameters of
    the target. Under ``project`` a new group costs its projection (w x D), so ids move between the
    widths their field already has, and when still under budget the cheapest new group that fits
    the gap is opened (e.g. in a field the threshold pruned entirely) for the next round to fill.

    Deterministic, so identical on every rank. Returns ``(plan, number of id moves)``.
    """
    from embdim.embedding_methods.grouping import allowed_widths, widths_from_field_plan

    dim, pad = plan.embedding_dim, plan.layout == "pad"
    choices = allowed_widths(dim)
    moved = 0
    for _ in range(64):
        gap = target - plan.num_params()
        if 0 <= gap <= tolerance * target:
            break
        widths = [widths_from_field_plan(f) for f in plan.fields]
        moves = []
        for i, w in enumerate(widths):
            if pad:
                up = gap > 0
                ids = np.flatnonzero(eligible[i] & (w < dim)) if up else np.flatnonzero(w > 0)
                new = w[ids] + (WIDTH_MULTIPLE if up else -WIDTH_MULTIPLE)
            else:
                present = np.unique(w[w > 0])
                if not len(present):
                    continue
                if gap > 0:
                    j = np.searchsorted(present, w, side="right")
                    ids = np.flatnonzero((j < len(present)) & eligible[i])
                    new = present[j[ids]]
                else:
                    j = np.searchsorted(present, w, side="left") - 1
                    ids = np.flatnonzero(w > 0)
                    new = np.where(j[ids] >= 0, present[np.maximum(j[ids], 0)], 0)
            if gap > 0:
                priority, frequency = kept[i][ids] - w[ids], counts[i][ids]
            else:
                priority, frequency = w[ids] - kept[i][ids], -counts[i][ids]
            moves.append((np.full(len(ids), i), ids, new, np.abs(new - w[ids]), priority, frequency))
        changed = False
        if moves:
            field_of, ids, new, cost, priority, frequency = (np.concatenate(x) for x in zip(*moves))
            order = np.lexsort((ids, field_of, -frequency, -priority))
            spent = np.cumsum(cost[order])
            # Under budget: never cross the target. Over: up to and including the move that crosses it.
            take = order[spent <= gap] if gap > 0 else order[:int(np.searchsorted(spent, -gap)) + 1]
            for i in np.unique(field_of[take]):
                sel = take[field_of[take] == i]
                widths[i][ids[sel]] = new[sel]
            moved += len(take)
            changed = len(take) > 0
            gap -= np.sign(gap) * cost[take].sum()
        if not pad and gap > tolerance * target:
            best = None  # (cost, field, id, width) of the cheapest group to open
            for i, w in enumerate(widths):
                present = set(np.unique(w[w > 0]).tolist())
                for width in (int(c) for c in choices if int(c) not in present):
                    ids = np.flatnonzero(eligible[i] & (w < width))
                    if not len(ids):
                        continue
                    first = ids[np.lexsort((ids, -counts[i][ids], -(kept[i][ids] - w[ids])))[0]]
                    cost = (width * dim if width < dim else 0) + width - w[first]
                    if cost <= gap and (best is None or cost < best[0]):
                        best = (cost, i, first, width)
            if best is not None:
                widths[best[1]][best[2]] = best[3]
                moved += 1
                changed = True
        if not changed:
            break
        plan = make_plan(widths)
    return plan, moved


def _search_module(module: nn.Module) -> MaskAwareEmbedding:
    if not isinstance(module, MaskAwareEmbedding) or not module.use_saliency:
        raise ValueError(f"expected the PME MaskAwareEmbedding search module (with an accumulator), got "
                         f"{type(module).__name__}")
    return module
