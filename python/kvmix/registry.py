"""The preset registry: every named cache configuration kvmix's tools know, defined once.

A preset is a recipe, not a cache: a name, a one-line description, the paper it follows, and
the cache class with the keyword arguments that build it. The demo, the evaluation, the
benchmarks, the ``kvmix`` command and the README's preset table all read this registry.

>>> kvmix.presets()                                         # doctest: +SKIP
('full', 'quanto-int4', ..., 'zipcache', ...)
>>> kvmix.preset_info("zipcache20-k3").description          # doctest: +SKIP
'ZipCache (20% 4-bit), regular keys 3-bit'
>>> cache = kvmix.make_cache("mikv", model.config, ratio=0.1)  # doctest: +SKIP

The registry also holds the caches kvmix is compared against: transformers' ``DynamicCache``
(``"full"``, the reference every method is measured against) and transformers'
``QuantizedCache`` with the optimum-quanto backend (``"quanto-int4"``/``"quanto-int2"``, which
need the ``eval`` extra). Their :attr:`Preset.policy` is ``None``: they hold no kvmix store.

The module is named ``registry`` because ``kvmix.presets`` is the function listing the names.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from transformers import DynamicCache, QuantizedCache

from kvmix import _kvmix
from kvmix.cache import EvictionCache, Kvmix5xCache, MiKVCache, QuantizedKVCache, ZipCache
from kvmix.errors import ConfigError
from kvmix.types import PolicyName

__all__ = ["PRESETS", "Preset", "make_cache", "markdown_table", "preset_info", "presets"]

MIKV = "MiKV (Yang et al., 2024)"
ZIPCACHE = "ZipCache (He et al., 2024)"
KIVI = "KIVI (Liu et al., 2024)"
H2O = "H2O (Zhang et al., 2023)"
KVMIX = "kvmix"
TRANSFORMERS = "transformers"


@dataclass(frozen=True)
class Preset:
    """One named cache configuration.

    Args:
        name: the identifier used on command lines and as the key of result files.
        description: one line; what tables and plots print.
        reference: the method it follows, e.g. ``"ZipCache (He et al., 2024)"``; ``"kvmix"`` for
            kvmix's own, ``"transformers"`` for transformers' reference cache.
        family: the group the evaluation's plots draw as one line (``"zipcache"``,
            ``"zipcache-ablation"``, ``"eviction"``, ...).
        factory: the cache class (called as ``factory(config, **options)``).
        options: the keyword arguments of ``factory`` this preset sets.
        policy: the kvmix store policy the cache holds (``None``: not a kvmix cache).
        requires: ``(module, extra)``: a module the factory needs and the ``kvmix`` extra that
            installs it (``None``: nothing beyond kvmix's own dependencies).
        fixed: keyword arguments of ``factory`` that are part of what the preset is and cannot
            be overridden (e.g. the quanto backend).
    """

    name: str
    description: str
    reference: str
    family: str
    factory: Callable[..., Any]
    options: Mapping[str, Any] = field(default_factory=dict)
    policy: PolicyName | None = None
    requires: tuple[str, str] | None = None
    fixed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A read-only copy: no caller can change a registered preset's options.
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        self.check_overrides(self.options)

    @property
    def label(self) -> str:
        """What tables print (the description)."""
        return self.description

    @property
    def is_kvmix(self) -> bool:
        """Whether the cache is a :class:`kvmix.KvmixCache` (holds kvmix stores)."""
        return self.policy is not None

    def overridable(self) -> tuple[str, ...]:
        """The keyword arguments :meth:`make_cache` accepts: the factory's, less ``config`` and
        :attr:`fixed`."""
        params = inspect.signature(self.factory).parameters.values()
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return tuple(
            p.name
            for p in params
            if p.kind in kinds and p.name not in ("self", "config") and p.name not in self.fixed
        )

    def check_overrides(self, overrides: Mapping[str, Any]) -> None:
        """Raise :class:`kvmix.ConfigError` naming the valid ones if any name is not accepted."""
        valid = self.overridable()
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise ConfigError(
                f"preset {self.name!r} has no option {', '.join(map(repr, unknown))}; valid "
                f"options: {', '.join(valid) if valid else 'none'}"
            )

    def store_options(self) -> dict[str, Any]:
        """The store options this preset sets (its own and the factory's non-``None`` defaults,
        e.g. :class:`kvmix.Kvmix5xCache`'s tiers), for building a bare :class:`kvmix.LayerStore`
        of the same configuration; empty for a non-kvmix cache."""
        if self.policy is None:
            return {}
        names = set(_kvmix.policy_defaults(self.policy))
        defaults = {
            p.name: p.default
            for p in inspect.signature(self.factory).parameters.values()
            if p.default is not inspect.Parameter.empty and p.default is not None
        }
        merged = {**defaults, **self.options}
        return {k: v for k, v in merged.items() if k in names and v is not None}

    def available(self) -> bool:
        """Whether what the factory needs is installed."""
        if self.requires is None:
            return True
        try:
            return importlib.util.find_spec(self.requires[0]) is not None
        except ModuleNotFoundError:  # a dotted name whose parent package is missing
            return False

    def derive(self, name: str, description: str, **overrides: Any) -> Preset:
        """A new preset: this one with ``overrides`` (checked) under another name."""
        self.check_overrides(overrides)
        return dataclasses.replace(
            self, name=name, description=description, options={**self.options, **overrides}
        )

    def make_cache(self, config: Any, **overrides: Any) -> Any:
        """A fresh cache for a model with ``config``; ``overrides`` replace the preset's options.

        Raises:
            ConfigError: an override the factory does not take (checked before anything is
                built), or a value the cache refuses.
            ModuleNotFoundError: the factory needs an extra that is not installed.
        """
        self.check_overrides(overrides)
        if not self.available():
            assert self.requires is not None
            module, extra = self.requires
            raise ModuleNotFoundError(
                f"preset {self.name!r} needs `{module}`: pip install 'kvmix[{extra}]'"
            )
        return self.factory(config=config, **{**self.options, **overrides})


def _quanto(config: Any = None, *, nbits: int = 4, residual_length: int = 128) -> Any:
    """transformers' ``QuantizedCache`` with the optimum-quanto backend."""
    return QuantizedCache(
        backend="quanto", config=config, nbits=nbits, residual_length=residual_length
    )


def _p(
    name: str,
    description: str,
    reference: str,
    family: str,
    factory: Callable[..., Any],
    policy: PolicyName | None,
    **options: Any,
) -> Preset:
    requires = ("optimum.quanto", "eval") if factory is _quanto else None
    return Preset(name, description, reference, family, factory, options, policy, requires)


#: Every preset, by name, in the order tables list them.
PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        p.name: p
        for p in [
            # The reference and transformers' own quantized cache.
            _p("full", "full cache (DynamicCache)", TRANSFORMERS, "full", DynamicCache, None),
            _p(
                "quanto-int4",
                "transformers QuantizedCache, quanto int4",
                KIVI,
                "quanto",
                _quanto,
                None,
                nbits=4,
            ),
            _p(
                "quanto-int2",
                "transformers QuantizedCache, quanto int2",
                KIVI,
                "quanto",
                _quanto,
                None,
                nbits=2,
            ),
            # kvmix's uniform baseline (what QuantizedCache does) and H2O eviction.
            _p(
                "uniform8",
                "uniform 8-bit (KIVI)",
                KIVI,
                "uniform",
                QuantizedKVCache,
                "uniform",
                bits=8,
            ),
            _p(
                "uniform4",
                "uniform 4-bit (KIVI)",
                KIVI,
                "uniform",
                QuantizedKVCache,
                "uniform",
                bits=4,
            ),
            _p(
                "uniform2",
                "uniform 2-bit (KIVI)",
                KIVI,
                "uniform",
                QuantizedKVCache,
                "uniform",
                bits=2,
            ),
            _p(
                "h2o10",
                "H2O eviction, keep 10%",
                H2O,
                "eviction",
                EvictionCache,
                "eviction",
                budget=0.1,
            ),
            _p(
                "h2o20",
                "H2O eviction, keep 20%",
                H2O,
                "eviction",
                EvictionCache,
                "eviction",
                budget=0.2,
            ),
            _p(
                "h2o50",
                "H2O eviction, keep 50%",
                H2O,
                "eviction",
                EvictionCache,
                "eviction",
                budget=0.5,
            ),
            # MiKV: the paper's preset and its budgets.
            _p("mikv", "MiKV (20% fp16, rest int2)", MIKV, "mikv", MiKVCache, "mikv"),
            _p("mikv10", "MiKV (10% fp16, rest int2)", MIKV, "mikv", MiKVCache, "mikv", ratio=0.1),
            _p(
                "mikv-int8",
                "MiKV (20% int8, rest int2)",
                MIKV,
                "mikv",
                MiKVCache,
                "mikv",
                high_bits=8,
            ),
            _p(
                "mikv-int3",
                "MiKV (20% fp16, rest int3)",
                MIKV,
                "mikv",
                MiKVCache,
                "mikv",
                low_bits=3,
            ),
            # ZipCache: the paper's preset, its budgets and ablations.
            _p(
                "zipcache",
                "ZipCache (40% 4-bit, rest 2-bit)",
                ZIPCACHE,
                "zipcache",
                ZipCache,
                "zipcache",
            ),
            _p(
                "zipcache20",
                "ZipCache (20% 4-bit)",
                ZIPCACHE,
                "zipcache",
                ZipCache,
                "zipcache",
                salient_ratio=0.2,
            ),
            _p(
                "zipcache60",
                "ZipCache (60% 4-bit, demo)",
                ZIPCACHE,
                "zipcache",
                ZipCache,
                "zipcache",
                salient_ratio=0.6,
            ),
            # The public code's selection: one salient set per kv-head instead of per layer.
            _p(
                "zipcache-kvhead",
                "ZipCache, salient sets per kv-head (public code)",
                ZIPCACHE,
                "zipcache-ablation",
                ZipCache,
                "zipcache",
                selection="kv_head",
            ),
            # ZipCache's two claims, each ablated alone.
            _p(
                "zipcache-accumulated",
                "ZipCache, accumulated scores",
                ZIPCACHE,
                "zipcache-ablation",
                ZipCache,
                "zipcache",
                normalized=False,
            ),
            _p(
                "zipcache-tokenwise",
                "ZipCache, plain tokenwise values",
                ZIPCACHE,
                "zipcache-ablation",
                ZipCache,
                "zipcache",
                channel_separable=False,
            ),
            # 3-bit keys for the regular tokens: what retrieval needs on SmolLM2 (2-bit
            # per-channel keys lose the passkey); at 20% salient the same bytes as the preset.
            _p(
                "zipcache-k3",
                "ZipCache, regular keys 3-bit",
                ZIPCACHE,
                "zipcache-keys",
                ZipCache,
                "zipcache",
                low_key_bits=3,
            ),
            _p(
                "zipcache20-k3",
                "ZipCache (20% 4-bit), regular keys 3-bit",
                ZIPCACHE,
                "zipcache-keys",
                ZipCache,
                "zipcache",
                salient_ratio=0.2,
                low_key_bits=3,
            ),
            # kvmix's own preset at ~5x, its first definition, and its rotation ablated.
            _p(
                "kvmix-5x",
                "kvmix-5x (rotated, 11% 4-bit, K3/V2, key ranges per 512 tokens, 4 sinks, "
                "per-layer bits, unbiased clipping)",
                KVMIX,
                "kvmix",
                Kvmix5xCache,
                "zipcache",
            ),
            _p(
                "kvmix-5x-v2",
                "kvmix-5x, second definition (14% 4-bit, one key range per classification)",
                KVMIX,
                "kvmix-ablation",
                Kvmix5xCache,
                "zipcache",
                salient_ratio=0.14,
                key_block=0,
            ),
            _p(
                "kvmix-5x-minmax",
                "kvmix-5x-v2 with min-max ranges (its definition before clipping)",
                KVMIX,
                "kvmix-ablation",
                Kvmix5xCache,
                "zipcache",
                salient_ratio=0.14,
                key_block=0,
                key_clip="minmax",
                value_clip="minmax",
            ),
            _p(
                "kvmix-5x-v1",
                "kvmix-5x, first definition (rotated, 20% 4-bit, K3/V2)",
                KVMIX,
                "kvmix-ablation",
                Kvmix5xCache,
                "zipcache",
                salient_ratio=0.2,
                sink_tokens=0,
                key_block=0,
                layer_options=None,
                key_clip="minmax",
                value_clip="minmax",
            ),
            _p(
                "kvmix-5x-norot",
                "kvmix-5x without the rotation",
                KVMIX,
                "kvmix-ablation",
                Kvmix5xCache,
                "zipcache",
                rotation_seed=None,
            ),
            _p(
                "kvmix-5x-v1-norot",
                "kvmix-5x's first definition without the rotation",
                KVMIX,
                "kvmix-ablation",
                Kvmix5xCache,
                "zipcache",
                salient_ratio=0.2,
                sink_tokens=0,
                key_block=0,
                layer_options=None,
                key_clip="minmax",
                value_clip="minmax",
                rotation_seed=None,
            ),
        ]
    }
)


