"""The transformers integration: kvmix caches under generate() on tiny random models of every
supported family, with the fused ("kvmix") and portable ("sdpa", "eager") attention paths."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

import kvmix
from kvmix.models import tiny_random_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma"]
IMPLS = ["sdpa", "eager", "kvmix"]
GREEDY = {"max_new_tokens": 8, "do_sample": False}


def _use(model, impl):
    """Run ``model`` on kvmix's fused attention (``"kvmix"``) or on transformers' ``impl`` with
    kvmix's portable scoring."""
    if impl == "kvmix":
        kvmix.enable_fused_attention(model)
    else:
        model.set_attn_implementation(impl)
        kvmix.enable_portable_scoring(model)


def _ids(model, batch=1, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=g)


def _generate(model, ids, cache, **kw):
    with torch.inference_mode():
        return model.generate(ids, past_key_values=cache, **{**GREEDY, **kw})


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny_random_model(request.param)


@pytest.mark.parametrize("impl", IMPLS)
def test_full_precision_is_token_identical_to_dynamic_cache(family_model, impl):
    _, model = family_model
    model.set_attn_implementation("sdpa")
    ids = _ids(model)
    want = _generate(model, ids, DynamicCache(config=model.config))
    _use(model, impl)
    got = _generate(model, ids, kvmix.FullPrecisionCache(model.config))
    assert torch.equal(got, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_full_precision_sampling_beam_padding_and_continuation(impl):
    model = tiny_random_model("llama")
    model.set_attn_implementation("sdpa")
    ids = _ids(model, batch=2, length=16)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    ids[0, :5] = 0
    cases = [
        {"attention_mask": mask},
        {"attention_mask": mask, "do_sample": True, "top_k": 20},
        {"attention_mask": mask, "num_beams": 2},
    ]
    for kw in cases:
        torch.manual_seed(0)
        want = _generate(model, ids, DynamicCache(config=model.config), **kw)
        _use(model, impl)
        torch.manual_seed(0)
        got = _generate(model, ids, kvmix.FullPrecisionCache(model.config), **kw)
        model.set_attn_implementation("sdpa")
        assert torch.equal(got, want), kw
    # A second generate() continues the same cache (multi-turn).
    one = _ids(model, length=12)
    ref_cache = DynamicCache(config=model.config)
    first = _generate(model, one, ref_cache)
    turn2 = torch.cat([first, _ids(model, length=5, seed=3)], dim=1)
    want = _generate(model, turn2, ref_cache)
    _use(model, impl)
    cache = kvmix.FullPrecisionCache(model.config)
    first_k = _generate(model, one, cache)
    got = _generate(model, torch.cat([first_k, turn2[:, first.shape[1] :]], dim=1), cache)
    model.set_attn_implementation("sdpa")
    assert torch.equal(first_k, first)
    assert torch.equal(got, want)


PRESETS = {
    "zipcache": lambda c: kvmix.ZipCache(c, streaming_gap=4),
    "mikv": lambda c: kvmix.MiKVCache(c),
    "mikv_int8": lambda c: kvmix.MiKVCache(c, high_bits=8, low_bits=3),
    "uniform2": lambda c: kvmix.QuantizedKVCache(c, bits=2, residual=8),
    "uniform4": lambda c: kvmix.QuantizedKVCache(c, bits=4, residual=8),
    "kvmix5x": lambda c: kvmix.Kvmix5xCache(c, streaming_gap=4),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fused_and_portable_paths_give_the_same_tokens(family_model, preset):
    _, model = family_model
    ids = _ids(model, length=40)
    outs = {}
    for impl in IMPLS:
        _use(model, impl)
        cache = PRESETS[preset](model.config)
        outs[impl] = _generate(model, ids, cache, max_new_tokens=12)
        report = cache.memory_report()
        assert report["bytes"] > 0
        assert report["fp16_bytes"] == (
            2 * model.config.num_hidden_layers * model.config.num_key_value_heads
        ) * (ids.shape[1] + 11) * 2 * _head_dim(model)
    model.set_attn_implementation("sdpa")
    assert torch.equal(outs["kvmix"], outs["sdpa"])
    assert torch.equal(outs["kvmix"], outs["eager"])


def _head_dim(model):
    c = model.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def test_eviction_runs_fused_and_refuses_portable():
    model = tiny_random_model("llama")
    ids = _ids(model, length=40)
    kvmix.enable_fused_attention(model)
    cache = kvmix.EvictionCache(model.config)
    out = _generate(model, ids, cache)
    assert out.shape[1] == ids.shape[1] + GREEDY["max_new_tokens"]
    report = cache.memory_report()
    assert report["tokens"] < report["fp16_bytes"] / (2 * 2 * _head_dim(model))
    _use(model, "sdpa")
    cache = kvmix.EvictionCache(model.config)
    with pytest.raises(kvmix.ConfigError, match="enable_fused_attention"):
        _generate(model, ids, cache)
    assert cache.get_seq_length() == 0  # refused before anything was stored
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sliding_window_models_are_refused(family):
    model = tiny_random_model(family)
    with pytest.raises(kvmix.ConfigError, match="sliding_attention"):
        kvmix.ZipCache(model.config)


def test_mistral_with_a_sliding_window_is_refused():
    model = tiny_random_model("mistral", sliding_window=4096)
    with pytest.raises(kvmix.ConfigError, match="sliding_attention"):
        kvmix.MiKVCache(model.config)


def test_tensors_on_devices_no_engine_runs_on_are_refused():
    """The Rust engine takes CPU tensors only; the Triton engine CUDA and CPU tensors. A refused
    first update leaves the layer uninitialized."""
    model = kvmix.enable_fused_attention(tiny_random_model("llama"))
    k = torch.empty(1, 2, 4, 16, device="meta")
    cache = kvmix.ZipCache(model.config, engine="rust")
    with pytest.raises(kvmix.ConfigError, match=r"engine='rust'.*CPU tensors.*meta"):
        cache.update(k, k, 0)
    cache = kvmix.ZipCache(model.config)
    with pytest.raises(kvmix.DTypeError, match=r"Triton engine.*meta"):
        cache.update(k, k, 0)
    assert not cache.layers[0].is_initialized and cache.layers[0].engine_name == "rust"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda c: kvmix.ZipCache(c, salient_ratio=1.5), "salient_ratio"),
        (lambda c: kvmix.ZipCache(c, low_bits=7), "low_bits"),
        (lambda c: kvmix.ZipCache(c, selection="head"), "`selection`.*'layer', 'kv_head'"),
        (lambda c: kvmix.MiKVCache(c, ratio=-0.1), "ratio"),
        (lambda c: kvmix.MiKVCache(c, high_bits=2), "high_bits"),
        (lambda c: kvmix.QuantizedKVCache(c, bits=3), "bits"),
        (lambda c: kvmix.QuantizedKVCache(c, residual=0), "residual"),
        (lambda c: kvmix.EvictionCache(c, budget=2.0), "budget"),
        (lambda c: kvmix.ZipCache(c, buffer_dtype="int8"), "buffer_dtype"),
    ],
)
def test_invalid_options_raise_at_construction(make, match):
    model = tiny_random_model("llama")
    with pytest.raises(kvmix.ConfigError, match=match):
        make(model.config)


