"""The caches on the Triton engine against the same caches on the Rust engine (the reference).

A tiny random Llama generates greedily with ``engine="triton"`` (CPU tensors: Triton's
interpreter runs the device kernels) and with ``engine="rust"``: the same tokens, every token
of every (sequence, kv-head) in the same tier of every layer, fused and portable, with a
left-padded batch. Both engines hold torch/numpy data of their own layout, so their byte
counts are each checked against their own buffers (see :func:`_triton_bytes_from_tensors`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import kvmix
from kvmix.models import tiny_random_model

pytest.importorskip("triton")
from kvmix.engines import triton_store
from kvmix.engines.triton_store import CHANNEL_CHUNK, PAGE, TritonLayerStore

PROMPT, NEW = 40, 6

PRESETS: dict[str, Callable[[Any, str], kvmix.KvmixCache]] = {
    "full": lambda c, e: kvmix.FullPrecisionCache(c, engine=e),
    # A residual below the prompt length, so the prompt is quantized in blocks.
    "uniform": lambda c, e: kvmix.QuantizedKVCache(c, residual=16, engine=e),
    # A short streaming gap, so decoding classifies twice within NEW tokens.
    "zipcache": lambda c, e: kvmix.ZipCache(c, streaming_gap=3, engine=e),
    # kvmix's preset: rotated keys and values, 3-bit regular keys.
    "kvmix-5x": lambda c, e: kvmix.Kvmix5xCache(c, streaming_gap=3, engine=e),
    # Attention sinks: the first 4 valid tokens of each sequence (the padded one's start
    # later) salient, a high-tier segment of their own.
    "zipcache-sinks": lambda c, e: kvmix.ZipCache(c, streaming_gap=3, sink_tokens=4, engine=e),
    # Heavy hitters + recent tokens trimmed at every step; demoted to 2 bits, or dropped.
    "mikv": lambda c, e: kvmix.MiKVCache(c, ratio=0.3, engine=e),
    "eviction": lambda c, e: kvmix.EvictionCache(c, budget=0.3, engine=e),
}
#: The eviction baseline needs the fused path (it has no dense keys to hand back).
CASES = [(p, f) for p in PRESETS for f in (True, False) if not (p == "eviction" and not f)]


def _model(fused: bool) -> Any:
    model = tiny_random_model("llama", num_hidden_layers=2)
    enable = kvmix.enable_fused_attention if fused else kvmix.enable_portable_scoring
    return enable(model)


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 128, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded second sequence
    return {"input_ids": ids, "attention_mask": mask}


def _generate(
    preset: str, engine: str, fused: bool, device: str = "cpu"
) -> tuple[torch.Tensor, kvmix.KvmixCache]:
    model = _model(fused).to(device)
    cache = PRESETS[preset](model.config, engine)
    inputs = {k: v.to(device) for k, v in _inputs().items()}
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, do_sample=False)
    return out[:, PROMPT:].cpu(), cache


def _tiers(cache: kvmix.KvmixCache) -> list[dict[str, list[int]]]:
    out = []
    for layer in cache.layers:
        store = layer.store
        for s in range(store.batch * store.kv_heads):
            tiers = store.tier_positions(s)
            held = {t: torch.as_tensor(tiers[t]).cpu().tolist() for t in tiers}
            out.append({t: sorted(int(p) for p in held[t]) for t in held})
    return out


def _triton_bytes_from_tensors(store: TritonLayerStore) -> int:
    """What the Triton store holds, read from its tensors' shapes and dtypes: every tier's rows
    up to its fill (codes, per-row parameters, positions, and scores where scored), per-segment
    parameters of the segments written, and the block table of segmented tiers.

    It differs from the Rust store's count by design: the streams of a layer share one row
    index per tier (a stream with fewer rows to store, e.g. a padded sequence's salient set,
    leaves holes), so the device never has to read sizes back, and share one block table
    where the Rust store keeps each stream's segment starts."""
    total = 0
    for tier in store._tiers.values():
        f, nseg = tier.fill, tier.nseg
        rows = [tier.pos, tier.kd, tier.vd]
        if tier.scored:
            rows += [tier.acc, tier.count]
        for codec, sc, of in ((tier.k, tier.ks, tier.ko), (tier.v, tier.vs, tier.vo)):
            if codec.kind == "token_groups":
                rows += [sc, of]
            elif codec.kind == "channel":
                total += sum(t[:, :nseg].numel() * t.element_size() for t in (sc, of))
        if tier.v.factor == "separable":
            total += tier.vf[:, :nseg].numel() * tier.vf.element_size()
        total += sum(t[:, :f].numel() * t.element_size() for t in rows)
        if tier.segmented:
            total += tier.seg.numel() * tier.seg.element_size()
    return total


