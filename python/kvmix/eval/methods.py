"""The methods an evaluation compares: presets of :mod:`kvmix.registry`.

A method is a recipe, not a cache: every trial builds a fresh cache from the model's config.
The evaluation runs every preset whose memory it can read (kvmix's caches and the full
``DynamicCache``; not quanto's ``QuantizedCache``): the papers' presets, the baselines,
ZipCache's ablations and the budget sweeps of the trade-off plots. ``"h2o@mikv"``-style names
build an eviction baseline whose budget holds the same bytes as another method (MiKV's thesis
compares them at equal memory).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Mapping
from typing import Any

from transformers import DynamicCache

from kvmix.bench.memory import measure
from kvmix.registry import PRESETS, Preset
from kvmix.types import PolicyName

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "SWEEP_METHODS",
    "Method",
    "eviction_budget_matching",
    "parse_variant",
    "resolve_methods",
]

#: An evaluated method is a preset (name, label, family, policy, options, ``make_cache``).
Method = Preset

#: Every method the evaluation can run, by name.
METHODS: Mapping[str, Method] = {
    name: p for name, p in PRESETS.items() if p.is_kvmix or p.factory is DynamicCache
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
def _ratio(
    policy: PolicyName, options: tuple[tuple[str, Any], ...], geometry: tuple[int, ...]
) -> float:
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
        raise ValueError(f"{target.name!r} is not a kvmix cache: no compressed memory to match")
    geometry = (tokens, kv_heads, head_dim)
    goal = _ratio(target.policy, tuple(sorted(target.store_options().items())), geometry)
    lo, hi = 0.0, 1.0
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        # More budget, more bytes, a smaller ratio.
        if _ratio("eviction", (("budget", mid),), geometry) > goal:
            lo = mid
        else:
            hi = mid
    return round((lo + hi) / 2, 4)


def parse_variant(spec: str) -> Method:
    """A method derived from a preset with overridden options, for measuring one idea at a
    time: ``"NAME=PRESET:key=value,key=value"`` (values parsed as Python literals, which may
    hold commas), e.g. ``'clipu=kvmix-5x:key_clip="mse_unbiased",value_clip="mse_unbiased"'``
    or ``'l18=kvmix-5x:layer_options={18: {"low_key_bits": 4}}'``."""
    name, eq, rest = spec.partition("=")
    base, _, opts = rest.partition(":")
    if not eq or not name or base not in METHODS:
        raise ValueError(
            f"a variant is NAME=PRESET:key=value,... with PRESET among {', '.join(sorted(METHODS))}"
            f"; got {spec!r}"
        )
    # Parsed as a call's keywords, so a value may itself hold commas (a dict of per-layer
    # options, a tuple).
    problem = f"variant {spec!r}: the overrides must be key=value pairs of Python literals"
    try:
        call = ast.parse(f"f({opts})", mode="eval").body
    except SyntaxError as e:
        raise ValueError(problem) from e
    if not isinstance(call, ast.Call) or call.args or any(kw.arg is None for kw in call.keywords):
        raise ValueError(problem)
    names = [str(kw.arg) for kw in call.keywords]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"variant {spec!r} sets {', '.join(twice)} more than once")
    try:
        overrides = {str(kw.arg): ast.literal_eval(kw.value) for kw in call.keywords}
    except ValueError as e:
        raise ValueError(problem) from e
    return METHODS[base].derive(name, f"{base} {overrides}", **overrides)


def resolve_methods(
    names: list[str] | tuple[str, ...], tokens: int, kv_heads: int, head_dim: int
) -> list[Method]:
    """Turn names into methods; ``"h2o@<method>"`` is eviction at ``<method>``'s bytes for a cache
    of ``tokens`` tokens of ``kv_heads`` x ``head_dim``; ``"NAME=PRESET:key=value,..."`` a
    variant (:func:`parse_variant`)."""
    out = []
    for name in names:
        if "=" in name:
            out.append(parse_variant(name))
            continue
        if name in METHODS:
            out.append(METHODS[name])
            continue
        if name.startswith("h2o@") and name[4:] in METHODS and METHODS[name[4:]].is_kvmix:
            target = METHODS[name[4:]]
            budget = eviction_budget_matching(target, tokens, kv_heads, head_dim)
            label = f"H2O eviction at {target.name}'s bytes (keep {budget:.1%})"
            out.append(PRESETS["h2o20"].derive(name, label, budget=budget))
            continue
        valid = sorted(METHODS) + [f"h2o@{n}" for n in sorted(METHODS) if METHODS[n].is_kvmix]
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(valid)}")
    return out
