"""The Triton store's stable partition (``partition_kernel``, under Triton's interpreter on CPU
tensors) against its definition: a stable sort of ``~pick``, then a gather of the positions,
-1 where the column is not picked. Rows longer than the kernel's block of 1024 columns (so the
running count carries across blocks), strided inputs (a tier's rows are a slice of its
capacity, sliced on the device), int16 and int32 positions, every column picked or none,
int8 categories picked by each code (ZipCache's classification), and widths below and past
the row's length."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from kvmix.engines.base import load_kernels
from kvmix.engines.triton_store import _partition


def _reference(
    pick: torch.Tensor, p: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.sort(~pick, dim=1, stable=True).indices[:, :width]
    return idx, torch.where(pick.gather(1, idx), p.gather(1, idx), -1)


CASES = [
    # (streams, columns, width, picked share or None for int8 categories, position dtype)
    (3, 2500, 1200, 0.3, torch.int32),  # three blocks; the width cuts the unpicked columns
    (2, 2500, 2500, 0.9, torch.int16),  # every column kept
    (4, 37, 50, 0.5, torch.int32),  # width past the row: the row's length
    (2, 1100, 300, 1.0, torch.int16),  # every column picked
    (2, 1100, 300, 0.0, torch.int32),  # none picked: all holes
    (3, 1500, 900, None, torch.int16),  # int8 categories 0-3, each code in turn
]


def _check(s, n, width, share, dtype, device):
    g = torch.Generator().manual_seed(n + width)
    cap = n + 13  # rows of a wider tensor: a row stride past n
    if share is None:
        cats = torch.randint(0, 4, (s, cap), generator=g, dtype=torch.int8).to(device)[:, :n]
    else:
        pick = (torch.rand(s, cap, generator=g) < share).to(device)[:, :n]
    p = torch.randint(0, 30000, (s, cap), generator=g, dtype=torch.int32).to(dtype)
    p = p.to(device)[:, :n]
    kern = load_kernels(torch.device(device))
    for code in range(4) if share is None else [1]:
        if share is None:
            pick = cats == code
            idx, gp = _partition(kern, cats, p, width, code)
        else:
            idx, gp = _partition(kern, pick, p, width)
        want_idx, want_gp = _reference(pick, p, width)
        assert idx.dtype == torch.long and gp.dtype == dtype
        assert torch.equal(idx, want_idx), code
        assert torch.equal(gp, want_gp), code


@pytest.mark.parametrize("s, n, width, share, dtype", CASES)
def test_partition_matches_a_stable_sort(s, n, width, share, dtype):
    _check(s, n, width, share, dtype, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_partition_matches_a_stable_sort_on_cuda():
    for case in CASES:
        _check(*case, "cuda")