@pytest.mark.parametrize(
    ("preset", "fused"), CASES, ids=[f"{p}-{'fused' if f else 'portable'}" for p, f in CASES]
)
def test_triton_engine_generates_as_the_rust_engine(preset: str, fused: bool) -> None:
    want, rust = _generate(preset, "rust", fused)
    got, tri = _generate(preset, "triton", fused)
    assert [layer.engine_name for layer in tri.layers] == ["triton", "triton"]
    assert [layer.engine_name for layer in rust.layers] == ["rust", "rust"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert _tiers(tri) == _tiers(rust)
    r, t = rust.memory_report(), tri.memory_report()
    held = 2 * 2 * 2 * (PROMPT + NEW - 1)
    assert t["tokens"] == r["tokens"] and (
        t["tokens"] < held if preset == "eviction" else t["tokens"] == held
    )
    assert t["fp16_bytes"] == r["fp16_bytes"]
    assert (
        t["rotation_bytes"] == r["rotation_bytes"] == (16 * 16 * 4 if preset == "kvmix-5x" else 0)
    )
    rotation = t["rotation_bytes"]
    assert t["bytes"] == sum(_triton_bytes_from_tensors(x.store) for x in tri.layers) + rotation
    # Allocated: every tensor the stores hold, spare capacity included.
    held = sum(x.numel() * x.element_size() for layer in tri.layers for x in layer.store.tensors())
    assert t["allocated_bytes"] == held + rotation >= t["bytes"]


def test_triton_engine_refuses_what_it_does_not_implement_before_anything_changes() -> None:
    config = _model(True).config
    with pytest.raises(kvmix.ConfigError, match=r"triton engine.*MiKV.*high_bits.*rust"):
        kvmix.MiKVCache(config, high_bits=4, engine="triton")
    with pytest.raises(kvmix.ConfigError, match="`engine` must be one of"):
        kvmix.ZipCache(config, engine="cuda")  # type: ignore[arg-type]
    # The same policy is accepted on the Rust engine and by "auto", which only builds a
    # Triton store for non-CPU tensors.
    kvmix.MiKVCache(config, high_bits=4, engine="rust")
    kvmix.MiKVCache(config, high_bits=4, engine="auto")


def test_triton_layer_takes_its_head_count_from_the_tensors() -> None:
    """Under tensor parallelism a rank receives a share of the kv-heads: the Triton store is
    built for those (one of the config's two here) and holds what the Rust store holds."""
    config = _model(True).config
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 1, 70, 16, generator=g), torch.randn(1, 1, 70, 16, generator=g)
    layers = []
    for engine in ("rust", "triton"):
        layer = kvmix.QuantizedKVCache(config, residual=16, engine=engine).layers[0]
        layer.update(k, v)
        layer.store.maybe_classify(True)
        assert layer.kv_heads == layer.store.kv_heads == 1
        layers.append(layer)
    rust, tri = layers
    assert isinstance(tri.store, TritonLayerStore)
    for tier in ("buffer", "high", "low"):
        np.testing.assert_array_equal(
            rust.store.tier_positions(0)[tier], tri.store.tier_positions(0)[tier].numpy()
        )
    dk_r, dv_r = rust.dense()
    dk_t, dv_t = tri.dense()
    # Same codes and parameters: the dequantized rows are bit-identical.
    torch.testing.assert_close(dk_t, dk_r, rtol=0, atol=0)
    torch.testing.assert_close(dv_t, dv_r, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_engine_takes_half_precision_tensors(dtype: torch.dtype) -> None:
    """fp16/bf16 keys and values are stored and dequantized as the Rust engine does them."""
    config = _model(True).config
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 2, 50, 16, generator=g).to(dtype)
    v = torch.randn(2, 2, 50, 16, generator=g).to(dtype)
    dense = []
    for engine in ("rust", "triton"):
        layer = kvmix.QuantizedKVCache(config, residual=16, engine=engine).layers[0]
        layer.update(k, v)
        layer.store.maybe_classify(True)
        dk, dv = layer.dense()
        assert dk.dtype == dtype and dk.shape == (2, 2, 50, 16)
        dense.append((dk, dv))
    torch.testing.assert_close(dense[1][0], dense[0][0], rtol=0, atol=0)
    torch.testing.assert_close(dense[1][1], dense[0][1], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("policy", "config"),
    [
        ("zipcache", {"streaming_gap": 5}),
        ("zipcache", {"streaming_gap": 5, "sink_tokens": 4}),
        # Regular tokens in blocks of 8: the sequences hold different counts of them, so a
        # block that is whole in one sequence is its last, shorter block (or none) in another.
        ("zipcache", {"streaming_gap": 5, "key_block": 8}),
        ("uniform", {"residual": 16}),
    ],
)
def test_left_padding_is_quantized_as_by_the_rust_store(policy: str, config: Any) -> None:
    """Sequences padded by different amounts: each one's padding is a segment of its own and
    uniform's blocks count from each one's first valid token, so the codes (dequantized rows)
    are bit-identical to the Rust store's, after the prefill and after decoding steps."""
    _padded_stores_agree(policy, config, 16, 45, [0, 7, 20], torch.Generator().manual_seed(3))


