"""Comparing float32 results that add the same terms in different orders.

A batched GEMM and per-slot matmuls, or one CPU's kernels and another's (AVX2, AVX-512, AMX
blockings), add the same products in different orders. Each element's rounding error is then up
to about ``n * eps * sum |terms|`` (eps = 6e-8 for float32), which follows the size of the terms,
not of the element: an element that cancels to near zero keeps the error of its large terms
(4.3e-6 on a gradient element of 1.5e-2 whose tensor reaches 3.2, seen on an AVX-512 Xeon). So
the absolute tolerance is a fraction of the largest magnitude in the reference; 2e-5 of it is
about 15x the largest error seen across kernel paths (``ATEN_CPU_CAPABILITY=default|avx2|avx512``,
``MKL_ENABLE_INSTRUCTIONS``) for the sums of tens of terms in these tests.
"""

from __future__ import annotations

import torch

SCALE_TOL = 2e-5
"""Absolute tolerance as a fraction of the reference's largest magnitude."""


def assert_close_sums(got: torch.Tensor, want: torch.Tensor, *, scale_tol: float = SCALE_TOL,
                      rtol: float = 1e-5, min_atol: float = 1e-6) -> None:
    """``assert_close`` for float32 sums taken in different orders (see the module docstring)."""
    scale = float(want.detach().abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=max(scale_tol * scale, min_atol))
