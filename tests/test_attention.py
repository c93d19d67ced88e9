"""Attention on the compressed store (`LayerStore.attend`) against torch SDPA.

The reference is `torch.nn.functional.scaled_dot_product_attention` in fp32 run on the store's
own dequantized contents (`LayerStore.dense` of every stream), with an explicit boolean mask for
the visibility rule: a key at position `p` is visible to a query at position `qp` iff
`first_valid[b] <= p <= qp`. The kernel folds dequantization into its dot products and must
agree with that to `ATOL` whatever the policy, tier codecs, GQA ratio, batch, left padding,
query count or head_dim. The quantization error itself is not measured here (see
`test_quantization_parity.py`): both sides see exactly the same dequantized cache.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import kvmix

#: Max abs difference between the kernel and fp32 SDPA on the dequantized cache. Outputs are
#: O(1) (convex combinations of O(1) values); the largest difference seen over this file is
#: ~1e-5 (fp32 summation order), while a wrong GQA mapping, causal or padding boundary gives
#: errors of 1e-2 to 1.
ATOL = 1e-4

# (id, policy, config). Small streaming gaps and residuals so that a few decode steps build
# several classifications (segments of per-channel parameters) and keep the buffer non-empty.
CONFIGS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("full", "full", None),
    ("mikv-fp16-int2", "mikv", {"streaming_gap": 3}),
    ("mikv-fp16-int3", "mikv", {"low_bits": 3, "streaming_gap": 2}),
    ("mikv-int8-int4", "mikv", {"high_bits": 8, "low_bits": 4, "streaming_gap": 3}),
    ("mikv-int4-int2-nobalancer", "mikv", {"high_bits": 4, "key_balancer": False}),
    ("mikv-int8-int3-g16", "mikv", {"high_bits": 8, "low_bits": 3, "group_size": 16}),
    ("zipcache-4-2", "zipcache", {"streaming_gap": 3}),
    ("zipcache-8-4", "zipcache", {"high_bits": 8, "low_bits": 4, "streaming_gap": 4}),
    ("uniform-2", "uniform", {"bits": 2, "residual": 16, "group_size": 16}),
    ("uniform-4", "uniform", {"bits": 4, "residual": 16, "group_size": 16}),
    ("eviction", "eviction", {"budget": 0.3, "streaming_gap": 2}),
]
GQA_RATIOS = (1, 3, 4, 8)
HEAD_DIMS = (64, 128, 80, 96)

#: Tiers a policy fills during decoding (checked, so the parity really covers them).
EXPECTED_TIERS = {
    "full": {"buffer"},
    "mikv": {"buffer", "high", "low"},
    "zipcache": {"buffer", "high", "low"},
    "uniform": {"buffer", "low"},
    "eviction": {"buffer", "high"},
}


@pytest.fixture(autouse=True, scope="module")
def _single_threaded_torch():
    """The reference runs many tiny torch ops between kernel calls. With two OpenMP threads on
    a busy two-core machine such an op can wait a scheduler slice (~10 ms) at its barrier, and
    the threads' idle spinning slows the next kernel call; one thread keeps the file fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Helpers ----------------------------------------------------------------------------------------


