"""A hypothesis state machine over LayerStore's operations, checked against a float64 model
after every step (issue 14).

The model holds, per (sequence, kv-head) stream, the exact appended keys and values of every
token with its position. After each step: `dense()` holds the model's tokens (a subset for
the eviction policy) within the codecs' error bound; the fused `attend` equals a float64
softmax over `dense()`; byte accounting adds up; and every refused call (NaN, magnitudes no
tier can hold, bad shapes, bad indices, sizes past the limits, a missing key balancer) leaves
the store exactly as it was.

Short in `make test` (KVMIX_FUZZ_EXAMPLES, default 12 machines of up to 25 steps per
configuration); `make fuzz` runs the long version and prints examples / steps / failures.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvmix import KvmixError
from kvmix._kvmix import LayerStore

EXAMPLES = int(os.environ.get("KVMIX_FUZZ_EXAMPLES", "12"))
STEPS = int(os.environ.get("KVMIX_FUZZ_STEPS", "25"))
STATS_FILE = os.environ.get("KVMIX_FUZZ_STATS")  # `make fuzz` collects the figures here

#: (policy, options, lowest bit width of any tier: None = exact storage)
CONFIGS = {
    "full": ("full", {}, None),
    "uniform4": ("uniform", {"bits": 4, "residual": 4}, 4),
    "uniform2-g2": ("uniform", {"bits": 2, "residual": 3, "group_size": 2}, 2),
    "zipcache": ("zipcache", {"streaming_gap": 2}, 2),
    "zipcache-1bit": ("zipcache", {"low_bits": 1, "selection": "kv_head"}, 1),
    "mikv": ("mikv", {"key_balancer": False, "streaming_gap": 1}, 2),
    "mikv-3bit-g4": ("mikv", {"key_balancer": False, "low_bits": 3, "group_size": 4}, 3),
    "mikv-balancer": ("mikv", {"streaming_gap": 2}, 2),
    "eviction": ("eviction", {"budget": 0.5}, None),
}

STATS = {"examples": 0, "steps": 0, "refused": 0}


def snapshot(store):
    streams = store.batch * store.kv_heads
    return (
        store.seen,
        store.batch,
        repr(store.memory()),
        [tuple(a.tobytes() for a in store.dense(s)) for s in range(streams)],
        [repr(store.tier_positions(s)) for s in range(streams)],
    )


class StoreMachine(RuleBasedStateMachine):
    config_name = "full"

    def __init__(self):
        super().__init__()
        STATS["examples"] += 1

    @initialize(
        heads=st.integers(1, 2),
        d=st.sampled_from([8, 16]),
        buffer=st.sampled_from(["float32", "float16"]),
    )
    def setup(self, heads, d, buffer):
        policy, options, self.bits = CONFIGS[self.config_name]
        self.policy = policy
        self.store = LayerStore(policy, heads, d, dict(options), buffer)
        self.h, self.d = heads, d
        # Model: per stream a dict position -> (key, value) in float64.
        self.model: list[dict[int, tuple[np.ndarray, np.ndarray]]] = []
        self.seen = 0
        self.batch = 0
        self.balancer_set = False
        self.span = 1.0  # largest |x| appended, for the error bound
        self.limit = 65504.0 if (buffer == "float16" or policy != "full") else 1e28
        if self.bits == 1:
            self.limit = 32752.0

    # -- helpers ----------------------------------------------------------------------------
    def refused(self, call):
        """`call` must raise a kvmix error and leave the store untouched."""
        before = snapshot(self.store)
        with pytest.raises(KvmixError):
            call()
        assert snapshot(self.store) == before
        STATS["refused"] += 1

    def step(self):
        STATS["steps"] += 1

    # -- operations --------------------------------------------------------------------------
    @rule(
        n=st.integers(0, 6),
        b=st.integers(1, 3),
        magnitude=st.sampled_from([1.0, 1.0, 1.0, 100.0, 1e-30, 3e4, 1e5]),
        seed=st.integers(0, 2**16),
    )
    def append(self, n, b, magnitude, seed):
        self.step()
        b = self.batch or b
        rng = np.random.default_rng(seed)
        k = (rng.standard_normal((b, self.h, n, self.d)) * magnitude).astype(np.float32)
        v = (rng.standard_normal((b, self.h, n, self.d)) * magnitude).astype(np.float32)
        if n and max(np.abs(k).max(), np.abs(v).max()) > self.limit:
            self.refused(lambda: self.store.append(k, v))
            return
        self.store.append(k, v)
        if n == 0:
            return
        if not self.batch:
            self.batch = b
            self.model = [{} for _ in range(b * self.h)]
        for s in range(b * self.h):
            for t in range(n):
                bi, h = divmod(s, self.h)
                self.model[s][self.seen + t] = (
                    k[bi, h, t].astype(np.float64),
                    v[bi, h, t].astype(np.float64),
                )
        self.seen += n
        self.span = max(self.span, float(np.abs(k).max()), float(np.abs(v).max()))

    @rule(seed=st.integers(0, 2**16))
    def append_bad(self, seed):
        self.step()
        rng = np.random.default_rng(seed)
        b = self.batch or 1
        k = rng.standard_normal((b, self.h, 2, self.d)).astype(np.float32)
        bad = k.copy()
        bad.flat[seed % bad.size] = [np.nan, np.inf, -np.inf][seed % 3]
        self.refused(lambda: self.store.append(bad, k))
        self.refused(lambda: self.store.append(k[:, :, :, :-1], k[:, :, :, :-1]))
        self.refused(lambda: self.store.append(k, k[:, :, :1]))

    @precondition(lambda self: self.batch > 0)
    @rule(force=st.booleans())
    def classify(self, force):
        self.step()
        if self.store.needs_balancer:
            self.refused(lambda: self.store.maybe_classify(force))
            return
        self.store.maybe_classify(force)

    @precondition(lambda self: self.batch > 0 and self.policy == "mikv")
    @rule(scale=st.sampled_from([0.25, 0.5, 1.0]))  # k·b stays within what append allowed
    def set_balancer(self, scale):
        self.step()
        bal = np.full((self.batch, self.h, self.d), scale, np.float32)
        if self.balancer_set:
            self.refused(lambda: self.store.set_key_balancer(bal))  # a second one
            return
        self.store.set_key_balancer(bal)
        self.balancer_set = True

    @precondition(lambda self: self.batch > 0)
    @rule(
        tq=st.integers(1, 3),
        rep=st.integers(1, 2),
        track=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def attend(self, tq, rep, track, seed):
        self.step()
        rng = np.random.default_rng(seed)
        q = rng.standard_normal((self.batch, self.h * rep, tq, self.d)).astype(np.float32)
        positions = [max(self.seen - tq + i, 0) for i in range(tq)]
        scale = 1.0 / np.sqrt(self.d) / max(self.span, 1.0)
        want = self.reference(q, positions, scale)
        got = self.store.attend(q, positions, scale, track=track)
        np.testing.assert_allclose(got, want, atol=3e-4, rtol=1e-3)
        self.refused(lambda: self.store.attend(q, positions, float("nan")))
        self.refused(lambda: self.store.attend(q[:, :0], positions, scale))

    def reference(self, q, positions, scale):
        """float64 softmax over dense(), with the store's visibility rule (no padding here)."""
        b, hq = q.shape[:2]
        rep = hq // self.h
        out = np.zeros(q.shape)
        for bi in range(b):
            for hh in range(hq):
                pos, k, v = self.store.dense(bi * self.h + hh // rep)
                for i, qp in enumerate(positions):
                    vis = pos <= qp
                    if not vis.any():
                        continue
                    logits = k[vis].astype(np.float64) @ q[bi, hh, i].astype(np.float64) * scale
                    w = np.exp(logits - logits.max())
                    out[bi, hh, i] = (w / w.sum()) @ v[vis].astype(np.float64)
        return out

    @precondition(lambda self: self.batch > 0)
    @rule(length=st.integers(0, 30))
    def crop(self, length):
        self.step()
        self.store.crop(length)
        if length < self.seen:
            for m in self.model:
                for p in [p for p in m if p >= length]:
                    del m[p]
            self.seen = length

    @precondition(lambda self: self.batch > 0)
    @rule(data=st.data())
    def select(self, data):
        self.step()
        idx = data.draw(st.lists(st.integers(0, self.batch - 1), max_size=3))
        self.refused(lambda: self.store.select_batch([self.batch]))
        self.refused(lambda: self.store.select_batch([-1]))
        self.store.select_batch(idx)
        self.model = [dict(self.model[i * self.h + h]) for i in idx for h in range(self.h)]
        self.batch = len(idx)
        if not idx:
            self.seen, self.balancer_set = 0, False

    @precondition(lambda self: self.batch > 0)
    @rule(repeats=st.integers(0, 2))
    def repeat(self, repeats):
        self.step()
        self.refused(lambda: self.store.repeat_interleave(2**40))
        self.refused(lambda: self.store.repeat_interleave(-1))
        self.store.repeat_interleave(repeats)
        self.model = [
            dict(self.model[i * self.h + h])
            for i in range(self.batch)
            for _ in range(repeats)
            for h in range(self.h)
        ]
        self.batch *= repeats
        if not repeats:
            self.seen, self.balancer_set = 0, False

    @precondition(lambda self: self.batch > 0)
    @rule(seed=st.integers(0, 2**16), bad=st.booleans())
    def add_scores(self, seed, bad):
        self.step()
        rng = np.random.default_rng(seed)
        n = max(self.seen, 1)
        acc = rng.random((self.batch, self.h, n)).astype(np.float32)
        cnt = np.ones_like(acc)
        if bad:
            acc.flat[seed % acc.size] = np.nan
            self.refused(lambda: self.store.add_scores(0, acc, cnt))
            return
        self.store.add_scores(0, acc, cnt)

    @rule()
    def reset(self):
        self.step()
        self.store.reset()
        self.model, self.seen, self.batch, self.span = [], 0, 0, 1.0
        self.balancer_set = False

    # -- invariants --------------------------------------------------------------------------
    @invariant()
    def matches_the_model(self):
        if not hasattr(self, "store"):
            return
        s = self.store
        assert (s.batch, s.seen) == (self.batch, self.seen)
        m = s.memory()
        tiers = m["tiers"]
        assert m["bytes"] == sum(t["total"] for t in tiers.values())
        assert m["fp16_bytes"] == self.batch * self.h * self.seen * 2 * self.d * 2
        held = 0
        for stream, model in enumerate(self.model):
            pos, k, v = s.dense(stream)
            held += len(pos)
            if self.policy == "eviction":
                assert set(pos.tolist()) <= set(model)
            else:
                assert pos.tolist() == sorted(model)
            for rows, which in ((k, 0), (v, 1)):
                want = np.array([model[p][which] for p in pos.tolist()]).reshape(-1, self.d)
                err = np.abs(rows - want)
                assert np.isfinite(rows).all()
                assert err.max(initial=0.0) <= self.tolerance(want), (stream, which)
        assert m["tokens"] == held

    def tolerance(self, want):
        """Error bound of the codecs: fp16 rounding (2^-11 relative, plus fp16's subnormal
        step) everywhere; a b-bit code within half a step of its group's range, which is at
        most the stream's whole range."""
        big = float(np.abs(want).max(initial=0.0))
        tol = big * 2.0**-10 + 1e-7
        if self.bits is not None:
            tol += 2 * self.span / (2**self.bits - 1) * 0.51 + big * 2.0**-9
        return tol


def _run(config_name):
    machine = type(f"Machine_{config_name}", (StoreMachine,), {"config_name": config_name})
    test = machine.TestCase
    test.settings = settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    failures = 0
    try:
        test("runTest").runTest()
    except BaseException:
        failures = 1
        raise
    finally:
        if STATS_FILE:
            with open(STATS_FILE, "a") as f:
                f.write(json.dumps({"config": config_name, **STATS, "failures": failures}) + "\n")
        for key in STATS:
            STATS[key] = 0


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_store_state_machine(config_name):
    _run(config_name)
