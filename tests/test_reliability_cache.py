"""Reliability of the transformers integration (issue 14): crop's semantics and the decoding
strategies built on it, left padding, odd quantization geometries under generate(), and one
cache layer's store shared between threads. Tiny random models on the CPU; every expected
token sequence comes from transformers' own DynamicCache or from the same row run alone."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvmix
from kvmix.models import tiny_random_model

GREEDY = {"max_new_tokens": 8, "do_sample": False}


def _ids(model, batch=1, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=g)


def _use(model, impl):
    """Run ``model`` on kvmix's fused attention (``"kvmix"``) or on transformers' ``impl`` with
    kvmix's portable scoring."""
    if impl == "kvmix":
        kvmix.enable_fused_attention(model)
    else:
        model.set_attn_implementation(impl)
        kvmix.enable_portable_scoring(model)


def _generate(model, ids, cache, **kw):
    with torch.inference_mode():
        return model.generate(ids, past_key_values=cache, **{**GREEDY, **kw})


@pytest.fixture(scope="module")
def llama():
    return kvmix.enable_portable_scoring(tiny_random_model("llama"))


def _filled(model, cache, n=6):
    k = torch.randn(1, model.config.num_key_value_heads, n, 16)
    for layer in range(len(cache.layers)):
        cache.update(k, k, layer)
    return cache


@pytest.mark.parametrize(
    "make", [lambda c: DynamicCache(config=c), lambda c: kvmix.FullPrecisionCache(c)]
)
def test_crop_follows_transformers(llama, make):
    """crop(0) keeps everything (before the fix it emptied a kvmix cache); crop(-n) drops n
    from the end; a positive value is refused (as DynamicCache does), by a ValueError."""
    cache = _filled(llama, make(llama.config))
    cache.crop(0)
    assert cache.get_seq_length() == 6
    cache.crop(-2)
    assert cache.get_seq_length() == 4
    with pytest.raises(ValueError, match="positive"):
        cache.crop(3)
    assert cache.get_seq_length() == 4
    cache.crop(-10)
    assert cache.get_seq_length() == 0


def test_crop_keeps_the_store_consistent(llama):
    cache = _filled(llama, kvmix.FullPrecisionCache(llama.config))
    cache.crop(-2)
    keys, _ = cache.layers[0].dense()
    assert keys.shape[2] == 4 == cache.layers[0].store.seen


@pytest.mark.parametrize("engine", ["rust", "triton"])
@pytest.mark.parametrize("impl", ["sdpa", "kvmix"])
@pytest.mark.parametrize("strategy", ["prompt_lookup", "assisted"])
def test_prompt_lookup_and_assisted_decoding_match_dynamic_cache(impl, strategy, engine):
    """Both strategies crop the cache after every verification step (often by 0). With a
    kvmix FullPrecisionCache they must give DynamicCache's tokens; before the fix crop(0)
    emptied the cache and the tokens differed. The same on the Triton engine (its kernels
    under the interpreter), whose store crops by leaving holes."""
    if engine == "triton":
        pytest.importorskip("triton")
    model = tiny_random_model("llama")
    model.set_attn_implementation("sdpa")
    # A repetitive prompt gives prompt lookup candidates to verify (and reject).
    ids = _ids(model, length=8).repeat(1, 3)
    kw: dict = {"max_new_tokens": 12, "do_sample": False}
    if strategy == "prompt_lookup":
        kw["prompt_lookup_num_tokens"] = 3
    else:
        kw["assistant_model"] = tiny_random_model("llama", seed=1)
    want = _generate(model, ids, DynamicCache(config=model.config), **kw)
    plain = _generate(model, ids, DynamicCache(config=model.config), max_new_tokens=12)
    assert torch.equal(want, plain)  # the strategies are exact for greedy decoding
    _use(model, impl)
    try:
        got = _generate(model, ids, kvmix.FullPrecisionCache(model.config, engine=engine), **kw)
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(got, want)


