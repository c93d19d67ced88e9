"""The core releases the GIL while it works, so other Python threads keep running.

Method: a worker thread makes one long call while the main thread sleeps in 1 ms steps and
counts how many steps it completed during the call. Waking from ``time.sleep`` needs the
GIL, so a call that holds the GIL leaves the main thread stuck for its whole duration (zero or
one step), whereas a call that releases it leaves the main thread free (hundreds of steps).
The harness is validated on a known GIL-holding call of similar length, ``sum(range(n))``,
so the test cannot pass by accident if the measurement itself is broken.

No wall-clock thresholds: the assertion compares step counts, whose two cases differ by two
orders of magnitude whatever the machine's speed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import kvmix

# 64M float32 elements (256 MB): about half a second to quantize on 2 cores.
SHAPE = (32, 8, 2048, 128)
MIN_STEPS_RELEASED = 20  # a released call of >= 0.1 s lets the main thread take far more
MAX_STEPS_HELD = 3  # a held call lets it take at most the step it was already in


def steps_during(call: Callable[[], Any]) -> tuple[int, Any, float]:
    """Run ``call`` in a worker thread; return how many 1 ms sleep steps the calling thread
    completed while it ran, its result and its duration."""
    inside = threading.Event()
    finished = threading.Event()
    box: dict[str, Any] = {}

    def worker() -> None:
        try:
            inside.set()
            t0 = time.perf_counter()
            box["result"] = call()
            box["seconds"] = time.perf_counter() - t0
        except BaseException as e:  # pragma: no cover - re-raised below
            box["error"] = e
        finally:
            finished.set()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    inside.wait()
    steps = 0
    while not finished.is_set():
        time.sleep(0.001)
        steps += 1
    thread.join()
    if "error" in box:
        raise box["error"]
    return steps, box["result"], box["seconds"]


@pytest.fixture(scope="module")
def big() -> np.ndarray:
    block = np.random.default_rng(0).standard_normal((1, 8, 2048, 128)).astype(np.float32)
    return np.ascontiguousarray(np.broadcast_to(block, SHAPE))


def test_harness_detects_a_gil_holding_call() -> None:
    # Builtin sum over a range iterates in C without ever releasing the GIL.
    n = 20_000_000
    steps, total, seconds = steps_during(lambda: sum(range(n)))
    assert total == n * (n - 1) // 2
    assert seconds > 0.05, "control call too short to be meaningful"
    assert steps <= MAX_STEPS_HELD, f"{steps} steps during a GIL-holding call of {seconds:.2f}s"


@pytest.mark.parametrize("grouping", ["token", "channel"])
def test_quantize_releases_the_gil(big: np.ndarray, grouping: str) -> None:
    steps, q, seconds = steps_during(lambda: kvmix.quantize(big, 2, grouping=grouping))
    assert q.shape == list(SHAPE)
    assert q.nbytes()["codes"] == big.size * 2 // 8
    assert steps >= MIN_STEPS_RELEASED, f"only {steps} steps during a {seconds:.2f}s quantize"


def test_dequantize_releases_the_gil(big: np.ndarray) -> None:
    q = kvmix.quantize(big, 4, group_size=64)

    def dequantize_repeatedly() -> np.ndarray:
        # Dequantization is fast; a few passes make the call long enough to observe.
        for _ in range(3):
            out = kvmix.dequantize(q)
        return out

    steps, out, seconds = steps_during(dequantize_repeatedly)
    assert out.shape == SHAPE and out.dtype == np.float32
    assert steps >= MIN_STEPS_RELEASED, f"only {steps} steps during {seconds:.2f}s of dequantize"


def test_statistics_release_the_gil(big: np.ndarray) -> None:
    def statistics_repeatedly() -> np.ndarray:
        # One pass takes ~10 ms; ten make the call long enough to observe, while a GIL-holding
        # version could not yield more than one step per gap (10 < MIN_STEPS_RELEASED).
        for _ in range(10):
            scale = kvmix.separable_channel_scale(big)
        return scale

    steps, scale, seconds = steps_during(statistics_repeatedly)
    assert scale.shape == (*SHAPE[:-2], SHAPE[-1])
    assert steps >= MIN_STEPS_RELEASED, f"only {steps} steps during {seconds:.2f}s of statistics"
