"""Reliability of the store API (issue 14): no abort, no panic, no silent wrong answer, nothing
lost. Every test here failed (or killed the interpreter) before the fix; each refusal is also
checked to leave the store exactly as it was. References are independent: float64 softmax
over `dense()`, the appended arrays themselves, or serial runs of the same calls."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import kvmix
from kvmix import ConfigError, KvmixError, NonFiniteError, ShapeError
from kvmix._kvmix import LayerStore, probe_positions, probe_scores


def _r(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def snapshot(store: LayerStore):
    """Everything observable about a store, for "a refused call changes nothing"."""
    streams = store.batch * store.kv_heads
    return (
        store.seen,
        store.batch,
        repr(store.memory()),
        [tuple(a.tobytes() for a in store.dense(s)) for s in range(streams)],
        [repr(store.tier_positions(s)) for s in range(streams)],
    )


def refused(store, exc, match, call):
    before = snapshot(store)
    with pytest.raises(exc, match=match):
        call()
    assert snapshot(store) == before


def _filled(rng, policy="zipcache", config=None, b=1, h=1, n=12, d=16, **kw):
    s = LayerStore(policy, h, d, config, **kw)
    s.append(_r(rng, b, h, n, d), _r(rng, b, h, n, d))
    return s


def _run_isolated(code: str) -> str:
    """Run `code` in a fresh interpreter: before the fix these calls aborted the process."""
    pre = "import numpy as np\nfrom kvmix._kvmix import LayerStore, probe_positions\n"
    p = subprocess.run(
        [sys.executable, "-c", pre + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    return p.stdout


# -- sizes are checked before allocating ----------------------------------------------------


def test_huge_sizes_are_refused_not_aborted():
    out = _run_isolated(
        """
        s = LayerStore("full", 1, 4)
        x = np.ones((1, 1, 2, 4), np.float32)
        s.append(x, x)
        for n in (2**40, 2**62, 2**64 - 1):
            try:
                s.repeat_interleave(n)
            except Exception as e:
                print(type(e).__name__, "repeats" in str(e), "65536" in str(e), s.batch)
        for n in (2**40, 2**62):
            try:
                probe_positions(n)
            except Exception as e:
                print(type(e).__name__, "length" in str(e), "4294967295" in str(e))
        """
    )
    lines = out.strip().splitlines()
    assert lines[:3] == ["ShapeError True True 1"] * 2 + lines[2:3]
    assert lines[2].split()[0] in ("ShapeError", "ConfigError", "OverflowError")
    assert lines[3:] == ["ShapeError True True"] * 2


def test_negative_sizes_name_the_argument(rng):
    s = _filled(rng, "full", h=1, d=4)
    refused(s, ConfigError, "`repeats`", lambda: s.repeat_interleave(-1))
    refused(s, ConfigError, "`indices`", lambda: s.select_batch([-1]))
    refused(s, ConfigError, "`length`", lambda: s.crop(-1))
    with pytest.raises(ConfigError, match="`length`"):
        probe_positions(-1)


def test_select_batch_limit(rng):
    s = _filled(rng, "full", d=4)
    refused(s, ShapeError, "65536", lambda: s.select_batch([0] * 70000))


# -- every geometry the options accept attends correctly -------------------------------------


def _softmax_reference(store, q, positions, scale):
    """float64 softmax attention over dense(), with the store's visibility rule."""
    b, hq = q.shape[:2]
    hk = store.kv_heads
    out = np.zeros(q.shape, np.float64)
    for bi in range(b):
        for h in range(hq):
            pos, k, v = store.dense(bi * hk + h // (hq // hk))
            for i, qp in enumerate(positions):
                vis = pos <= qp
                logits = k[vis].astype(np.float64) @ q[bi, h, i].astype(np.float64) * scale
                w = np.exp(logits - logits.max())
                out[bi, h, i] = (w / w.sum()) @ v[vis].astype(np.float64)
    return out


SUB_BYTE = [
    ("uniform", {"bits": 2, "group_size": 2, "residual": 8}),
    ("mikv", {"low_bits": 3, "group_size": 4, "key_balancer": False}),
    ("mikv", {"low_bits": 1, "group_size": 4, "key_balancer": False, "high_bits": 4}),
    ("mikv", {"low_bits": 3, "group_size": 8, "key_balancer": False}),
]


@pytest.mark.parametrize("policy,config", SUB_BYTE)
@pytest.mark.parametrize("track", [False, True])
def test_sub_byte_token_groups_match_softmax_over_dense(rng, policy, config, track):
    """Before: the fused kernel panicked (MiKV 3-bit groups of 4) or differed by 0.7-3.9."""
    s = LayerStore(policy, 2, 16, config)
    s.append(_r(rng, 2, 2, 40, 16), _r(rng, 2, 2, 40, 16))
    s.maybe_classify(True)
    for _ in range(3):  # decoding steps: the buffer and the tiers both hold tokens
        s.append(_r(rng, 2, 2, 1, 16), _r(rng, 2, 2, 1, 16))
        s.maybe_classify(False)
    q = _r(rng, 2, 4, 2, 16)
    positions = [s.seen - 2, s.seen - 1]
    want = _softmax_reference(s, q, positions, 0.3)
    got = s.attend(q, positions, 0.3, track=track)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_zero_query_heads_are_refused(rng):
    s = _filled(rng, "uniform", {"bits": 4})
    s.maybe_classify(True)
    refused(s, ShapeError, "at least one head", lambda: s.attend(_r(rng, 1, 0, 1, 16), [12], 0.25))


# -- refusals are atomic; what append accepts, classification stores -------------------------


def test_one_bit_tiers_store_everything_append_accepts(rng):
    """1-bit codes: the fp16 scale (max - min) / 1 overflowed for |x| > 32752 after the
    buffer was emptied; tokens were lost. Now append refuses those and keeps the rest."""
    cfg = {"low_bits": 1, "key_balancer": False, "ratio": 0.25}
    s = LayerStore("mikv", 1, 16, cfg)
    refused(
        s,
        NonFiniteError,
        "32752",
        lambda: s.append(_r(rng, 1, 1, 8, 16, scale=4e4), _r(rng, 1, 1, 8, 16)),
    )
    k = np.clip(_r(rng, 1, 1, 8, 16, scale=4e4), -32752, 32752)
    v = _r(rng, 1, 1, 8, 16)
    s.append(k, v)
    s.maybe_classify(True)
    pos, dk, _ = s.dense(0)
    assert list(pos) == list(range(8))
    # 1-bit codes hold max or min of a group: every reconstruction lies within the data's range.
    assert np.abs(dk).max() <= 32752 * 1.001


def test_tiny_values_are_stored_not_lost(rng):
    """Values of 1e-30: the channel-separable factor sqrt(max|v|) underflowed fp16 and the
    classification refused them after emptying the buffer (0 tokens left)."""
    s = LayerStore("zipcache", 1, 16)
    v = _r(rng, 1, 1, 8, 16, scale=1e-30)
    s.append(_r(rng, 1, 1, 8, 16), v)
    s.maybe_classify(True)
    pos, _, dv = s.dense(0)
    assert list(pos) == list(range(8))
    assert np.abs(dv - v[0, 0]).max() < 1e-29


def test_refused_classification_leaves_the_store_intact(rng):
    """MiKV without its balancer: the classification is refused; dense() still returns the
    appended data exactly (float32 buffer) and the store classifies once it is set."""
    s = LayerStore("mikv", 1, 16, None, "float32")
    k, v = _r(rng, 1, 1, 10, 16), _r(rng, 1, 1, 10, 16)
    s.append(k, v)
    refused(s, ConfigError, "key balancer", lambda: s.maybe_classify(True))
    _, dk, dv = s.dense(0)
    np.testing.assert_array_equal(dk, k[0, 0])
    np.testing.assert_array_equal(dv, v[0, 0])
    s.set_key_balancer(np.ones((1, 1, 16), np.float32))
    assert s.maybe_classify(True)


def test_second_key_balancer_is_refused(rng):
    """It used to rescale keys already stored (error 0.34 -> 6.97)."""
    s = LayerStore("mikv", 1, 16)
    s.append(_r(rng, 1, 1, 10, 16), _r(rng, 1, 1, 10, 16))
    s.set_key_balancer(np.ones((1, 1, 16), np.float32))
    s.maybe_classify(True)
    refused(
        s,
        ConfigError,
        "already set",
        lambda: s.set_key_balancer(np.full((1, 1, 16), 3, np.float32)),
    )


def test_balancer_that_would_overflow_the_tiers_is_refused(rng):
    s = LayerStore("mikv", 1, 16)
    s.append(_r(rng, 1, 1, 10, 16, scale=1e4), _r(rng, 1, 1, 10, 16))
    refused(
        s,
        NonFiniteError,
        "balancer",
        lambda: s.set_key_balancer(np.full((1, 1, 16), 100, np.float32)),
    )


def test_empty_batch_and_empty_append(rng):
    s = _filled(rng, "full", d=4)
    z = np.zeros((0, 1, 3, 4), np.float32)
    refused(s, ShapeError, "got keys for 0", lambda: s.append(z, z))
    empty = LayerStore("full", 1, 4)
    refused(empty, ShapeError, "batch 0", lambda: empty.append(z, z))  # advanced `seen` before
    before = snapshot(s)
    e = np.zeros((1, 1, 0, 4), np.float32)
    s.append(e, e)  # no tokens: a no-op, no position assigned
    assert snapshot(s) == before


@pytest.mark.parametrize("op", ["select_batch([])", "repeat_interleave(0)"])
def test_emptying_the_batch_holds_and_counts_nothing(rng, op):
    s = _filled(rng, "zipcache", b=2)
    s.maybe_classify(True)
    eval(f"s.{op}")
    m = s.memory()
    assert (m["bytes"], m["fp16_bytes"], m["tokens"], s.batch, s.seen) == (0, 0, 0, 0, 0)
    s.append(_r(rng, 3, 1, 4, 16), _r(rng, 3, 1, 4, 16))  # a new batch starts cleanly
    assert s.batch == 3 and s.seen == 4


# -- non-finite inputs ---------------------------------------------------------------------


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale_is_refused(rng, scale):
    s = _filled(rng, "full", d=4)
    refused(s, NonFiniteError, "scale", lambda: s.attend(_r(rng, 1, 1, 1, 4), [11], scale))
    q = _r(rng, 1, 1, 4, 4)
    with pytest.raises(NonFiniteError, match="scale"):
        probe_scores(q, q, [3], scale)


def test_queries_that_overflow_the_logits_are_refused(rng):
    """1e38 queries gave zeros (inf logits); now refused, and 1e30 ones still work."""
    s = _filled(rng, "full", d=4)
    refused(
        s, NonFiniteError, "float32", lambda: s.attend(_r(rng, 1, 1, 1, 4, scale=1e38), [11], 1.0)
    )
    nan_q = _r(rng, 1, 1, 1, 4)
    nan_q[0, 0, 0, 1] = np.nan
    refused(s, NonFiniteError, "NaN", lambda: s.attend(nan_q, [11], 1.0))
    q = _r(rng, 1, 1, 1, 4, scale=1e30)
    out = s.attend(q, [11], 1e-30)
    np.testing.assert_allclose(out, _softmax_reference(s, q, [11], 1e-30), atol=1e-5, rtol=1e-4)
    with pytest.raises(NonFiniteError):
        q4 = _r(rng, 1, 1, 4, 4, scale=1e38)
        probe_scores(q4, q4, [3], 1.0)


def test_non_finite_scores_are_refused(rng):
    s = _filled(rng, "zipcache", n=3)
    bad = np.full((1, 1, 3), np.nan, np.float32)
    ones = np.ones((1, 1, 3), np.float32)
    refused(s, NonFiniteError, "finite", lambda: s.add_scores(0, bad, ones))
    refused(s, NonFiniteError, "finite", lambda: s.add_scores(0, ones, -ones))


def test_fp16_buffer_never_turns_a_finite_input_into_inf(rng):
    """An fp16 buffer stored 1e5 as inf (attention over it returned zeros): refused now; a
    float32 buffer keeps it exactly."""
    x = _r(rng, 1, 1, 3, 4, scale=1e5)
    s16 = LayerStore("full", 1, 4, None, "float16")
    refused(s16, NonFiniteError, "65504", lambda: s16.append(x, x))
    s32 = LayerStore("full", 1, 4, None, "float32")
    s32.append(x, x)
    np.testing.assert_array_equal(s32.dense(0)[1], x[0, 0])


# -- unclear errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy,options,name",
    [
        ("zipcache", {"salient_ratio": "0.4"}, "salient_ratio"),
        ("mikv", {"low_bits": -1}, "low_bits"),
        ("uniform", {"bits": 2.5}, "bits"),
        ("mikv", {"key_balancer": "yes"}, "key_balancer"),
    ],
)
def test_wrongly_typed_options_name_the_option(policy, options, name):
    with pytest.raises(ConfigError, match=f"`{name}`"):
        LayerStore(policy, 1, 16, options)


