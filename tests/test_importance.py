"""Importance scoring and selection: the Rust core against the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvmix
from kvmix.reference import importance as ref


@given(
    length=st.integers(0, 600),
    recent=st.sampled_from([0.0, 0.05, 0.1, 0.5, 1.0]),
    random=st.sampled_from([0.0, 0.05, 0.2, 1.0]),
    seed=st.integers(0, 2**64 - 1),
)
def test_probe_positions_match_reference(length, recent, random, seed):
    got = kvmix.probe_positions(length, recent, random, seed)
    assert got == ref.probe_positions(length, recent, random, seed)
    assert got == sorted(set(got)), "sorted, no duplicates"
    n_recent = min(max(int(np.ceil(recent * length)), 1 if length else 0), length)
    assert got[len(got) - n_recent :] == list(range(length - n_recent, length))


def test_probe_positions_default_is_ten_percent():
    p = kvmix.probe_positions(4096)
    assert len(p) == 2 * int(np.ceil(0.05 * 4096))
    assert p != kvmix.probe_positions(4096, seed=1)


@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    rep=st.sampled_from([1, 3]),
    length=st.integers(1, 24),
    dim=st.sampled_from([4, 16]),
    mode=st.sampled_from(["exact", "full_matrix"]),
    seed=st.integers(0, 1000),
)
def test_probe_scores_match_reference(batch, kv_heads, rep, length, dim, mode, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, kv_heads * rep, length, dim), dtype=np.float32)
    k = rng.standard_normal((batch, kv_heads, length, dim), dtype=np.float32)
    probes = kvmix.probe_positions(length, 0.1, 0.2, seed)
    first_valid = [int(rng.integers(0, length)) for _ in range(batch)]
    scale = 1 / np.sqrt(dim)
    acc, count = kvmix.probe_scores(q, k, probes, scale, first_valid, mode)
    racc, rcount = ref.probe_scores(q, k, probes, scale, first_valid, mode)
    np.testing.assert_allclose(acc, racc, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(count, rcount)
    # Every valid probe row distributes exactly one unit per query head.
    for b in range(batch):
        n_rows = sum(p >= first_valid[b] for p in probes)
        np.testing.assert_allclose(acc[b].sum(), n_rows * kv_heads * rep, rtol=1e-5)


def test_probe_scores_accept_torch_bfloat16():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 3, 12, 8, generator=g)
    k = torch.randn(1, 1, 12, 8, generator=g)
    probes = [3, 11]
    qb, kb = q.bfloat16(), k.bfloat16()
    from kvmix.quant import as_core_array

    (qa, _), (ka, _) = as_core_array(qb), as_core_array(kb)
    acc, _ = kvmix.probe_scores(qa, ka, probes, 0.3, bfloat16=True)
    racc, _ = ref.probe_scores(qb.float().numpy(), kb.float().numpy(), probes, 0.3)
    np.testing.assert_allclose(acc, racc, rtol=1e-5, atol=1e-6)


@given(
    scores=st.lists(st.integers(0, 4).map(float), min_size=0, max_size=40),
    k=st.integers(0, 45),
)
def test_top_k_matches_reference_with_ties(scores, k):
    arr = np.array(scores, dtype=np.float32)
    assert kvmix.top_k(arr, k) == ref.top_k(arr, k)


def _round_half_up(x: float) -> int:
    # The core rounds budgets with f64::round (half away from zero); Python's round() is
    # banker's rounding.
    return int(np.floor(x + 0.5))


@given(
    length=st.integers(1, 80),
    ratio=st.sampled_from([0.1, 0.2, 0.5]),
    recent_share=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 1000),
)
def test_mikv_prefill_selection_matches_reference(length, ratio, recent_share, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 2, length, 16), dtype=np.float32)
    store = kvmix.LayerStore(
        "mikv",
        2,
        16,
        {"ratio": ratio, "recent_share": recent_share, "key_balancer": False},
        "float32",
    )
    store.append(x, x)
    acc = rng.integers(0, 5, (1, 2, length)).astype(np.float32)  # many ties
    store.add_scores(0, acc, np.ones_like(acc))
    store.maybe_classify()
    budget = _round_half_up(ratio * length)
    n_recent = _round_half_up(recent_share * budget)
    for h in range(2):
        want = ref.heavy_and_recent(np.arange(length), acc[0, h], np.ones(length), budget, n_recent)
        got = store.tier_positions(h)
        np.testing.assert_array_equal(got["high"], np.flatnonzero(want))
        np.testing.assert_array_equal(got["low"], np.flatnonzero(~want))


@given(length=st.integers(1, 80), ratio=st.sampled_from([0.4, 0.6]), seed=st.integers(0, 1000))
def test_zipcache_prefill_selection_is_top_normalized(length, ratio, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 1, length, 16), dtype=np.float32)
    store = kvmix.LayerStore("zipcache", 1, 16, {"salient_ratio": ratio}, "float32")
    store.append(x, x)
    acc = rng.random((1, 1, length), dtype=np.float32)
    count = rng.integers(1, 6, (1, 1, length)).astype(np.float32)
    store.add_scores(0, acc, count)
    store.maybe_classify()
    want = ref.top_k(ref.normalized(acc[0, 0], count[0, 0]), _round_half_up(ratio * length))
    np.testing.assert_array_equal(store.tier_positions(0)["high"], want)


@given(
    length=st.integers(1, 60),
    kv_heads=st.integers(1, 4),
    selection=st.sampled_from(["layer", "kv_head"]),
    seed=st.integers(0, 1000),
)
def test_zipcache_salient_sets_per_layer_or_per_kv_head(length, kv_heads, selection, seed):
    # "layer": one set per sequence, by the normalized sum over its kv-heads (counts summed too);
    # "kv_head": each stream ranks its own scores. Two sequences: nothing pools across them.
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, kv_heads, length, 16), dtype=np.float32)
    store = kvmix.LayerStore(
        "zipcache", kv_heads, 16, {"salient_ratio": 0.4, "selection": selection}, "float32"
    )
    store.append(x, x)
    acc = rng.random((2, kv_heads, length), dtype=np.float32)
    count = rng.integers(1, 6, (2, kv_heads, length)).astype(np.float32)
    store.add_scores(0, acc, count)
    store.maybe_classify()
    k = _round_half_up(0.4 * length)
    for b in range(2):
        pooled = ref.top_k(ref.normalized(acc[b].sum(0), count[b].sum(0)), k)
        for h in range(kv_heads):
            own = ref.top_k(ref.normalized(acc[b, h], count[b, h]), k)
            want = pooled if selection == "layer" else own
            got = store.tier_positions(b * kv_heads + h)["high"]
            np.testing.assert_array_equal(got, np.sort(want))


def test_normalized_and_accumulated_rankings_differ_on_early_bias():
    # Accumulated attention favours early tokens seen by many queries; the normalized score
    # removes that bias (ZipCache's argument).
    acc = np.array([[[4.0, 1.0, 0.9]]], dtype=np.float32)
    count = np.array([[[10.0, 1.0, 1.0]]], dtype=np.float32)
    x = np.zeros((1, 1, 3, 8), np.float32)
    picks = {}
    for normalized in (True, False):
        store = kvmix.LayerStore(
            "zipcache", 1, 8, {"salient_ratio": 0.34, "normalized": normalized}, "float32"
        )
        store.append(x, x)
        store.add_scores(0, acc, count)
        store.maybe_classify()
        picks[normalized] = store.tier_positions(0)["high"].tolist()
    assert picks == {True: [1], False: [0]}


def test_accumulate_dense_sums_gqa_heads_and_counts_visible_queries():
    store = kvmix.LayerStore("zipcache", 1, 8, {"streaming_gap": 100}, "float32")
    x = np.zeros((1, 1, 4, 8), np.float32)
    store.append(x, x)
    # Two query heads (GQA 2:1), two queries at positions 2 and 3.
    probs = np.zeros((1, 2, 2, 4), np.float32)
    probs[0, 0, 0, :3] = [0.5, 0.25, 0.25]
    probs[0, 1, 1, :] = [0.1, 0.2, 0.3, 0.4]
    store.accumulate_dense(probs, [2, 3])
    store.add_scores(0, np.zeros((1, 1, 4), np.float32), np.zeros((1, 1, 4), np.float32))
    # normalized = acc / count = [0.6/2, 0.45/2, 0.55/2, 0.4/1]: the top 40% (2 tokens) are 3, 0.
    store.maybe_classify()
    assert store.tier_positions(0)["high"].tolist() == [0, 3]


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    rep=st.sampled_from([1, 3]),
    length=st.integers(1, 80),
    pad=st.integers(0, 10),
    seed=st.integers(0, 1000),
)
def test_prefill_probe_scores_in_torch_match_reference(batch, rep, length, pad, seed):
    """The fused attention's block-wise torch scoring (rows in several blocks, left padding)
    equals the NumPy reference."""
    torch = pytest.importorskip("torch")
    from kvmix.attention import _probabilities

    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, 2 * rep, length, 16), dtype=np.float32)
    k = rng.standard_normal((batch, 2, length, 16), dtype=np.float32)
    probes = kvmix.probe_positions(length, 0.3, 0.3, seed)
    first_valid = [min(pad * b, length - 1) for b in range(batch)]
    acc = _probabilities(torch.from_numpy(q), torch.from_numpy(k), probes, first_valid, 0.3)
    racc, _ = ref.probe_scores(q, k, probes, 0.3, first_valid)
    np.testing.assert_allclose(acc.numpy(), racc, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("length", [1, 31, 32, 100])
def test_one_pass_prefill_attention_equals_sdpa_and_reference(length, threads, monkeypatch):
    """MiKV's prefill: output and accumulated attention of every row from one softmax, with the
    row blocks run inline or side by side on scoring threads."""
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("KVMIX_SCORING_THREADS", threads)
    from kvmix.attention import _attention_and_column_sums

    g = torch.Generator().manual_seed(length)
    q = torch.randn(2, 6, length, 16, generator=g) * 2
    k = torch.randn(2, 2, length, 16, generator=g) * 2
    v = torch.randn(2, 2, length, 16, generator=g)
    out, acc = _attention_and_column_sums(q, k, v, 0.25)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=0.25, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    racc, _ = ref.probe_scores(q.numpy(), k.numpy(), list(range(length)), 0.25)
    np.testing.assert_allclose(acc.numpy(), racc, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["exact", "full_matrix"])
def test_visible_counts_match_brute_force(mode):
    """How many scored rows see each key: rows at or after it (or L - j), zero in the padding."""
    pytest.importorskip("torch")
    from kvmix.attention import _visible_counts

    t = 50
    rows = kvmix.probe_positions(t, 0.2, 0.2, 3)
    got = _visible_counts(rows, t, [0, 7], mode)
    j = np.arange(t)
    base = t - j if mode == "full_matrix" else np.array([sum(r >= k for r in rows) for k in j])
    want = np.stack([np.where(j >= fv, base, 0) for fv in (0, 7)])[:, None, :]
    np.testing.assert_array_equal(got, want.astype(np.float32))
    assert got.dtype == np.float32


def test_scoring_pool_is_per_process(monkeypatch):
    """A forked child inherits the scoring executor but not its threads: it gets a new one."""
    pytest.importorskip("torch")
    from kvmix import attention

    pool = attention._scoring_pool(2)
    assert attention._scoring_pool(2) is pool
    monkeypatch.setattr(attention.os, "getpid", lambda: -1)
    child = attention._scoring_pool(2)
    assert child is not pool
    assert child.submit(lambda: 41 + 1).result(timeout=10) == 42
