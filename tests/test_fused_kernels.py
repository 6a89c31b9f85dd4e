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
    torch.manual_seed(0)
    batch, fields = 513, 7
    device = torch.device("cuda")
    x = torch.randn(batch, fields, dim, device=device, dtype=torch.float64)
    # Thresholds around the row norms so that some rows are pruned, none within 1e-3 of the step.
    norms = x.abs().sum(-1) if norm == 1 else x.norm(dim=-1)
    thresholds = norms.median(0).values
    x = x.float()
    near = ((x.double().abs().sum(-1) if norm == 1 else x.double().norm(dim=-1)) - thresholds).abs() < 1e-3
    x[near] *= 1.01
    thresholds = thresholds.float().requires_grad_()
    prune = torch.tensor([True, False, True, True, False, True, True], device=device)
    width = torch.randint(1, dim // 4 + 1, (batch, fields), device=device) * 4
    coef = torch.randn(batch, fields, dim, device=device)
    results = []
    for fn in (_RowAndWidthMask.apply, fused_kernels.row_and_width_mask):
        xi = x.clone().requires_grad_()
        ti = thresholds.detach().clone().requires_grad_()
        out = fn(xi, ti, prune, width, norm)
        (out * coef).sum().backward()
        results.append((out.detach(), xi.grad, ti.grad))
    (want, want_gx, want_gt), (got, got_gx, got_gt) = results
    torch.testing.assert_close(got, want)  # a copy or a zero of each entry: exact
    torch.testing.assert_close(got_gx, want_gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_gt, want_gt, rtol=1e-4, atol=1e-3)
    assert (want == 0).any() and (want != 0).any()


def test_kernels_are_opt_in(monkeypatch) -> None:
    x = torch.zeros(2, 3, 4, device="cuda")
    monkeypatch.delenv("EMBDIM_TRITON", raising=False)
    assert not fused_kernels.triton_enabled(x)
    monkeypatch.setenv("EMBDIM_TRITON", "1")
    assert fused_kernels.triton_enabled(x)
    assert not fused_kernels.triton_enabled(x.cpu())