@pytest.mark.parametrize("chunk", [CHANNEL_CHUNK, 64])
@pytest.mark.parametrize("clip", ["minmax", "mse_unbiased"])
def test_channel_grids_span_chunks_and_padded_segments(
    clip: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Triton store fits per-channel key grids from chunks of ``CHANNEL_CHUNK`` rows,
    combined on the host: a prompt whose tiers span several chunks, left-padded differently
    per sequence (so one push writes several segments), gives the Rust store's codes bit for
    bit, with and without the range search, and after classifications while decoding. With
    chunks of 64 rows a stream with fewer real rows than another in the same push has whole
    chunks past its rows (the unpadded sequence in the padding's push: 0 rows of 150), which
    must count nothing."""
    monkeypatch.setattr(triton_store, "CHANNEL_CHUNK", chunk)
    config = {"streaming_gap": 5, "salient_ratio": 0.3, "key_clip": clip, "value_clip": clip}
    g = torch.Generator().manual_seed(5)
    n = 2 * CHANNEL_CHUNK + 90
    rust = _padded_stores_agree("zipcache", config, 32, n, [0, 37, 150], g)
    # The first sequence's regular tokens span two chunks of one segment.
    assert len(rust.tier_positions(0)["low"]) > CHANNEL_CHUNK


@pytest.mark.parametrize("search", ["float64", "fp32-unchecked"])
def test_the_fp32_range_search_and_its_float64_check_choose_the_rust_grids(
    search: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Triton quantizers search ranges in fp32 and again in float64 only where fp32
    rounding could have changed a decision (the default, checked by every case above). Each
    path alone gives the Rust store's codes bit for bit here too: every search in float64
    (the re-search, run everywhere), and the fp32 decisions left unchecked (so a wrong fp32
    choice is not hidden by the float64 re-search), per-channel keys over several chunks and
    key blocks, per-token values with separable factors."""
    monkeypatch.setattr(triton_store, "SEARCH", search)
    monkeypatch.setattr(triton_store, "CHANNEL_CHUNK", 64)
    config = {"streaming_gap": 5, "salient_ratio": 0.3, "key_block": 96}
    config |= {"key_clip": "mse_unbiased", "value_clip": "mse_unbiased"}
    _padded_stores_agree(
        "zipcache", config, 32, 300, [0, 37, 150], torch.Generator().manual_seed(6)
    )


def _padded_stores_agree(
    policy: str, config: Any, d: int, n: int, first_valid: list[int], g: torch.Generator
) -> Any:
    """A Rust and a Triton store fed the same left-padded prompt (``first_valid`` per
    sequence; 2 kv-heads), classified, then 12 decoding steps: the same tiers and bit-identical
    dequantized rows for every stream. Returns the Rust store."""
    b, h = len(first_valid), 2
    rust = kvmix.LayerStore(policy, h, d, config, "float16")
    tri = TritonLayerStore(policy, h, d, config, "float16")
    k, v = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    rust.append(k.numpy(), v.numpy())
    tri.append(k, v)
    for store in (rust, tri):
        store.set_first_valid(first_valid)
    acc, cnt = torch.rand(b, h, n, generator=g), torch.ones(b, h, n)
    rust.add_scores(0, acc.numpy(), cnt.numpy())
    tri.add_scores(0, acc, cnt)
    assert rust.maybe_classify(True) and tri.maybe_classify(True)
    for step in range(12):
        k1, v1 = torch.randn(b, h, 1, d, generator=g), torch.randn(b, h, 1, d, generator=g)
        rust.append(k1.numpy(), v1.numpy())
        tri.append(k1, v1)
        assert rust.maybe_classify() == tri.maybe_classify(), step
    for s in range(b * h):
        pr, kr, vr = rust.dense(s)
        pt, kt, vt = tri.dense(s)
        np.testing.assert_array_equal(pt.numpy(), pr)
        np.testing.assert_array_equal(kt.numpy(), kr)
        np.testing.assert_array_equal(vt.numpy(), vr)
        rt, tt = rust.tier_positions(s), tri.tier_positions(s)
        for tier in rt:
            np.testing.assert_array_equal(tt[tier].numpy(), rt[tier])
    return rust


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_whole_buffer_is_taken_without_sorting_as_it_was_appended(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ZipCache's classification takes every stream's whole buffer; when no stream has a hole
    the rows come back as they were written (no sort, no gather, no copy: the keys and values
    are the buffer's own fp16 rows, which the quantize kernels widen as they load them): the
    prompt's keys and values as the fp16 buffer rounds them (the prompt converted once, from
    any dtype), positions in order, the scores added, and the buffer left empty. A buffer
    with holes takes the sorting path (covered by the uniform and MiKV cases above)."""
    g = torch.Generator().manual_seed(6)
    k = torch.randn(2, 40, 3, 16, generator=g).to(dtype).transpose(1, 2)  # strided, as models
    v = torch.randn(2, 40, 3, 16, generator=g).to(dtype).transpose(1, 2)
    store = TritonLayerStore("zipcache", 3, 16, {"streaming_gap": 10}, "float16")
    store.append(k, v)
    acc, cnt = torch.rand(2, 3, 40, generator=g), torch.rand(2, 3, 40, generator=g)
    store.add_scores(0, acc, cnt)

    def no_sort(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a whole buffer without holes needs no sort")

    monkeypatch.setattr(torch, "sort", no_sort)
    buf = store._tiers["buffer"]
    got = store._take_buffer(list(store._buf_len))
    monkeypatch.undo()
    assert got[0].data_ptr() == buf.kd.data_ptr() and got[1].data_ptr() == buf.vd.data_ptr()
    want = (
        k.float().to(torch.float16).reshape(6, 40, 16),
        v.float().to(torch.float16).reshape(6, 40, 16),
        torch.arange(40, dtype=torch.int16).expand(6, 40),  # 2-byte positions (POS16_LIMIT)
        acc.reshape(6, 40),
        cnt.reshape(6, 40),
    )
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert store._tiers["buffer"].fill == 0 and store._buf_len == [0, 0]


@pytest.mark.parametrize("policy", ["zipcache", "mikv"])
def test_positions_widen_to_int32_past_the_16_bit_limit(
    policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Positions are stored in 2 bytes while they fit (as the Rust store stores them) and
    every tier widens them to 4 bytes before the first one past the limit is written (the
    limit lowered to 45 here): the positions held, the tiers, every attention output and the
    received scores are those of a store whose positions are 4 bytes from the start, and the
    bytes reported follow the dtype."""
    import kvmix.engines.triton_store as ts

    g = torch.Generator().manual_seed(9)
    k, v = torch.randn(2, 2, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    opts = {"streaming_gap": 4} if policy == "zipcache" else {"ratio": 0.5}
    stores = {}
    real = ts.POS16_LIMIT
    for limit in (real, 45, -1):  # 2 bytes throughout; widened at 46; 4 bytes
        monkeypatch.setattr(ts, "POS16_LIMIT", limit)
        store = TritonLayerStore(policy, 2, 16, opts, "float16")
        store.append(k, v)
        if policy == "mikv":
            store.set_key_balancer(torch.ones(2, 2, 16))
        store.add_scores(
            0,
            torch.rand(2, 2, 40, generator=torch.Generator().manual_seed(1)),
            torch.ones(2, 2, 40),
        )
        store.maybe_classify(True)
        outs = []
        for step in range(12):
            x = torch.randn(2, 2, 1, 16, generator=torch.Generator().manual_seed(100 + step))
            store.append(x, -x)
            q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(200 + step))
            outs.append(store.attend(q, [40 + step], 0.25, True))
            store.maybe_classify()
            dtypes = {t.pos.dtype for t in store._tiers.values()}
            if limit == 45:
                assert dtypes == {torch.int16 if 40 + step <= 45 else torch.int32}, step
        stores[limit] = (store, outs)
    base = stores[real][0]
    wide, wide_outs = stores[-1]
    assert {t.pos.dtype for t in base._tiers.values()} == {torch.int16}
    assert {t.pos.dtype for t in wide._tiers.values()} == {torch.int32}
    for limit in (real, 45):
        store, outs = stores[limit]
        for a, b in zip(outs, wide_outs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for s in range(4):
            got, want = store.tier_positions(s), wide.tier_positions(s)
            assert {n: x.tolist() for n, x in got.items()} == {
                n: x.tolist() for n, x in want.items()
            }
        for name, t in store._tiers.items():
            torch.testing.assert_close(t.acc[:, : t.fill], wide._tiers[name].acc[:, : t.fill])
    held = {n: t.s * t.fill * 2 for n, t in base._tiers.items()}  # 2 bytes per row
    assert {n: t.nbytes()["positions"] for n, t in base._tiers.items()} == held
    assert {n: t.nbytes()["positions"] for n, t in wide._tiers.items()} == {
        n: 2 * x for n, x in held.items()
    }


def test_a_growing_tier_keeps_its_spare_rows_within_a_sixteenth() -> None:
    """A tier that grows keeps its row capacity within a sixteenth (and a page) of its
    fill, in chunked pushes (a chunked prefill: 40% and 60% of 2048-row chunks to the high
    and low tiers, up to 32k) and row by row (decoding), while its reallocations stay few
    (geometric growth). Before session 35 the capacity grew by a quarter: 13104 rows then
    sat in a 16256-row tier, 24% of it allocated for nothing."""
    store = TritonLayerStore("zipcache", 2, 16)
    store.append(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))  # makes the tiers
    for name, share in (("high", 0.4), ("low", 0.6)):
        tier = store._tiers[name]
        grows = 0
        pushes = [int(2048 * share)] * 16 + [1] * 3000
        for n in pushes:
            before = tier.cap
            tier.reserve(n, 0)
            tier.fill += n  # what a push of n rows does to the capacity's bookkeeping
            grows += tier.cap != before
            assert tier.fill <= tier.cap <= tier.fill + tier.fill // 16 + PAGE, (name, tier.fill)
            assert tier.cap % PAGE == 0
        assert grows <= 16 + 40, (name, grows)  # one a chunk, then ~log(1.0625) of the rows
        assert tier.kd.shape[1] == tier.vd.shape[1] == tier.pos.shape[1] == tier.cap


def test_triton_store_gives_back_the_prompts_buffer_rows() -> None:
    """After the prompt moves from the buffer to the tiers, the buffer keeps room for the
    decoding steps until the next classification, not for the prompt; the tiers hold what
    they were pushed, so what the store allocates stays close to what it holds."""
    g = torch.Generator().manual_seed(4)
    store = TritonLayerStore("zipcache", 2, 16, {"streaming_gap": 10}, "float16")
    k, v = torch.randn(1, 2, 1000, 16, generator=g), torch.randn(1, 2, 1000, 16, generator=g)
    store.append(k, v)
    store.add_scores(0, torch.rand(1, 2, 1000, generator=g), torch.ones(1, 2, 1000))
    assert store._tiers["buffer"].cap >= 1000
    store.maybe_classify(True)
    assert store._tiers["buffer"].cap == PAGE  # 10 steps + 1 fit one page
    m = store.memory()
    buf = store._tiers["buffer"]
    room = sum(t.numel() * t.element_size() for t in (buf.pos, buf.kd, buf.vd, buf.acc, buf.count))
    # The tiers were sized by their one push (rounded up to whole pages: 400 -> 448 and
    # 600 -> 640 rows here); the buffer holds one empty page.
    assert m["bytes"] <= m["allocated_bytes"] <= 1.2 * m["bytes"] + room


def test_scores_reach_the_rows_of_their_positions() -> None:
    """``add_scores(start, acc, count)`` adds ``acc[..., p - start]`` to the row holding
    position ``p``, for windows inside, across and past the buffer's positions (a buffer
    without holes takes them by slices; the reference here is each row's own position), and
    to a scored tier's rows after a classification (H2O's kept tokens: a gather)."""
    g = torch.Generator().manual_seed(6)
    b, h, d = 2, 2, 16
    store = TritonLayerStore("eviction", h, d, {"budget": 0.4}, "float32")
    k, v = torch.randn(b, h, 50, d, generator=g), torch.randn(b, h, 50, d, generator=g)
    store.append(k[:, :, :30], v[:, :, :30])
    store.set_first_valid([0, 0])
    store.add_scores(0, torch.rand(b, h, 30, generator=g), torch.ones(b, h, 30))
    assert store.maybe_classify(True)
    store.append(k[:, :, 30:], v[:, :, 30:])  # positions 30 .. 49 in the buffer
    tiers = [t for t in store._tiers.values() if t.scored]
    before = [(t.acc[:, : t.fill].clone(), t.count[:, : t.fill].clone()) for t in tiers]
    want = [a.clone() for a, _ in before], [c.clone() for _, c in before]
    for start, n in ((30, 20), (35, 5), (45, 10), (25, 10), (0, 60), (60, 4), (10, 5)):
        acc = torch.rand(b, h, n, generator=g)
        cnt = torch.randint(1, 5, (b, h, n), generator=g).float()
        store.add_scores(start, acc, cnt)
        for i, t in enumerate(tiers):
            p = t.pos[:, : t.fill].long()
            hit = (p >= start) & (p < start + n)
            for s_, r in hit.nonzero().tolist():
                want[0][i][s_, r] += acc.reshape(b * h, n)[s_, p[s_, r] - start]
                want[1][i][s_, r] += cnt.reshape(b * h, n)[s_, p[s_, r] - start]
    assert [t.fill > 0 for t in tiers] == [True, True]  # the buffer and the high tier
    assert store._tiers["buffer"].fill == 20
    for i, t in enumerate(tiers):
        torch.testing.assert_close(t.acc[:, : t.fill], want[0][i], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(t.count[:, : t.fill], want[1][i], rtol=0, atol=0)


@pytest.mark.parametrize("buffer_dtype", ["float16", "bfloat16", "float32"])
def test_a_decoding_steps_append_writes_the_rows_as_the_prompts_push(buffer_dtype: str) -> None:
    """A decoding step's token goes into the buffer by one kernel (not the prompt's push):
    the same rows (rounded to the buffer's dtype as torch rounds, from bf16 or strided input),
    positions and zero scores; a non-finite value is refused on the CPU with the store as it
    was."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 2, 41, 16, generator=g) * 3).to(torch.bfloat16)
    step = TritonLayerStore("zipcache", 2, 16, {"streaming_gap": 10}, buffer_dtype)  # type: ignore[arg-type]
    whole = TritonLayerStore("zipcache", 2, 16, {"streaming_gap": 10}, buffer_dtype)  # type: ignore[arg-type]
    step.append(x[:, :, :40], -x[:, :, :40])
    whole.append(x, -x)
    # A strided bf16 token (a view of a [B, T, H, D] tensor), as a model hands it over.
    tok = x[:, :, 40:].transpose(1, 2).contiguous().transpose(1, 2)
    step.append(tok, -tok)
    bs, bw = step._tiers["buffer"], whole._tiers["buffer"]
    assert (step.seen, bs.fill) == (whole.seen, bw.fill) == (41, 41)
    for name in ("kd", "vd", "pos", "acc", "count"):
        assert torch.equal(getattr(bs, name)[:, :41], getattr(bw, name)[:, :41]), name
    bad = tok.clone()
    bad[1, 0, 0, 3] = float("nan")
    before = {n: getattr(bs, n).clone() for n in ("pos", "kd")}
    with pytest.raises(kvmix.NonFiniteError, match="NaN"):
        step.append(bad, tok)
    big = tok.clone()
    big[0, 1, 0, 0] = 70000.0
    with pytest.raises(kvmix.NonFiniteError, match="fp16 range"):
        step.append(tok, big)
    assert (step.seen, bs.fill) == (41, 41)
    assert torch.equal(bs.pos, before["pos"])
    assert torch.equal(bs.kd[:, :41], before["kd"][:, :41])
    step.append(tok, -tok)  # the flag was cleared: the next token is taken
    assert step.seen == 42 and int(bs.pos[0, 41]) == 41


def test_a_refused_prompt_leaves_the_triton_store_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A prompt is taken by one kernel that writes and checks in the same pass, so a refused
    one (NaN, beyond the fp16 range) has been written past the fill: the store is put back
    (fill, positions, their width, capacity, bytes), the rows it wrote are zeroed (the
    attention kernel reads whole pages of the buffer: a NaN left there would reach the output
    through a zero probability), and a first prompt refused leaves a fresh store."""
    g = torch.Generator().manual_seed(8)
    h, d = 2, 16
    x = torch.randn(1, h, 70, d, generator=g)
    first = TritonLayerStore("zipcache", h, d, {"streaming_gap": 100}, "float16")
    bad = x[:, :, :30].clone()
    bad[0, 1, 29, 5] = float("nan")
    with pytest.raises(kvmix.NonFiniteError, match="NaN"):
        first.append(bad, bad)
    assert first.batch == 0 and first.seen == 0 and not first._tiers
    # Positions would widen past the (lowered) 16-bit limit: the refused prompt keeps int16.
    monkeypatch.setattr(triton_store, "POS16_LIMIT", 60)
    clean = TritonLayerStore("zipcache", h, d, {"streaming_gap": 100}, "float16")
    store = TritonLayerStore("zipcache", h, d, {"streaming_gap": 100}, "float16")
    for s in (clean, store):
        s.append(x[:, :, :40], x[:, :, :40])
    buf = store._tiers["buffer"]
    before = (store.seen, buf.fill, buf.cap, buf.pos.dtype, store.memory())
    big = x[:, :, 40:].clone() * 0
    big[0, 0, 10, 0] = 70000.0  # 40 rows: the buffer grows a page, positions pass 60
    with pytest.raises(kvmix.NonFiniteError, match="fp16 range"):
        store.append(x[:, :, 40:], big)
    assert (store.seen, buf.fill, buf.cap, buf.pos.dtype, store.memory()) == before
    assert bool((buf.pos[:, 40:] == -1).all())
    assert not buf.kd[:, 40:].any() and not buf.vd[:, 40:].any()
    # The next prompt is taken, and attention over the page reads no trace of the refused one.
    for s in (clean, store):
        s.append(x[:, :, 40:45], -x[:, :, 40:45])
    q = torch.randn(1, 4, 1, d, generator=g)
    want, got = clean.attend(q, [44], 0.25, False), store.attend(q, [44], 0.25, False)
    assert torch.isfinite(got).all() and torch.equal(got, want)
    assert buf.pos.dtype == torch.int16 and store.seen == 45


@pytest.mark.parametrize("preset", ["zipcache", "kvmix-5x"])
def test_the_salient_ranking_breaks_ties_as_the_rust_store(preset: str) -> None:
    """ZipCache's ranking on the device (one stable sort: eligible first, then by score, ties
    to the more recent token) against the Rust store's ``importance::top_k``: normalized
    scores with many ties (small integers over small counts, zero counts), a left-padded
    sequence, sinks (kvmix-5x) -- every token of every stream in the same tier."""
    b, h, d, n = 2, 2, 32, 150
    g = torch.Generator().manual_seed(12)
    opts = kvmix.make_cache(preset, tiny_random_model("llama").config).layers[0].options
    k, v = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    acc = torch.randint(0, 4, (b, h, n), generator=g).float()
    cnt = torch.randint(0, 3, (b, h, n), generator=g).float()
    acc[cnt == 0] = 0.0
    rust = kvmix.LayerStore("zipcache", h, d, opts, "float16")
    tri = TritonLayerStore("zipcache", h, d, opts, "float16")
    rust.append(k.numpy(), v.numpy())
    tri.append(k, v)
    for store in (rust, tri):
        store.set_first_valid([0, 9])
    rust.add_scores(0, acc.numpy(), cnt.numpy())
    tri.add_scores(0, acc, cnt)
    assert rust.maybe_classify(True) and tri.maybe_classify(True)
    for s in range(b * h):
        want = {t: sorted(int(x) for x in p) for t, p in rust.tier_positions(s).items()}
        got = {t: sorted(int(x) for x in p.tolist()) for t, p in tri.tier_positions(s).items()}
        assert got == want, s


def test_three_bit_codes_are_packed_as_the_rust_packer_packs_them() -> None:
    """kvmix-5x's 3-bit keys: each stored row is ``kvmix.pack_bits`` of the codes recovered
    from the row's dequantized values and its segment's per-channel parameters (eight codes
    to three bytes, least significant bit first), and dequantizes to the Rust store's rows."""
    b, h, d, n = 1, 2, 32, 200
    g = torch.Generator().manual_seed(5)
    config = {"salient_ratio": 0.2, "low_key_bits": 3}
    rust = kvmix.LayerStore("zipcache", h, d, config, "float16")
    tri = TritonLayerStore("zipcache", h, d, config, "float16")
    k, v = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    rust.append(k.numpy(), v.numpy())
    tri.append(k, v)
    acc = torch.rand(b, h, n, generator=g)
    rust.add_scores(0, acc.numpy(), torch.ones(b, h, n).numpy())
    tri.add_scores(0, acc, torch.ones(b, h, n))
    rust.maybe_classify(True)
    tri.maybe_classify(True)
    low = tri._tiers["low"]
    assert low.k.bits == 3 and low.kd.shape[2] == d * 3 // 8
    checked = 0
    for s in range(b * h):
        pr, kr, _ = rust.dense(s)
        pt, kt, _ = tri.dense(s)
        np.testing.assert_array_equal(pt.numpy(), pr)
        np.testing.assert_array_equal(kt.numpy(), kr)
        dense = dict(zip(pt.tolist(), kt, strict=True))
        segs = low.row_segments()
        for r in range(low.fill):
            p = int(low.pos[s, r])
            if p < 0:
                continue
            seg = segs[r]
            sc, of = low.ks[s, seg].float(), low.ko[s, seg].float()
            codes = torch.where(sc > 0, (dense[p] - of) / torch.where(sc > 0, sc, 1.0), 0.0)
            codes = codes.round().to(torch.uint8).numpy()
            np.testing.assert_array_equal(low.kd[s, r].numpy(), kvmix.pack_bits(codes, 3))
            checked += 1
    assert checked == b * h * (n - 40)  # every regular token of both kv-heads
    # The attention kernel reads the 3-bit rows as the Rust kernel reads its own.
    q = torch.randn(b, 4, 1, d, generator=g)
    out_r = rust.attend(q.numpy(), [n], 0.2, True)
    out_t = tri.attend(q, [n], 0.2, True)
    np.testing.assert_allclose(out_t.numpy(), out_r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("policy", "config"),
    [
        ("mikv", {"ratio": 0.3}),
        ("mikv", {"ratio": 0.3, "key_balancer": False}),
        ("eviction", {"budget": 0.3}),
    ],
)
def test_heavy_hitter_policies_trim_as_the_rust_store(policy: str, config: Any) -> None:
    """MiKV and H2O eviction trim the important set at every decoding step on the device: the
    same tokens in the same tiers as the Rust store at every step (a left-padded sequence, the
    key balancer on), bit-identical dequantized rows, attention within fp32 rounding."""
    b, h, d, n = 2, 2, 16, 60
    g = torch.Generator().manual_seed(3)
    rust = kvmix.LayerStore(policy, h, d, config, "float16")
    tri = TritonLayerStore(policy, h, d, config, "float16")
    k, v = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    rust.append(k.numpy(), v.numpy())
    tri.append(k, v)
    for store in (rust, tri):
        store.set_first_valid([0, 7])
    wants = policy == "mikv" and config.get("key_balancer", True)
    assert rust.needs_balancer == tri.needs_balancer == wants
    if policy == "mikv" and tri.needs_balancer:
        balancer = torch.rand(b, h, d, generator=g) + 0.5
        rust.set_key_balancer(balancer.numpy())
        tri.set_key_balancer(balancer)
    acc = torch.rand(b, h, n, generator=g)
    rust.add_scores(0, acc.numpy(), torch.ones(b, h, n).numpy())
    tri.add_scores(0, acc, torch.ones(b, h, n))
    assert rust.maybe_classify(True) and tri.maybe_classify(True)
    for step in range(20):
        k1, v1 = torch.randn(b, h, 1, d, generator=g), torch.randn(b, h, 1, d, generator=g)
        rust.append(k1.numpy(), v1.numpy())
        tri.append(k1, v1)
        q = torch.randn(b, 4, 1, d, generator=g)
        out_r = rust.attend(q.numpy(), [n + step], 0.25, True)
        out_t = tri.attend(q, [n + step], 0.25, True)
        np.testing.assert_allclose(out_t.numpy(), out_r, rtol=1e-5, atol=1e-5)
        assert rust.maybe_classify() and tri.maybe_classify()
        for s in range(b * h):
            rt, tt = rust.tier_positions(s), tri.tier_positions(s)
            for tier in rt:
                assert sorted(tt[tier].tolist()) == sorted(rt[tier].tolist()), (step, s, tier)
    for s in range(b * h):
        pr, kr, vr = rust.dense(s)
        pt, kt, vt = tri.dense(s)
        np.testing.assert_array_equal(pt.numpy(), pr)
        np.testing.assert_array_equal(kt.numpy(), kr)
        np.testing.assert_array_equal(vt.numpy(), vr)
    # The high tier's holes were compacted: it holds about the budget, not every step's row.
    assert tri._tiers["high"].fill <= 2 * max(tri._high_real) + PAGE


@pytest.mark.parametrize("preset", ["uniform", "zipcache", "kvmix-5x", "mikv", "eviction"])
def test_a_cache_cropped_into_its_quantized_tiers_decodes_as_on_the_rust_engine(
    preset: str,
) -> None:
    """``crop`` (what assisted and prompt-lookup decoding call after every verification step)
    20 tokens deep, into the tiers the prompt was compressed into, then decoding on: the
    Triton store drops the same positions as the Rust store (it leaves holes where the Rust
    store removes rows), so the same tokens follow and every kept token is in the same tier."""
    out = {}
    for engine in ("rust", "triton"):
        model = _model(True)
        inputs = _inputs()
        cache = PRESETS[preset](model.config, engine)
        first = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, do_sample=False)
        before = _tiers(cache)
        cache.crop(-20)
        n = cache.get_seq_length()
        assert n == PROMPT + NEW - 1 - 20
        # The crop reaches past the buffer: positions it drops were held in packed tiers.
        assert any(
            p >= n for stream in before for tier, held in stream.items() if tier != "buffer"
            for p in held
        )  # fmt: skip
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, NEW, dtype=torch.long)], 1)
        again = model.generate(
            first[:, : n + 1],
            attention_mask=mask[:, : n + 1],
            past_key_values=cache,
            max_new_tokens=4,
            do_sample=False,
        )
        out[engine] = (again[:, n + 1 :], _tiers(cache), cache.memory_report()["tokens"])
    torch.testing.assert_close(out["triton"][0], out["rust"][0], rtol=0, atol=0)
    assert out["triton"][1:] == out["rust"][1:]


