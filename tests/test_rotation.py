"""The rotated cache (kvmix-5x): the store holds rotated keys/values, attention is unchanged."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import kvmix
from kvmix.cache import randomized_hadamard
from kvmix.models import tiny_random_model


def test_randomized_hadamard_is_orthogonal_seeded_and_not_trivial() -> None:
    r = randomized_hadamard(64, 0)
    assert torch.allclose(r @ r.T, torch.eye(64), atol=1e-6)
    assert torch.equal(r, randomized_hadamard(64, 0))
    assert not torch.equal(r, randomized_hadamard(64, 1))
    # Every entry has magnitude 1/sqrt(D): each channel is spread over all channels.
    assert torch.allclose(r.abs(), torch.full((64, 64), 64**-0.5))
    with pytest.raises(kvmix.ConfigError, match="power-of-two"):
        randomized_hadamard(48, 0)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain softmax attention of ``q`` (B, Hq, 1, D) over ``k``, ``v`` (B, Hkv, T, D)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def test_rotated_store_attends_like_the_unrotated_keys() -> None:
    """8-bit codes of the rotated keys/values: dense() rotates back to the inputs, and the fused
    path's output (query rotated in, output rotated out) matches softmax over the *unrotated*
    dense keys/values, which it would not if either rotation were missing."""
    model = kvmix.enable_portable_scoring(tiny_random_model("llama"))
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache = kvmix.KvmixCache(cfg, "uniform", {"bits": 8, "residual": 1}, rotation_seed=3)
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(0)
    kv_heads = cfg.num_key_value_heads
    k = torch.randn(1, kv_heads, 40, head_dim, generator=g)
    k[..., 5] *= 20  # an outlier channel, as real keys have
    v = torch.randn(1, kv_heads, 40, head_dim, generator=g)
    layer.update(k, v)
    layer.store.maybe_classify()
    dk, dv = layer.dense()
    assert torch.allclose(dk, k, atol=0.3) and torch.allclose(dv, v, atol=0.05)
    q = torch.randn(1, cfg.num_attention_heads, 1, head_dim, generator=g)
    r = layer.rotation
    assert r is not None
    out = torch.from_numpy(layer.store.attend((q @ r).numpy(), [40], 0.125, False)) @ r.T
    want = _attention(q, dk, dv, 0.125)
    assert torch.allclose(out, want, atol=1e-3)
    unrotated_out = torch.from_numpy(layer.store.attend(q.numpy(), [40], 0.125, False))
    assert not torch.allclose(unrotated_out, want, atol=0.1)


def test_kvmix5x_at_high_bits_matches_the_full_cache() -> None:
    """With every token in the 8-bit tier the rotated preset greedily decodes as the full cache
    does, on both engines: a wrong rotation anywhere (query, output, dense) changes the tokens."""
    model = tiny_random_model("llama")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 30), generator=g)
    greedy = {"max_new_tokens": 10, "do_sample": False}
    with torch.inference_mode():
        kvmix.enable_portable_scoring(model)
        want = model.generate(ids, past_key_values=kvmix.FullPrecisionCache(model.config), **greedy)
        for impl in ("kvmix", "sdpa"):
            if impl == "kvmix":
                kvmix.enable_fused_attention(model)
            else:
                model.set_attn_implementation(impl)
                kvmix.enable_portable_scoring(model)
            cache = kvmix.Kvmix5xCache(
                model.config, salient_ratio=1.0, high_bits=8, streaming_gap=3
            )
            got = model.generate(ids, past_key_values=cache, **greedy)
            assert torch.equal(got, want), impl
    model.set_attn_implementation("sdpa")


def test_memory_report_counts_the_rotation_matrix() -> None:
    """The rotation is held by the cache, so its bytes are part of what the report says."""
    model = kvmix.enable_portable_scoring(tiny_random_model("llama"))
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rotated = kvmix.Kvmix5xCache(cfg)
    plain = kvmix.Kvmix5xCache(cfg, rotation_seed=None)
    k = torch.randn(1, cfg.num_key_value_heads, 40, head_dim)
    for cache in (rotated, plain):
        for layer in cache.layers:
            layer.update(k, k)
    stores = sum(layer.store.memory()["bytes"] for layer in rotated.layers)
    got, base = rotated.memory_report(), plain.memory_report()
    assert got["rotation_bytes"] == head_dim * head_dim * 4 and base["rotation_bytes"] == 0
    assert got["bytes"] == stores + head_dim * head_dim * 4
    assert got["compression_ratio"] == got["fp16_bytes"] / got["bytes"]


def test_layer_options_override_one_layer_and_bad_ones_are_refused() -> None:
    """``layer_options={1: {"low_key_bits": 4}}``: layer 1's store has 4-bit regular keys (and
    holds more key bytes for the same tokens), layer 0 keeps the preset's 3 bits; a key that
    is not a layer index, or an option the policy does not have, is refused at construction."""
    model = kvmix.enable_portable_scoring(tiny_random_model("llama", num_hidden_layers=2))
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache = kvmix.Kvmix5xCache(cfg, layer_options={1: {"low_key_bits": 4}})
    assert [layer.options["low_key_bits"] for layer in cache.layers] == [3, 4]
    assert cache.options["low_key_bits"] == 3 and cache.layer_options == {1: {"low_key_bits": 4}}
    k = torch.randn(1, cfg.num_key_value_heads, 60, head_dim)
    acc = torch.rand(1, cfg.num_key_value_heads, 60).numpy()
    for layer in cache.layers:
        layer.update(k, k)
        layer.store.add_scores(0, acc, acc * 0 + 1)
        layer.store.maybe_classify(True)
    low = [layer.store.memory()["tiers"]["low"] for layer in cache.layers]
    rows = [
        sum(len(layer.store.tier_positions(s)["low"]) for s in range(layer.store.kv_heads))
        for layer in cache.layers
    ]
    assert rows[0] == rows[1] > 0
    assert (low[0]["key_data"], low[1]["key_data"]) == (
        rows[0] * head_dim * 3 // 8,
        rows[1] * head_dim * 4 // 8,
    )
    for bad, match in (
        ({2: {"low_bits": 3}}, r"layer indices in \[0, 2\)"),
        ({"1": {"low_bits": 3}}, "layer indices"),
        ({0: {"lowbits": 3}}, "unknown option `lowbits`"),
        ({0: 3}, r"layer_options\[0\]"),
    ):
        with pytest.raises(kvmix.ConfigError, match=match):
            kvmix.Kvmix5xCache(cfg, layer_options=bad)  # type: ignore[arg-type]


def test_kvmix5x_applies_its_calibrated_layers_only_to_the_model_they_were_measured_on() -> None:
    """SmolLM2-135M's shape gets the per-layer bits of ``KVMIX5X_CALIBRATED_LAYERS``; another
    shape gets none (its layers all take the preset's options), and ``layer_options=None`` turns
    them off; any other string is refused."""
    from transformers import LlamaConfig

    from kvmix.cache import KVMIX5X_CALIBRATED_LAYERS

    smollm2 = LlamaConfig(
        num_hidden_layers=30,
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=64,
    )
    table = KVMIX5X_CALIBRATED_LAYERS[("llama", 30, 576, 3)]
    cache = kvmix.Kvmix5xCache(smollm2)
    for i, layer in enumerate(cache.layers):
        want = {"low_key_bits": 3, "low_bits": 2, **table.get(i, {})}
        assert {k: layer.options[k] for k in want} == want, i
    assert sum(layer.options["low_key_bits"] == 4 for layer in cache.layers) == 5
    off = kvmix.Kvmix5xCache(smollm2, layer_options=None)
    assert {layer.options["low_key_bits"] for layer in off.layers} == {3}
    other = kvmix.Kvmix5xCache(tiny_random_model("llama", num_hidden_layers=2).config)
    assert other.layer_options == {}
    with pytest.raises(kvmix.ConfigError, match="'calibrated' or None"):
        kvmix.Kvmix5xCache(smollm2, layer_options="auto")  # type: ignore[arg-type]


def _rotated_run(fuse: bool, fused_attention: bool, device: str = "cpu") -> dict[str, list[Any]]:
    """A tiny random Llama (fp32, a left-padded batch of two) decoding with kvmix-5x on the
    Triton engine (interpreted on the CPU), the rotation in the store's kernels (``fuse``) or
    as torch ops around the store (the reference): per step, each layer's attention output
    (the input of ``o_proj``), the tiers and the scores the store holds (on the CPU)."""
    model = tiny_random_model("llama", num_hidden_layers=2).to(device)
    (kvmix.enable_fused_attention if fused_attention else kvmix.enable_portable_scoring)(model)
    cache = kvmix.Kvmix5xCache(model.config, streaming_gap=2, engine="triton")
    cache._shared.fuse_rotation = fuse
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    outputs: list[torch.Tensor] = []
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda _m, args: outputs.append(args[0].detach().clone())
        )
        for layer in model.model.layers
    ]
    # Teacher-forced tokens, the same for both runs: only the cache differs.
    steps = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(5))
    got: dict[str, list[Any]] = {"out": [], "tiers": [], "scores": []}
    try:
        with torch.inference_mode():
            for i in range(steps.shape[1] + 1):
                outputs.clear()
                tokens = ids if i == 0 else steps[:, i - 1 : i]
                mask = mask if i == 0 else torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
                model(
                    tokens.to(device),
                    attention_mask=mask.to(device),
                    past_key_values=cache,
                    use_cache=True,
                )
                got["out"].append(torch.cat(outputs).cpu() if i else None)  # prefill: exact
                got["tiers"].append(
                    [
                        {t: sorted(p.cpu().tolist()) for t, p in x.store.tier_positions(s).items()}
                        for x in cache.layers
                        for s in range(4)
                    ]
                )
                got["scores"].append(
                    [
                        (t.acc[:, : t.fill].cpu(), t.count[:, : t.fill].cpu())
                        for x in cache.layers
                        for t in x.store._tiers.values()
                        if t.scored
                    ]
                )
    finally:
        for h in hooks:
            h.remove()
    layer = cache.layers[0]
    assert layer.rotation is not None
    assert (layer.host_rotation is None) == fuse == (layer.store.rotation is not None)
    return got


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            ],
        ),
    ],
)
@pytest.mark.parametrize("fused_attention", [True, False], ids=["fused", "portable"])
def test_the_rotation_in_the_triton_kernels_matches_the_torch_rotation(
    fused_attention: bool, device: str
) -> None:
    """kvmix-5x on the Triton engine, the rotation in the kernels (append: a decoding step's
    rows times R; attention: the query times R; merge: the output times R^T) against the
    same cache with the rotation as torch ops around the store (``fuse_rotation=False``),
    fused and portable attention, a left-padded batch, 5 decoding steps with two
    classifications: every layer's attention output within 1e-5 of its largest value, the
    received-attention scores within 1e-5, the same tokens in the same tiers at every step.
    On CUDA (``pytest -m cuda``) the kernels are compiled: the query slab written and read
    back across a barrier, the transforms in the GPU's layouts."""
    pytest.importorskip("triton")
    fused = _rotated_run(True, fused_attention, device)
    ref = _rotated_run(False, fused_attention, device)
    for step in range(1, len(ref["out"])):
        got, want = fused["out"][step], ref["out"][step]
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5, (step, err)
    for step, (got_t, want_t) in enumerate(zip(fused["tiers"], ref["tiers"], strict=True)):
        assert got_t == want_t, step
    for got_s, want_s in zip(fused["scores"], ref["scores"], strict=True):
        for (acc, cnt), (acc_r, cnt_r) in zip(got_s, want_s, strict=True):
            torch.testing.assert_close(acc, acc_r, rtol=0, atol=1e-5)
            assert torch.equal(cnt, cnt_r)


@pytest.mark.parametrize("buffer_dtype", ["float16", "bfloat16", "float32"])
def test_a_rotating_triton_store_stores_the_rotated_rows(buffer_dtype: str) -> None:
    """``set_rotation``: a prompt (torch matmul) and a decoding step's token (the append
    kernel's Walsh-Hadamard transform), bf16 and strided, are stored as ``(x.float() @
    R).to(bf16)`` in the buffer's dtype: the prompt bit for bit, the step within one bf16
    rounding (the two sum in different orders); ``dense`` gives the rows back unrotated; the
    non-finite check sees the rotated row; a matrix that is not a randomized Hadamard, or one
    set after rows are stored, is refused."""
    pytest.importorskip("triton")
    from kvmix.engines.triton_store import TritonLayerStore

    d = 32
    r = randomized_hadamard(d, 2)
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(2, 2, 41, d, generator=g) * 3).to(torch.bfloat16)
    store = TritonLayerStore("zipcache", 2, d, {"streaming_gap": 10}, buffer_dtype)  # type: ignore[arg-type]
    for bad, match in (
        (torch.eye(d), "randomized Hadamard"),
        (r[:, :16], "float32"),
        (r.double(), "float32"),
    ):
        with pytest.raises(kvmix.ConfigError, match=match):
            store.set_rotation(bad)
    store.set_rotation(r)
    store.append(x[:, :, :40], -x[:, :, :40])
    tok = x[:, :, 40:].transpose(1, 2).contiguous().transpose(1, 2)
    store.append(tok, -tok)
    dt = store._tiers["buffer"].kd.dtype
    want_k = (x.float() @ r).to(torch.bfloat16).to(dt).reshape(4, 41, d)
    want_v = (-x.float() @ r).to(torch.bfloat16).to(dt).reshape(4, 41, d)
    buf = store._tiers["buffer"]
    assert torch.equal(buf.kd[:, :40], want_k[:, :40])
    assert torch.equal(buf.vd[:, :40], want_v[:, :40])
    for got, want in ((buf.kd[:, 40], want_k[:, 40]), (buf.vd[:, 40], want_v[:, 40])):
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=0)
        assert not torch.allclose(got.float(), tok.reshape(4, d).float(), atol=0.1)
    # `dense` rotates back as it dequantizes: what `append` took, within the roundings.
    pos, k1, v1 = store.dense(1)
    assert pos.tolist() == list(range(41))
    torch.testing.assert_close(k1, x[0, 1].float(), rtol=0, atol=0.1)
    torch.testing.assert_close(v1, -x[0, 1].float(), rtol=0, atol=0.1)
    # |x R| can pass the fp16 range where |x| does not (a row's norm gathers in one channel).
    big = torch.zeros(1, 2, 1, d)
    big[0, 0, 0, :] = 60000.0 * r[:, 0] / r[:, 0].abs()  # (big R)[0] = 60000 * sqrt(d)
    with pytest.raises(kvmix.NonFiniteError, match="fp16 range"):
        store.append(torch.cat([big, big]), torch.cat([big, big]) * 0)
    with pytest.raises(kvmix.ConfigError, match="before the first append"):
        store.set_rotation(r)