def _gaussian_kv(
    rng: np.random.Generator, batch: int, kv_heads: int, tokens: int, head_dim: int
) -> tuple[np.ndarray, np.ndarray]:
    k = rng.standard_normal((batch, kv_heads, tokens, head_dim), dtype=np.float32)
    v = rng.standard_normal((batch, kv_heads, tokens, head_dim), dtype=np.float32)
    k[..., [1, head_dim // 3]] *= 8.0  # outlier channels, as real keys have
    k[..., head_dim - 2] += 4.0
    return k, v


def _queries(
    rng: np.random.Generator, batch: int, q_heads: int, q_len: int, head_dim: int
) -> np.ndarray:
    return rng.standard_normal((batch, q_heads, q_len, head_dim), dtype=np.float32)


def _first_valid(batch: int) -> list[int]:
    return [0, 7, 19][:batch] if batch > 1 else [0]


def _reference(
    store: kvmix.LayerStore, q: np.ndarray, q_positions: list[int], scale: float, first_valid
) -> np.ndarray:
    """fp32 SDPA on the dequantized store, with the visibility rule as an explicit mask."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = store.kv_heads
    streams = [store.dense(s) for s in range(batch * kv_heads)]
    # Streams may hold different positions (eviction keeps per-head sets): pad to the longest
    # and mask the padding out.
    t = max(1, max(len(p) for p, _, _ in streams))
    keys = torch.zeros(batch, kv_heads, t, head_dim)
    values = torch.zeros(batch, kv_heads, t, head_dim)
    visible = torch.zeros(batch, kv_heads, q_len, t, dtype=torch.bool)
    qpos = torch.tensor(q_positions, dtype=torch.int64)[:, None]
    for s, (pos, k, v) in enumerate(streams):
        b, h = divmod(s, kv_heads)
        n = len(pos)
        assert np.all(np.diff(pos.astype(np.int64)) > 0), "dense() must be in position order"
        keys[b, h, :n] = torch.from_numpy(k)
        values[b, h, :n] = torch.from_numpy(v)
        p = torch.from_numpy(pos.astype(np.int64))[None, :]
        visible[b, h, :, :n] = (p <= qpos) & (p >= first_valid[b])
    # Query head h reads kv head h // (q_heads // kv_heads): enable_gqa's grouping, so the mask
    # (per kv head) is expanded the same way.
    mask = visible.repeat_interleave(q_heads // kv_heads, dim=1)
    out = F.scaled_dot_product_attention(
        torch.from_numpy(q), keys, values, attn_mask=mask, scale=scale, enable_gqa=True
    )
    # A query that sees nothing: SDPA gives NaN, the kernel gives zeros.
    out = torch.where(mask.any(-1, keepdim=True), out, torch.zeros(()))
    return out.numpy()


def _assert_parity(store, q, q_positions, scale, first_valid, track=True) -> np.ndarray:
    got = store.attend(q, q_positions, scale, track=track)
    assert got.shape == q.shape
    assert got.dtype == np.float32
    want = _reference(store, q, q_positions, scale, first_valid)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    return got


def _tiers_filled(store: kvmix.LayerStore) -> set[str]:
    filled: set[str] = set()
    for s in range(store.batch * store.kv_heads):
        filled |= {tier for tier, pos in store.tier_positions(s).items() if len(pos)}
    return filled


def _prefill(
    policy: str,
    config: dict[str, Any] | None,
    *,
    batch: int,
    kv_heads: int,
    q_heads: int,
    head_dim: int,
    tokens: int,
    rng: np.random.Generator,
) -> kvmix.LayerStore:
    """A store after the prompt: appended, padding marked, scored and classified."""
    store = kvmix.LayerStore(policy, kv_heads, head_dim, config, "float32")
    k, v = _gaussian_kv(rng, batch, kv_heads, tokens, head_dim)
    store.append(k, v)
    store.set_first_valid(_first_valid(batch))
    if store.needs_balancer:
        store.set_key_balancer(
            kvmix.key_balancer(_queries(rng, batch, q_heads, tokens, head_dim), k)
        )
    acc = rng.random((batch, kv_heads, tokens), dtype=np.float32)
    store.add_scores(0, acc, np.ones_like(acc))
    store.maybe_classify()
    return store


# Parity over policies, tiers, GQA, batch/padding, q_len and head_dim ----------------------------


@pytest.mark.parametrize(
    ("policy", "config"), [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS]
)
@pytest.mark.parametrize("ratio", GQA_RATIOS, ids=[f"gqa{r}" for r in GQA_RATIOS])
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=[f"d{d}" for d in HEAD_DIMS])
@pytest.mark.parametrize("batch", [1, 3])
def test_attend_matches_sdpa_on_dequantized_cache(policy, config, ratio, head_dim, batch) -> None:
    rng = np.random.default_rng([ratio, head_dim, batch])
    kv_heads = 2 if ratio < 8 else 1
    q_heads = kv_heads * ratio
    fv = _first_valid(batch)
    scale = head_dim**-0.5
    store = _prefill(
        policy,
        config,
        batch=batch,
        kv_heads=kv_heads,
        q_heads=q_heads,
        head_dim=head_dim,
        tokens=61,
        rng=rng,
    )
    # Prefill-like: every prompt position queries the cache at once (causal + padding mask).
    prompt = list(range(store.seen))
    _assert_parity(store, _queries(rng, batch, q_heads, len(prompt), head_dim), prompt, scale, fv)
    # Decoding: append one token, attend with tracking, classify when due.
    for _ in range(7):
        k, v = _gaussian_kv(rng, batch, kv_heads, 1, head_dim)
        store.append(k, v)
        q = _queries(rng, batch, q_heads, 1, head_dim)
        _assert_parity(store, q, [store.seen - 1], scale, fv)
        store.maybe_classify()
    # Several new tokens at once (speculative / chunked prefill): causal among themselves.
    k, v = _gaussian_kv(rng, batch, kv_heads, 5, head_dim)
    store.append(k, v)
    assert _tiers_filled(store) == EXPECTED_TIERS[policy]
    last = list(range(store.seen - 5, store.seen))
    _assert_parity(store, _queries(rng, batch, q_heads, 5, head_dim), last, scale, fv)
    # Queries in the past: the causal mask cuts into the compressed tiers too.
    past = [store.seen - 40, store.seen - 23, store.seen - 1]
    _assert_parity(store, _queries(rng, batch, q_heads, 3, head_dim), past, scale, fv, track=False)


@given(
    case=st.sampled_from(CONFIGS),
    kv_heads=st.integers(1, 3),
    ratio=st.sampled_from(GQA_RATIOS),
    head_dim=st.sampled_from([16, 32, 48, 64, 80, 96, 128]),
    batch=st.integers(1, 3),
    tokens=st.integers(1, 120),
    data=st.data(),
)
def test_attend_matches_sdpa_hypothesis(case, kv_heads, ratio, head_dim, batch, tokens, data):
    """Random shapes, padding and query positions (any order, repeats allowed)."""
    _, policy, config = case
    rng = np.random.default_rng(tokens)
    store = kvmix.LayerStore(policy, kv_heads, head_dim, config, "float32")
    k, v = _gaussian_kv(rng, batch, kv_heads, tokens, head_dim)
    store.append(k, v)
    fv = data.draw(st.lists(st.integers(0, tokens), min_size=batch, max_size=batch), "first_valid")
    store.set_first_valid(fv)
    if store.needs_balancer:
        q = _queries(rng, batch, kv_heads * ratio, tokens, head_dim)
        store.set_key_balancer(kvmix.key_balancer(q, k))
    acc = rng.random((batch, kv_heads, tokens), dtype=np.float32)
    store.add_scores(0, acc, np.ones_like(acc))
    store.maybe_classify()
    for _ in range(data.draw(st.integers(0, 5), "decode steps")):
        k, v = _gaussian_kv(rng, batch, kv_heads, 1, head_dim)
        store.append(k, v)
        q = _queries(rng, batch, kv_heads * ratio, 1, head_dim)
        store.attend(q, [store.seen - 1], head_dim**-0.5)
        store.maybe_classify()
    positions = data.draw(st.lists(st.integers(0, store.seen - 1), min_size=1, max_size=6), "q")
    q = _queries(rng, batch, kv_heads * ratio, len(positions), head_dim)
    _assert_parity(store, q, positions, head_dim**-0.5, fv)


@pytest.mark.parametrize(("name", "policy", "config"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_large_logits_and_long_cache(name, policy, config) -> None:
    """Peaked softmax (logit std ~10, top token ~80% of the mass) over ~1k tokens: max
    subtraction and accumulation order."""
    rng = np.random.default_rng(1)
    head_dim, kv_heads, q_heads, batch = 64, 2, 8, 2
    store = _prefill(
        policy,
        config,
        batch=batch,
        kv_heads=kv_heads,
        q_heads=q_heads,
        head_dim=head_dim,
        tokens=1000,
        rng=rng,
    )
    q = 10.0 * _queries(rng, batch, q_heads, 2, head_dim)
    _assert_parity(store, q, [store.seen - 2, store.seen - 1], 1.0 / 8, _first_valid(batch))


def test_fully_padded_query_gets_zeros() -> None:
    store = kvmix.LayerStore("zipcache", 2, 64, None, "float32")
    rng = np.random.default_rng(2)
    k, v = _gaussian_kv(rng, 2, 2, 30, 64)
    store.append(k, v)
    store.set_first_valid([0, 20])
    acc = rng.random((2, 2, 30), dtype=np.float32)
    store.add_scores(0, acc, np.ones_like(acc))
    store.maybe_classify()
    q = _queries(rng, 2, 4, 2, 64)
    out = store.attend(q, [10, 29], 0.125, track=True)
    assert np.all(out[1, :, 0] == 0.0)  # position 10 < first_valid 20: nothing visible
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, _reference(store, q, [10, 29], 0.125, [0, 20]), atol=ATOL)


def test_noncontiguous_queries_are_read_correctly() -> None:
    rng = np.random.default_rng(3)
    store = _prefill(
        "zipcache", None, batch=1, kv_heads=2, q_heads=8, head_dim=64, tokens=80, rng=rng
    )
    q = np.ascontiguousarray(_queries(rng, 1, 8, 3, 64).transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    assert not q.flags.c_contiguous
    want = _reference(store, np.ascontiguousarray(q), [77, 78, 79], 0.125, [0])
    np.testing.assert_allclose(store.attend(q, [77, 78, 79], 0.125), want, atol=ATOL)


@pytest.mark.parametrize(("name", "policy", "config"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_attend_after_crop_select_and_repeat(name, policy, config) -> None:
    """The batch operations of a transformers `Cache` rebuild streams; attention must follow."""
    rng = np.random.default_rng(10)
    kw = {"batch": 3, "kv_heads": 2, "q_heads": 4, "head_dim": 64, "tokens": 61, "rng": rng}
    store = _prefill(policy, config, **kw)
    for _ in range(5):
        k, v = _gaussian_kv(rng, 3, 2, 1, 64)
        store.append(k, v)
        store.attend(_queries(rng, 3, 4, 1, 64), [store.seen - 1], 0.125)
        store.maybe_classify()
    fv = _first_valid(3)
    store.crop(50)
    _assert_parity(store, _queries(rng, 3, 4, 2, 64), [48, 49], 0.125, fv)
    store.select_batch([2, 0])
    fv = [fv[2], fv[0]]
    _assert_parity(store, _queries(rng, 2, 4, 1, 64), [store.seen - 1], 0.125, fv)
    store.repeat_interleave(2)
    fv = [fv[0], fv[0], fv[1], fv[1]]
    _assert_parity(store, _queries(rng, 4, 4, 1, 64), [store.seen - 1], 0.125, fv)


# Real keys and values ---------------------------------------------------------------------------


def _llama_qkv(model, input_ids: torch.Tensor, layer: int) -> tuple[np.ndarray, ...]:
    """Post-RoPE queries, keys and values of one layer of a Llama forward with a cache."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = model.model.layers[layer].self_attn
    captured: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        b, t, _ = hidden.shape
        q = module.q_proj(hidden).view(b, t, -1, module.head_dim).transpose(1, 2)
        captured["q"], _ = apply_rotary_pos_emb(q, q, cos, sin)

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(input_ids, use_cache=True)
    finally:
        handle.remove()
    cache = out.past_key_values.layers[layer]
    return tuple(
        x.detach().float().contiguous().numpy() for x in (captured["q"], cache.keys, cache.values)
    )


def _parity_on_real_kv(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> None:
    tokens, head_dim = q.shape[2:]
    kv_heads = k.shape[1]
    prompt = tokens - 4
    for name, policy, config in CONFIGS:
        store = kvmix.LayerStore(policy, kv_heads, head_dim, config, "float32")
        store.append(k[:, :, :prompt], v[:, :, :prompt])
        if store.needs_balancer:
            store.set_key_balancer(kvmix.key_balancer(q[:, :, :prompt], k[:, :, :prompt]))
        acc, count = kvmix.probe_scores(
            q[:, :, :prompt],
            k[:, :, :prompt],
            kvmix.probe_positions(prompt, 0.1, 0.1),
            scale,
        )
        store.add_scores(0, acc, count)
        store.maybe_classify()
        for t in range(prompt, tokens):
            store.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
            got = store.attend(np.ascontiguousarray(q[:, :, t : t + 1]), [t], scale)
            want = _reference(store, np.ascontiguousarray(q[:, :, t : t + 1]), [t], scale, [0])
            np.testing.assert_allclose(got, want, atol=ATOL, err_msg=name)
            store.maybe_classify()


def test_real_kv_from_tiny_random_llama() -> None:
    from kvmix.models import tiny_random_model

    model = tiny_random_model(
        "llama", hidden_size=192, head_dim=64, num_attention_heads=6, num_key_value_heads=2
    )
    ids = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(0))
    q, k, v = _llama_qkv(model, ids, layer=1)
    _parity_on_real_kv(q, k, v, 64**-0.5)


@pytest.mark.slow
def test_real_kv_from_smollm2() -> None:
    pytest.importorskip("gguf")
    from kvmix.models import load_smollm2

    try:
        model, tokenizer = load_smollm2()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"SmolLM2 unavailable: {e}")
    text = "In the beginning God created the heaven and the earth. " * 40
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :160]
    q, k, v = _llama_qkv(model, ids, layer=model.config.num_hidden_layers // 2)
    _parity_on_real_kv(q, k, v, model.config.head_dim**-0.5)


# Importance tracking ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "policy", "config"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_tracking_does_not_change_the_output(name, policy, config) -> None:
    rng = np.random.default_rng(4)
    kw = {"batch": 3, "kv_heads": 2, "q_heads": 6, "head_dim": 64, "tokens": 50, "rng": rng}
    store = _prefill(policy, config, **kw)
    k, v = _gaussian_kv(rng, 3, 2, 1, 64)
    store.append(k, v)
    q = _queries(rng, 3, 6, 1, 64)
    untracked = store.attend(q, [store.seen - 1], 0.125, track=False)
    tracked = store.attend(q, [store.seen - 1], 0.125, track=True)
    np.testing.assert_array_equal(untracked, tracked)
    np.testing.assert_array_equal(untracked, store.attend(q, [store.seen - 1], 0.125, track=False))


def _focused_store(policy: str, config: dict[str, Any] | None, *, track: bool, target: int):
    """All prompt tokens still buffered with low random scores (`target` lowest of all), then
    one query that attends almost only to `target`, tracked or not, then a classification."""
    rng = np.random.default_rng(5)
    tokens, d = 64, 64
    store = kvmix.LayerStore(policy, 1, d, config, "float32")
    # No outlier channels here: a query along one key must single that key out.
    k = rng.standard_normal((1, 1, tokens, d), dtype=np.float32)
    v = rng.standard_normal((1, 1, tokens, d), dtype=np.float32)
    store.append(k, v)
    if store.needs_balancer:
        store.set_key_balancer(np.ones((1, 1, d), np.float32))
    acc = 0.5 + 0.1 * rng.random((1, 1, tokens), dtype=np.float32)
    acc[0, 0, target] = 0.0
    store.add_scores(0, acc, np.ones_like(acc))
    q = (40.0 * k[:, :, target : target + 1] / np.linalg.norm(k[0, 0, target])).repeat(2, axis=1)
    out = store.attend(np.ascontiguousarray(q), [tokens - 1], 1.0, track=track)
    np.testing.assert_allclose(out[0, 0, 0], v[0, 0, target], atol=1e-3)  # really focused
    assert store.maybe_classify(force=True)
    return store


@pytest.mark.parametrize(
    ("policy", "config"),
    [
        ("mikv", {"ratio": 0.25}),
        ("zipcache", {"salient_ratio": 0.25}),
        ("eviction", {"budget": 0.25}),
    ],
)
def test_tracked_attention_raises_importance_of_scored_tokens(policy, config) -> None:
    target = 5  # old, so not protected as "recent"
    tracked = _focused_store(policy, config, track=True, target=target).tier_positions(0)
    untracked = _focused_store(policy, config, track=False, target=target).tier_positions(0)
    assert target in tracked["high"]
    assert target not in untracked["high"]


def test_tracked_attention_keeps_a_heavy_hitter_in_the_mikv_high_tier() -> None:
    """MiKV re-ranks its (scored) high tier at every classification: a high-tier token that
    decoding queries attend to stays there only if that attention is tracked."""

    def high_tier_after_decoding(track: bool) -> list[int]:
        rng = np.random.default_rng(9)
        tokens, d, target = 64, 64, 5
        config = {"ratio": 0.25, "recent_share": 0.25, "key_balancer": False}
        store = kvmix.LayerStore("mikv", 1, d, config, "float32")
        k = rng.standard_normal((1, 1, tokens, d), dtype=np.float32)
        v = rng.standard_normal((1, 1, tokens, d), dtype=np.float32)
        store.append(k, v)
        acc = 0.1 * rng.random((1, 1, tokens), dtype=np.float32)
        acc[0, 0, 10:21] = 1.0
        acc[0, 0, target] = 0.5  # the weakest heavy hitter
        store.add_scores(0, acc, np.ones_like(acc))
        store.maybe_classify()
        assert target in store.tier_positions(0)["high"]
        q = 40.0 * k[:, :, target : target + 1] / np.linalg.norm(k[0, 0, target])
        q = np.ascontiguousarray(q.repeat(2, axis=1))
        for _ in range(12):
            x = rng.standard_normal((1, 1, 1, d), dtype=np.float32)
            store.append(x, x)
            # New tokens outscore the target once they are no longer "recent"...
            one = np.ones((1, 1, 1), np.float32)
            store.add_scores(store.seen - 1, 2.0 * one, one)
            # ...unless the attention it receives while decoding is counted.
            store.attend(q, [store.seen - 1], 1.0, track=track)
            store.maybe_classify()
        return store.tier_positions(0)["high"].tolist()

    assert 5 in high_tier_after_decoding(track=True)
    assert 5 not in high_tier_after_decoding(track=False)


@pytest.mark.parametrize(
    ("policy", "config"),
    [("zipcache", {"streaming_gap": 2}), ("uniform", {"bits": 4, "residual": 16})],
)
def test_unscored_tiers_keep_no_scores_and_ignore_tracking(policy, config) -> None:
    """Tiers that are never re-ranked hold no scores: tracked attention to their tokens changes
    neither the memory report nor any later classification."""

    def decoded(track: bool) -> kvmix.LayerStore:
        rng = np.random.default_rng(6)
        kw = {"batch": 1, "kv_heads": 1, "q_heads": 2, "head_dim": 64, "tokens": 64}
        store = _prefill(policy, config, rng=rng, **kw)
        low = store.tier_positions(0)["low"]
        _, k, _ = store.dense(0)
        # Decoding queries that look at a compressed prompt token.
        q = 40.0 * k[low[3]] / np.linalg.norm(k[low[3]])
        q = np.ascontiguousarray(np.broadcast_to(q, (1, 2, 1, 64)))
        for _ in range(6):
            x = rng.standard_normal((1, 1, 1, 64), dtype=np.float32)
            store.append(x, x)
            store.attend(q, [store.seen - 1], 1.0, track=track)
            store.maybe_classify()
        return store

    tracked, untracked = decoded(True), decoded(False)
    for tier in ("high", "low"):
        assert tracked.memory()["tiers"][tier]["scores"] == 0
    assert tracked.memory() == untracked.memory()
    for tier, positions in tracked.tier_positions(0).items():
        np.testing.assert_array_equal(positions, untracked.tier_positions(0)[tier], err_msg=tier)


# Bad input ----------------------------------------------------------------------------------------


def _small_store() -> kvmix.LayerStore:
    rng = np.random.default_rng(8)
    return _prefill(
        "zipcache", None, batch=2, kv_heads=2, q_heads=4, head_dim=64, tokens=20, rng=rng
    )


@pytest.mark.parametrize(
    ("shape", "positions"),
    [
        pytest.param((2, 4, 64), [19], id="3d-queries"),
        pytest.param((2, 4, 1, 1, 64), [19], id="5d-queries"),
        pytest.param((2, 4, 1, 32), [19], id="wrong-head-dim"),
        pytest.param((1, 4, 1, 64), [19], id="wrong-batch"),
        pytest.param((2, 3, 1, 64), [19], id="q-heads-not-multiple-of-kv-heads"),
        pytest.param((2, 4, 1, 64), [18, 19], id="too-many-positions"),
        pytest.param((2, 4, 2, 64), [19], id="too-few-positions"),
        pytest.param((2, 4, 1, 64), [], id="no-positions"),
    ],
)
def test_bad_queries_raise_shape_error(shape, positions) -> None:
    store = _small_store()
    before = store.memory()
    with pytest.raises(kvmix.ShapeError):
        store.attend(np.zeros(shape, np.float32), positions, 0.125)
    assert store.memory() == before
    store.attend(np.zeros((2, 4, 1, 64), np.float32), [19], 0.125)  # store still usable


def test_shape_error_is_a_kvmix_value_error() -> None:
    with pytest.raises(ValueError, match="head_dim"):
        _small_store().attend(np.zeros((2, 4, 1, 32), np.float32), [19], 0.125)


def test_wrong_dtype_queries_raise_dtype_error() -> None:
    with pytest.raises(kvmix.DTypeError):
        _small_store().attend(np.zeros((2, 4, 1, 64), np.float64), [19], 0.125)


def test_nan_queries_are_refused() -> None:
    q = np.zeros((2, 4, 1, 64), np.float32)
    q[0, 0, 0, 0] = np.nan
    with pytest.raises(kvmix.NonFiniteError, match="NaN"):
        _small_store().attend(q, [19], 0.125)


@pytest.mark.parametrize("head_dim", [80, 96])
def test_uniform_default_config_accepts_head_dims_80_and_96(head_dim) -> None:
    kvmix.LayerStore("uniform", 2, head_dim)
