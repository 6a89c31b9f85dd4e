"""The Triton kernels against the torch formulas they replace (needs CUDA and Triton).

On a CPU-only machine (CI) these tests skip with the reason shown; the GPU benchmark runs them on
the lent GPU machine before timing (bench/gpu_suite.sh's kernels section).
"""

from __future__ import annotations

import pytest
import torch

from embdim.embedding_methods import fused_kernels
from embdim.embedding_methods.optembed import _RowAndWidthMask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or fused_kernels.triton is None,
                                reason="needs a CUDA GPU and Triton (the kernels run only there)")


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("dim", [16, 128, 36])
def test_row_and_width_mask_equals_the_torch_formula(norm: int, dim: int) -> None:
    """Values and gradients of the kernels equal the torch formula's.

    The inputs are dyadic (multiples of 1/64, small), so every L1 norm, every ``z`` and every
    row sum is exact in float32 whatever the summation order: BinaryStep's slope ``2 - 4|z|``
    turns an ordinary rounding difference of ``z`` (about 1e-5 for a norm near 100) into a
    gradient difference of about 1e-3, which would hide a real error behind a loose tolerance.
    """
    torch.manual_seed(0)
    batch, fields = 513, 7
    device = torch.device("cuda")
    x = torch.randint(-128, 129, (batch, fields, dim), device=device).float() / 64
    norms = x.abs().sum(-1) if norm == 1 else x.norm(dim=-1)
    # Thresholds on the 1/128 grid between the 1/64 norms: rows on both sides, none at z = 0,
    # and many within |z| <= 1, where the straight-through slope is not zero.
    thresholds = (norms.median(0).values * 64).round() / 64 + 1 / 128
    prune = torch.tensor([True, False, True, True, False, True, True], device=device)
    width = torch.randint(1, dim // 4 + 1, (batch, fields), device=device) * 4
    coef = torch.randint(-64, 65, (batch, fields, dim), device=device).float() / 64
    results = []
    for fn in (_RowAndWidthMask.apply, fused_kernels.row_and_width_mask):
        xi = x.clone().requires_grad_()
        ti = thresholds.clone().requires_grad_()
        out = fn(xi, ti, prune, width, norm)
        (out * coef).sum().backward()
        results.append((out.detach(), xi.grad, ti.grad))
    (want, want_gx, want_gt), (got, got_gx, got_gt) = results
    torch.testing.assert_close(got, want)  # a copy or a zero of each entry: exact
    torch.testing.assert_close(got_gx, want_gx, rtol=1e-5, atol=1e-5)
    # L2 norms end in a rounded sqrt, so z (and the slope 2 - 4|z|) differs by an ulp between the
    # two; the threshold gradient sums that over the batch (measured on an H100: 7e-5 relative).
    torch.testing.assert_close(got_gt, want_gt, rtol=1e-5 if norm == 1 else 3e-4, atol=1e-4)
    assert (want == 0).any() and (want != 0).any()
    z = norms - thresholds
    assert ((z.abs() <= 1) & prune).any()  # the straight-through gradient is exercised


def test_kernels_can_be_turned_off(monkeypatch) -> None:
    x = torch.zeros(2, 3, 4, device="cuda")
    monkeypatch.delenv("EMBDIM_TRITON", raising=False)
    assert fused_kernels.triton_enabled(x)
    monkeypatch.setenv("EMBDIM_TRITON", "0")
    assert not fused_kernels.triton_enabled(x)
    assert not fused_kernels.triton_enabled(x.cpu())
