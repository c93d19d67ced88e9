"""Memory held by a compressed cache under each preset, read from the real store buffers.

For each kvmix preset (``--presets``, names of :mod:`kvmix.registry`), builds one
:class:`kvmix.LayerStore` per layer for a cache shaped like SmolLM2-135M's (30 layers,
3 kv-heads, head_dim 64), prefills it with ``--tokens`` tokens, optionally decodes ``--decode``
more, and prints the bytes each tier holds against a dense fp16 cache
of the same tokens. Byte counts depend only on how many tokens each tier holds, not on the
values, so the keys/values are Gaussian and the importance scores random. A rotated preset's
rotation matrix (``kvmix-5x``: ``head_dim**2`` floats per cache) is not a store buffer and not
counted here; ``KvmixCache.memory_report`` counts it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

import kvmix
from kvmix.cache import combine_memory_reports
from kvmix.registry import PRESETS
from kvmix.types import BufferDtype, PolicyName

#: The presets measured by default (any kvmix preset of :mod:`kvmix.registry` can be named):
#: the papers' presets and the baselines.
DEFAULT_PRESETS: tuple[str, ...] = (
    "zipcache",
    "zipcache60",
    "mikv",
    "mikv-int8",
    "uniform2",
    "uniform4",
    "h2o20",
)


def _kvmix_preset(name: str) -> str:
    """argparse type: a preset that holds kvmix stores."""
    valid = [n for n, p in PRESETS.items() if p.is_kvmix]
    if name not in valid:
        raise argparse.ArgumentTypeError(
            f"{name!r} is not a kvmix preset; valid presets: {', '.join(valid)}"
        )
    return name


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=4096, help="prompt tokens (default 4096)")
    p.add_argument("--decode", type=int, default=0, help="decoding steps after the prompt")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--buffer-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument(
        "--presets",
        nargs="+",
        type=_kvmix_preset,
        default=list(DEFAULT_PRESETS),
        metavar="PRESET",
        help=f"kvmix presets to measure (default: {' '.join(DEFAULT_PRESETS)})",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def measure(
    policy: PolicyName,
    config: dict[str, Any] | None,
    *,
    tokens: int,
    decode: int,
    layers: int,
    kv_heads: int,
    head_dim: int,
    buffer_dtype: BufferDtype = "float16",
    seed: int = 0,
) -> dict[str, Any]:
    """Prefill (and decode) ``layers`` stores and return their summed memory report."""
    rng = np.random.default_rng(seed)
    reports = []
    for _ in range(layers):
        store = kvmix.LayerStore(policy, kv_heads, head_dim, config, buffer_dtype)
        x = rng.standard_normal((1, kv_heads, tokens, head_dim), dtype=np.float32)
        store.append(x, x)
        if store.needs_balancer:
            store.set_key_balancer(np.ones((1, kv_heads, head_dim), np.float32))
        acc = rng.random((1, kv_heads, tokens), dtype=np.float32)
        store.add_scores(0, acc, np.ones_like(acc))
        store.maybe_classify()
        for step in range(decode):
            t = rng.standard_normal((1, kv_heads, 1, head_dim), dtype=np.float32)
            store.append(t, t)
            store.add_scores(
                tokens + step,
                rng.random((1, kv_heads, 1), np.float32),
                np.ones((1, kv_heads, 1), np.float32),
            )
            store.maybe_classify()
        reports.append(store.memory())
    return combine_memory_reports(reports)


def main(args: argparse.Namespace) -> int:
    shape = f"{args.layers} layers x {args.kv_heads} kv-heads x head_dim {args.head_dim}"
    print(f"cache: {args.tokens} prompt tokens + {args.decode} decoded, {shape}")
    print(f"dense fp16 cache of the same tokens: see fp16 column; buffer dtype {args.buffer_dtype}")
    header = f"{'preset':46} {'bytes':>12} {'fp16 bytes':>12} {'ratio':>7}  tiers (buffer/high/low)"
    print(header)
    print("-" * len(header))
    results = {}
    for name in args.presets:
        preset = PRESETS[name]
        assert preset.policy is not None  # _kvmix_preset admits kvmix presets only
        label = f"{name}: {preset.description}"
        r = measure(
            preset.policy,
            preset.store_options(),
            tokens=args.tokens,
            decode=args.decode,
            layers=args.layers,
            kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            buffer_dtype=args.buffer_dtype,
        )
        results[name] = {"description": preset.description, **r}
        tiers = "/".join(f"{r['tiers'][t]['total']:,}" for t in ("buffer", "high", "low"))
        print(
            f"{label:46} {r['bytes']:>12,} {r['fp16_bytes']:>12,} "
            f"{r['compression_ratio']:>6.2f}x  {tiers}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
