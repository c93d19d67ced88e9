"""Packed segments in the Triton store: bytes against the Rust store, and decode attention time.

For ZipCache and kvmix-5x (store options of ``kvmix.registry.PRESETS``; kvmix-5x's rotation
set as the cache sets it) at Llama-3.1-8B's kv shape (8 kv heads, 32 query heads, head_dim
128, bf16 keys/values and queries), a store is filled with a random prompt (outlier key
channels, uniform scores), classified as after a prefill, then decodes ``--decode`` steps
(append, tracked attention, classification every ``streaming_gap`` steps). Printed per case:

* the Triton store's ``memory()["bytes"]`` and its ratio to fp16, the Rust store's for the
  same input (``--rust``, on the host), and the Triton segment index's bytes (a block table per
  layer; the Rust store keeps 4 bytes per segment, stream and codec);
* rows and kernel iterations (blocks or pages) of the high and the low tier;
* the fused decode attention (``TritonLayerStore.attend``: the attention launch and the merge,
  CUDA events, median of 30 x 10 calls), without and with tracking.

The script reads only the stores' public surface and ``TierView.fill_pages``, so the same file
runs on a checkout from before the packing (``git stash``/another worktree) for the old times.

    python3 -u gpu/pages_check.py --rust > $OUT/pages-h200.txt 2>&1
    TRITON_INTERPRET=1 python3 gpu/pages_check.py --device cpu --tiny   # CPU smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import kvmix
from kvmix.cache import randomized_hadamard
from kvmix.engines.triton_store import TritonLayerStore
from kvmix.registry import PRESETS

CHUNK = 4096


def chunks(b: int, t: int, hk: int, d: int, seed: int = 0) -> Any:
    """``(start, keys, values, scores)``: Gaussian fp32 keys with 4 outlier channels and a
    per-channel bias (as ``kvmix.bench.attention.kv_chunks``), values, uniform scores."""
    gen = torch.Generator().manual_seed(seed)
    outliers = torch.randperm(d, generator=gen)[:4]
    bias = 2.0 * torch.randn(d, generator=gen)
    for start in range(0, t, CHUNK):
        n = min(CHUNK, t - start)
        keys = torch.randn(b, hk, n, d, generator=gen)
        keys[..., outliers] *= 15.0
        keys += bias
        yield (
            start,
            keys,
            torch.randn(b, hk, n, d, generator=gen),
            torch.rand(b, hk, n, generator=gen),
        )


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Median milliseconds per call (CUDA events on a GPU; one wall-clock call elsewhere)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(30):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        for _ in range(10):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 10)
    return statistics.median(times)


def run_case(preset: str, b: int, t: int, args: argparse.Namespace) -> dict[str, Any]:
    dev = torch.device(args.device)
    hk, hq, d = args.kv_heads, args.q_heads, args.head_dim
    p = PRESETS[preset]
    assert p.policy is not None
    options = dict(p.store_options())
    if args.gap:
        options["streaming_gap"] = args.gap
    tri = TritonLayerStore(p.policy, hk, d, options, "bfloat16")  # type: ignore[arg-type]
    rust = kvmix.LayerStore(p.policy, hk, d, options, "bfloat16") if args.rust else None
    if preset == "kvmix-5x":
        tri.set_rotation(randomized_hadamard(d, 0).to(dev))
    gen = torch.Generator().manual_seed(1)
    for start, k, v, sc in chunks(b, t, hk, d):
        tri.append(k.to(dev, torch.bfloat16), v.to(dev, torch.bfloat16))
        tri.add_scores(start, sc.to(dev), torch.ones_like(sc).to(dev))
        if rust is not None:
            kb, vb = k.to(torch.bfloat16).float(), v.to(torch.bfloat16).float()
            rust.append(kb.numpy(), vb.numpy())
            rust.add_scores(start, sc.numpy(), np.ones_like(sc.numpy()))
    tri.maybe_classify(True)
    if rust is not None:
        rust.maybe_classify(True)
    scale = d**-0.5
    # Decoding: the Triton store's own tracked scores decide its classifications; the Rust
    # store (bytes only) gets the same tokens and unit scores, which give it the same segment
    # structure (how many rows go where) if not the same rows.
    for i in range(args.decode):
        k1 = torch.randn(b, hk, 1, d, generator=gen)
        v1 = torch.randn(b, hk, 1, d, generator=gen)
        tri.append(k1.to(dev, torch.bfloat16), v1.to(dev, torch.bfloat16))
        q = torch.randn(b, hq, 1, d, generator=gen).to(dev, torch.bfloat16)
        tri.attend(q, [t + i], scale, True)
        tri.maybe_classify()
        if rust is not None:
            kb, vb = k1.to(torch.bfloat16).float(), v1.to(torch.bfloat16).float()
            rust.append(kb.numpy(), vb.numpy())
            rust.add_scores(t + i, np.ones((b, hk, 1), np.float32), np.ones((b, hk, 1), np.float32))
            rust.maybe_classify()
    pos = t + args.decode
    k1 = torch.randn(b, hk, 1, d, generator=gen).to(dev, torch.bfloat16)
    tri.append(k1, k1)
    q = torch.randn(b, hq, 1, d, generator=gen).to(dev, torch.bfloat16)
    plain = timed(lambda: tri.attend(q, [pos], scale, False), dev)
    tracked = timed(lambda: tri.attend(q, [pos], scale, True), dev)
    m = tri.memory()
    tiers = m["tiers"]
    index = sum(x["key_index"] + x["value_index"] for x in tiers.values())
    rows = {n: tri._tiers[n].fill for n in ("high", "low")}
    iters = {n: tri._tiers[n].view().fill_pages(64) for n in ("high", "low")}
    out: dict[str, Any] = {
        "preset": preset,
        "B": b,
        "T": t,
        "bytes": m["bytes"],
        "fp16": m["fp16_bytes"],
        "index": index,
        "rows": rows,
        "iters": iters,
        "ms": plain,
        "ms_track": tracked,
    }
    if rust is not None:
        rust.append(k1.float().cpu().numpy(), k1.float().cpu().numpy())
        rm = rust.memory()
        out["rust_bytes"] = rm["bytes"]
        out["rust_index"] = sum(x["key_index"] + x["value_index"] for x in rm["tiers"].values())
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--presets", nargs="+", default=["zipcache", "kvmix-5x"])
    ap.add_argument("--batches", type=int, nargs="+", default=[8])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--decode", type=int, default=200, help="decoded steps (2 classifications)")
    ap.add_argument("--gap", type=int, default=0, help="streaming_gap (0: the preset's)")
    ap.add_argument("--rust", action="store_true", help="also fill a Rust store (bytes)")
    ap.add_argument("--tiny", action="store_true", help="a CPU-sized shape (interpreter)")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    if args.tiny:
        args.kv_heads, args.q_heads, args.head_dim = 2, 8, 32
        args.batches, args.contexts, args.decode, args.gap = [1], [300], 9, 4
        args.rust = True
    print(
        f"device {args.device}: kv {args.kv_heads} x q {args.q_heads} heads, head_dim "
        f"{args.head_dim}, bf16; {args.decode} decoded steps"
    )
    head = (
        f"{'preset':9} {'B':>2} {'T':>6} {'triton B':>12} {'x fp16':>6} {'rust B':>12} "
        f"{'x fp16':>6} {'idx tri/rust':>13} {'high rows/it':>13} {'low rows/it':>13} "
        f"{'attend ms':>9} {'+track':>7}"
    )
    print(head)
    print("-" * len(head))
    for preset in args.presets:
        for b in args.batches:
            for t in args.contexts:
                r = run_case(preset, b, t, args)
                rb = r.get("rust_bytes")
                rust = f"{rb:>12,} {r['fp16'] / rb:>6.3f}" if rb else f"{'-':>12} {'-':>6}"
                idx = f"{r['index']}/{r.get('rust_index', '-')}"
                hi = f"{r['rows']['high']}/{r['iters']['high']}"
                lo = f"{r['rows']['low']}/{r['iters']['low']}"
                print(
                    f"{preset:9} {b:>2} {t:>6} {r['bytes']:>12,} {r['fp16'] / r['bytes']:>6.3f} "
                    f"{rust} {idx:>13} {hi:>13} {lo:>13} {r['ms']:>9.3f} {r['ms_track']:>7.3f}",
                    flush=True,
                )
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
