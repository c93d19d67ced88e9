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


def _r(method: str, batch: int, context: int, step: float, prefill: float) -> dict:
    return {"method": method, "batch": batch, "context": context, "oom": False,
            "step_ms": step, "prefill_s": prefill}  # fmt: skip


def test_verdicts_judge_the_issues_targets() -> None:
    """The end-to-end verdicts against hand-computed ratios: a step against DynamicCache's at
    every shape, against QuantizedCache's at B=8 x 32k, the prefill at 32k, the capacity; an
    out-of-memory reference or an unmeasured shape is said, not judged."""
    from kvmix.bench import gpu

    results = [
        _r("full", 1, 32768, 60.0, 4.0),
        _r("zipcache", 1, 32768, 40.0, 4.2),  # 1.50x, +5.0%
        _r("kvmix-5x", 1, 32768, 75.0, 4.6),  # 0.80x, +15.0%
        {"method": "full", "batch": 8, "context": 32768, "oom": True},
        _r("quanto-int2", 8, 32768, 160.0, 11.0),
        _r("zipcache", 8, 32768, 40.0, 12.0),  # 4.00x quanto
        _r("kvmix-5x", 8, 32768, 100.0, 12.0),  # 1.60x quanto
        _r("zipcache-portable", 8, 32768, 10.0, 1.0),  # not fused: not judged
    ]
    capacity = {
        "full": {"max_batch": 30, "first_oom": 31, "limit_reached": False},
        "zipcache": {"max_batch": 116, "first_oom": 117, "limit_reached": False},
        "kvmix-5x": {"max_batch": 128, "first_oom": None, "limit_reached": True},
    }
    lines = gpu.verdicts(results, capacity, 32768)
    assert lines == [
        "zipcache B=1 T=32768: step no slower than DynamicCache: met (1.50x)",
        "zipcache B=1 T=32768: prefill <= +10% over DynamicCache (end to end): met (+5.0%)",
        "zipcache B=8 T=32768: DynamicCache out of memory",
        "zipcache B=8 T=32768: step >= 2x faster than quanto-int2: met (4.00x)",
        "kvmix-5x B=1 T=32768: step no slower than DynamicCache: NOT met (0.80x)",
        "kvmix-5x B=1 T=32768: prefill <= +10% over DynamicCache (end to end): NOT met (+15.0%)",
        "kvmix-5x B=8 T=32768: DynamicCache out of memory",
        "kvmix-5x B=8 T=32768: step >= 2x faster than quanto-int2: NOT met (1.60x)",
        "zipcache largest batch at 32768: >= 4x DynamicCache's: NOT met (116 against 30, 3.87x)",
        "kvmix-5x largest batch at 32768: >= 4x DynamicCache's: met (128 against 30, 4.27x)"
        " (a lower bound: the search's limit)",
    ]
    # At 8k alone: steps judged, no prefill verdict (its target is at 32k), the QuantizedCache
    # target said to be unmeasured.
    lines = gpu.verdicts(
        [_r("full", 8, 8192, 60.0, 2.0), _r("zipcache", 8, 8192, 30.0, 2.1)], {}, 0
    )
    assert lines == [
        "zipcache B=8 T=8192: step no slower than DynamicCache: met (2.00x)",
        "zipcache: the QuantizedCache target is at B=8 T=32768: not measured",
    ]