def test_cache_contract_of_the_pinned_transformers():
    """Fails loudly if transformers changes the Cache API kvmix relies on."""
    for name in ("get_seq_length", "get_mask_sizes", "get_max_length", "update", "reset"):
        assert callable(getattr(CacheLayerMixin, name, None)), name
    for name in ("reorder_cache", "crop", "batch_repeat_interleave", "batch_select_indices"):
        assert callable(getattr(Cache, name, None)), name
    assert list(inspect.signature(Cache.__init__).parameters)[1] == "layers"
    model = kvmix.enable_fused_attention(tiny_random_model("llama"))
    cache = kvmix.ZipCache(model.config)
    assert isinstance(cache, Cache)
    assert cache.get_seq_length() == 0
    assert cache.get_mask_sizes(5, 0) == (5, 0)
    k = torch.randn(1, 2, 6, 16)
    cache.update(k, k, 0)
    assert cache.get_seq_length(0) == 6
    assert cache.get_mask_sizes(1, 0) == (7, 0)
    assert cache.get_max_length() == -1
    cache.crop(-2)
    assert cache.get_seq_length(0) == 4
    cache.reset()
    assert cache.get_seq_length(0) == 0


@pytest.mark.parametrize("impl", ["kvmix", "sdpa"])
def test_prefill_timings_are_measured_per_phase(impl):
    """The phases a prefill spends in kvmix are timed by the cache: MiKV's fused path computes
    the prompt's attention itself, ZipCache leaves it to sdpa; decoding adds nothing; reset
    clears them."""
    model = tiny_random_model("llama")
    ids = _ids(model, length=64)
    _use(model, impl)
    for make, own_attention in [(kvmix.ZipCache, False), (kvmix.MiKVCache, impl == "kvmix")]:
        cache = make(model.config)
        with torch.inference_mode():
            model(ids, past_key_values=cache, use_cache=True)
        timings = cache.prefill_timings()
        assert set(timings) == set(kvmix.cache.PREFILL_PHASES)
        assert timings["compression"] > 0 and timings["scoring"] > 0
        assert (timings["attention"] > 0) == own_attention
        with torch.inference_mode():
            for _ in range(3):  # decoding steps
                model(ids[:, :1], past_key_values=cache, use_cache=True)
        assert cache.prefill_timings() == timings
        cache.reset()
        assert sum(cache.prefill_timings().values()) == 0
    model.set_attn_implementation("sdpa")