def test_a_rotation_checked_where_it_was_made_is_not_read_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``hadamard_to`` checks the matrix's values on the host and marks its copy, so
    ``set_rotation`` (once per layer) reads nothing back from the device; its shape and dtype
    are still checked against each store; a marked matrix changed in place, or given other
    storage, has its values checked again (and refused when they are no longer a randomized
    Hadamard matrix); an inference tensor (no version counter) is read every time."""
    pytest.importorskip("triton")
    from kvmix.engines import triton_store
    from kvmix.engines.triton_store import TritonLayerStore, hadamard_to

    d = 16
    cpu = torch.device("cpu")
    r = randomized_hadamard(d, 5)
    moved = hadamard_to(r, d, cpu)
    assert torch.equal(moved, r)
    assert torch.equal(hadamard_to(r, d, "cpu"), r)  # a device's name, as torch takes it
    with pytest.raises(kvmix.ConfigError, match="randomized Hadamard"):
        hadamard_to(torch.eye(d), d, cpu)
    reads: list[int] = []
    real = triton_store._check_hadamard_values

    def counted(rotation: Any, dim: int) -> None:
        reads.append(dim)
        real(rotation, dim)

    monkeypatch.setattr(triton_store, "_check_hadamard_values", counted)

    def store(dim: int = d) -> Any:
        return TritonLayerStore("zipcache", 2, dim, {"streaming_gap": 10}, "float16")  # type: ignore[arg-type]

    store().set_rotation(moved)
    store().set_rotation(moved)
    assert reads == []
    with pytest.raises(kvmix.ConfigError, match=r"float32 \[32, 32\]"):
        store(32).set_rotation(moved)  # remembered, but not this store's head_dim
    store().set_rotation(r.clone())  # an unmarked matrix is read
    assert reads == [d]
    other = hadamard_to(randomized_hadamard(d, 6), d, cpu)
    other.data = torch.eye(d)  # other storage (no version change): read again, refused
    with pytest.raises(kvmix.ConfigError, match="randomized Hadamard"):
        store().set_rotation(other)
    moved[0, 0] = -moved[0, 0]  # in place: the version counter moves, the mark is stale
    with pytest.raises(kvmix.ConfigError, match="randomized Hadamard"):
        store().set_rotation(moved)
    assert reads == [d] * 4  # the clone, hadamard_to(other), then the two changed matrices
    # Under inference mode (as a benchmark's prefill runs): hadamard_to's copy is still a
    # normal tensor, so it is remembered; an inference tensor has no version counter, so it is
    # read each time.
    with torch.inference_mode():
        inferred = randomized_hadamard(d, 5)
        moved = hadamard_to(inferred, d, cpu)
        assert inferred.is_inference() and not moved.is_inference()
        store().set_rotation(moved)
        store().set_rotation(inferred)
        store().set_rotation(inferred)
    assert reads == [d] * 7  # hadamard_to's, then the inference tensor's two


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_prompt_append_kernel_rotates_as_the_torch_rotation(dtype: torch.dtype) -> None:
    """How the Triton store takes a prompt on a GPU (``_append_rows`` with the rotation: one
    launch rotates, converts and checks; here under the interpreter): a strided prompt in the
    model's layout, rows past a block of 32 included, lands in the fp16 buffer as ``(x.float()
    @ R).to(dtype).to(fp16)`` within one rounding of the dtype (the two sum in different
    orders), with its positions and zero scores, and is not the unrotated input. A row whose
    rotation leaves the fp16 range sets the flag."""
    pytest.importorskip("triton")
    from kvmix.engines.triton_store import TritonLayerStore

    d = 64
    r = randomized_hadamard(d, 3)
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(2, 45, 3, d, generator=g) * 4).to(dtype).transpose(1, 2)  # (B, H, N, D)
    store = TritonLayerStore("zipcache", 3, d, {}, "float16")
    store._init(2, x.device)
    flag = torch.zeros(1, dtype=torch.int32)
    store._append_rows(x, -x, 45, flag, r)
    buf = store._tiers["buffer"]
    assert int(flag[0]) == 0 and buf.fill == 0  # the caller advances the fill
    for got, sign in ((buf.kd, 1), (buf.vd, -1)):
        want = (sign * x.float() @ r).to(dtype).float().reshape(6, 45, d)
        # One rounding of the result, plus what the order of d fp32 sums can move it.
        ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-10}[dtype]
        sums = d * 2**-24 * float(x.float().abs().max())
        torch.testing.assert_close(got[:, :45].float(), want, rtol=ulp, atol=sums)
        assert not torch.allclose(got[:, :45].float(), sign * x.float().reshape(6, 45, d), atol=0.1)
    assert buf.pos[:, :45].tolist() == [list(range(45))] * 6
    assert not buf.acc[:, :45].any() and not buf.count[:, :45].any()
    big = torch.zeros(2, 3, 1, d, dtype=dtype)
    big[1, 2, 0, :] = (60000.0 * r[:, 0] / r[:, 0].abs()).to(dtype)  # (big R)[0] = 60000 sqrt(d)
    store._append_rows(big, big * 0, 1, flag, r)
    assert int(flag[0]) == 1