def _padded_vs_alone(model, make_cache, impl, pad=5, length=40):
    """Tokens of row 0 when generated left-padded in a batch of 2 and when generated alone."""
    _use(model, impl)
    try:
        ids = _ids(model, batch=2, length=length, seed=3)
        mask = torch.ones_like(ids)
        mask[0, :pad] = 0
        ids[0, :pad] = 0
        batch = _generate(model, ids, make_cache(model.config), attention_mask=mask)
        alone = _generate(model, ids[:1, pad:], make_cache(model.config))
    finally:
        model.set_attn_implementation("sdpa")
    return batch[0, length:], alone[0, length - pad :]


CACHES = {
    "zipcache": lambda c: kvmix.ZipCache(c),
    "uniform2": lambda c: kvmix.QuantizedKVCache(c, bits=2, residual=8),
    "mikv": lambda c: kvmix.MiKVCache(c),
}


@pytest.mark.parametrize("impl", ["sdpa", "kvmix"])
@pytest.mark.parametrize("name", sorted(CACHES))
def test_left_padded_row_gives_the_tokens_it_gives_alone(name, impl):
    """A sequence's statistics never see its padding: per-channel key statistics and
    channel-separable value factors (pads entered the quantized segment), uniform blocks
    (counted from position 0 instead of the first real token), ZipCache's probes (drawn over
    the padded length) and MiKV's key balancer (max over the pads). Before the fix the padded
    ZipCache and uniform rows gave other tokens."""
    model = tiny_random_model("llama")
    # The reference itself: a DynamicCache gives the same tokens padded and alone.
    ref_b, ref_a = _padded_vs_alone(model, lambda c: DynamicCache(config=c), "sdpa")
    assert torch.equal(ref_b, ref_a)
    got_b, got_a = _padded_vs_alone(model, CACHES[name], impl)
    assert torch.equal(got_b, got_a)


def test_padding_is_its_own_segment_in_the_store():
    """Store level: the quantized values of a padded sequence's real tokens equal those of the
    same tokens stored alone (bit for bit), whatever the pads hold."""
    import numpy as np

    rng = np.random.default_rng(0)
    pad, n, d = 4, 24, 16
    k = rng.standard_normal((1, 1, n, d)).astype(np.float32)
    v = rng.standard_normal((1, 1, n, d)).astype(np.float32)
    junk = (rng.standard_normal((1, 1, pad, d)) * 50).astype(np.float32)
    for policy, cfg in [("uniform", {"bits": 2, "residual": 8}), ("zipcache", {})]:
        alone = kvmix.LayerStore(policy, 1, d, cfg)
        alone.append(k, v)
        alone.maybe_classify(True)
        padded = kvmix.LayerStore(policy, 1, d, cfg)
        padded.append(np.concatenate([junk, k], 2), np.concatenate([junk, v], 2))
        padded.set_first_valid([pad])
        padded.maybe_classify(True)
        _, ka, va = alone.dense(0)
        _, kp, vp = padded.dense(0)
        np.testing.assert_array_equal(kp[pad:], ka, err_msg=policy)
        np.testing.assert_array_equal(vp[pad:], va, err_msg=policy)


@pytest.mark.parametrize(
    "make",
    [
        lambda c: kvmix.MiKVCache(c, low_bits=3, group_size=4),
        lambda c: kvmix.QuantizedKVCache(c, bits=2, group_size=2, residual=4),
    ],
    ids=["mikv-3bit-g4", "uniform-2bit-g2"],
)
def test_sub_byte_token_groups_under_generate(make):
    """Token groups whose codes do not fill whole bytes (3 x 4 and 2 x 2 bits): before the fix
    the fused kernel panicked (MiKV) or silently differed from softmax over dense() (uniform;
    logits 16 apart). Now the fused logits equal the portable path's within fp32 tolerance."""
    model = tiny_random_model("llama")
    ids = _ids(model, length=20)
    logits = {}
    for impl in ("sdpa", "kvmix"):
        _use(model, impl)
        with torch.inference_mode():
            out = model.generate(
                ids,
                past_key_values=make(model.config),
                max_new_tokens=6,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        logits[impl] = torch.stack(out.logits)
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(logits["kvmix"], logits["sdpa"], atol=2e-4, rtol=2e-4)
