"""The methods an evaluation compares: a name, a label, and how to build its cache.

A method is a recipe, not a cache: every trial builds a fresh cache from the model's config.
The registry holds the papers' presets, the baselines, ZipCache's ablations and the budget
sweeps of the trade-off plots; ``"h2o@mikv"``-style names build an eviction baseline whose
budget holds the same bytes as another method (MiKV's thesis compares them at equal memory).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import DynamicCache

import kvmix
from kvmix.bench.memory import measure

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "SWEEP_METHODS",
    "Method",
    "eviction_budget_matching",
    "resolve_methods",
]


@dataclass(frozen=True)
class Method:
    """One cache configuration under evaluation.

    Args:
        name: short identifier used on the command line and in result files.
        label: what tables and plots print.
        family: ``"full"``, ``"uniform"``, ``"eviction"``, ``"mikv"`` or ``"zipcache"`` (the
            plots draw one line per family).
        policy: the kvmix store policy, ``None`` for transformers' ``DynamicCache``.
        options: the policy's options (the keyword arguments of its ``Cache`` class).
    """

    name: str
    label: str
    family: str
    policy: str | None
    options: dict[str, Any] = field(default_factory=dict)

    def make_cache(self, config: Any) -> Any:
        """A fresh cache for a model with ``config``."""
        if self.policy is None:
            return DynamicCache(config=config)
        return _CACHE_CLASSES[self.policy](config, **self.options)


_CACHE_CLASSES: dict[str, Callable[..., kvmix.KvmixCache]] = {
    "uniform": kvmix.QuantizedKVCache,
    "eviction": kvmix.EvictionCache,
    "mikv": kvmix.MiKVCache,
    "zipcache": kvmix.ZipCache,
    "kvmix5x": kvmix.Kvmix5xCache,
}


def _m(name: str, label: str, family: str, policy: str | None, **options: Any) -> Method:
    return Method(name, label, family, policy, options)


#: Every named method. The presets use the papers' defaults (design.md §1).
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        _m("full", "full cache (DynamicCache)", "full", None),
        _m("uniform4", "uniform 4-bit (KIVI)", "uniform", "uniform", bits=4),
        _m("uniform2", "uniform 2-bit (KIVI)", "uniform", "uniform", bits=2),
        _m("h2o20", "H2O eviction, keep 20%", "eviction", "eviction", budget=0.2),
        _m("mikv", "MiKV (20% fp16, rest int2)", "mikv", "mikv"),
        _m("zipcache", "ZipCache (40% 4-bit, rest 2-bit)", "zipcache", "zipcache"),
        # The public code's selection: one salient set per kv-head instead of per layer.
        _m(
            "zipcache-kvhead",
            "ZipCache, salient sets per kv-head (public code)",
            "zipcache-ablation",
            "zipcache",
            selection="kv_head",
        ),
        # ZipCache's two claims, each ablated alone.
        _m(
            "zipcache-accumulated",
            "ZipCache, accumulated scores",
            "zipcache-ablation",
            "zipcache",
            normalized=False,
        ),
        _m(
            "zipcache-tokenwise",
            "ZipCache, plain tokenwise values",
            "zipcache-ablation",
            "zipcache",
            channel_separable=False,
        ),
        # 3-bit keys for the regular tokens: what retrieval needs on SmolLM2 (2-bit per-channel
        # keys lose the passkey); at 20% salient the same bytes as the paper's preset.
        _m(
            "zipcache-k3",
            "ZipCache, regular keys 3-bit",
            "zipcache-keys",
            "zipcache",
            low_key_bits=3,
        ),
        _m(
            "zipcache20-k3",
            "ZipCache (20% 4-bit), regular keys 3-bit",
            "zipcache-keys",
            "zipcache",
            salient_ratio=0.2,
            low_key_bits=3,
        ),
        # kvmix's own preset at ~5x, and its rotation ablated.
        _m("kvmix-5x", "kvmix-5x (rotated, 20% 4-bit, K3/V2)", "kvmix", "kvmix5x"),
        _m(
            "kvmix-5x-norot",
            "kvmix-5x without the rotation",
            "kvmix-ablation",
            "kvmix5x",
            rotation_seed=None,
        ),
        # Budget sweeps for the trade-off plots.
        _m("uniform8", "uniform 8-bit (KIVI)", "uniform", "uniform", bits=8),
        _m("h2o10", "H2O eviction, keep 10%", "eviction", "eviction", budget=0.1),
        _m("h2o50", "H2O eviction, keep 50%", "eviction", "eviction", budget=0.5),
        _m("mikv10", "MiKV (10% fp16, rest int2)", "mikv", "mikv", ratio=0.1),
        _m("mikv-int8", "MiKV (20% int8, rest int2)", "mikv", "mikv", high_bits=8),
        _m("mikv-int3", "MiKV (20% fp16, rest int3)", "mikv", "mikv", low_bits=3),
        _m("zipcache20", "ZipCache (20% 4-bit)", "zipcache", "zipcache", salient_ratio=0.2),
        _m("zipcache60", "ZipCache (60% 4-bit, demo)", "zipcache", "zipcache", salient_ratio=0.6),
    ]
}

#: The README's table: the presets, the baselines (eviction at MiKV's bytes), ZipCache's ablations.
DEFAULT_METHODS: tuple[str, ...] = (
    "full",
    "uniform4",
    "uniform2",
    "h2o@mikv",
    "mikv",
    "zipcache",
    "zipcache-kvhead",
    "zipcache-accumulated",
    "zipcache-tokenwise",
    "zipcache-k3",
    "zipcache20-k3",
)

#: Extra budgets for the trade-off (Pareto) plots.
SWEEP_METHODS: tuple[str, ...] = (
    "h2o@zipcache",
    "uniform8",
    "h2o10",
    "h2o50",
    "mikv10",
    "mikv-int8",
    "mikv-int3",
    "zipcache20",
    "zipcache60",
)


@functools.lru_cache(maxsize=64)
def _ratio(policy: str, options: tuple[tuple[str, Any], ...], geometry: tuple[int, ...]) -> float:
    tokens, kv_heads, head_dim = geometry
    report = measure(
        policy,
        dict(options),
        tokens=tokens,
        decode=0,
        layers=1,
        kv_heads=kv_heads,
        head_dim=head_dim,
    )
    return float(report["compression_ratio"])


def eviction_budget_matching(
    target: Method, tokens: int, kv_heads: int, head_dim: int, tolerance: float = 1e-3
) -> float:
    """The eviction budget whose cache holds as many bytes as ``target``'s for ``tokens`` tokens.

    Both sides are measured on real stores (:func:`kvmix.bench.memory.measure`: the byte counts
    depend only on how many tokens each tier holds), and the budget is found by bisection.
    """
    if target.policy is None:
        raise ValueError("the full cache has no compressed memory to match")
    geometry = (tokens, kv_heads, head_dim)
    goal = _ratio(target.policy, tuple(sorted(target.options.items())), geometry)
    lo, hi = 0.0, 1.0
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        # More budget, more bytes, a smaller ratio.
        if _ratio("eviction", (("budget", mid),), geometry) > goal:
            lo = mid
        else:
            hi = mid
    return round((lo + hi) / 2, 4)


def resolve_methods(
    names: list[str] | tuple[str, ...], tokens: int, kv_heads: int, head_dim: int
) -> list[Method]:
    """Turn names into methods; ``"h2o@<method>"`` is eviction at ``<method>``'s bytes for a cache
    of ``tokens`` tokens of ``kv_heads`` x ``head_dim``."""
    out = []
    for name in names:
        if name in METHODS:
            out.append(METHODS[name])
            continue
        if name.startswith("h2o@") and name[4:] in METHODS:
            target = METHODS[name[4:]]
            budget = eviction_budget_matching(target, tokens, kv_heads, head_dim)
            label = f"H2O eviction at {target.name}'s bytes (keep {budget:.1%})"
            out.append(_m(name, label, "eviction", "eviction", budget=budget))
            continue
        valid = sorted(METHODS) + [f"h2o@{n}" for n in sorted(METHODS) if n != "full"]
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(valid)}")
    return out
