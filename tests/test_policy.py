"""The policies' options, defined once in Rust: every option of every policy, its default, its
type checking and its round trip through ``LayerStore.options``; the Python constructors and
their docstrings against that one source."""

from __future__ import annotations

import inspect
import re
from typing import Any, get_args

import pytest

import kvmix
from kvmix.models import tiny_random_model
from kvmix.types import BufferDtype, Clip, CountMode, PolicyName, Scoring, Selection

D = 64

#: A valid value different from the default, for every option (written here, not derived, so
#: that a changed default or a dropped option fails the tests).
NON_DEFAULT: dict[str, dict[str, Any]] = {
    "full": {},
    "uniform": {"bits": 4, "residual": 64, "group_size": 8},
    "mikv": {
        "ratio": 0.3,
        "recent_share": 0.25,
        "high_bits": 8,
        "low_bits": 3,
        "group_size": 16,
        "key_balancer": False,
        "streaming_gap": 4,
    },
    "zipcache": {
        "salient_ratio": 0.2,
        "high_bits": 8,
        "low_bits": 3,
        "low_key_bits": 3,
        "probe_recent": 0.1,
        "probe_random": 0.0,
        "count_mode": "full_matrix",
        "normalized": False,
        "channel_separable": False,
        "selection": "kv_head",
        "streaming_gap": 7,
        "sink_tokens": 4,
        "key_block": 64,
        "key_clip": "mse",
        "value_clip": "mse",
    },
    "eviction": {"budget": 0.3, "recent_share": 0.25, "streaming_gap": 2},
}

#: The papers' defaults (design.md §1), written independently of the Rust source.
PAPER_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {},
    "uniform": {"bits": 2, "residual": 128, "group_size": None},
    "mikv": {
        "ratio": 0.2,
        "recent_share": 0.5,
        "high_bits": None,
        "low_bits": 2,
        "group_size": None,
        "key_balancer": True,
        "streaming_gap": 1,
    },
    "zipcache": {
        "salient_ratio": 0.4,
        "high_bits": 4,
        "low_bits": 2,
        "low_key_bits": None,
        "probe_recent": 0.05,
        "probe_random": 0.05,
        "count_mode": "exact",
        "normalized": True,
        "channel_separable": True,
        "selection": "layer",
        "streaming_gap": 100,
        "sink_tokens": 0,  # not in the paper: kvmix's addition, off by default
        "key_block": 0,  # the paper: one per-channel range per classification's regular keys
        "key_clip": "minmax",  # the paper's round-to-nearest over each group's range
        "value_clip": "minmax",
    },
    "eviction": {"budget": 0.2, "recent_share": 0.5, "streaming_gap": 1},
}

CACHE_CLASSES = {
    "full": kvmix.FullPrecisionCache,
    "uniform": kvmix.QuantizedKVCache,
    "mikv": kvmix.MiKVCache,
    "zipcache": kvmix.ZipCache,
    "eviction": kvmix.EvictionCache,
}

SCORING = {
    "full": "none",
    "uniform": "none",
    "mikv": "every_query",
    "zipcache": "probes",
    "eviction": "every_query",
}


def _kind(policy: str, option: str) -> str:
    value = NON_DEFAULT[policy][option]
    return {bool: "bool", int: "int", float: "float", str: "str"}[type(value)]


#: Values of the wrong type (or out of the integer range) for each kind of option.
WRONG: dict[str, list[Any]] = {
    "float": ["0.4", True, [0.4]],
    "int": [2.5, -1, "2", True, 2**70],
    "bool": [1, "yes", 0.0],
    "str": [5, "bogus", True],
}

ALL_OPTIONS = [(p, o) for p in kvmix.POLICIES for o in NON_DEFAULT[p]]


def test_the_literal_types_list_exactly_the_core_values():
    assert set(get_args(PolicyName)) == set(kvmix.POLICIES)
    assert len(kvmix.POLICIES) == len(set(kvmix.POLICIES)) == 5
    assert set(get_args(BufferDtype)) == set(kvmix.BUFFER_DTYPES)
    assert set(get_args(CountMode)) == {"exact", "full_matrix"}
    assert set(get_args(Selection)) == {"layer", "kv_head"}
    assert set(get_args(Clip)) == set(kvmix._kvmix.CLIPS) == {"minmax", "mse", "mse_unbiased"}
    assert set(get_args(Scoring)) == set(SCORING.values())


@pytest.mark.parametrize("policy", kvmix.POLICIES)
def test_defaults_are_the_papers_and_every_option_is_listed(policy):
    defaults = kvmix.policy_defaults(policy)
    assert defaults == PAPER_DEFAULTS[policy]
    assert set(defaults) == set(NON_DEFAULT[policy])
    store = kvmix.LayerStore(policy, 2, D)
    assert store.policy == policy
    assert store.options == defaults
    assert store.scoring == SCORING[policy]
    assert store.evicts == (policy == "eviction")


@pytest.mark.parametrize(("policy", "option"), ALL_OPTIONS)
def test_every_option_is_read_and_round_trips(policy, option):
    value = NON_DEFAULT[policy][option]
    assert value != kvmix.policy_defaults(policy)[option]
    store = kvmix.LayerStore(policy, 2, D, {option: value})
    want = {**kvmix.policy_defaults(policy), option: value}
    assert store.options == want
    again = kvmix.LayerStore(policy, 2, D, store.options)
    assert again.options == want
    # None keeps the default.
    assert kvmix.LayerStore(policy, 2, D, {option: None}).options == kvmix.policy_defaults(policy)


