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
    assert data["max_batch"]["zipcache"] == {"max_batch": 2, "limit_reached": True}
