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
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from embdim.embedding_methods.base import (BudgetError, EmbeddingMethod, FieldSpec, SearchContext, TrainingSchedule,
                                           full_width_params)
from embdim.embedding_methods.fused_kernels import row_and_width_mask, triton_enabled
from embdim.embedding_methods.plan import FieldPlan, GroupPlan, SizePlan

logger = logging.getLogger(__name__)

WIDTH_STEP = 4
"""Searched widths are multiples of this (FBGEMM TBE asserts ``embedding_dim % 4 == 0``)."""
RETRAIN_INITS = ("rewind", "inherit", "fresh")


def allowed_widths(embedding_dim: int) -> np.ndarray:
    """The searchable widths {4, 8, ..., embedding_dim} (the paper's {1..D} restricted to TBE widths)."""
    if embedding_dim <= 0 or embedding_dim % WIDTH_STEP:
        raise ValueError(f"embedding_dim must be a positive multiple of {WIDTH_STEP}, got {embedding_dim}")
    return np.arange(WIDTH_STEP, embedding_dim + 1, WIDTH_STEP, dtype=np.int64)


class BinaryStep(torch.autograd.Function):
    """Hard step with the piecewise-linear straight-through gradient of OptEmbed ``models/layer.py``.

    forward: ``(z > 0).float()``; backward: ``grad * g(z)`` with ``g(z) = 2 - 4|z|`` for
    ``|z| <= 0.4``, ``0.4`` for ``0.4 < |z| <= 1`` and ``0`` for ``|z| > 1``.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z)
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        return grad_output * _binary_step_slope(z)


def _row_norm(x: torch.Tensor, norm: int) -> torch.Tensor:
    """L1 or L2 norm over the last dim (the reference's ``torch.norm(xv, norm, dim=2)``)."""
    return x.abs().sum(-1) if norm == 1 else torch.linalg.vector_norm(x, 2, dim=-1)


def _binary_step_slope(z: torch.Tensor) -> torch.Tensor:
    """``BinaryStep``'s straight-through derivative ``g(z)``."""
    abs_z = z.abs()
    return torch.where(abs_z <= 0.4, 2 - 4 * abs_z, torch.where(abs_z <= 1, torch.full_like(z, 0.4),
                                                                  torch.zeros_like(z)))


class _RowAndWidthMask(torch.autograd.Function):
    """The supernet's training mask in one autograd node: ``x * m_row * m_width`` with
    ``m_row = where(prune, BinaryStep(||x||_p - t), 1)`` per ``[B, F]`` row and ``m_width`` keeping
    the first ``width[b, f]`` dims.

    Values and gradients are those of the composed formula in ``OptEmbedSupernet.mask_pooled``
    (the row norm, ``BinaryStep``, ``where`` and two ``[B, F, D]`` products, each its own autograd
    node; a masked entry may come out as ``+0.0`` where the products gave ``-0.0``), with fewer
    passes over ``[B, F, D]``: both 0/1 masks become one comparison against the effective width
    (``width``, or 0 for a pruned row) and one ``where``, no float mask is built, and the backward
    forms the row-mask gradient, the masked output gradient and the norm's gradient together
    (``addcmul_`` in place) instead of four separately allocated ``[B, F, D]`` gradients summed by
    autograd. Only ``[B, F]`` tensors are saved besides ``x``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, thresholds: torch.Tensor, prune: torch.Tensor, width: torch.Tensor,
                norm: int) -> torch.Tensor:
        norms = _row_norm(x, norm)  # [B, F], the same reduction as the composed formula
        z = norms - thresholds
        row = torch.where(prune, z > 0, True)  # BinaryStep(z) = (z > 0), or 1 where the field is not pruned
        positions = torch.arange(x.shape[-1], device=x.device)
        ctx.save_for_backward(x, z, norms if norm == 2 else None, prune, row, width)
        ctx.norm = norm
        keep = positions < torch.where(row, width, 0).unsqueeze(-1)  # [B, F, D]: both masks
        return torch.where(keep, x, 0.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, z, norms, prune, row, width = ctx.saved_tensors
        keep = torch.arange(x.shape[-1], device=x.device) < width.unsqueeze(-1)  # the width mask alone
        grad_kept = torch.where(keep, grad, 0.0)  # dL/d(x * m_row), [B, F, D]
        grad_row = (grad_kept * x).sum(-1)  # dL/dm_row, [B, F]
        grad_z = torch.where(prune, grad_row, torch.zeros_like(grad_row)) * _binary_step_slope(z)
        grad_x = grad_kept.mul_(row.unsqueeze(-1))  # the direct path, in place
        if ctx.norm == 1:
            grad_x.addcmul_(grad_z.unsqueeze(-1), x.sign())  # d||x||_1 / dx = sign(x)
        else:  # d||x||_2 / dx = x / ||x|| (0 where the norm is 0, as torch's norm backward)
            grad_x.addcmul_((grad_z / norms).masked_fill_(norms == 0, 0).unsqueeze(-1), x)
        return grad_x, -grad_z.sum(0), None, None, None


class OptEmbedSupernet(nn.Module):
    """The search-phase module; stands in for an ``EmbeddingBagCollection`` of uniform width D.

    The KJT goes unchanged to the child ``ebc`` (which DMP shards); masks act on its pooled output.
    For single-hot fields the pooled vector is the looked-up row, so the row mask is exact there.

    The thresholds are created on the device of ``ebc``'s parameters: on ``meta`` (how the trainer
    builds the sparse module) DMP materialises them on its device and calls ``reset_parameters``.
    ``forward`` hands the pooled output to one ``torch.fx.wrap``-ed function, so the train
    pipeline's fx trace sees ``ebc(features)`` followed by one opaque node.

    Args:
        ebc: the full-width collection, one table per field, every table of width D.
        fields: the dataset's sparse fields (order of ``thresholds``).
        norm: 1 or 2, the norm compared with the thresholds.
        threshold_init: initial value of every threshold (the reference's ``init_threshold(0)``).

    Example::

        supernet = OptEmbedSupernet(ebc, fields)
        dlrm = DLRM(supernet, dense_in_features=13, dense_arch_layer_sizes=[64, 16], ...)
    """

    def __init__(self, ebc: EmbeddingBagCollection, fields: list[FieldSpec], norm: int = 1,
                 threshold_init: float = 0.0) -> None:
        super().__init__()
        if norm not in (1, 2):
            raise ValueError(f"norm must be 1 or 2, got {norm}")
        configs = ebc.embedding_bag_configs()
        dims = {c.embedding_dim for c in configs}
        if len(dims) != 1:
            raise ValueError(f"every search table must have the same width, got {sorted(dims)}")
        names = [n for c in configs for n in c.feature_names]
        if sorted(names) != sorted(f.name for f in fields):
            raise ValueError(f"ebc features {names} do not match fields {[f.name for f in fields]}")
        self.ebc = ebc
        self.fields = list(fields)
        self.feature_names = [f.name for f in fields]
        self.embedding_dim = dims.pop()
        self.norm = norm
        self.threshold_init = float(threshold_init)
        device = next(iter(ebc.parameters()), torch.empty(0)).device
        # Replicated dense parameters (docs/torchrec-notes.md#per-field-parameters); the trainer
        # gives them to ``OptEmbed.extra_optimizers`` (plain SGD, as ``get_optimizer`` does).
        self.thresholds = nn.Parameter(torch.empty(len(fields), device=device))
        self.reset_parameters()
        # Constants kept out of the buffers (DDP never broadcasts them, checkpoints skip them) and
        # out of torch until first use, so building the model under a meta-device context is safe.
        self._prune_rows = [not f.multi_hot for f in fields]
        self._widths = allowed_widths(self.embedding_dim).tolist()
        self._constants_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.apply_row_mask = True
        """Row mask on/off; ``export_plan`` turns it off and applies the frozen keep masks instead."""
        self.candidate_widths: torch.Tensor | None = None
        """Per-field widths [F] applied in eval mode (None = full width, as the reference's test phase)."""
        self._key_index: dict[tuple[str, ...], torch.Tensor] = {}
        skipped = [f.name for f in fields if f.multi_hot]
        if skipped:
            logger.warning("OptEmbed: row pruning is skipped for multi-hot fields %s (a pooled bag is a sum "
                           "of rows, so a per-row mask is not exact on it); their widths are still searched",
                           skipped)

    def reset_parameters(self) -> None:
        """Sets every threshold to ``threshold_init`` (the tables are the child collection's business)."""
        if not self.thresholds.is_meta:
            with torch.no_grad():
                self.thresholds.fill_(self.threshold_init)

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The inner configs (uniform width D), as DLRM's constructor reads them."""
        return self.ebc.embedding_bag_configs()

    def set_candidate_widths(self, widths: Sequence[int] | None) -> None:
        """Sets per-field widths (field order) used in eval mode; None restores full width."""
        if widths is None:
            self.candidate_widths = None
            return
        w = torch.as_tensor(list(widths), dtype=torch.long, device=self.thresholds.device)
        if w.shape != (len(self.fields),) or bool(((w <= 0) | (w > self.embedding_dim) | (w % WIDTH_STEP != 0)).any()):
            raise ValueError(f"candidate widths must be {len(self.fields)} multiples of {WIDTH_STEP} in "
                             f"[{WIDTH_STEP}, {self.embedding_dim}], got {list(widths)}")
        self.candidate_widths = w

    def regularizer(self) -> torch.Tensor:
        """``sum_f exp(-t_f)`` over the row-pruned fields (the paper's threshold regulariser)."""
        # Multiplying by the 0/1 flags (rather than indexing) keeps every threshold in the graph,
        # so DDP never sees an unused parameter even when every field is multi-hot.
        prune_rows, _ = self._constants()
        return (torch.exp(-self.thresholds) * prune_rows.to(self.thresholds.dtype)).sum()

    def _constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prune_rows [F] bool, allowed widths)`` on the thresholds' device."""
        device = self.thresholds.device
        if device not in self._constants_on:
            self._constants_on[device] = (torch.tensor(self._prune_rows, device=device),
                                          torch.tensor(self._widths, dtype=torch.long, device=device))
        return self._constants_on[device]

    def _field_index(self, keys: list[str]) -> torch.Tensor:
        # Sharded KeyedTensors do not keep config order (docs/torchrec-notes.md#key-order): map by name.
        index = self._key_index.get(tuple(keys))
        if index is None or index.device != self.thresholds.device:
            position = {n: i for i, n in enumerate(self.feature_names)}
            index = torch.tensor([position[k] for k in keys], device=self.thresholds.device)
            self._key_index[tuple(keys)] = index
        return index

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        # The KJT goes straight to the (sharded) collection, as TrainPipelineSparseDist requires.
        return _mask_pooled(self, self.ebc(features))

    def mask_pooled(self, pooled: KeyedTensor) -> KeyedTensor:
        """Applies the row mask and the width mask to the collection's pooled output."""
        keys = pooled.keys()
        values = pooled.values()
        batch_size, dim = values.shape[0], self.embedding_dim
        x = values.reshape(batch_size, len(keys), dim)
        index = self._field_index(keys)
        prune_rows, widths = self._constants()
        width = None
        if self.training:
            # Uniform width per (sample, field) so every candidate width is trained about equally
            # (reference ``get_random_field_mask``), over {4, ..., D} instead of {1, ..., D}.
            width = widths[torch.randint(len(widths), (batch_size, len(keys)), device=x.device)]
        elif self.candidate_widths is not None:
            width = self.candidate_widths[index]
        if self.training and self.apply_row_mask:
            # The search's training step: the row mask below and the width mask in one autograd
            # node (_RowAndWidthMask, the same values and gradients).
            mask = row_and_width_mask if triton_enabled(x) else _RowAndWidthMask.apply
            x = mask(x, self.thresholds[index], prune_rows[index], width, self.norm)
        else:
            if self.apply_row_mask:
                # Row (feature) mask m_f = BinaryStep(||e||_p - t_f), computed on the full-width
                # vector before the dim mask (reference ``mode_supernet='all'``).
                z = _row_norm(x, self.norm) - self.thresholds[index]
                row_mask = torch.where(prune_rows[index], BinaryStep.apply(z), torch.ones_like(z))
                x = x * row_mask.unsqueeze(-1)
            if width is not None:
                x = x * (torch.arange(dim, device=x.device) < width.unsqueeze(-1)).to(x.dtype)
        return KeyedTensor(keys=keys, length_per_key=pooled.length_per_key(),
                           values=x.reshape(batch_size, len(keys) * dim))


def _mask_pooled(supernet: OptEmbedSupernet, pooled: KeyedTensor) -> KeyedTensor:
    return supernet.mask_pooled(pooled)


# One opaque fx node: the masking reads key lists and branches on the mode, which symbolic
# tracing (the train pipeline's) cannot follow.
torch.fx.wrap("_mask_pooled")


def candidate_logits(dlrm: nn.Module, dense_features: torch.Tensor, pooled: dict[str, torch.Tensor],
                     widths: torch.Tensor, row_keep: dict[str, torch.Tensor] | None = None, *,
                     row_rank: dict[str, torch.Tensor] | None = None, keep_counts: torch.Tensor | None = None,
                     max_rows: int = 1 << 15) -> torch.Tensor:
    """Logits of P width candidates on one batch from ONE embedding lookup.

    Applies each candidate's per-field width mask (and the frozen row keep mask) to the pooled
    embeddings and runs the model's ``dense_arch``, ``inter_arch`` and ``over_arch`` on the stacked
    ``[P * B, ...]`` inputs, as ``torchrec.models.dlrm.DLRM.forward`` does for one model. Works for
    ``DLRM`` and its subclasses (``DLRM_DCN``, ``DLRM_Projection``), which only swap those arches.

    Args:
        dlrm: a torchrec ``DLRM`` (eval mode; the dense arches must be row-independent, as they are).
        dense_features: ``[B, num_dense]``.
        pooled: ``{feature: [B, D]}``, e.g. ``search_module(kjt).to_dict()``.
        widths: ``[P, F]`` widths, columns in ``dlrm.sparse_arch.sparse_feature_names`` order (the
            field order for a DLRM built on ``OptEmbed.search_tables()``).
        row_keep: ``{feature: bool [B]}``; a sample whose row is pruned gets a zero vector there.
        row_rank: ``{feature: int64 [B]}``, with ``keep_counts``: per candidate row pruning. A
            sample's row is kept by candidate p when its rank (position by norm among the field's
            thresholded rows; the field's row count for rows below the threshold) is below
            ``keep_counts[p, f]``; features missing from ``row_rank`` keep every row.
        keep_counts: ``[P, F]`` kept rows per candidate and field (columns as ``widths``).
        max_rows: candidates are processed in chunks of at most this many ``P * B`` rows to bound memory.

    Returns:
        ``[P, B]`` logits.
    """
    names = list(dlrm.sparse_arch.sparse_feature_names)
    dim = dlrm.sparse_arch.D
    if widths.dim() != 2 or widths.shape[1] != len(names):
        raise ValueError(f"widths must be [P, {len(names)}], got {tuple(widths.shape)}")
    columns = []
    for name in names:
        column = pooled[name]
        if row_keep is not None and name in row_keep:
            column = column * row_keep[name].to(column.dtype).unsqueeze(-1)
        columns.append(column)
    sparse = torch.stack(columns, dim=1)  # [B, F, D]
    batch_size = sparse.shape[0]
    dense = dlrm.dense_arch(dense_features)  # candidate-independent: computed once
    masks = (torch.arange(dim, device=sparse.device) < widths.to(sparse.device).unsqueeze(-1)).to(sparse.dtype)
    ranked = None
    if row_rank:
        if keep_counts is None or tuple(keep_counts.shape) != tuple(widths.shape):
            raise ValueError(f"row_rank needs keep_counts of shape {tuple(widths.shape)}")
        # [B, F] rank of every sample's row (-1 = never pruned: kept by any count >= 0).
        ranked = torch.stack([row_rank[n].to(sparse.device) if n in row_rank
                              else torch.full((batch_size,), -1, dtype=torch.long, device=sparse.device)
                              for n in names], dim=1)
        keep_counts = keep_counts.to(sparse.device)
    chunk = max(1, max_rows // max(1, batch_size))
    outputs = []
    for start in range(0, widths.shape[0], chunk):
        mask = masks[start:start + chunk]  # [p, F, D]
        num = mask.shape[0]
        stacked_sparse = sparse.unsqueeze(0) * mask.unsqueeze(1)  # [p, B, F, D]
        if ranked is not None:
            keep = ranked.unsqueeze(0) < keep_counts[start:start + chunk].unsqueeze(1)  # [p, B, F]
            stacked_sparse = stacked_sparse * keep.unsqueeze(-1).to(sparse.dtype)
        stacked_sparse = stacked_sparse.reshape(num * batch_size, len(names), dim)
        stacked_dense = dense.unsqueeze(0).expand(num, -1, -1).reshape(num * batch_size, -1)
        interaction = dlrm.inter_arch(dense_features=stacked_dense, sparse_features=stacked_sparse)
        outputs.append(dlrm.over_arch(interaction).reshape(num, batch_size))
    return torch.cat(outputs, dim=0)


class CandidateAUC:
    """Per-candidate AUC from histograms of logits, mergeable across ranks by summing the state.

    Logits are clamped to ``[-logit_range, logit_range]`` and binned uniformly; ``state()`` is one
    int64 tensor ``[2, P, num_bins]`` (negative and positive counts) that ranks all-reduce with a
    sum. Pairs of a positive and a negative in different bins are ordered exactly; pairs in the same
    bin count 1/2 (a tie), so the binned AUC is within ``error_bound()`` = 0.5 * (fraction of
    positive-negative pairs sharing a bin) of the exact AUC. With 65536 bins over [-16, 16] a bin
    is 5e-4 logits wide, so logits spread over a few units give a bound of about 1e-4 (the
    search logs the bound of every generation).

    Args:
        num_candidates: P.
        num_bins: histogram bins.
        logit_range: logits outside ``[-logit_range, logit_range]`` fall in the end bins.
        device: where the counts live (the device the trainer all-reduces on).
    """

    def __init__(self, num_candidates: int, num_bins: int = 1 << 16, logit_range: float = 16.0,
                 device: torch.device | str | None = None) -> None:
        if num_candidates <= 0 or num_bins < 2 or logit_range <= 0:
            raise ValueError(f"need num_candidates > 0, num_bins >= 2, logit_range > 0; got "
                             f"{num_candidates}, {num_bins}, {logit_range}")
        self.num_candidates = num_candidates
        self.num_bins = num_bins
        self.logit_range = logit_range
        self.counts = torch.zeros(2, num_candidates, num_bins, dtype=torch.long, device=device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Adds a batch: ``logits [P, B]``, ``labels [B]`` (0/1)."""
        if logits.dim() != 2 or logits.shape[0] != self.num_candidates:
            raise ValueError(f"logits must be [{self.num_candidates}, B], got {tuple(logits.shape)}")
        logits = logits.detach().to(self.counts.device, torch.float64)
        scaled = (logits.clamp(-self.logit_range, self.logit_range) + self.logit_range) / (2 * self.logit_range)
        bins = (scaled * self.num_bins).long().clamp_(0, self.num_bins - 1)
        positive = (labels.detach().reshape(-1).to(self.counts.device) > 0.5).long()
        candidate = torch.arange(self.num_candidates, device=self.counts.device).unsqueeze(1)
        flat = (positive.unsqueeze(0) * self.num_candidates + candidate) * self.num_bins + bins
        self.counts.view(-1).index_add_(0, flat.reshape(-1), torch.ones_like(flat.reshape(-1)))

    def state(self) -> torch.Tensor:
        """The counts ``[2, P, num_bins]`` (int64); sum it across ranks, then ``load_state``."""
        return self.counts

    def load_state(self, state: torch.Tensor) -> None:
        """Replaces the counts, e.g. with the all-reduced ``state()``."""
        if state.shape != self.counts.shape:
            raise ValueError(f"state must be {tuple(self.counts.shape)}, got {tuple(state.shape)}")
        self.counts = state.to(self.counts.device, torch.long).clone()

    def _pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        negative, positive = self.counts[0].double(), self.counts[1].double()
        below = torch.cumsum(negative, dim=1) - negative  # negatives in strictly lower bins
        ordered = (positive * below).sum(1)
        tied = (positive * negative).sum(1)
        total = positive.sum(1) * negative.sum(1)
        return ordered, tied, total

    def compute(self) -> torch.Tensor:
        """AUC per candidate ``[P]`` (float64; NaN where a class is absent)."""
        ordered, tied, total = self._pairs()
        return torch.where(total > 0, (ordered + 0.5 * tied) / total.clamp(min=1), torch.full_like(total, math.nan))

    def error_bound(self) -> torch.Tensor:
        """Largest possible ``|binned AUC - exact AUC|`` per candidate, from the same counts."""
        _, tied, total = self._pairs()
        return 0.5 * tied / total.clamp(min=1)


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


def _gene_choices(choices: np.ndarray | Sequence[np.ndarray], num_genes: int) -> list[np.ndarray]:
    """The allowed values of every gene: one ascending array each (one array = the same for all)."""
    if isinstance(choices, np.ndarray) and choices.ndim == 1:
        choices = [choices] * num_genes
    if len(choices) != num_genes:
        raise ValueError(f"need the choices of {num_genes} genes, got {len(choices)}")
    return [np.array(sorted({int(v) for v in c}), dtype=np.int64) for c in choices]


def repair_to_budget(candidate: np.ndarray, choices: np.ndarray | Sequence[np.ndarray],
                     param_count_fn: Callable[[np.ndarray], Any], budget_params: float, rng: np.random.Generator,
                     min_params: float = 0.0) -> np.ndarray:
    """Steps random genes down one choice at a time until the candidate fits ``budget_params``,
    then up while it stays under ``min_params`` and a step up still fits.

    Args:
        candidate: ``[G]`` gene values (not modified), each one of its gene's choices.
        choices: the allowed values of every gene (ascending), or one array for all genes (the
            widths of a widths-only candidate).
        param_count_fn: ``[P, G] -> [P]`` parameter counts, non-decreasing in every gene.
        budget_params: the parameter budget.
        rng: random source.
        min_params: grow the candidate until it holds at least this many parameters, where a step
            that keeps it within ``budget_params`` exists (0 = no growth: the reference's repair).
    """
    genes = _gene_choices(choices, len(candidate))
    repaired = np.array(candidate, dtype=np.int64, copy=True)
    index = [int(np.searchsorted(g, v)) for g, v in zip(genes, repaired)]

    def count(c: np.ndarray) -> np.ndarray:
        return np.asarray(param_count_fn(np.atleast_2d(c)), dtype=np.float64)

    while float(count(repaired)[0]) > budget_params:
        shrinkable = [j for j in range(len(genes)) if index[j] > 0]
        if not shrinkable:
            raise ValueError(f"budget_params={budget_params} is below the narrowest candidate")
        j = int(rng.choice(shrinkable))
        index[j] -= 1
        repaired[j] = genes[j][index[j]]
    while min_params > 0 and float(count(repaired)[0]) < min_params:
        growable = [j for j in range(len(genes)) if index[j] + 1 < len(genes[j])]
        if not growable:
            break
        steps = np.repeat(repaired[None], len(growable), axis=0)
        for row, j in enumerate(growable):
            steps[row, j] = genes[j][index[j] + 1]
        fitting = [j for j, params in zip(growable, count(steps)) if params <= budget_params]
        if not fitting:
            break  # every step up overshoots: the search space has no finer step here
        j = int(rng.choice(fitting))
        index[j] += 1
        repaired[j] = genes[j][index[j]]
    return repaired


def mutate(parent: np.ndarray, choices: np.ndarray | Sequence[np.ndarray], mutation_prob: float,
           rng: np.random.Generator) -> np.ndarray:
    """Copy of ``parent`` with each gene redrawn from its choices with probability ``mutation_prob``.

    Unlike the reference (which edits the parent in place and draws from [1, D)), the parent is
    untouched, every width incl. the narrowest can be drawn, and at least one gene changes so a
    mutation never just re-evaluates its parent. ``choices``: one array for every gene (widths)
    or one per gene.
    """
    genes = _gene_choices(choices, len(parent))
    child = np.array(parent, dtype=np.int64, copy=True)
    redraw = rng.random(child.size) < mutation_prob
    for j in np.flatnonzero(redraw):
        child[j] = rng.choice(genes[j])
    variable = [j for j, g in enumerate(genes) if g.size > 1]
    if np.array_equal(child, parent) and variable:
        j = int(rng.choice(variable))
        child[j] = rng.choice(genes[j][genes[j] != child[j]])
    return child


def crossover(parent_a: np.ndarray, parent_b: np.ndarray, rng: np.random.Generator,
              num_units: int | None = None) -> tuple[np.ndarray, int]:
    """One-point crossover at a point in [1, U-1] (the reference draws it in [1, latent_dim]).

    ``num_units`` (default: every gene is a unit) groups genes laid out gene-major (gene g of unit
    u at ``g * U + u``): a field's width and keep level travel together.
    """
    num_units = parent_a.size if num_units is None else num_units
    if num_units < 2 or parent_a.size % num_units:
        raise ValueError(f"crossover needs at least 2 units dividing {parent_a.size} genes, got {num_units}")
    point = int(rng.integers(1, num_units))
    from_a = np.arange(parent_a.size) % num_units < point
    return np.where(from_a, parent_a, parent_b).astype(np.int64), point


def evolutionary_search(fitness_fn: Callable[[np.ndarray], np.ndarray], *, num_fields: int,
                        allowed_widths: Sequence[int], param_count_fn: Callable[[np.ndarray], Any],
                        budget_params: float, generations: int, keep_num: int, mutation_num: int,
                        crossover_num: int, mutation_prob: float, patience: int,
                        rng: np.random.Generator, gene_choices: Sequence[np.ndarray] | None = None,
                        min_params: float = 0.0,
                        initial: Callable[[np.random.Generator, int], np.ndarray] | None = None,
                        ) -> tuple[np.ndarray, list[dict]]:
    """Genetic search of per-field widths (reference ``evolution.py::EvolutionSearcher.search``).

    Each generation scores the population, keeps the best ``keep_num``, mutates the best
    ``mutation_num`` and crosses random pairs of the best ``crossover_num + 1``. Fitness is cached
    per candidate, so ``fitness_fn`` only sees candidates not scored before (one batched call per
    generation). Every candidate is repaired to ``budget_params`` before it is scored (and grown
    towards ``min_params`` where a step fits).

    Args:
        fitness_fn: ``[P, G]`` candidates -> ``[P]`` fitness (validation AUC), higher is better.
        num_fields: F (the crossover units).
        allowed_widths: the candidate widths of every field (a candidate is its F widths).
        param_count_fn: ``[P, G]`` candidates -> ``[P]`` parameter counts.
        budget_params: the largest allowed parameter count (``math.inf`` = no budget).
        generations: the most generations (the paper's T).
        keep_num: elite kept from one generation to the next.
        mutation_num: children by mutation per generation.
        crossover_num: children by crossover per generation.
        mutation_prob: per-gene mutation probability.
        patience: stop after this many generations without a better best (0 = never stop early).
        rng: the only random source (the result is deterministic given its state).
        gene_choices: the allowed values of each of the G genes (a multiple of F, gene-major:
            gene g of field f at ``g * F + f``); None = one gene per field, ``allowed_widths``.
        min_params: repair grows candidates below this many parameters (0 = never).
        initial: ``(rng, i) -> [G]`` the i-th candidate of generation 0 before repair (None =
            every gene drawn uniformly).

    Returns:
        ``(best [G] int64, history)``; history has one JSON-able dict per generation.
    """
    widths = np.array(sorted({int(w) for w in allowed_widths}), dtype=np.int64)
    if num_fields <= 0 or widths.size == 0 or widths[0] <= 0:
        raise ValueError(f"need num_fields > 0 and positive widths, got {num_fields}, {list(allowed_widths)}")
    genes = _gene_choices(widths if gene_choices is None else gene_choices,
                          num_fields if gene_choices is None else len(gene_choices))
    if len(genes) % num_fields:
        raise ValueError(f"{len(genes)} genes are not a multiple of num_fields={num_fields}")
    if generations <= 0 or min(keep_num, mutation_num, crossover_num, patience) < 0:
        raise ValueError("generations must be positive and keep_num, mutation_num, crossover_num, patience >= 0")
    if mutation_num + crossover_num == 0 or not 0 < mutation_prob <= 1:
        raise ValueError("need mutation_num + crossover_num > 0 and mutation_prob in (0, 1]")
    narrowest = np.array([g[0] for g in genes], dtype=np.int64)
    if float(np.asarray(param_count_fn(narrowest[None]))[0]) > budget_params:
        raise ValueError(f"budget_params={budget_params} is below the narrowest candidate")

    def repair(candidate: np.ndarray) -> np.ndarray:
        return repair_to_budget(candidate, genes, param_count_fn, budget_params, rng, min_params)

    fitness: dict[tuple[int, ...], float] = {}

    def score(population: list[np.ndarray]) -> np.ndarray:
        new = list({tuple(int(w) for w in c): None for c in population if tuple(int(w) for w in c) not in fitness})
        if new:
            values = np.asarray(fitness_fn(np.array(new, dtype=np.int64)), dtype=np.float64).reshape(-1)
            if values.shape != (len(new),):
                raise ValueError(f"fitness_fn returned {values.shape}, expected ({len(new)},)")
            # A NaN fitness (e.g. AUC of a split with one class) must never win.
            fitness.update(zip(new, np.nan_to_num(values, nan=-np.inf).tolist()))
        return np.array([fitness[tuple(int(w) for w in c)] for c in population])

    def fresh(make: Callable[[], np.ndarray], seen: set) -> np.ndarray:
        # Retry a few times for a candidate not seen yet; a duplicate costs no evaluation anyway.
        for _ in range(10):
            child = make()
            if tuple(child.tolist()) not in seen:
                break
        seen.add(tuple(child.tolist()))
        return child

    def draw(i: int) -> np.ndarray:
        if initial is not None:
            return np.asarray(initial(rng, i), dtype=np.int64)
        return np.array([rng.choice(g) for g in genes], dtype=np.int64)

    population_size = keep_num + mutation_num + crossover_num
    seen: set = set()
    population = [fresh(lambda i=i: repair(draw(i)), seen) for i in range(population_size)]
    best, best_fitness, stale, history = narrowest, -np.inf, 0, []
    for generation in range(generations):
        population = list({tuple(c.tolist()): c for c in population}.values())  # drop duplicates
        values = score(population)
        order = np.argsort(-values, kind="stable")
        ranked = [population[i] for i in order]
        if values[order[0]] > best_fitness:
            best, best_fitness, stale = ranked[0].copy(), float(values[order[0]]), 0
        else:
            stale += 1
        finite = values[np.isfinite(values)]
        history.append({
            "generation": generation, "num_scored": len(fitness), "best_fitness": best_fitness,
            "best_widths": best[:num_fields].tolist(), "best_params": int(np.asarray(param_count_fn(best[None]))[0]),
            "population_best": float(values[order[0]]),
            "population_mean": float(finite.mean()) if finite.size else float("nan"),
        })
        if len(genes) > num_fields:
            history[-1]["best_genes"] = best.tolist()
        logger.info("OptEmbed evolution generation %d: best %.6f, population mean %.6f, %d scored",
                    generation, best_fitness, history[-1]["population_mean"], len(fitness))
        if (patience and stale >= patience) or generation == generations - 1 or all(g.size == 1 for g in genes):
            break
        seen = set(fitness) | {tuple(c.tolist()) for c in ranked[:keep_num]}
        children = list(ranked[:keep_num])
        mutation_pool = ranked[:max(1, mutation_num)]
        crossover_pool = ranked[:crossover_num + 1]
        for i in range(mutation_num):
            parent = mutation_pool[i % len(mutation_pool)]
            children.append(fresh(lambda: repair(mutate(parent, genes, mutation_prob, rng)), seen))
        for _ in range(crossover_num):
            if num_fields < 2 or len(crossover_pool) < 2:
                # No crossover on one field or one parent: mutate the best instead.
                children.append(fresh(lambda: repair(mutate(ranked[0], genes, mutation_prob, rng)), seen))
                continue

            def make_crossover() -> np.ndarray:
                a, b = rng.choice(len(crossover_pool), size=2, replace=False)
                child, _ = crossover(crossover_pool[a], crossover_pool[b], rng, num_fields)
                return repair(child)

            children.append(fresh(make_crossover, seen))
        population = children
    return best, history


def _sample_rank(jagged: JaggedTensor, ranks: torch.Tensor) -> torch.Tensor:
    """Per-sample norm rank of a single-hot field's row (``_norm_ranks``; -1 for an empty bag,
    whose pooled vector is zero anyway)."""
    values, lengths = jagged.values(), jagged.lengths()
    samples = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    out = torch.full((lengths.numel(),), -1, dtype=torch.long, device=values.device)
    return out.index_reduce_(0, samples, ranks.to(values.device)[values], "amax")


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


def _table_row_norms(context: SearchContext, table_name: str, num_embeddings: int, norm: int,
                     device: torch.device) -> np.ndarray:
    """``||E_r||_norm`` of every row of a sharded table, identical on every rank.

    Each local shard adds ``sum_j |E_rj|^p`` of its rows and columns; the sum over ranks is exact for
    row-wise, table-wise and column-wise shards alike (a column-wise shard holds part of each row).
    This needs every element in exactly one shard across ranks (``local_rows`` yields a replicated
    table on one rank only). Cost: one float32 vector of ``num_embeddings`` per table per rank.
    """
    powered = torch.zeros(num_embeddings, dtype=torch.float32, device=device)
    with torch.no_grad():
        for first_row, rows in context.local_rows(table_name):
            rows = rows.detach().to(device, torch.float32)
            powered[first_row:first_row + rows.shape[0]] += rows.abs().pow(norm).sum(1)
    powered = context.all_reduce_sum(powered)
    return (powered if norm == 1 else powered.sqrt()).cpu().numpy()


def _norm_ranks(norms: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Position of every kept row by norm (0 = highest; ties by id); ``keep.sum()`` for the others,
    so ``rank < n`` selects the top n kept rows."""
    kept = np.flatnonzero(keep)
    ranks = np.full(len(norms), len(kept), dtype=np.int64)
    # A stable sort breaks ties by id, so every rank of the job picks the same rows.
    ranks[kept[np.argsort(-norms[kept], kind="stable")]] = np.arange(len(kept), dtype=np.int64)
    return ranks


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
