"""The layer store from Python: dequantized contents against the reference quantizers,
byte accounting, batch operations and refusal of bad input."""

from __future__ import annotations

import numpy as np
import pytest

import kvmix
from kvmix.reference import quantization as rq

D = 32


def _prefilled(policy, config=None, length=50, heads=2, batch=1, seed=0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((batch, heads, length, D), dtype=np.float32)
    v = rng.standard_normal((batch, heads, length, D), dtype=np.float32)
    k[..., 3] *= 8  # an outlier channel, as real keys have
    store = kvmix.LayerStore(policy, heads, D, config, "float32")
    store.append(k, v)
    if store.needs_balancer:
        q = rng.standard_normal((batch, heads * 2, length, D), dtype=np.float32)
        store.set_key_balancer(kvmix.key_balancer(q, k))
    acc = rng.random((batch, heads, length), dtype=np.float32)
    store.add_scores(0, acc, np.ones_like(acc))
    store.maybe_classify()
    return store, k, v


def _rows(store, stream, tier):
    """Positions of a tier and the matching dequantized keys/values from dense()."""
    positions = store.tier_positions(stream)[tier]
    pos, k, v = store.dense(stream)
    idx = np.searchsorted(pos, positions)
    return positions, k[idx], v[idx]


def test_zipcache_tiers_equal_reference_quantizers():
    store, k, v = _prefilled("zipcache")
    for s in range(2):
        for tier, bits in (("high", 4), ("low", 2)):
            positions, kh, vh = _rows(store, s, tier)
            kx, vx = k[0, s, positions], v[0, s, positions]
            qk = rq.quantize_channel_blocks(kx, bits, len(positions))
            np.testing.assert_allclose(
                kh, rq.dequantize_channel_blocks(qk, len(positions)), atol=1e-6
            )
            qv = rq.quantize_token_groups(vx, bits, D, channel_scale=rq.separable_channel_scale(vx))
            np.testing.assert_allclose(vh, rq.dequantize_token_groups(qv, D), rtol=1e-6, atol=1e-6)


def test_zipcache_plain_tokenwise_values_ablation():
    """`channel_separable=False` (the ablation of ZipCache's value quantizer) quantizes values
    per token without channel factors; keys are unchanged."""
    store, k, v = _prefilled("zipcache", {"channel_separable": False})
    positions, kh, vh = _rows(store, 0, "low")
    vx = v[0, 0, positions]
    plain = rq.dequantize_token_groups(rq.quantize_token_groups(vx, 2, D), D)
    np.testing.assert_allclose(vh, plain, rtol=1e-6, atol=1e-6)
    separable = rq.quantize_token_groups(vx, 2, D, channel_scale=rq.separable_channel_scale(vx))
    assert not np.allclose(vh, rq.dequantize_token_groups(separable, D), atol=1e-3)
    kx = k[0, 0, positions]
    qk = rq.quantize_channel_blocks(kx, 2, len(positions))
    np.testing.assert_allclose(kh, rq.dequantize_channel_blocks(qk, len(positions)), atol=1e-6)


def test_zipcache_low_key_bits_changes_only_the_regular_keys():
    """`low_key_bits=3`: the regular tier's keys are 3-bit per-channel, its values stay 2-bit
    channel-separable, the salient tier is untouched, and the store holds more bytes."""
    store, k, v = _prefilled("zipcache", {"low_key_bits": 3})
    positions, kl, vl = _rows(store, 0, "low")
    kx, vx = k[0, 0, positions], v[0, 0, positions]
    qk = rq.quantize_channel_blocks(kx, 3, len(positions))
    np.testing.assert_allclose(kl, rq.dequantize_channel_blocks(qk, len(positions)), atol=1e-6)
    qv = rq.quantize_token_groups(vx, 2, D, channel_scale=rq.separable_channel_scale(vx))
    np.testing.assert_allclose(vl, rq.dequantize_token_groups(qv, D), rtol=1e-6, atol=1e-6)
    positions, kh, _ = _rows(store, 0, "high")
    qk = rq.quantize_channel_blocks(k[0, 0, positions], 4, len(positions))
    np.testing.assert_allclose(kh, rq.dequantize_channel_blocks(qk, len(positions)), atol=1e-6)
    low, paper = store.memory()["tiers"]["low"], _prefilled("zipcache")[0].memory()["tiers"]["low"]
    rows = sum(len(store.tier_positions(s)["low"]) for s in range(2))
    assert (low["key_data"], paper["key_data"]) == (rows * D * 3 // 8, rows * D * 2 // 8)
    assert low["value_data"] == paper["value_data"]


@pytest.mark.parametrize(("key_clip", "value_clip"), [("mse", "minmax"), ("minmax", "mse")])
def test_zipcache_clip_reaches_only_its_stream(key_clip, value_clip):
    """`key_clip` / `value_clip`: both tiers' keys (values) equal the reference quantizers with
    that clipping, and a clipped stream's squared error is below min-max's (it can never be
    above it: min-max is one of the candidates)."""
    store, k, v = _prefilled("zipcache", {"key_clip": key_clip, "value_clip": value_clip})
    paper, _, _ = _prefilled("zipcache")
    for s in range(2):
        for tier, bits in (("high", 4), ("low", 2)):
            positions, kh, vh = _rows(store, s, tier)
            kx, vx = k[0, s, positions], v[0, s, positions]
            qk = rq.quantize_channel_blocks(kx, bits, len(positions), clip=key_clip)
            np.testing.assert_array_equal(kh, rq.dequantize_channel_blocks(qk, len(positions)))
            f = rq.separable_channel_scale(vx)
            qv = rq.quantize_token_groups(vx, bits, D, channel_scale=f, clip=value_clip)
            np.testing.assert_allclose(vh, rq.dequantize_token_groups(qv, D), rtol=1e-6, atol=1e-6)
            _, kp, vp = _rows(paper, s, tier)
            # 2-bit: well below (Gaussian groups: ~0.55x); 4-bit: below.
            bound = 0.9 if bits == 2 else 1.0
            for clip, got, want in (
                (key_clip, ((kh - kx) ** 2).sum(), ((kp - kx) ** 2).sum()),
                (value_clip, ((vh / f - vx / f) ** 2).sum(), ((vp / f - vx / f) ** 2).sum()),
            ):
                assert got < bound * want if clip == "mse" else got == want
    assert store.memory()["bytes"] == paper.memory()["bytes"]


def test_zipcache_sink_tokens_are_salient_in_a_segment_of_their_own():
    """`sink_tokens=3`: the first 3 valid tokens are in the high tier whatever their scores
    (here the lowest), inside the salient budget, and quantized as a segment of their own:
    the other salient tokens' per-channel key statistics do not see them."""
    rng = np.random.default_rng(7)
    n, h, ratio = 50, 2, 0.2
    k = rng.standard_normal((1, h, n, D), dtype=np.float32)
    v = rng.standard_normal((1, h, n, D), dtype=np.float32)
    k[:, :, 0] *= 30  # a sink's outlying key
    store = kvmix.LayerStore(
        "zipcache", h, D, {"sink_tokens": 3, "salient_ratio": ratio}, "float32"
    )
    store.append(k, v)
    acc = rng.random((1, h, n), dtype=np.float32) + 1.0
    acc[:, :, :3] = 0.0  # the sinks score lowest: only the rule keeps them salient
    store.add_scores(0, acc, np.ones_like(acc))
    store.maybe_classify()
    budget = round(ratio * n)
    for s in range(h):
        high = store.tier_positions(s)["high"]
        assert len(high) == budget and set(range(3)) <= set(high.tolist())
        # The rest of the budget: the best-scored of the others (selection="layer" pools the
        # layer's heads).
        best = np.argsort(-acc[0].sum(0)[3:], kind="stable")[: budget - 3] + 3
        assert set(high.tolist()) == set(range(3)) | set(best.tolist())
        pos, kd, _ = store.dense(s)
        idx = np.searchsorted(pos, high)
        for seg in (np.arange(3), np.sort(best)):
            kx = k[0, s, seg]
            qk = rq.quantize_channel_blocks(kx, 4, len(seg))
            rows = idx[np.searchsorted(high, seg)]
            np.testing.assert_allclose(
                kd[rows], rq.dequantize_channel_blocks(qk, len(seg)), atol=1e-5
            )
    plain = kvmix.LayerStore("zipcache", h, D, {"salient_ratio": ratio})
    plain.append(k, v)
    plain.add_scores(0, acc, np.ones_like(acc))
    plain.maybe_classify()
    assert not set(range(3)) & set(plain.tier_positions(0)["high"].tolist())


@pytest.mark.parametrize("block", [0, 7, 16, 1000])
def test_zipcache_key_block_gives_each_block_of_regular_tokens_its_own_key_ranges(block):
    """`key_block=B`: the regular tokens, in position order, are cut every B tokens (the last
    block shorter) and each block's keys are quantized per channel over that block alone, as
    the reference quantizer's channel blocks; `0` (or a block longer than the set) is one
    range per channel over the whole set (the paper). Each extra block costs its per-channel
    key scale and offset and its value factors (2 + 2 + 2 bytes per channel), and a segment
    start in the keys' and the values' index (4 + 4 bytes)."""
    rng = np.random.default_rng(11)
    n, h, ratio = 60, 2, 0.25
    k = rng.standard_normal((1, h, n, D), dtype=np.float32)
    k[:, :, 40] *= 20  # one outlying regular key: only its own block's ranges see it
    v = rng.standard_normal((1, h, n, D), dtype=np.float32)
    acc = rng.random((1, h, n), dtype=np.float32)
    acc[:, :, 40] = 0.0  # ranked last: regular

    def store_with(config):
        store = kvmix.LayerStore("zipcache", h, D, {"salient_ratio": ratio, **config}, "float32")
        store.append(k, v)
        store.add_scores(0, acc, np.ones_like(acc))
        store.maybe_classify()
        return store

    store, whole = store_with({"key_block": block}), store_with({})
    low = store.tier_positions(0)["low"]
    assert len(low) == n - round(ratio * n) and 40 in low.tolist()
    blocks = -(-len(low) // block) if block else 1
    for s in range(h):
        pos, kd, _ = store.dense(s)
        rows = np.searchsorted(pos, store.tier_positions(s)["low"])
        kx = k[0, s, store.tier_positions(s)["low"]]
        want = rq.dequantize_channel_blocks(
            rq.quantize_channel_blocks(kx, 2, block or len(kx)), block or len(kx)
        )
        np.testing.assert_allclose(kd[rows], want, atol=1e-5)
    extra = (blocks - 1) * h * (D * 6 + 8)
    assert store.memory()["bytes"] - whole.memory()["bytes"] == extra


@pytest.mark.parametrize("bits", [0, 5, 8])
def test_zipcache_low_key_bits_out_of_range_is_refused(bits):
    with pytest.raises(kvmix.ConfigError, match="low_key_bits"):
        kvmix.LayerStore("zipcache", 2, D, {"low_key_bits": bits})


def test_mikv_tiers_equal_reference_quantizers():
    store, k, v = _prefilled("mikv", {"low_bits": 3})
    rng = np.random.default_rng(0)
    rng.standard_normal((1, 2, 50, D), dtype=np.float32)  # k
    rng.standard_normal((1, 2, 50, D), dtype=np.float32)  # v
    q = rng.standard_normal((1, 4, 50, D), dtype=np.float32)
    b = rq.key_balancer(q, k)
    for s in range(2):
        positions, kh, vh = _rows(store, s, "high")
        np.testing.assert_array_equal(kh, k[0, s, positions].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(vh, v[0, s, positions].astype(np.float16).astype(np.float32))
        positions, kl, vl = _rows(store, s, "low")
        kq = rq.quantize_token_groups(k[0, s, positions], 3, D // 2, channel_scale=1 / b[0, s])
        np.testing.assert_allclose(kl, rq.dequantize_token_groups(kq, D // 2), rtol=1e-6, atol=1e-6)
        vq = rq.quantize_token_groups(v[0, s, positions], 3, D // 2)
        np.testing.assert_allclose(vl, rq.dequantize_token_groups(vq, D // 2), rtol=1e-6, atol=1e-6)


def test_uniform_keys_per_channel_blocks_values_per_token():
    store, k, v = _prefilled("uniform", {"bits": 4, "residual": 16, "group_size": 16})
    positions, kl, vl = _rows(store, 0, "low")
    assert positions.tolist() == list(range(48))
    np.testing.assert_allclose(
        kl,
        rq.dequantize_channel_blocks(rq.quantize_channel_blocks(k[0, 0, :48], 4, 16), 16),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        vl, rq.dequantize_token_groups(rq.quantize_token_groups(v[0, 0, :48], 4, 16), 16), atol=1e-6
    )
    # The residual stays exact.
    positions, kb, _ = _rows(store, 0, "buffer")
    assert positions.tolist() == [48, 49]
    np.testing.assert_array_equal(kb, k[0, 0, 48:])


def test_full_policy_is_lossless():
    store, k, v = _prefilled("full")
    pos, kd, vd = store.dense(1)
    np.testing.assert_array_equal(pos, np.arange(50))
    np.testing.assert_array_equal(kd, k[0, 1])
    np.testing.assert_array_equal(vd, v[0, 1])


def test_memory_report_adds_up_and_zipcache_is_five_times_smaller():
    store, _, _ = _prefilled("zipcache", length=1024, heads=3, seed=1)
    m = store.memory()
    assert m["bytes"] == sum(t["total"] for t in m["tiers"].values())
    for t in m["tiers"].values():
        parts = [v for key, v in t.items() if key != "total"]
        assert t["total"] == sum(parts)
    assert m["fp16_bytes"] == 3 * 1024 * 2 * D * 2
    assert m["tokens"] == 3 * 1024
    # 40% at 4 bits + 60% at 2 bits = 2.8 bits before metadata: 16/2.8 = 5.7x at most.
    assert 4.0 < m["fp16_bytes"] / m["bytes"] < 16 / 2.8


def test_eviction_reports_against_every_token_seen():
    store, _, _ = _prefilled("eviction", {"budget": 0.2}, length=100)
    m = store.memory()
    assert m["tokens"] == 2 * 20
    assert m["fp16_bytes"] == 2 * 100 * 2 * D * 2


def test_batch_select_repeat_crop_reset():
    store, _, _ = _prefilled("zipcache", batch=2, length=30)
    before = [store.dense(s) for s in range(4)]
    store.select_batch([1, 0])
    for s_new, s_old in ((0, 2), (1, 3), (2, 0), (3, 1)):
        for a, b in zip(store.dense(s_new), before[s_old], strict=True):
            np.testing.assert_array_equal(a, b)
    store.repeat_interleave(2)
    assert store.batch == 4
    store.crop(10)
    assert store.seen == 10
    assert store.dense(0)[0].tolist() == list(range(10))
    store.reset()
    assert store.seen == 0 and store.batch == 0


def test_bad_input_is_refused_and_store_kept():
    store, _, _ = _prefilled("zipcache")
    before = store.dense(0)
    x = np.zeros((1, 2, 1, D), np.float32)
    with pytest.raises(kvmix.ShapeError, match="kv heads"):
        store.append(np.zeros((1, 3, 1, D), np.float32), np.zeros((1, 3, 1, D), np.float32))
    with pytest.raises(kvmix.ShapeError, match="same shape"):
        store.append(x, np.zeros((1, 2, 2, D), np.float32))
    with pytest.raises(kvmix.DTypeError):
        store.append(x.astype(np.float64), x.astype(np.float64))
    bad = x.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(kvmix.NonFiniteError, match="NaN/Inf"):
        store.append(bad, x)
    for a, b in zip(store.dense(0), before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert store.seen == 50


@pytest.mark.parametrize(
    ("policy", "config", "match"),
    [
        ("zipcache", {"salient_ratio": 2.0}, "salient_ratio"),
        ("zipcache", {"bits": 4}, "unknown option `bits`"),
        ("mikv", {"low_bits": 5}, "low_bits"),
        ("uniform", {"bits": 3}, "bits"),
        ("eviction", {"budget": -1.0}, "budget"),
        ("h2o", None, "policy"),
    ],
)
def test_invalid_configuration_names_the_option(policy, config, match):
    with pytest.raises(kvmix.ConfigError, match=match):
        kvmix.LayerStore(policy, 2, D, config)


def test_mikv_without_balancer_says_what_to_do():
    store = kvmix.LayerStore("mikv", 1, D)
    x = np.zeros((1, 1, 4, D), np.float32)
    store.append(x, x)
    with pytest.raises(kvmix.ConfigError, match="set_key_balancer"):
        store.maybe_classify()


@pytest.mark.parametrize(
    "policy, config",
    [
        ("zipcache", {"salient_ratio": 0.4}),
        ("mikv", {"ratio": 0.2}),
        ("uniform", {"bits": 2, "residual": 8}),
    ],
)
def test_dense_into_a_reused_buffer_equals_dense(policy, config):
    store, _, _ = _prefilled(policy, config, batch=2)
    rng = np.random.default_rng(1)
    shape = (2, 2, 80, D)
    keys, values = np.full(shape, 7.0, np.float32), np.full(shape, 7.0, np.float32)
    for step in range(3):  # the same buffers across appends and classifications
        n = store.dense_into(keys, values, changed_only=step > 0)
        assert n == store.seen == 50 + step
        for s in range(4):
            _, k, v = store.dense(s)
            np.testing.assert_array_equal(keys[s // 2, s % 2, :n], k)
            np.testing.assert_array_equal(values[s // 2, s % 2, :n], v)
        assert (keys[:, :, n:] == 7.0).all(), "rows past the tokens are left untouched"
        if step > 0:
            # Only changed rows are rewritten: a row scribbled over since stays scribbled.
            keys[0, 0, 0] = 5.0
            store.dense_into(keys, values, changed_only=True)
            assert (keys[0, 0, 0] == 5.0).all()
            store.dense_into(keys, values)
            np.testing.assert_array_equal(keys[0, 0, :n], store.dense(0)[1])
        new = rng.standard_normal((2, 2, 1, D), dtype=np.float32)
        store.append(new, new)
        store.maybe_classify()


def test_dense_into_refuses_bad_buffers():
    store, _, _ = _prefilled("uniform", {"bits": 4, "residual": 8})
    ok = np.zeros((1, 2, 50, D), np.float32)
    with pytest.raises(kvmix.ShapeError, match="capacity"):
        store.dense_into(np.zeros((1, 2, 49, D), np.float32), np.zeros((1, 2, 49, D), np.float32))
    with pytest.raises(kvmix.ShapeError, match="C-contiguous"):
        store.dense_into(np.zeros((1, 2, D, 50), np.float32).transpose(0, 1, 3, 2), ok)
    with pytest.raises(kvmix.DTypeError, match="writeable float32"):
        store.dense_into(ok.astype(np.float64), ok.copy())
    assert store.dense_into(ok, np.zeros_like(ok)) == 50
