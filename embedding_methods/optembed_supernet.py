"""OptEmbed's supernet: the autograd masks, the search module and the row norms.

Lyu et al., "OptEmbed: Learning Optimal Embedding Table for Click-through Rate Prediction",
CIKM 2022 (arXiv 2208.04482); reference code github.com/fuyuanlyu/OptEmbed (``models/layer.py``,
``models/modules_super.py``). The method (``optembed.OptEmbed``) builds an ``OptEmbedSupernet``
for the search phase: a full-width table E (the child ``ebc``, which DMP shards), learnable
per-field thresholds t, a row mask ``m = BinaryStep(||e||_p - t_f)`` per looked-up row and, in
training, a random width per (sample, field) that keeps the first w dims (the paper's
lower-triangular masks P[j]). ``_table_row_norms`` and ``_norm_ranks`` freeze the row masks over
whole (sharded) tables for the export. The deviations from the reference are listed in
``optembed.py``.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embdim.embedding_methods.base import FieldSpec, SearchContext
from embdim.embedding_methods.fused_kernels import row_and_width_mask, triton_enabled

logger = logging.getLogger(__name__)

WIDTH_STEP = 4
"""Searched widths are multiples of this (FBGEMM TBE asserts ``embedding_dim % 4 == 0``)."""


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
