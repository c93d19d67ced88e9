"""The preset registry (kvmix.registry): every preset builds what its name and description claim,
overrides are checked before anything is built, and every tool (demo, evaluation, benchmarks,
README table, stored results) names presets from this one registry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, QuantizedCache

import kvmix
from kvmix.models import tiny_random_model
from kvmix.registry import PRESETS, Preset, markdown_table

ROOT = Path(__file__).resolve().parents[1]

# What each preset's name and description claim, written out by hand from the papers' presets
# and the descriptions (not read from the registry): the resolved store options that must hold.
CLAIMS: dict[str, dict[str, object]] = {
    "uniform8": {"bits": 8, "residual": 128},
    "uniform4": {"bits": 4, "residual": 128},
    "uniform2": {"bits": 2, "residual": 128},
    "h2o10": {"budget": 0.1},
    "h2o20": {"budget": 0.2},
    "h2o50": {"budget": 0.5},
    "mikv": {"ratio": 0.2, "high_bits": None, "low_bits": 2, "key_balancer": True},
    "mikv10": {"ratio": 0.1, "high_bits": None, "low_bits": 2},
    "mikv-int8": {"ratio": 0.2, "high_bits": 8, "low_bits": 2},
    "mikv-int3": {"ratio": 0.2, "high_bits": None, "low_bits": 3},
    "zipcache": {"salient_ratio": 0.4, "high_bits": 4, "low_bits": 2, "low_key_bits": None},
    "zipcache20": {"salient_ratio": 0.2, "high_bits": 4, "low_bits": 2},
    "zipcache60": {"salient_ratio": 0.6, "high_bits": 4, "low_bits": 2},
    "zipcache-kvhead": {"salient_ratio": 0.4, "selection": "kv_head"},
    "zipcache-accumulated": {"salient_ratio": 0.4, "normalized": False},
    "zipcache-tokenwise": {"salient_ratio": 0.4, "channel_separable": False},
    "zipcache-k3": {"salient_ratio": 0.4, "low_key_bits": 3, "low_bits": 2},
    "zipcache20-k3": {"salient_ratio": 0.2, "high_bits": 4, "low_key_bits": 3, "low_bits": 2},
    "kvmix-5x": {
        "salient_ratio": 0.11,
        "high_bits": 4,
        "low_key_bits": 3,
        "low_bits": 2,
        "sink_tokens": 4,
        "key_block": 512,
        "key_clip": "mse_unbiased",
        "value_clip": "mse_unbiased",
    },
    "kvmix-5x-v2": {
        "salient_ratio": 0.14,
        "high_bits": 4,
        "low_key_bits": 3,
        "low_bits": 2,
        "sink_tokens": 4,
        "key_block": 0,
        "key_clip": "mse_unbiased",
        "value_clip": "mse_unbiased",
    },
    "kvmix-5x-minmax": {
        "salient_ratio": 0.14,
        "high_bits": 4,
        "low_key_bits": 3,
        "low_bits": 2,
        "sink_tokens": 4,
        "key_block": 0,
        "key_clip": "minmax",
        "value_clip": "minmax",
    },
    "kvmix-5x-v1": {
        "salient_ratio": 0.2,
        "high_bits": 4,
        "low_key_bits": 3,
        "low_bits": 2,
        "sink_tokens": 0,
        "key_block": 0,
        "key_clip": "minmax",
        "value_clip": "minmax",
    },
    "kvmix-5x-v1-norot": {
        "salient_ratio": 0.2,
        "high_bits": 4,
        "low_key_bits": 3,
        "low_bits": 2,
        "sink_tokens": 0,
        "key_block": 0,
        "key_clip": "minmax",
        "value_clip": "minmax",
    },
    "kvmix-5x-norot": {
        "salient_ratio": 0.11,
        "high_bits": 4,
        "low_key_bits": 3,
        "low_bits": 2,
        "sink_tokens": 4,
        "key_block": 512,
        "key_clip": "mse_unbiased",
        "value_clip": "mse_unbiased",
    },
}
# The store policy each preset family runs (kvmix-5x is ZipCache's store, rotated).
POLICY = {
    "uniform": "uniform",
    "h2o": "eviction",
    "mikv": "mikv",
    "zipcache": "zipcache",
    "kvmix": "zipcache",
}
ROTATED = {"kvmix-5x", "kvmix-5x-v2", "kvmix-5x-minmax", "kvmix-5x-v1"}


def small_config() -> LlamaConfig:
    return LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=128,
    )


def test_registry_lists_every_preset_once_with_a_reference():
    names = kvmix.presets()
    assert len(names) == len(set(names)) == len(PRESETS)
    assert set(names) == set(CLAIMS) | {"full", "quanto-int4", "quanto-int2"}
    for name in names:
        info = kvmix.preset_info(name)
        assert info.name == name
        assert info.description and "\n" not in info.description
        assert info.reference
    assert kvmix.preset_info("zipcache").reference == "ZipCache (He et al., 2024)"
    assert kvmix.preset_info("mikv").reference == "MiKV (Yang et al., 2024)"
    assert kvmix.preset_info("kvmix-5x").reference == "kvmix"


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_kvmix_preset_builds_what_it_claims(name):
    cache = kvmix.make_cache(name, small_config())
    assert isinstance(cache, kvmix.KvmixCache)
    expected_policy = next(p for prefix, p in POLICY.items() if name.startswith(prefix))
    assert cache.policy == expected_policy == kvmix.preset_info(name).policy
    for option, value in CLAIMS[name].items():
        assert cache.options[option] == value, option
    # The store options the registry reports (used by bench memory and budget matching) are
    # the ones the built cache resolved.
    for option, value in kvmix.preset_info(name).store_options().items():
        assert cache.options[option] == value, option
    assert (cache.rotation is not None) == (name in ROTATED)
    assert len(cache.layers) == 2


@pytest.fixture(scope="module")
def tiny():
    model = tiny_random_model("llama", seed=1)
    kvmix.enable_fused_attention(model)
    return model


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_kvmix_preset_generates(tiny, name):
    """Each preset's cache runs a short greedy generation (fused attention) and holds fewer bytes
    than a dense fp16 cache once its tokens are classified."""
    ids = torch.randint(1, 128, (1, 300), generator=torch.Generator().manual_seed(0))
    # Short gaps so that the generated tokens are classified too (uniform has no gap).
    gap = {"streaming_gap": 4} if "streaming_gap" in PRESETS[name].overridable() else {}
    cache = kvmix.make_cache(name, tiny.config, **gap)
    with torch.inference_mode():
        out = tiny.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 306)
    report = cache.memory_report()
    # K and V, 2 layers, 2 kv-heads, 305 tokens seen (the last one generated is not fed back), D 16
    assert report["fp16_bytes"] == 2 * 2 * 2 * 305 * 16 * 2
    if name != "uniform8":  # 8-bit codes plus per-group metadata: about fp16's size
        assert report["compression_ratio"] > 1.0


def test_transformers_presets_build_their_caches():
    assert type(kvmix.make_cache("full", small_config())) is DynamicCache
    for name, bits in (("quanto-int4", 4), ("quanto-int2", 2)):
        info = kvmix.preset_info(name)
        assert info.policy is None and info.requires == ("optimum.quanto", "eval")
        if info.available():
            cache = kvmix.make_cache(name, small_config())
            assert isinstance(cache, QuantizedCache)
            assert cache.layers[0].nbits == bits


def test_overrides_replace_options_and_leave_the_registry_alone():
    cache = kvmix.make_cache("zipcache20-k3", small_config(), salient_ratio=0.3, high_bits=8)
    assert cache.options["salient_ratio"] == 0.3
    assert cache.options["high_bits"] == 8
    assert cache.options["low_key_bits"] == 3  # the preset's own, kept
    assert dict(PRESETS["zipcache20-k3"].options) == {"salient_ratio": 0.2, "low_key_bits": 3}
    rotated = kvmix.make_cache("kvmix-5x", small_config(), rotation_seed=None)
    assert rotated.rotation is None
    with pytest.raises(TypeError):
        PRESETS["zipcache"].options["salient_ratio"] = 0.9  # type: ignore[index]
    with pytest.raises(TypeError):
        PRESETS["new"] = PRESETS["zipcache"]  # type: ignore[index]


def test_unknown_names_are_refused_with_the_valid_ones():
    with pytest.raises(kvmix.ConfigError, match="unknown preset 'zip'; valid presets: full, "):
        kvmix.make_cache("zip", small_config())
    with pytest.raises(kvmix.ConfigError, match="unknown preset 'zip'"):
        kvmix.preset_info("zip")
    # MiKV's option name on a ZipCache preset.
    with pytest.raises(
        kvmix.ConfigError, match=r"preset 'zipcache' has no option 'ratio'; valid options: sal"
    ):
        kvmix.make_cache("zipcache", small_config(), ratio=0.1)
    with pytest.raises(kvmix.ConfigError, match="no option 'bits'"):
        PRESETS["mikv"].derive("x", "x", bits=3)


def test_bad_overrides_are_refused_before_anything_is_built():
    calls = []

    def factory(config, *, width=1):
        calls.append((config, width))
        return object()

    spy = Preset("spy", "a spy", "test", "test", factory, {"width": 2})
    with pytest.raises(kvmix.ConfigError, match="no option 'height'; valid options: width"):
        spy.make_cache("cfg", height=3)
    assert calls == []
    spy.make_cache("cfg", width=5)
    assert calls == [("cfg", 5)]
    with pytest.raises(kvmix.ConfigError, match="no option 'depth'"):
        Preset("bad", "bad", "test", "test", factory, {"depth": 1})
    # A value the cache refuses is a ConfigError from the cache's own validation.
    with pytest.raises(kvmix.ConfigError, match="salient_ratio"):
        kvmix.make_cache("zipcache", small_config(), salient_ratio=1.5)


def test_a_missing_extra_is_named():
    needy = Preset("needy", "x", "test", "test", DynamicCache, requires=("no_such_mod_kv", "eval"))
    assert not needy.available()
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'kvmix\[eval\]'"):
        needy.make_cache(small_config())
    # A submodule of a missing package (optimum.quanto without optimum): not available either.
    orphan = Preset("o", "x", "test", "test", DynamicCache, requires=("no_such_pkg_kv.sub", "eval"))
    assert not orphan.available()


def test_every_tool_names_registry_presets():
    from kvmix import demo
    from kvmix.bench import generate, memory
    from kvmix.eval import DEFAULT_METHODS, METHODS, SWEEP_METHODS

    assert set(demo.METHODS) == set(CLAIMS)
    assert set(memory.DEFAULT_PRESETS) <= set(CLAIMS)
    assert all(generate.method(m).preset is PRESETS[m] for m in generate.DEFAULT_METHODS)
    assert generate.method("mikv-portable").implementation == "sdpa"
    assert set(METHODS) == set(CLAIMS) | {"full"}  # quanto's memory is not readable
    for name in (*DEFAULT_METHODS, *SWEEP_METHODS):
        assert name in METHODS or METHODS[name.removeprefix("h2o@")].is_kvmix


RESULTS = [
    "results/eval.json",
    "results/suite-2k/suite.json",
    "results/suite-4k/suite.json",
    "results/suite-8k/suite.json",
    "results/suite-filler-2k/suite.json",
]


@pytest.mark.parametrize("path", RESULTS)
def test_stored_results_name_registry_presets(path):
    """The method names keying the stored results still resolve (eval's names were kept)."""
    from kvmix.eval import METHODS

    data = json.loads((ROOT / path).read_text())
    names = set(data["methods"]) if "methods" in data else {r["method"] for r in data["records"]}
    assert names
    for name in names:
        assert name in METHODS or METHODS[name.removeprefix("h2o@")].is_kvmix, name
    if "methods" in data:
        for name, info in data["methods"].items():
            if name in METHODS:
                assert info["family"] == METHODS[name].family, name


def test_readme_preset_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme
    rows = [line for line in readme.splitlines() if re.match(r"\| `[a-z0-9@-]+` \| ", line)]
    listed = [re.match(r"\| `([^`]+)`", r)[1] for r in rows if r in markdown_table()]
    assert listed == list(kvmix.presets())
