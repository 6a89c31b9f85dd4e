"""Triton kernels for memory-bound chains of the search models (CUDA only; CPU runs the torch formula).

``row_and_width_mask``: OptEmbed's training mask (``optembed_supernet._RowAndWidthMask``) in one pass
over the ``[B, F, D]`` pooled values forward and one backward. The torch formula makes about six
passes per step (the row norm, the comparison, ``where``, then in the backward ``where``, a
product-sum, ``mul_`` and ``addcmul_``); a GPU profile put them at about 5 ms of a 25 ms 1-GPU
step at batch 65536 (docs/methods.md, "OptEmbed"). Here each program owns one ``(sample,
field)`` row of D values: forward reads x once and writes the masked row; backward reads the
output gradient and x once and writes the input gradient, with the per-row scalars (``z``, the
L2 norm) kept from the forward. The values and gradients are the torch formula's; the
torch formula stays the reference in ``tests/test_fused_kernels.py`` (run on a GPU) and is what
runs wherever Triton or CUDA is missing.

On CUDA the kernels run by default; ``EMBDIM_TRITON=0`` in the environment turns them off (the
torch formula everywhere). ``tests/test_fused_kernels.py`` checks them against the torch formula
on a CUDA machine (7 passed on an H100, 2026-12-07), and ``bench/gpu_onegpu.sh`` times both
(OptEmbed's search step 1.38x -> 1.12x plain TorchRec's on one H100 at batch 65536).
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds have none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None


def triton_enabled(x: torch.Tensor) -> bool:
    """Whether the Triton kernels serve ``x``: a CUDA tensor, Triton importable, not turned off."""
    return triton is not None and x.is_cuda and os.environ.get("EMBDIM_TRITON", "1") != "0"


if triton is not None:

    @triton.jit
    def _mask_forward(x_ptr, thr_ptr, prune_ptr, width_ptr, out_ptr, z_ptr, norm_ptr, num_fields, dim,
                      NORM: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        field = row % num_fields
        cols = tl.arange(0, BLOCK)
        inside = cols < dim
        x = tl.load(x_ptr + row * dim + cols, mask=inside, other=0.0).to(tl.float32)
        if NORM == 1:
            norm = tl.sum(tl.abs(x), axis=0)
        else:
            norm = tl.sqrt(tl.sum(x * x, axis=0))
        z = norm - tl.load(thr_ptr + field).to(tl.float32)
        prune = tl.load(prune_ptr + field)
        width = tl.load(width_ptr + row)
        # BinaryStep(z) = (z > 0) where the field is row-pruned, else 1; a pruned row keeps 0 dims.
        kept = (prune == 0) | (z > 0)
        limit = tl.where(kept, width, 0)
        out = tl.where(cols < limit, x, 0.0)
        tl.store(out_ptr + row * dim + cols, out.to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(z_ptr + row, z)
        tl.store(norm_ptr + row, norm)

    @triton.jit
    def _mask_backward(grad_ptr, x_ptr, prune_ptr, width_ptr, z_ptr, norm_ptr, grad_x_ptr, grad_z_ptr,
                       num_fields, dim, NORM: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        field = row % num_fields
        cols = tl.arange(0, BLOCK)
        inside = cols < dim
        g = tl.load(grad_ptr + row * dim + cols, mask=inside, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * dim + cols, mask=inside, other=0.0).to(tl.float32)
        width = tl.load(width_ptr + row)
        prune = tl.load(prune_ptr + field)
        z = tl.load(z_ptr + row)
        kept = (prune == 0) | (z > 0)
        grad_kept = tl.where(cols < width, g, 0.0)  # dL/d(x * m_row): the width mask alone
        grad_row = tl.sum(grad_kept * x, axis=0)  # dL/dm_row
        # BinaryStep's straight-through slope g(z) (OptEmbed models/layer.py).
        abs_z = tl.abs(z)
        slope = tl.where(abs_z <= 0.4, 2.0 - 4.0 * abs_z, tl.where(abs_z <= 1.0, 0.4, 0.0))
        grad_z = tl.where(prune != 0, grad_row * slope, 0.0)
        grad_x = tl.where(kept, grad_kept, 0.0)
        if NORM == 1:
            sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
            grad_x = grad_x + grad_z * sign
        else:
            norm = tl.load(norm_ptr + row)
            scale = tl.where(norm == 0, 0.0, grad_z / tl.where(norm == 0, 1.0, norm))
            grad_x = grad_x + scale * x
        tl.store(grad_x_ptr + row * dim + cols, grad_x.to(grad_x_ptr.dtype.element_ty), mask=inside)
        tl.store(grad_z_ptr + row, grad_z)


class _TritonRowAndWidthMask(torch.autograd.Function):
    """``optembed_supernet._RowAndWidthMask`` with both passes as Triton kernels (same arguments)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, thresholds: torch.Tensor, prune: torch.Tensor, width: torch.Tensor,
                norm: int) -> torch.Tensor:
        x = x.contiguous()
        batch, num_fields, dim = x.shape
        rows = batch * num_fields
        out = torch.empty_like(x)
        z = torch.empty(rows, device=x.device, dtype=torch.float32)
        norms = torch.empty(rows, device=x.device, dtype=torch.float32)
        prune_i8 = prune.to(torch.int8).contiguous()
        width_i32 = width.to(torch.int32).contiguous()
        block = triton.next_power_of_2(dim)
        _mask_forward[(rows,)](x, thresholds.contiguous(), prune_i8, width_i32, out, z, norms, num_fields, dim,
                               NORM=norm, BLOCK=block)
        ctx.save_for_backward(x, prune_i8, width_i32, z, norms)
        ctx.norm, ctx.block, ctx.threshold_dtype = norm, block, thresholds.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, prune_i8, width_i32, z, norms = ctx.saved_tensors
        batch, num_fields, dim = x.shape
        grad = grad.contiguous()
        grad_x = torch.empty_like(x)
        grad_z = torch.empty(batch * num_fields, device=x.device, dtype=torch.float32)
        _mask_backward[(batch * num_fields,)](grad, x, prune_i8, width_i32, z, norms, grad_x, grad_z, num_fields,
                                              dim, NORM=ctx.norm, BLOCK=ctx.block)
        grad_thresholds = -grad_z.view(batch, num_fields).sum(0).to(ctx.threshold_dtype)
        return grad_x, grad_thresholds, None, None, None


def row_and_width_mask(x: torch.Tensor, thresholds: torch.Tensor, prune: torch.Tensor, width: torch.Tensor,
                       norm: int) -> torch.Tensor:
    """OptEmbed's training mask on ``x [B, F, D]`` with the Triton kernels (callers check
    ``triton_enabled(x)`` first; ``thresholds``/``prune`` are ``[F]`` in ``x``'s field order,
    ``width`` is ``[B, F]``)."""
    return _TritonRowAndWidthMask.apply(x, thresholds, prune, width, norm)