@pytest.mark.parametrize("engine", ["rust", "triton"])
def test_a_later_update_of_a_dtype_no_engine_stores_is_refused_before_anything_changes(
    engine: str,
) -> None:
    """Only the first update was checked: later ones reached the store as they came, where
    the Triton engine's kernels stored ints, bools, float64 and fp8 (and values of another
    dtype than the keys) without a word, and the Rust engine refused them only after
    converting. Every update is now checked first, on both engines."""
    model = _model(True)
    cache = PRESETS["zipcache"](model.config, engine)
    model.generate(**_inputs(), past_key_values=cache, max_new_tokens=2, do_sample=False)
    before = (cache.get_seq_length(), cache.memory_report())
    x = torch.randn(2, 2, 1, 16)
    bad = {
        "key states must be float32, float16 or bfloat16, got torch.int32": (x.int(), x.int()),
        "got torch.float64": (x.double(), x.double()),
        "got torch.bool": (x > 0, x > 0),
        "got torch.float8_e4m3fn": (x.to(torch.float8_e4m3fn), x.to(torch.float8_e4m3fn)),
        "value states must be float32, float16 or bfloat16": (x, x.int()),
        "same dtype, got torch.float32 and torch.float16": (x, x.half()),
        "must be torch tensors, got ndarray": (x.numpy(), x.numpy()),
    }
    for match, (k, v) in bad.items():
        with pytest.raises(kvmix.DTypeError, match=match):
            cache.update(k, v, 0)
        assert (cache.get_seq_length(), cache.memory_report()) == before
    cache.update(x, x, 0)  # a good one is still taken
    assert cache.get_seq_length() == before[0] + 1