# -- threads -----------------------------------------------------------------------------------


def test_one_store_shared_by_threads_is_safe_and_serial(rng):
    """Before: PyO3's bare "Already borrowed" RuntimeError. Now calls are serialized by a
    lock: concurrent attends give exactly the serial results, and appends interleaved with
    attends leave a store equal to a serial one."""
    k, v = _r(rng, 2, 2, 3000, 64), _r(rng, 2, 2, 3000, 64)
    qs = [_r(rng, 2, 4, 1, 64) for _ in range(8)]
    s = LayerStore("zipcache", 2, 64)
    s.append(k, v)
    s.maybe_classify(True)
    serial = [s.attend(q, [2999], 0.125, track=False) for q in qs]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i):
        try:
            for _ in range(3):
                results[i] = s.attend(qs[i], [2999], 0.125, track=False)
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i in range(8):
        np.testing.assert_array_equal(results[i], serial[i])

    shared, alone = LayerStore("full", 2, 64), LayerStore("full", 2, 64)
    chunks = [(_r(rng, 2, 2, 50, 64), _r(rng, 2, 2, 50, 64)) for _ in range(6)]
    shared.append(*chunks[0])
    lock = threading.Lock()
    order: list[int] = []

    def appender(i):
        with lock:  # the order of appends decides positions; record it to replay serially
            shared.append(*chunks[i])
            order.append(i)
        shared.attend(_r(np.random.default_rng(i), 2, 2, 1, 64), [shared.seen - 1], 0.1)

    threads = [threading.Thread(target=appender, args=(i,)) for i in range(1, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in [0, *order]:
        alone.append(*chunks[i])
    assert snapshot(shared) == snapshot(alone)


def test_errors_are_kvmix_errors():
    assert issubclass(NonFiniteError, KvmixError) and issubclass(KvmixError, ValueError)
    assert kvmix.KvmixError is KvmixError
