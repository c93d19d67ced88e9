"""``python -m kvmix.bench gpu`` runs end to end (its toy model on the CPU; the real run needs a
GPU): every method gives a prefill time, a decode step and, for kvmix, the cache's ratio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmix.bench.__main__ import main


def test_gpu_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["gpu", "--tiny", "--device", "cpu", "--contexts", "48", "--batches", "2"]
    argv += ["--steps", "2", "--methods", "full", "zipcache", "zipcache-portable", "mikv"]
    argv += ["--max-batch", "--max-batch-context", "48", "--max-batch-limit", "2"]
    assert main([*argv, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["results"]}
    assert set(rows) == {"full", "zipcache", "zipcache-portable", "mikv"}
    for r in rows.values():
        assert not r["oom"] and r["prefill_s"] > 0 and r["step_ms"] > 0
        assert r["tok_s"] == pytest.approx(2 / (r["step_ms"] / 1e3), rel=1e-12)
    for name in ("zipcache", "zipcache-portable", "mikv"):
        assert rows[name]["compression_ratio"] > 1.0
    # No out-of-memory on the CPU: the search stops at its limit.
    for method in ("full", "zipcache", "zipcache-portable", "mikv"):
        got = data["max_batch"][method]
        assert (got["max_batch"], got["first_oom"], got["limit_reached"]) == (2, None, True)


@pytest.mark.parametrize(("largest", "limit"), [(37, 256), (1, 256), (0, 256), (256, 256), (5, 9)])
def test_max_batch_search_finds_the_largest_fit(
    monkeypatch: pytest.MonkeyPatch, largest: int, limit: int
) -> None:
    """The search's bracketing and bisection against a known capacity (each attempt's fit
    decided by a stand-in for the real fill-and-decode)."""
    import torch

    from kvmix.bench import gpu

    tried: list[int] = []

    def fits(model, method, batch, context, chunk, device):  # type: ignore[no-untyped-def]
        tried.append(batch)
        return batch <= largest, 1000 * batch

    monkeypatch.setattr(gpu, "fits", fits)
    got = gpu.max_batch(None, "full", 1024, limit, torch.device("cpu"), tolerance=0.0)
    assert got["max_batch"] == min(largest, limit)
    assert got["first_oom"] == (None if largest >= limit else got["max_batch"] + 1)
    assert got["limit_reached"] == (largest >= limit)
    assert got["attempts"] == len(tried) <= 20