@pytest.mark.parametrize("engine", ["rust", "triton"])
def test_the_batch_and_crop_methods_refuse_what_they_cannot_take_before_anything_changes(
    engine: str,
) -> None:
    """transformers' batch methods and ``crop`` on both engines: fractional or bool arguments
    were truncated by ``int()`` (indices 0.5 selected row 0, ``crop(2.5)`` reported
    ``crop(2)``), a negative index was refused by the two engines' stores with different
    exceptions. Now the same exceptions on both, before any layer changes."""
    model = _model(True)
    cache = PRESETS["zipcache"](model.config, engine)
    model.generate(**_inputs(), past_key_values=cache, max_new_tokens=2, do_sample=False)
    before = (cache.get_seq_length(), cache.memory_report())
    refused = [
        (kvmix.ShapeError, "1-D sequence of integers", cache.batch_select_indices, [0.5]),
        (kvmix.ShapeError, "1-D sequence of integers", cache.reorder_cache, [[0, 1]]),
        (kvmix.ShapeError, "batch index -1 out of range", cache.batch_select_indices, [-1, 0]),
        (kvmix.ShapeError, "batch index 2 out of range", cache.reorder_cache, [0, 2]),
        (kvmix.ConfigError, "`repeats` must be a non-negative", cache.batch_repeat_interleave, -1),
        (kvmix.ConfigError, "`repeats` must be an integer", cache.batch_repeat_interleave, 2.0),
        (kvmix.ConfigError, "must be an integer, got -2.5", cache.crop, -2.5),
        (kvmix.ConfigError, "must be an integer, got True", cache.crop, True),
    ]
    for error, match, method, arg in refused:
        with pytest.raises(error, match=match):
            method(torch.tensor(arg) if isinstance(arg, list) else arg)
        assert (cache.get_seq_length(), cache.memory_report()) == before
    cache.batch_select_indices(torch.tensor([1, 0]))  # good ones are still taken
    cache.batch_repeat_interleave(np.int64(2))
    cache.crop(-1)
    assert cache.get_seq_length() == before[0] - 1
    assert cache.memory_report()["tokens"] == 2 * before[1]["tokens"] * (before[0] - 1) // before[0]