@pytest.mark.parametrize("policy", kvmix.POLICIES)
def test_all_options_at_once_round_trip(policy):
    store = kvmix.LayerStore(policy, 2, D, NON_DEFAULT[policy])
    assert store.options == NON_DEFAULT[policy]
    assert kvmix.LayerStore(policy, 2, D, store.options).options == NON_DEFAULT[policy]


@pytest.mark.parametrize(("policy", "option"), ALL_OPTIONS)
def test_mistyped_values_are_refused_naming_the_option(policy, option):
    for wrong in WRONG[_kind(policy, option)]:
        with pytest.raises(kvmix.ConfigError, match=f"`{option}`") as info:
            kvmix.LayerStore(policy, 2, D, {option: wrong})
        assert policy in str(info.value) or option in str(info.value)


@pytest.mark.parametrize("policy", kvmix.POLICIES)
def test_unknown_options_are_refused_listing_the_valid_ones(policy):
    foreign = {"bits", "salient_ratio", "budget", "ratio", "nonsense", "salient-ratio"}
    for key in sorted(foreign - set(NON_DEFAULT[policy])):
        for value in (1, None):
            with pytest.raises(kvmix.ConfigError, match=f"unknown option `{key}`") as info:
                kvmix.LayerStore(policy, 2, D, {key: value})
            message = str(info.value)
            assert f"'{policy}'" in message
            for valid in NON_DEFAULT[policy]:
                assert valid in message
    with pytest.raises(kvmix.ConfigError, match="must be strings"):
        kvmix.LayerStore(policy, 2, D, {3: 1})


def test_unknown_policy_lists_the_policies():
    with pytest.raises(kvmix.ConfigError, match="'zipcache'"):
        kvmix.LayerStore("zip", 2, D)
    with pytest.raises(kvmix.ConfigError, match="'mikv'"):
        kvmix.policy_defaults("MiKV")


def test_buffer_dtype_default_and_choices():
    for policy in kvmix.POLICIES:
        want = "float32" if policy == "full" else "float16"
        assert kvmix.default_buffer_dtype(policy) == want
        assert kvmix.LayerStore(policy, 2, D).buffer_dtype == want
        for dtype in kvmix.BUFFER_DTYPES:
            assert kvmix.LayerStore(policy, 2, D, None, dtype).buffer_dtype == dtype
        with pytest.raises(kvmix.ConfigError, match="`buffer_dtype`"):
            kvmix.LayerStore(policy, 2, D, None, "int8")
    config = tiny_random_model("llama").config
    assert kvmix.ZipCache(config, buffer_dtype="bfloat16").buffer_dtype == "bfloat16"
    assert kvmix.ZipCache(config).layers[0].store.buffer_dtype == "float16"
    assert kvmix.FullPrecisionCache(config).buffer_dtype == "float32"


def _documented_defaults(cls: type) -> dict[str, str]:
    """``option -> text between the backticks of 'Default ``...``'`` in the Args section."""
    doc = inspect.getdoc(cls) or ""
    args = doc.split("Args:", 1)[1]
    entries = re.split(r"\n    (?=\w+: )", "\n" + args)
    out = {}
    for entry in entries:
        m = re.match(r"\s*(\w+): (.*)", entry, re.S)
        if m:
            d = re.search(r"Default ``(.+?)``", " ".join(m.group(2).split()))
            if d:
                out[m.group(1)] = d.group(1)
    return out


@pytest.mark.parametrize("policy", kvmix.POLICIES)
def test_cache_classes_take_every_option_and_document_its_default(policy):
    cls = CACHE_CLASSES[policy]
    params = inspect.signature(cls.__init__).parameters
    keywords = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords == set(NON_DEFAULT[policy]) | {"buffer_dtype", "engine"}
    # `engine` is where the store lives, not a policy option: its default is Python's.
    assert params["engine"].default == "auto"
    for name in keywords - {"engine"}:
        assert params[name].default is None, name  # the default lives in Rust
    documented = _documented_defaults(cls)
    defaults = kvmix.policy_defaults(policy)
    assert set(documented) == set(defaults), cls.__name__
    for option, value in defaults.items():
        assert documented[option] == repr(value), (cls.__name__, option)


@pytest.mark.parametrize("policy", kvmix.POLICIES)
def test_cache_classes_pass_options_through(policy):
    config = tiny_random_model("llama").config
    cls = CACHE_CLASSES[policy]
    assert cls(config).options == kvmix.policy_defaults(policy)
    cache = cls(config, **NON_DEFAULT[policy])
    assert cache.options == NON_DEFAULT[policy]
    assert all(layer.store.options == NON_DEFAULT[policy] for layer in cache.layers)
    generic = kvmix.KvmixCache(config, policy, NON_DEFAULT[policy])
    assert generic.options == cache.options
    for option in NON_DEFAULT[policy]:
        wrong = WRONG[_kind(policy, option)][0]
        with pytest.raises(kvmix.ConfigError, match=f"`{option}`"):
            cls(config, **{option: wrong})
