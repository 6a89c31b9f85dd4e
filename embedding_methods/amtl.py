"""AMTL: per-id embedding widths from twin mask networks fed with frequency features.

Yan et al., "Learning Effective and Efficient Embedding via an Adaptively-Masked Twins-based Layer",
CIKM 2021 (arXiv 2108.11513). No public code; ``docs/methods.md#amtl`` collects what the
abstract and secondary sources establish and marks the rest as design. This file follows it:

- Input per id: frequency features ``s_i`` from the train-split counts (``mask_aware.side_features``:
  log1p(count), count-rank fraction, normalised frequency), stored in a frozen per-id side table
  that is sharded like any table (docs/torchrec-notes.md#side-tables).
- Twins, per field and not shared: ``h_i = alpha_i * MLP_h(s_i) + (1 - alpha_i) * MLP_l(s_i)`` with
  ``alpha_i = log1p(cnt_i) / log1p(max cnt of the field)`` (the paper's "normalized frequency"; the
  log form is our choice: with raw ``cnt / max_cnt`` nearly every id of a heavy-tailed field would
  train l-AML alone). Frequent ids mostly train h-AML, rare ones l-AML; ids never seen in training
  (count 0, alpha 0) use l-AML like any rare id.
- Choice over K = D/4 widths {4, 8, ..., D} instead of the paper's D positions (FBGEMM TBE widths
  must be multiples of 4, docs/torchrec-notes.md#table-widths): ``p_i = softmax(h_i / T)``, straight-through
  one-hot ``t_i`` (hard forward, soft backward), mask ``m_ij = sum_{k: width_k > j} t_ik`` (the
  cumulative sum from the right, expanded to dims), applied to each looked-up row before pooling
  (``mask_aware.MaskAwareEmbedding``).
- Loss: task loss + ``lambda * F`` + ``budget_weight * relu(F - budget)``, where ``F`` is the
  expected parameter fraction ``sum_i E_p[width_i] / (N * D)`` over *every row of every table*
  (exactly the achieved fraction of a ``pad`` plan drawn from p: rows x widths over N x D).
  The paper trains on the task loss alone (docs/methods.md#amtl marks the width penalty as design). Because
  an id's mask depends only on its count, F is computed exactly from the distinct counts of each
  field weighted by their multiplicities, not estimated from a batch (a batch over-represents
  frequent ids, whose rows are a small share of the parameters).
- The mask networks start with a zero output layer whose bias favours ``initial_width`` (full width
  by default), so a warm-started model (``amtl_from_baseline``) is unchanged at step 0; the paper
  stresses that AMTL can be added to a trained model.

Export: per distinct count of every field, the mask nets' ``log p(width)``; without a budget every
id takes its argmax width. With one, the plan meets it: the export projects the per-id widths onto
the budget by choosing the assignment of highest total log-probability whose parameters, as the
plan's layout stores them, are at most the budget (``widths_for_budget``: a Lagrangian price per
parameter, bisected, then single ids of the boundary profiles widened while they fit), so the plan
ends within one id's width step of the budget and distinct budgets give distinct plans. The ids
moved and the fractions before and after are logged and kept in ``plan.extra["budget_projection"]``.
Ids are grouped by width (``embedding_methods.grouping``). AMTL never prunes an id (its narrowest
width is 4), so its floor is every id at width 4. The training penalty F counts what a ``pad`` plan
stores (rows x widths over N x D); under ``project`` the projections are counted at export only.

Warm start (``warm_start``, ``--init-from``): a trained baseline's full-width tables are loaded
into the search tables straight from its DCP checkpoint (``amtl_warm_start_keys`` maps the keys).
Retrain start (``retrain_init``): "fresh", or "inherit" (each id's first w searched dims with a
``[I_w | 0]`` projection: the retrain model starts as the masked search model).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from embdim.embedding_methods.base import BudgetError, EmbeddingMethod, FieldSpec, SearchContext, uniform_floor
from embdim.embedding_methods.gemm import batched_affine
from embdim.embedding_methods.grouping import (allowed_widths, retrain_init_state_from_tables, size_plan_from_widths,
                                               widths_from_field_plan)
from embdim.embedding_methods.mask_aware import (NUM_SIDE_FEATURES, MaskAwareEmbedding, copy_into_table, main_table_name,
                                          side_features)
from embdim.embedding_methods.plan import SizePlan

logger = logging.getLogger(__name__)

INITIAL_LOGIT = 2.0
"""Bias of the initial width's logit (others 0): p = e^2 / (e^2 + K - 1), 0.71 for K = 4 at T = 1."""
RETRAIN_INITS = ("fresh", "inherit")


def straight_through_one_hot(probs: torch.Tensor) -> torch.Tensor:
    """``onehot(argmax p)`` in the forward pass, gradient of ``p`` in the backward pass.

    Written as ``onehot + (p - stopgrad(p))``, the paper's ``p + stopgrad(onehot - p)`` rearranged
    so that the forward value is exactly 0/1 in floating point.
    """
    # scatter_ rather than F.one_hot, which checks the class range with two host reads off CUDA.
    hard = torch.zeros_like(probs).scatter_(-1, probs.argmax(dim=-1, keepdim=True), 1.0)
    return hard + (probs - probs.detach())


