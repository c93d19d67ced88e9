"""The store's division (``triton_kernels._div_fp16``): one Markstein step from a reciprocal
that may be off by a few ulp gives the correctly rounded quotient for fp16 divisors, so the
Triton store's codes are the Rust store's (IEEE division) at every rounding boundary, on the
GPU too, where Triton's own ``/`` is within 2 ulp only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
from kvmix.engines.base import load_kernels


def _cases(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Dividends ``a`` and fp16 divisors ``b``: half of them put ``a / b`` within a few ulp
    of a code boundary ``k - 0.5`` (where a quotient one ulp off flips the code), half span
    many magnitudes (fp16 normals and subnormals as divisors)."""
    rng = np.random.default_rng(seed)
    b = np.abs(rng.standard_normal(n) * 10.0 ** rng.uniform(-7, 4, n)).astype(np.float16)
    b = np.where(np.isfinite(b) & (b > 0), b, np.float16(1.5)).astype(np.float32)
    k = rng.integers(0, 17, n).astype(np.float32)
    near = ((k - np.float32(0.5)) * b).astype(np.float32)
    for _ in range(3):  # nudge each by 0 to 3 ulp either way
        step = rng.integers(-1, 2, n)
        near = np.where(step > 0, np.nextafter(near, np.float32(np.inf)), near)
        near = np.where(step < 0, np.nextafter(near, np.float32(-np.inf)), near)
    wide = (rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 4, n)).astype(np.float32)
    a = np.where(np.arange(n) % 2 == 0, near, wide).astype(np.float32)
    return np.where(a == 0, np.float32(1.0), a), b


def _divide(a: torch.Tensor, b: torch.Tensor, rb: torch.Tensor | None) -> torch.Tensor:
    kern = load_kernels(a.device)
    out = torch.empty_like(a)
    block = 1024
    grid = (-(-a.numel() // block),)
    kern.divide_kernel[grid](a, b, rb if rb is not None else a, out, a.numel(), rb is not None,
                             block)  # fmt: skip
    return out


@pytest.mark.parametrize("ulps", [0, -2, 2])
def test_the_division_is_correctly_rounded_from_a_reciprocal_a_few_ulp_off(ulps: int) -> None:
    a, b = _cases(20_000, seed=ulps + 3)
    rb = (np.float32(1.0) / b).astype(np.float32)
    for _ in range(abs(ulps)):  # what the GPU's approximate reciprocal may return
        rb = np.nextafter(rb, np.float32(np.inf if ulps > 0 else -np.inf)).astype(np.float32)
    got = _divide(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(rb)).numpy()
    want = a / b  # numpy's float32 division: IEEE, correctly rounded
    # The plain product by the reciprocal is wrong on many of these (the test's teeth).
    assert (a * rb != want).sum() > 1000
    np.testing.assert_array_equal(got, want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_division_on_the_gpu_matches_ieee_division() -> None:
    """With the GPU's own approximate reciprocal (Triton's ``1 / b``) against torch's CUDA
    division (IEEE)."""
    a, b = _cases(2_000_000, seed=7)
    ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
    got = _divide(ta, tb, None)
    want = ta / tb
    assert torch.equal(want.cpu(), torch.from_numpy(a / b))
    assert torch.equal(got, want)
