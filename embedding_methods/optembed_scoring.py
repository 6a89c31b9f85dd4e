"""OptEmbed's candidate scoring: logits of many width candidates from one lookup, and their AUC.

The evolution (``optembed.OptEmbed.export_plan``) scores every candidate on each rank's part of
the validation split: one embedding lookup per batch serves all candidates (``candidate_logits``)
and the binned AUC counts are summed across ranks (``CandidateAUC``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

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


def _sample_rank(jagged: JaggedTensor, ranks: torch.Tensor) -> torch.Tensor:
    """Per-sample norm rank of a single-hot field's row (``_norm_ranks``; -1 for an empty bag,
    whose pooled vector is zero anyway)."""
    values, lengths = jagged.values(), jagged.lengths()
    samples = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    out = torch.full((lengths.numel(),), -1, dtype=torch.long, device=values.device)
    return out.index_reduce_(0, samples, ranks.to(values.device)[values], "amax")