def presets() -> tuple[str, ...]:
    """The names of every preset, in table order (:func:`preset_info` describes one)."""
    return tuple(PRESETS)


def preset_info(name: str) -> Preset:
    """The :class:`Preset` called ``name``.

    Raises:
        ConfigError: no preset has that name (the message lists them).
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


def make_cache(name: str, config: Any, **overrides: Any) -> Any:
    """A fresh cache of preset ``name`` for a model with ``config``.

    Args:
        name: one of :func:`presets`.
        config: the model's config.
        overrides: keyword arguments of the preset's cache class replacing the preset's own
            (e.g. ``make_cache("zipcache", config, salient_ratio=0.2)``).

    Raises:
        ConfigError: an unknown preset or option (naming the valid ones, before anything is
            built), or a value the cache refuses.
    """
    return preset_info(name).make_cache(config, **overrides)


def _options_text(p: Preset) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in p.options.items()) or "defaults"


def markdown_table() -> str:
    """The README's preset table: name, reference, description, class and options."""
    lines = ["| preset | method | description | cache (options) |", "|---|---|---|---|"]
    for p in PRESETS.values():
        cls = getattr(p.factory, "__name__", "").lstrip("_")
        cls = "QuantizedCache(backend='quanto')" if p.factory is _quanto else cls
        lines.append(
            f"| `{p.name}` | {p.reference} | {p.description} | `{cls}` ({_options_text(p)}) |"
        )
    return "\n".join(lines)
