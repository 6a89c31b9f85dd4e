"""The split weight-gradient GEMMs (embedding_methods/gemm.py) against one plain batched GEMM."""

from __future__ import annotations

import pytest
import torch

from embdim.embedding_methods import gemm
from embdim.embedding_methods.gemm import batched_affine, batched_weight_grad, split_rows


def test_split_rows_fills_the_gpu_without_short_chunks() -> None:
    assert split_rows(26, 65536, 132) == 32  # 26 x 21 >= 4 x 132 blocks; 32 divides the rows
    assert split_rows(52, 65536, 132) == 16
    assert split_rows(26, 65000, 132) == 25  # 21..24 leave remainders
    assert split_rows(26, 65537, 132) == 21  # prime: no divisor up to 42, the remainder it is
    assert split_rows(26, 4096, 132) == 4  # capped: chunks of at least 1024 rows
    assert split_rows(26, 1500, 132) == 1
    assert split_rows(1000, 65536, 132) == 1  # enough batch entries already
    assert split_rows(26, 65536, 0) == 1  # CPU


@pytest.mark.parametrize("layout", ["column_blocks", "contiguous", "mixed"])
@pytest.mark.parametrize("chunks", [1, 3, 7])
def test_split_weight_grad_equals_one_batched_gemm(chunks: int, layout: str) -> None:
    g = torch.Generator().manual_seed(0)
    # column_blocks: strided views as _ProjectPooled passes them, column blocks of a [N, S] matrix
    # (interleaved chunks, no copy); contiguous [G, N, K] as the AMTL nets (row blocks, views);
    # mixed: one of each (row blocks, copied). N = 1000: a remainder of 1 row for 3 chunks, 6 for 7.
    values = torch.randn(1000, 5 * 8, generator=g, dtype=torch.float64)
    x = values.as_strided((5, 1000, 6), (8, 40, 1))
    grad = torch.randn(1000, 5 * 16, generator=g, dtype=torch.float64).view(1000, 5, 16).transpose(0, 1)
    if layout != "column_blocks":
        grad = grad.contiguous()
    if layout == "contiguous":
        x = x.contiguous()
    assert (gemm._interleaved_chunks(x, 3, 333) is not None) == (layout != "contiguous")
    assert (gemm._interleaved_chunks(grad, 3, 333) is not None) == (layout == "column_blocks")
    want = torch.bmm(x.transpose(1, 2), grad)
    got = batched_weight_grad(x, grad, chunks=chunks)
    assert got.shape == (5, 6, 16)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_interleaved_chunks_hold_every_row_once() -> None:
    t = torch.arange(7 * 4 * 3).view(7, 4 * 3).view(7, 4, 3).transpose(0, 1)  # [G=4, N=7, K=3] blocks
    chunks = gemm._interleaved_chunks(t, 3, 2)  # rows 0..5 in 3 chunks of 2 (row 6 is the remainder)
    assert chunks is not None and chunks.shape == (12, 2, 3)
    for c in range(3):
        for g in range(4):
            assert torch.equal(chunks[c * 4 + g], t[g, [c, c + 3]])


def test_batched_affine_equals_baddbmm_with_the_split_on(monkeypatch) -> None:
    # Pretend the CPU is a GPU of 132 multiprocessors so the automatic split happens here.
    monkeypatch.setattr(gemm, "multiprocessors", lambda device: 132)
    assert split_rows(6, 4000, gemm.multiprocessors(torch.device("cpu"))) == 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4000, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(6, 4000, 5, generator=g, dtype=torch.float64)
    got = batched_affine(x, weight, bias)
    grads = torch.autograd.grad((got * upstream).sum(), (x, weight, bias))
    want = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    want_grads = torch.autograd.grad((want * upstream).sum(), (x, weight, bias))
    torch.testing.assert_close(got, want)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
