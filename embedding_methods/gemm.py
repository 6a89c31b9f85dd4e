"""Batched GEMMs whose shapes cuBLAS schedules badly: the weight gradients of per-field layers.

The weight gradient of a batched linear map ``y[g] = x[g] @ w[g]`` is ``x[g]^T @ dy[g]``: a tiny
``[in, out]`` output per batch entry, reduced over the whole batch of rows N. cuBLAS runs a batched
GEMM as one thread block per output tile and batch entry, so 26 fields give 26 blocks that each
walk all N rows while the rest of the GPU idles: measured on an H200 at N = 65536, the [26, 28, 128]
gradient of the compact model's projection took 2.4 ms per step (0.2 ms of arithmetic), and the
AMTL mask nets' three such gradients 6.6 ms (BENCHMARKS.md, "Why the misses"). Splitting the rows
into chunks that become extra batch entries (split-K done by hand) and summing the partial
products fills the GPU.
"""

from __future__ import annotations

import functools

import torch

MIN_CHUNK_ROWS = 1024
"""Rows per chunk at least: shorter chunks make the partial sums' traffic matter."""
BLOCKS_PER_MULTIPROCESSOR = 4
"""Batch entries (one tile each for these small outputs) per multiprocessor to aim for."""


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (a CPU batched GEMM already
    spreads over the cores, so no split)."""
    return _cuda_multiprocessors(device.index or 0) if device.type == "cuda" else 0


@functools.lru_cache(maxsize=None)
def _cuda_multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_rows(num_batches: int, num_rows: int, multiprocessors: int) -> int:
    """How many row chunks give ``num_batches * chunks`` >= ``BLOCKS_PER_MULTIPROCESSOR`` blocks
    per multiprocessor, each chunk at least ``MIN_CHUNK_ROWS`` rows (1 = no split). The smallest
    such count that divides ``num_rows`` where there is one (up to twice the need): equal chunks
    of a contiguous tensor are a view, a remainder makes the chunked part a copy."""
    most = num_rows // MIN_CHUNK_ROWS
    wanted = min(-(-BLOCKS_PER_MULTIPROCESSOR * multiprocessors // max(num_batches, 1)), most)
    if wanted <= 1:
        return 1
    return next((c for c in range(wanted, min(2 * wanted, most) + 1) if num_rows % c == 0), wanted)


def batched_weight_grad(x: torch.Tensor, grad: torch.Tensor, chunks: int | None = None) -> torch.Tensor:
    """``x[g]^T @ grad[g]`` for ``x`` ``[G, N, I]`` and ``grad`` ``[G, N, O]``: ``[G, I, O]``.

    Args:
        x: the layer inputs (any strides: split views are copied once into chunk order).
        grad: the output gradients.
        chunks: row chunks to split N into; None: ``split_rows`` for the device (1 on CPU).
    """
    num_batches, num_rows, width_in = x.shape
    width_out = grad.shape[-1]
    if chunks is None:
        chunks = split_rows(num_batches, num_rows, multiprocessors(x.device))
    if chunks <= 1:
        return torch.bmm(x.transpose(1, 2), grad)
    rows = num_rows // chunks
    head = rows * chunks
    x_chunks, grad_chunks = _interleaved_chunks(x, chunks, rows), _interleaved_chunks(grad, chunks, rows)
    if x_chunks is not None and grad_chunks is not None:
        # Chunk c = rows c, c + C, c + 2C, ...: batch entry c * G + g (no copy).
        out = torch.bmm(x_chunks.transpose(1, 2), grad_chunks).view(chunks, num_batches, width_in, width_out).sum(0)
    else:  # chunk c = rows [c * rows, (c + 1) * rows): a view of contiguous tensors, else a copy
        x_chunks = x[:, :head].reshape(num_batches * chunks, rows, width_in)
        grad_chunks = grad[:, :head].reshape(num_batches * chunks, rows, width_out)
        out = torch.bmm(x_chunks.transpose(1, 2), grad_chunks).view(num_batches, chunks, width_in, width_out).sum(1)
    if head < num_rows:  # the rows left over after equal chunks
        out.baddbmm_(x[:, head:].transpose(1, 2), grad[:, head:])
    return out


def _interleaved_chunks(t: torch.Tensor, chunks: int, rows: int) -> torch.Tensor | None:
    """``[chunks * G, rows, K]`` view of ``t`` ``[G, N, K]`` whose entry ``c * G + g`` holds rows
    ``c, c + chunks, ...`` of batch g, when one batch stride covers both (None otherwise).

    That is the case for column blocks of a row-major ``[N, G * step]`` matrix (``t``'s strides
    ``(step, G * step, 1)``): the per-field views of pooled embeddings and of their gradients,
    which a row-block split would have to copy (a [26, 65536, 128] gradient: 0.67 ms on an H200).
    """
    num_batches, _, width = t.shape
    batch_stride, row_stride, col_stride = t.stride()
    if row_stride != num_batches * batch_stride:
        return None
    return t.as_strided((chunks * num_batches, rows, width), (batch_stride, chunks * row_stride, col_stride),
                        t.storage_offset())


class BatchedAffine(torch.autograd.Function):
    """``bias[:, None] + x @ weight^T`` for ``x`` ``[G, N, in]``, ``weight`` ``[G, out, in]``
    (``nn.Linear``'s layout), ``bias`` ``[G, out]``: ``torch.baddbmm``'s values and gradients, with
    the weight gradient through ``batched_weight_grad``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = batched_weight_grad(grad, x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(1) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def batched_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))`` with a split weight gradient."""
    return BatchedAffine.apply(x, weight, bias)