def cumulative_width_mask(choice: torch.Tensor, width_step: int = 4) -> torch.Tensor:
    """Mask over D = K * width_step dims from a (one-hot) choice over widths ``[L, K]``.

    ``m[:, j] = sum_{k >= j // width_step} choice[:, k]``: dim j is kept when the chosen width
    ``width_step * (k + 1)`` exceeds j. Hard 0/1 when ``choice`` is one-hot; soft gradients flow to
    every choice at or beyond the dim's block.
    """
    per_block = choice.flip(-1).cumsum(-1).flip(-1)
    return per_block.repeat_interleave(width_step, dim=-1)


class _CumulativeMaskedRows(torch.autograd.Function):
    """``rows * cumulative_width_mask(straight_through_one_hot(probs))`` in one step.

    ``rows`` ``[..., D]``, ``probs`` ``[..., K]`` with ``D = K * width_step``. The forward keeps the
    first ``width_step * (argmax + 1)`` dims of every row; the backward gives exactly the gradients
    of the composed formula: ``g * mask`` to the rows and, to the probabilities (the one-hot's
    straight-through gradient is the identity), ``cumsum_k(sum over block k of g * rows)`` (the
    right-to-left cumulative mask's backward). Nothing ``[..., D]``-sized is built besides the
    output and the row gradient: no float mask, no one-hot, no flipped copies, and three kernels
    instead of about twelve.
    """

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, probs: torch.Tensor, width_step: int) -> torch.Tensor:
        num_choices = probs.shape[-1]
        keep = torch.arange(num_choices, device=probs.device) <= probs.argmax(dim=-1, keepdim=True)  # [..., K]
        ctx.save_for_backward(rows, keep)
        ctx.width_step = width_step
        blocks = rows.unflatten(-1, (num_choices, width_step))
        return (blocks * keep.unsqueeze(-1)).flatten(-2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        rows, keep = ctx.saved_tensors
        shape = (keep.shape[-1], ctx.width_step)
        grad_blocks = grad.unflatten(-1, shape)
        grad_rows = (grad_blocks * keep.unsqueeze(-1)).flatten(-2) if ctx.needs_input_grad[0] else None
        grad_probs = None
        if ctx.needs_input_grad[1]:
            # cumsum_k(sum over block k of g * rows) as one GEMM with a 0/1 [D, K] matrix: CUDA's
            # cumsum over a short last dim took 9.9 ms per step at [65536, 26, 32] on an H200.
            grad_probs = (grad * rows) @ _block_cumsum_matrix(shape[0], shape[1], grad.dtype, grad.device)
        return grad_rows, grad_probs, None


@functools.lru_cache(maxsize=16)
def _block_cumsum_matrix(num_choices: int, width_step: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``T [K * width_step, K]`` with ``T[d, k] = 1`` where ``d // width_step <= k``: ``v @ T`` is
    ``cumsum_k`` of ``v``'s block sums."""
    block = torch.arange(num_choices * width_step, device=device) // width_step
    return (block.unsqueeze(1) <= torch.arange(num_choices, device=device)).to(dtype)


def masked_rows(rows: torch.Tensor, probs: torch.Tensor, width_step: int = 4) -> torch.Tensor:
    """``rows * cumulative_width_mask(straight_through_one_hot(probs), width_step)`` (values and
    gradients), computed by ``_CumulativeMaskedRows``."""
    return _CumulativeMaskedRows.apply(rows, probs, width_step)


class AMTLMaskNet(nn.Module):
    """The twin mask networks of every field (the ``mask_fn`` of ``MaskAwareEmbedding``).

    The 2 x F small MLPs (h-AML and l-AML of every field) are stored stacked and evaluated as one
    batched GEMM per layer: every parameter is ``[2, F, ...]``, index 0 of the first dim the
    h-AML, 1 the l-AML, the second dim the field. Layer j has ``weight_j`` ``[2, F, out, in]``
    (``nn.Linear``'s layout) and ``bias_j`` ``[2, F, out]``; the last layer is the choice head,
    initialised to a zero weight and a bias of ``INITIAL_LOGIT`` on the initial width.
    ``reset_parameters`` draws the hidden layers exactly as the ``nn.Linear`` modules of a
    per-field ``ModuleList`` would, in the same order (h-AML of every field, then l-AML).

    Args:
        fields (list[FieldSpec]): the sparse fields (one h-AML / l-AML pair each).
        embedding_dim (int): D; the choices are the widths ``4, 8, ..., D``.
        hidden_sizes (list[int]): hidden widths of each MLP (ReLU).
        temperature (float): softmax temperature T.
        initial_width (int): width every id starts at (a multiple of 4 in ``[4, D]``).
        device (torch.device | None): where to create the parameters (``meta`` for DMP).
    """

    def __init__(self, fields: list[FieldSpec], embedding_dim: int, *, hidden_sizes: list[int],
                 temperature: float, initial_width: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.widths = allowed_widths(embedding_dim)
        if initial_width not in self.widths:
            raise ValueError(f"initial_width must be one of {self.widths.tolist()}, got {initial_width}")
        self.embedding_dim = embedding_dim
        self.temperature = temperature
        self.field_index = {f.name: i for i, f in enumerate(fields)}
        self.num_embeddings = [f.num_embeddings for f in fields]
        self.initial_choice = int(np.flatnonzero(self.widths == initial_width)[0])
        sizes = [NUM_SIDE_FEATURES, *hidden_sizes, len(self.widths)]
        self.num_layers = len(sizes) - 1
        for j, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
            shape = (2, len(fields), n_out, n_in)
            self.register_parameter(f"weight_{j}", nn.Parameter(torch.empty(shape, device=device)))
            self.register_parameter(f"bias_{j}", nn.Parameter(torch.empty(2, len(fields), n_out, device=device)))
        self.reset_parameters()
        # Distinct side rows of each field and how many ids have them (``set_count_profiles``);
        # host arrays, moved to the parameters' device on first use (not buffers: DMP would
        # materialise meta buffers as zeros, and they are recomputed from the counts anyway).
        self._profiles: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(fields)
        self._profiles_on: dict[torch.device, tuple[list, torch.Tensor]] = {}
        self._index_on: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def reset_parameters(self) -> None:
        """Hidden layers as ``nn.Linear.reset_parameters`` (Kaiming-uniform weight, uniform bias),
        drawn per net and field in the old module order; the head as described in the class doc."""
        if self.weight_0.is_meta:
            return
        with torch.no_grad():
            for net in range(2):
                for f in range(self.weight_0.shape[1]):
                    for j in range(self.num_layers - 1):
                        weight, bias = getattr(self, f"weight_{j}")[net, f], getattr(self, f"bias_{j}")[net, f]
                        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                        bound = 1 / math.sqrt(weight.shape[1]) if weight.shape[1] > 0 else 0
                        nn.init.uniform_(bias, -bound, bound)
            last = self.num_layers - 1
            head, head_bias = getattr(self, f"weight_{last}"), getattr(self, f"bias_{last}")
            head.zero_()
            head_bias.zero_()
            head_bias[..., self.initial_choice] = INITIAL_LOGIT

    def _layers(self, fields: list[int], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(weight [2P, out, in], bias [2P, out])`` of every layer for the fields ``fields``."""
        everything = len(fields) == self.weight_0.shape[1] and fields == list(range(len(fields)))
        index = None
        if not everything:
            key = (tuple(fields), device)
            if key not in self._index_on:  # made once: a per-step host-to-device copy would sync
                self._index_on[key] = torch.tensor(fields, dtype=torch.long, device=device)
            index = self._index_on[key]
        layers = []
        for j in range(self.num_layers):
            weight, bias = getattr(self, f"weight_{j}"), getattr(self, f"bias_{j}")
            if index is not None:
                weight, bias = weight.index_select(1, index), bias.index_select(1, index)
            layers.append((weight.flatten(0, 1), bias.flatten(0, 1)))
        return layers

    def _twin_logits(self, fields: list[int], side: torch.Tensor) -> torch.Tensor:
        """``alpha * MLP_h(s) + (1 - alpha) * MLP_l(s)`` ``[P, N, K]`` of side rows ``[P, N, 4]``
        (N rows of each of the P fields ``fields``): one ``baddbmm`` per layer for all 2P MLPs."""
        num, rows = side.shape[0], side.shape[1]
        s = side[..., :NUM_SIDE_FEATURES]
        x = s.unsqueeze(0).expand(2, num, rows, NUM_SIDE_FEATURES).reshape(2 * num, rows, NUM_SIDE_FEATURES)
        layers = self._layers(fields, side.device)
        for j, (weight, bias) in enumerate(layers):
            x = batched_affine(x, weight, bias)  # baddbmm, with a weight gradient that fills the GPU
            if j < len(layers) - 1:
                x = torch.relu(x)
        h, l = x.view(2, num, rows, x.shape[-1]).unbind(0)
        alpha = side[..., 2:3]
        return alpha * h + (1 - alpha) * l

    def logits(self, field_name: str, side: torch.Tensor) -> torch.Tensor:
        """``h = alpha * MLP_h(s) + (1 - alpha) * MLP_l(s)`` ``[L, K]`` from side rows ``[L, 4]``."""
        return self._twin_logits([self.field_index[field_name]], side.unsqueeze(0))[0]

    def probs(self, field_name: str, side: torch.Tensor) -> torch.Tensor:
        return self._softmax(self.logits(field_name, side))

    def _softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """``softmax(logits / T)``; at T = 1 without the division (x / 1 == x: one pass less)."""
        return torch.softmax(logits if self.temperature == 1 else logits / self.temperature, dim=-1)

    def forward(self, field_name: str, rows: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        choice = straight_through_one_hot(self.probs(field_name, side.to(self._device())))
        return cumulative_width_mask(choice).to(rows.dtype)

    def mask_rows(self, field_names: list[str], rows: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """The masked rows ``rows * forward(field, rows, side)`` of P fields at once.

        Args:
            field_names: the P fields, in the order of ``rows``' second dim.
            rows: ``[N, P, D]`` looked-up rows.
            side: ``[N, P, 4]`` their side rows.
        """
        fields = [self.field_index[n] for n in field_names]
        logits = self._twin_logits(fields, side.to(self._device()).transpose(0, 1))  # [P, N, K]
        probs = self._softmax(logits).transpose(0, 1)
        return masked_rows(rows, probs.to(rows.dtype), self.embedding_dim // len(self.widths))

    def choices(self, field_name: str, side: torch.Tensor) -> torch.Tensor:
        """Index of the argmax width per row (the export rule; T does not change the argmax)."""
        return self.logits(field_name, side).argmax(dim=-1)

    def _device(self) -> torch.device:
        return self.weight_0.device

    def set_count_profiles(self, counts: Mapping[str, np.ndarray]) -> None:
        """Stores the distinct counts of every field with their multiplicities (for the penalty)."""
        for name, i in self.field_index.items():
            values, multiplicity = np.unique(np.asarray(counts[name]), return_counts=True)
            self._profiles[i] = (side_features(values, counts[name]), multiplicity.astype(np.float64))
        self._profiles_on.clear()

    def expected_param_fraction(self) -> torch.Tensor:
        """``sum_i E_p[width_i] / (N * D)`` over every row of every table (differentiable).

        Fields are evaluated together (one batched pass per bucket of fields, ``_profile_buckets``):
        the distinct side rows of a bucket's fields padded to its longest field's with copies of a
        field's first row at multiplicity 0 (they add exactly 0).
        """
        if any(p is None for p in self._profiles):
            raise RuntimeError("AMTL: count profiles are missing; call AMTL.init_search_state(module, context) "
                               "after sharding")
        device = self._device()
        if device not in self._profiles_on:
            # Moved once: a host-to-device copy every step (as the per-step ``as_tensor(widths)``
            # was) blocks the host until the GPU has caught up.
            self._profiles_on[device] = (
                [(fields, torch.from_numpy(rows).to(device), torch.from_numpy(mult).to(device))
                 for fields, rows, mult in self._profile_buckets()],
                torch.as_tensor(self.widths, dtype=torch.float32, device=device))
        buckets, widths = self._profiles_on[device]
        total = None
        for fields, rows, mult in buckets:
            probs = self._softmax(self._twin_logits(fields, rows))
            expected_width = probs @ widths  # [P, U]
            part = (mult * expected_width).sum()
            total = part if total is None else total + part
        return total / (sum(self.num_embeddings) * self.embedding_dim)

    def _profile_buckets(self, max_padding: float = 1.5) -> list[tuple[list[int], np.ndarray, np.ndarray]]:
        """``(fields, rows [P, U, 4], multiplicities [P, U] float32)`` per bucket of fields.

        Fields sorted by their number of distinct counts are cut into buckets whose padded size
        stays within ``max_padding`` times their real size, so that one field with many distinct
        counts does not make every other field pad to it (usually a single bucket).
        """
        order = sorted(range(len(self._profiles)), key=lambda i: len(self._profiles[i][1]))  # type: ignore[index]
        groups: list[list[int]] = []
        for i in order:
            if groups:
                group = groups[-1] + [i]
                real = sum(len(self._profiles[j][1]) for j in group)  # type: ignore[index]
                if len(group) * len(self._profiles[i][1]) <= max_padding * real:  # type: ignore[index]
                    groups[-1] = group
                    continue
            groups.append([i])
        buckets = []
        for group in groups:
            group.sort()
            longest = max(len(self._profiles[i][1]) for i in group)  # type: ignore[index]
            width = self._profiles[group[0]][0].shape[1]  # type: ignore[index]
            rows = np.zeros((len(group), longest, width), dtype=np.float32)
            mult = np.zeros((len(group), longest), dtype=np.float32)
            for k, i in enumerate(group):
                r, m = self._profiles[i]  # type: ignore[misc]
                rows[k, :len(m)], rows[k, len(m):] = r, r[0]
                mult[k, :len(m)] = m  # float64 -> float32, as the per-field cast did
            buckets.append((group, rows, mult))
        return buckets


@dataclass(frozen=True)
class CountProfiles:
    """The mask nets' scores of one field, per distinct train count (ids with equal counts have
    equal side rows, hence equal scores)."""

    inverse: np.ndarray
    """``[num_embeddings]`` int64: the profile (distinct count) of every id."""
    multiplicity: np.ndarray
    """``[U]`` int64: ids per profile."""
    log_probs: np.ndarray
    """``[U, K]`` float64: ``log softmax(h / T)`` over the widths 4, 8, ..., D."""


def widths_for_budget(profiles: list[CountProfiles], widths: np.ndarray,
                      table_params: float) -> tuple[list[np.ndarray], float]:
    """Per-id widths maximising ``sum_i log p_i(w_i)`` subject to ``sum_i w_i <= table_params``.

    A multiple-choice knapsack, solved by its Lagrangian: for a price ``lam`` per parameter every
    id takes ``argmax_k log p(k) - lam * width_k`` (ties to the narrower width), whose total width
    does not grow with ``lam``; bisection finds the boundary price, where every profile is either
    settled or switches between two widths. The ids of switching profiles (in order of log-prob
    gained per parameter, then field, then id) then take the wider width while the total fits, so
    the result is within one id's width step of ``table_params`` (all ids at D when that fits).

    Args:
        profiles: per field, the scores per distinct count (``AMTL.width_scores``).
        widths: the K widths ``4, 8, ..., D`` of the score columns, ascending.
        table_params: the most table parameters (rows x widths) allowed.

    Returns:
        ``(per-field [num_embeddings] int64 widths, the price lam)``. Raises ``ValueError`` when
        even every id at the narrowest width exceeds ``table_params``.
    """
    widths = np.asarray(widths, dtype=np.int64)
    total_ids = sum(int(p.multiplicity.sum()) for p in profiles)

    def choose(lam: float) -> list[np.ndarray]:
        return [np.argmax(p.log_probs - lam * widths[None, :], axis=1) for p in profiles]

    def params(choice: list[np.ndarray]) -> int:
        return int(sum((p.multiplicity * widths[c]).sum() for p, c in zip(profiles, choice)))

    def expand(choice: list[np.ndarray]) -> list[np.ndarray]:
        return [widths[c][p.inverse] for p, c in zip(profiles, choice)]

    if total_ids * widths[-1] <= table_params:
        return [np.full(len(p.inverse), widths[-1], dtype=np.int64) for p in profiles], -math.inf
    if total_ids * widths[0] > table_params:
        raise ValueError(f"table_params={table_params:.0f} is below every id at width {widths[0]} "
                         f"({total_ids * widths[0]})")
    spread = max(float(np.ptp(p.log_probs)) for p in profiles) if profiles else 0.0
    step = float(np.diff(widths).min()) if len(widths) > 1 else 1.0
    # Beyond +-(spread / step) the price alone decides: every id at the narrowest (widest) width.
    low, high = -(spread / step + 1.0), spread / step + 1.0  # params(low) > table_params >= params(high)
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if params(choose(middle)) <= table_params:
            high = middle
        else:
            low = middle
    below, above = choose(high), choose(low)
    result = expand(below)
    gap = table_params - params(below)
    # Ids whose profile switches at the boundary price: widen them in order while the total fits.
    field_of, ids, cost, gain = [], [], [], []
    for i, (p, b, a) in enumerate(zip(profiles, below, above)):
        switching = np.flatnonzero(a != b)
        if not len(switching):
            continue
        delta = (widths[a] - widths[b]).astype(np.int64)
        per_param = np.zeros(len(b))
        per_param[switching] = ((p.log_probs[switching, a[switching]] - p.log_probs[switching, b[switching]])
                                / delta[switching])
        member = np.flatnonzero(a[p.inverse] != b[p.inverse])
        field_of.append(np.full(len(member), i))
        ids.append(member)
        cost.append(delta[p.inverse[member]])
        gain.append(per_param[p.inverse[member]])
    if ids:
        field_of, ids, cost, gain = (np.concatenate(x) for x in (field_of, ids, cost, gain))
        order = np.lexsort((ids, field_of, -gain))
        take = order[np.cumsum(cost[order]) <= gap]
        for i in np.unique(field_of[take]):
            sel = take[field_of[take] == i]
            result[i][ids[sel]] += cost[sel]
    return result, high


def _check(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"amtl.{key}: {message}, got {value!r}")


class AMTL(EmbeddingMethod):
    """AMTL (Yan et al., CIKM 2021): per-id widths from frequency-driven twin mask networks.

    Args:
        config (AMTL.Config): see the fields.
        fields (list[FieldSpec]): the dataset's sparse fields.
        embedding_dim (int): the full width D (a multiple of 4).
    """

    name = "amtl"
    report_order = 4

    @dataclass(kw_only=True, slots=True)
    class Config:
        temperature: float = 1.0
        """Softmax temperature T of ``p = softmax(h / T)`` (the paper: small T approaches argmax)."""
        hidden_sizes: list[int] = field(default_factory=lambda: [16, 16])
        """Hidden widths of each h-AML / l-AML MLP (ReLU); the paper gives none."""
        penalty_weight: float = 0.1
        """lambda of ``lambda * F``, F = expected fraction of the full-width parameters (0 = the
        paper's plain task loss)."""
        budget: float = 0.0
        """Target fraction of the full-width parameters; ``budget_weight * relu(F - budget)`` is
        added while F exceeds it. 0 = unset: the run's ``search.budget`` fills it (trainer.phases);
        0 or 1 after that = no budget term."""
        budget_weight: float = 10.0
        """Weight of the budget hinge."""
        mask_lr: float = 1e-3
        """Adam learning rate of the mask networks (their own optimizer, see ``extra_optimizers``)."""
        initial_width: int = 0
        """Width every id starts at (0 = D, so a warm-started model is unchanged at step 0)."""
        max_groups: int = 0
        """At most this many width groups per field in the plan (0 = one per width used); extra
        groups are merged up into the next wider one."""
        pooled_single_hot: bool = True
        """Look single-hot fields up with a pooled EBC (one vector per bag; exact for one id)."""
        retrain_init: str = "fresh"
        """Retrain start: "fresh", or "inherit" (each id's first w searched dims, projection [I_w | 0],
        so the retrain model starts as the masked search model)."""

        def __post_init__(self) -> None:
            _check(self.temperature > 0 and math.isfinite(self.temperature), "temperature", "must be positive",
                   self.temperature)
            _check(len(self.hidden_sizes) > 0 and all(h > 0 for h in self.hidden_sizes), "hidden_sizes",
                   "must be a non-empty list of positive widths", self.hidden_sizes)
            _check(self.penalty_weight >= 0, "penalty_weight", "must be >= 0", self.penalty_weight)
            _check(0 <= self.budget <= 1, "budget", "must be in [0, 1] (0 = the run's budget)", self.budget)
            _check(self.budget_weight >= 0, "budget_weight", "must be >= 0", self.budget_weight)
            _check(self.mask_lr > 0, "mask_lr", "must be positive", self.mask_lr)
            _check(self.initial_width >= 0 and self.initial_width % 4 == 0, "initial_width",
                   "must be 0 (= D) or a positive multiple of 4", self.initial_width)
            _check(self.max_groups >= 0, "max_groups", "must be >= 0", self.max_groups)
            _check(self.retrain_init in RETRAIN_INITS, "retrain_init", f"must be one of {list(RETRAIN_INITS)}",
                   self.retrain_init)

    def __init__(self, config: "AMTL.Config", fields: list[FieldSpec], embedding_dim: int, *,
                 layout: str | None = None) -> None:
        super().__init__(config, fields, embedding_dim, layout=layout)
        _check(config.initial_width <= embedding_dim, "initial_width", f"must be at most D={embedding_dim}",
               config.initial_width)

    # -- search ---------------------------------------------------------------------------------

    def _pooled_fields(self) -> list[FieldSpec]:
        return [f for f in self.fields if self.config.pooled_single_hot and not f.multi_hot]

    def search_tables(self) -> list[EmbeddingBagConfig]:
        """The pooled single-hot tables (may be empty); the unpooled, side tables are built inside."""
        return [EmbeddingBagConfig(name=main_table_name(f.name), num_embeddings=f.num_embeddings,
                                   embedding_dim=self.embedding_dim, feature_names=[f.name])
                for f in self._pooled_fields()]

    def build_search_module(self, ebc: EmbeddingBagCollection) -> MaskAwareEmbedding:
        device = ebc.device if ebc is not None else None  # meta when the trainer builds it
        cfg = self.config
        mask_net = AMTLMaskNet(self.fields, self.embedding_dim, hidden_sizes=list(cfg.hidden_sizes),
                               temperature=cfg.temperature, initial_width=cfg.initial_width or self.embedding_dim,
                               device=device)
        return MaskAwareEmbedding(self.fields, self.embedding_dim, mask_fn=mask_net, use_side=True,
                                  pooled_single_hot=cfg.pooled_single_hot, ebc=ebc, device=device)

    def init_search_state(self, module: nn.Module, context: SearchContext) -> None:
        """Fills this rank's side-table shards from the counts and gives the mask nets the count
        profiles of the penalty. Call on every rank after sharding (and again after a resume)."""
        module = _search_module(module)
        counts = {f.name: np.asarray(context.counts(f.name)) for f in self.fields}
        module.fill_side_tables(context, counts.__getitem__)
        _mask_net(module).set_count_profiles(counts)

    def search_loss(self, module: nn.Module) -> torch.Tensor:
        """``lambda * F + budget_weight * relu(F - budget)``; always in the graph, so every mask-net
        parameter gets a gradient each step (DDP needs no ``find_unused_parameters``)."""
        fraction = _mask_net(_search_module(module)).expected_param_fraction()
        cfg = self.config
        loss = cfg.penalty_weight * fraction
        if 0 < cfg.budget < 1:
            loss = loss + cfg.budget_weight * torch.relu(fraction - cfg.budget)
        return loss

    def extra_optimizers(self, module: nn.Module) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.extra_parameters(module), lr=self.config.mask_lr)]

    def extra_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        return list(_mask_net(_search_module(module)).parameters())

    # -- export ---------------------------------------------------------------------------------

    def width_scores(self, module: nn.Module, context: SearchContext) -> list[CountProfiles]:
        """``log p(width | id)`` of every field, per distinct train count (identical on every rank;
        collective).

        An id's side row is a function of its count alone (``mask_aware.side_features``), so the
        mask nets are evaluated once per distinct count, as the training penalty is. Each rank
        evaluates the (replicated) nets; the scores are then averaged over ranks with one
        all-reduce, which hands every rank the same bits whatever its floating-point order.
        """
        module = _search_module(module)
        if int(module.side_filled) != 1:
            raise RuntimeError("amtl: the side table was never filled (init_search_state)")
        net = _mask_net(module)
        device = net._device()
        ranks = float(context.all_reduce_sum(torch.ones(1, dtype=torch.float64, device=device))[0])
        result = []
        with torch.no_grad():
            for f in self.fields:
                counts = np.asarray(context.counts(f.name))
                values, inverse, multiplicity = np.unique(counts, return_inverse=True, return_counts=True)
                side = torch.from_numpy(side_features(values, counts)).to(device)
                logits = net.logits(f.name, side).double()
                log_probs = torch.log_softmax(logits / net.temperature, dim=-1)
                log_probs = context.all_reduce_sum(log_probs) / ranks
                result.append(CountProfiles(inverse.reshape(-1).astype(np.int64), multiplicity.astype(np.int64),
                                            log_probs.cpu().numpy()))
        return result

    def searched_widths(self, module: nn.Module, context: SearchContext) -> list[np.ndarray]:
        """Argmax width of every id of every field, the mask nets' own choice before the budget
        (identical on every rank; collective)."""
        widths = allowed_widths(self.embedding_dim)
        return [widths[p.log_probs.argmax(axis=1)][p.inverse] for p in self.width_scores(module, context)]

    def budget_floor(self) -> tuple[float, str]:
        return (uniform_floor([f.num_embeddings for f in self.fields], self.embedding_dim, self.layout),
                f"every id at width 4 (AMTL prunes no id), {self.layout} layout")

    def export_plan(self, module: nn.Module, context: SearchContext) -> SizePlan:
        """Per-id widths grouped by width, projected onto the budget. Collective: every rank must call it.

        Without a budget every id takes its argmax width. With one, the widths are those that
        maximise ``sum_i log p_i(w_i)`` (the most probable assignment under the mask nets) subject
        to the plan's parameters, as its layout stores them, being at most the budget, filled to
        within one id's width step of it (``widths_for_budget``); what this changed against the
        argmax is logged and recorded in ``plan.extra["budget_projection"]``.
        """
        if context.embedding_dim != self.embedding_dim:
            raise ValueError(f"amtl: context.embedding_dim={context.embedding_dim}, the method has {self.embedding_dim}")
        profiles = self.width_scores(module, context)
        choices = allowed_widths(self.embedding_dim)
        argmax = [choices[p.log_probs.argmax(axis=1)][p.inverse] for p in profiles]
        with torch.no_grad():
            expected = float(_mask_net(_search_module(module)).expected_param_fraction())
        cfg = self.config
        budget = cfg.budget if 0 < cfg.budget < 1 else context.budget
        names = [f.name for f in self.fields]

        def make_plan(widths: list[np.ndarray]) -> SizePlan:
            return size_plan_from_widths(self.name, self.embedding_dim, names, widths, layout=self.layout,
                                         max_groups=cfg.max_groups, budget=budget if budget < 1 else None)

        plan = make_plan(argmax)
        extra: dict[str, Any] = {"config": asdict(cfg), "expected_param_fraction": expected,
                                 "retrain_init": cfg.retrain_init, "fallbacks": []}
        if budget < 1:
            before = plan.achieved_fraction()
            target = budget * plan.full_params()
            # Under project every width group costs its projection (w x D) on top of the tables,
            # which on small tables can exceed the budget whatever the ids do: then only the
            # narrowest and the full width are offered (one projection per field at most).
            subsets = [np.arange(len(choices))]
            if self.layout == "project" and len(choices) > 2:
                subsets.append(np.array([0, len(choices) - 1]))
            fits = []
            for columns in subsets:
                fitted = self._fit_widths(profiles, choices, columns, target, make_plan)
                if fitted is not None:
                    fits.append((columns, fitted))
                    if fitted[0].num_params() >= 0.95 * target:
                        break
            if not fits:
                raise BudgetError(self.name, budget, *self.budget_floor())
            # The first width set that reaches 0.95 x budget, else the one closest to it.
            columns, (plan, widths, lam) = (fits[-1] if fits[-1][1][0].num_params() >= 0.95 * target
                                            else max(fits, key=lambda f: f[1][0].num_params()))
            if len(columns) < len(choices):
                extra["fallbacks"].append(f"{self.layout} layout: with a projection per width group the budget "
                                          f"{budget:g} is not filled; widths restricted to {choices[columns].tolist()}")
                logger.warning("amtl: %s", extra["fallbacks"][-1])
            narrowed = int(sum(((w < a) & (w > 0)).sum() for w, a in zip(widths, argmax)))
            widened = int(sum((w > a).sum() for w, a in zip(widths, argmax)))
            extra["budget_projection"] = {"fraction_before": before, "fraction_after": plan.achieved_fraction(),
                                          "ids_narrowed": narrowed, "ids_widened": widened, "lambda": lam}
            logger.info("amtl: budget %.4f: projected the argmax plan (fraction %.4f) onto it: %d ids narrowed, %d "
                        "widened, fraction %.4f", budget, before, narrowed, widened, plan.achieved_fraction())
            if plan.achieved_fraction() < 0.95 * budget:
                extra["fallbacks"].append(f"fraction {plan.achieved_fraction():.4f} is below 0.95 x budget {budget:g}: "
                                          f"projections or merged groups ({self.layout} layout, max_groups="
                                          f"{cfg.max_groups}) took the rest")
                logger.warning("amtl: %s", extra["fallbacks"][-1])
        extra["mean_width"] = {f.name: float(widths_from_field_plan(fp).mean()) for f, fp in zip(self.fields, plan.fields)}
        plan.extra = extra
        logger.info("amtl: achieved fraction %.4f (expected %.4f)", plan.achieved_fraction(), expected)
        return plan

    @staticmethod
    def _fit_widths(profiles: list[CountProfiles], choices: np.ndarray, columns: np.ndarray, target: float,
                    make_plan: Any) -> tuple[SizePlan, list[np.ndarray], float] | None:
        """``widths_for_budget`` over the widths ``choices[columns]`` with the largest tables' share
        whose plan, projections and merged groups included, fits ``target`` (bisected: those extras
        grow with the tables, stepwise). None when even every id at the narrowest width does not fit."""
        restricted = [CountProfiles(p.inverse, p.multiplicity, p.log_probs[:, columns]) for p in profiles]
        widths_here = choices[columns]

        def fit(table_target: float) -> tuple[SizePlan, list[np.ndarray], float]:
            widths, lam = widths_for_budget(restricted, widths_here, table_target)
            return make_plan(widths), widths, lam

        best = fit(target)
        if best[0].num_params() <= target:
            return best
        low, high = float(widths_here[0] * sum(len(p.inverse) for p in profiles)), float(target)
        best = fit(low)
        if best[0].num_params() > target:
            return None
        for _ in range(40):  # low fits, high does not
            if high - low < 1:
                break
            middle = 0.5 * (low + high)
            candidate = fit(middle)
            if candidate[0].num_params() <= target:
                low = middle
                if candidate[0].num_params() > best[0].num_params():
                    best = candidate
            else:
                high = middle
        return best

    def wants_retrain_init(self) -> bool:
        return self.config.retrain_init == "inherit"

    def retrain_init_state(self, searched: nn.Module, initial: nn.Module | None,
                           plan: SizePlan) -> dict[str, torch.Tensor] | None:
        """``retrain_init="inherit"``: each id keeps the first w dims of its searched row (the dims its
        mask kept) and each group's projection starts as ``[I_w | 0]``, so the retrain model starts
        as the masked search model. ``searched`` is an unsharded copy of the search module with every
        table gathered (``MaskAwareEmbedding.table_names()``). None for "fresh"."""
        if self.config.retrain_init == "fresh":
            return None
        module = _search_module(searched)
        tables = {f.name: module.full_table(main_table_name(f.name)) for f in plan.fields}
        return retrain_init_state_from_tables(plan, tables)

    supports_warm_start = True

    def warm_start(self, module: nn.Module, context: SearchContext, path: Path) -> dict[str, str]:
        """``embdim search --method amtl --init-from CHECKPOINT``: loads a trained baseline's
        full-width tables into the (sharded) search tables; the mask nets keep their init (every id
        at ``initial_width``, D by default, so the model starts as the baseline).

        The baseline's DCP checkpoint (``path`` is a ``step_N`` folder or a run folder whose
        ``ckpt/latest`` names one) is read straight into this model's sharded tables through
        ``context.load_tables``: DCP reshards, so the baseline may have used another plan or world
        size. Collective. Returns ``{checkpoint key: search-model key}``.

        Args:
            module: this method's search module (inside the sharded model).
            context: the search context; its ``load_tables`` does the DCP read.
            path: the baseline checkpoint.
        """
        mapping = context.load_tables(Path(path), amtl_warm_start_keys(module))
        logger.info("amtl: warm start from %s (%d tables)", path, len(mapping))
        return mapping


def _search_module(module: nn.Module) -> MaskAwareEmbedding:
    if not isinstance(module, MaskAwareEmbedding):
        raise ValueError(f"expected the MaskAwareEmbedding search module, got {type(module).__name__}")
    return module


def _mask_net(module: MaskAwareEmbedding) -> AMTLMaskNet:
    if not isinstance(module.mask_fn, AMTLMaskNet):
        raise ValueError(f"the search module's mask_fn is {type(module.mask_fn).__name__}, not AMTLMaskNet")
    return module.mask_fn


def amtl_warm_start_keys(module: nn.Module) -> dict[str, str]:
    """``{baseline EBC key: search-module key}`` of every main table.

    A baseline's plain EBC stores ``embedding_bags.t_<field>.weight``; the search module keeps the
    same table as ``ec.embeddings.t_<field>.weight`` (unpooled fields) or
    ``ebc.embedding_bags.t_<field>.weight`` (pooled single-hot fields). With this map the trainer can
    also load a sharded (DCP) baseline checkpoint straight into the sharded search module.
    """
    module = _search_module(module)
    keys = {}
    for name in module.feature_names:
        table = main_table_name(name)
        source = f"embedding_bags.{table}.weight"
        keys[source] = (f"ebc.embedding_bags.{table}.weight" if name in module.pooled_names
                        else f"ec.embeddings.{table}.weight")
    return keys


def amtl_from_baseline(module: nn.Module, baseline_state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Warm start (the paper's "already-trained model" use): copies a baseline's full-width tables.

    Args:
        module: the ``MaskAwareEmbedding`` search module, sharded or not (each local shard takes its
            slice of the baseline table, so this works after DMP).
        baseline_state_dict: a state dict holding full (unsharded) ``[num_embeddings, D]`` tensors
            under keys ending in ``embedding_bags.t_<field>.weight`` (any prefix, e.g. the DLRM's
            ``model.sparse_arch.embedding_bag_collection.``).

    Returns:
        ``{baseline key: search-module key}`` of what was copied. Raises ``KeyError`` when a field's
        table is missing or ambiguous in the baseline.
    """
    copied = {}
    for source_suffix, target in amtl_warm_start_keys(module).items():
        matches = [k for k in baseline_state_dict if k == source_suffix or k.endswith("." + source_suffix)]
        if len(matches) != 1:
            raise KeyError(f"baseline state dict: expected one key ending in {source_suffix!r}, found {matches}")
        table = source_suffix.split(".")[1]
        copy_into_table(module, table, torch.as_tensor(baseline_state_dict[matches[0]]).detach())
        copied[matches[0]] = target
    return copied