@pytest.mark.slow  # ~25 s under the interpreter: beam search doubles every step's work
@pytest.mark.parametrize("preset", ["zipcache", "mikv"])
def test_beam_search_on_the_triton_engine(preset: str) -> None:
    """Beam search expands the batch (``repeat_interleave``) and reorders it at every step
    (``select_batch``): the Triton store follows as the Rust store does."""
    out = {}
    for engine in ("rust", "triton"):
        model = _model(True)
        ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(2))
        cache = PRESETS[preset](model.config, engine)
        out[engine] = model.generate(
            ids, past_key_values=cache, max_new_tokens=6, do_sample=False, num_beams=2
        )
    torch.testing.assert_close(out["triton"], out["rust"], rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("preset", "fused"), CASES, ids=[f"{p}-{'fused' if f else 'portable'}" for p, f in CASES]
)
def test_cuda_triton_engine_generates_as_the_cpu_rust_engine(preset: str, fused: bool) -> None:
    """On a GPU (``pytest -m cuda``): the model on CUDA with ``engine="auto"`` (the Triton
    engine, compiled) against the model on the CPU with the Rust engine: the same tokens and
    tiers (as ``gpu/engine_e2e.py`` measured on an H200 for five presets)."""
    want, rust = _generate(preset, "rust", fused)
    got, tri = _generate(preset, "auto", fused, "cuda")
    assert tri.layers[0].engine_name == "triton"
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert _tiers(tri) == _tiers(rust)


def test_deleting_a_cache_frees_its_store_without_the_garbage_collector() -> None:
    """No reference cycle between a cache and its layers: `del cache` gives the stores'
    (device) tensors back at once, not at the collector's next run (a GPU capacity search
    that allocates cache after cache depends on it)."""
    import gc
    import weakref

    model = _model(True)
    cache = kvmix.make_cache("kvmix-5x", model.config, engine="triton")
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    model.generate(ids, past_key_values=cache, max_new_tokens=2, do_sample=False)
    held = weakref.ref(cache.kvmix_layers[0].store._tiers["low"].kd)
    gone = weakref.ref(cache)
    gc.disable()
    try:
        del cache
        assert gone() is None and held() is None
    finally:
        gc.enable()
