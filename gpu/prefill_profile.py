"""Prefill time of kvmix's caches against DynamicCache, with the prefill scoring on the Triton
kernels (``kvmix.engines.triton_scoring``) and on the torch code they replace (issue 15's
target: scoring + compression <= 10% of DynamicCache's prefill at 32k).

1. End to end: Llama-3.1-8B's shape with random bf16 weights (``--layers`` of its 32 layers),
   ``--batch`` x ``--context`` random tokens, one forward pass into an empty cache (logits of
   the last position only), synchronized, the median of ``--repeats`` after a warm-up (the
   torch path: ``--torch-repeats``, no warm-up of its own). kvmix caches run fused on the
   Triton engine, once per scoring path (``KVMIX_PREFILL_SCORING``: ``triton``, ``torch``);
   one more prefill, with every phase timer synchronized, gives
   ``cache.prefill_timings()``'s split (attention kvmix computes itself, scoring,
   compression) and the share of scoring + compression in DynamicCache's prefill.
2. The kernels alone against the torch path on the model's head shapes: ZipCache's probe rows
   and every row (MiKV), time and largest difference of the column sums. ``--sweep`` also
   times other GPU tiles (``triton_scoring.GPU_BLOCKS``).

    python3 gpu/prefill_profile.py                      # one H200: B=8 x 32k, 8 layers
    python3 gpu/prefill_profile.py --skip-e2e --sweep   # the kernels' tiles
    python3 gpu/prefill_profile.py --device cpu --tiny --batch 2 --context 40 --layers 2
                                                        # smoke test (Triton's interpreter)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

import kvmix
from kvmix import _kvmix
from kvmix import attention as kattn
from kvmix import cache as kcache
from kvmix.bench.gpu import _model, llama_8b_config
from kvmix.engines import load_scoring

KVMIX_METHODS = ("zipcache", "kvmix-5x", "mikv")
#: Also accepted by --methods: kvmix-5x without its range search (what the search costs).
EXTRA_METHODS = ("kvmix-5x-minmax",)
ENV = kattn.SCORING_KERNEL_ENV


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warm: bool = True) -> float:
    """Median seconds of ``fn()`` over ``repeats`` synchronized calls (after one warm-up)."""
    if warm:
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextmanager
def scoring(path: str) -> Iterator[None]:
    old = os.environ.get(ENV)
    os.environ[ENV] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


@contextmanager
def synchronized_phase_timers(device: torch.device) -> Iterator[None]:
    """The caches' phase timers (``time.perf_counter`` in kvmix.attention and kvmix.cache)
    wait for the device first, so each phase's seconds are its device time."""

    def perf_counter() -> float:
        sync(device)
        return time.perf_counter()

    shim = types.SimpleNamespace(perf_counter=perf_counter)
    saved = kattn.time, kcache.time
    kattn.time = kcache.time = shim  # type: ignore[assignment]
    try:
        yield
    finally:
        kattn.time, kcache.time = saved


def make_cache(method: str, config: Any, engine: str) -> Any:
    if method == "full":  # transformers' DynamicCache, as `python -m kvmix.bench gpu` runs it
        return kvmix.make_cache(method, config)
    return kvmix.make_cache(method, config, engine=engine)


def prefill_once(model: Any, ids: torch.Tensor, cache: Any) -> None:
    with torch.inference_mode():
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)


def end_to_end(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    config = llama_8b_config(args.tiny)
    config.num_hidden_layers = min(args.layers, config.num_hidden_layers)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = _model(config, device, dtype)
    engine = "triton"  # on CPU tensors: the interpreter (a smoke test of the same code)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.context), generator=gen)
    ids = ids.to(device)
    rows: list[dict[str, Any]] = []
    runs = [("full", "-")] + [
        (m, s) for m in args.methods if m != "full" for s in args.scoring
    ]  # fmt: skip
    if "full" not in args.methods:
        runs = runs[1:]
    for method, path in runs:
        if method == "full":
            model.set_attn_implementation("sdpa")
        else:
            kvmix.enable_fused_attention(model)
        with scoring(path if path != "-" else "torch"):
            try:
                # A warm-up prefill of the same shape compiles the kernels; the torch path
                # runs after the Triton path of the same method (the store's kernels are
                # compiled) and costs minutes at 32k for MiKV: no warm-up, --torch-repeats.
                torch_path = path == "torch"
                sec = timed(
                    lambda m=method: prefill_once(model, ids, make_cache(m, config, engine)),
                    device,
                    args.torch_repeats if torch_path else args.repeats,
                    warm=not torch_path or "triton" not in args.scoring,
                )
                phases: dict[str, float] = {}
                if method != "full":
                    cache = make_cache(method, config, engine)
                    with synchronized_phase_timers(device):
                        prefill_once(model, ids, cache)
                    phases = cache.prefill_timings()
                    del cache
            except torch.cuda.OutOfMemoryError:
                sec, phases = float("nan"), {"oom": 1.0}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append({"method": method, "path": path, "prefill_s": sec, **phases})
        print(f"  {method:9s} {path:6s} prefill {sec:8.3f} s  {phases}", flush=True)
    # Which fused SDPA op gave the prompt's attention and its rows' LSE (None: not tried).
    print(f"  fused LSE ops: GQA native {kattn._FUSED_GQA}, LSE checked {kattn._FUSED_LSE_OK}")
    return rows


def kernel_alone(args: argparse.Namespace, device: torch.device) -> list[str]:
    """The kernels against the torch path on random queries/keys of the model's head shape."""
    cfg = llama_8b_config(args.tiny)
    b, t = args.batch, args.kernel_context or args.context
    hq, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dtype = torch.float32 if args.tiny else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(1)
    # The model's layout: (B, T, H, D) viewed as (B, H, T, D).
    q = torch.randn(b, t, hq, d, device=device, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(b, t, hk, d, device=device, generator=g).to(dtype).transpose(1, 2)
    scale = d**-0.5
    scoring_mod = load_scoring(device)
    probes = [int(x) for x in _kvmix.probe_positions(t, 0.05, 0.05, 0)]
    sets = {"probes": probes, "every row": list(range(t))}
    lines = []
    fv = [0] * b
    for name, rows in sets.items():
        if name == "every row" and args.skip_every_row:
            continue
        with scoring("triton"):
            got = kattn._probabilities(q, k, rows, fv, scale)
            tk = timed(lambda r=rows: kattn._probabilities(q, k, r, fv, scale), device, 3)
        with scoring("torch"):
            want = kattn._probabilities(q, k, rows, fv, scale)
            tt = timed(lambda r=rows: kattn._probabilities(q, k, r, fv, scale), device, 1)
        err = float((got - want).abs().max() / want.abs().max())
        lines.append(
            f"  {name:9s} ({len(rows):6d} rows): kernel {1e3 * tk:9.2f} ms, torch "
            f"{1e3 * tt:9.2f} ms ({tt / tk:5.1f}x), max |diff| / max {err:.1e}"
        )
        print(lines[-1], flush=True)
        if args.sweep:
            # One kernel's tile at a time, the other's at its default: the difference in the
            # total is the swept kernel's.
            default = dict(scoring_mod.GPU_BLOCKS)
            plain = [
                (64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 2),
                (32, 128, 4, 3), (32, 64, 4, 3), (64, 32, 4, 4), (128, 32, 4, 3),
            ]  # fmt: skip
            # The stacked kernel's BLOCK_M is rows per head (the tile has rep x that); a fifth
            # entry 1 sums the tiles elementwise and reduces over rows once (ACC2D).
            stacked = [
                (32, 128, 4, 3), (32, 128, 8, 3), (32, 128, 8, 2), (16, 128, 4, 3),
                (32, 64, 4, 3), (16, 64, 4, 3), (32, 128, 8, 3, 1), (32, 128, 8, 2, 1),
                (32, 64, 4, 3, 1), (16, 128, 4, 3, 1), (16, 64, 4, 3, 1), (32, 64, 8, 3, 1),
                (16, 128, 4, 2, 1), (16, 128, 4, 4, 1), (16, 128, 8, 3, 1), (16, 256, 8, 3, 1),
                (16, 256, 8, 2, 1), (32, 128, 4, 3, 1),
            ]  # fmt: skip
            for which in args.sweep_kernels:
                for tile in stacked if which == "received_stacked" else plain:
                    # The per-head kernel runs when no stacked tile is given.
                    base = {n: x for n, x in default.items() if n != "received_stacked"}
                    tiles = {**(base if which == "received" else default), which: tile}
                    try:
                        out = scoring_mod.received_attention(q, k, rows, fv, scale, blocks=tiles)
                        diff = float((out - want).abs().max() / want.abs().max())
                        ts = timed(
                            lambda r=rows, tl=tiles: scoring_mod.received_attention(
                                q, k, r, fv, scale, blocks=tl
                            ),
                            device,
                            3,
                        )
                        msg = f"{1e3 * ts:9.2f} ms, max |diff| / max {diff:.1e}"
                    except Exception as e:  # report, and go on with the next tile
                        msg = f"failed: {type(e).__name__}: {str(e)[:80]}"
                    fitted = {
                        key[0]: ran for key, ran in scoring_mod._FITTED.items() if key[3] == tile
                    }
                    lines.append(
                        f"    {which:8s} tile (BM, BN, warps, stages) = {tile}: {msg}"
                        + (f" (ran as {fitted[which]})" if fitted.get(which, tile) != tile else "")
                    )
                    print(lines[-1], flush=True)
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--layers", type=int, default=8, help="of the 32 (prefill scales with it)")
    p.add_argument("--repeats", type=int, default=2, help="timed prefills per run (median)")
    p.add_argument("--torch-repeats", type=int, default=1, help="the same, torch scoring")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["full", *KVMIX_METHODS],
        choices=["full", *KVMIX_METHODS, *EXTRA_METHODS],
    )
    p.add_argument("--scoring", nargs="+", default=["triton", "torch"], choices=["triton", "torch"])
    p.add_argument("--kernel-context", type=int, help="tokens for part 2 (default --context)")
    p.add_argument("--skip-every-row", action="store_true", help="part 2: probes only")
    p.add_argument("--skip-e2e", action="store_true", help="part 2 only")
    p.add_argument("--sweep", action="store_true", help="part 2: time other GPU tiles")
    p.add_argument(
        "--sweep-kernels",
        nargs="+",
        default=["lse", "received", "received_stacked"],
        choices=["lse", "received", "received_stacked"],
        help="the kernels --sweep times",
    )
    p.add_argument("--tiny", action="store_true", help="2-layer toy model (CPU smoke test)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        info = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    else:
        info = f"cpu (Triton interpreter), torch {torch.__version__}"
    import triton

    print(f"# {info}, triton {triton.__version__}, kvmix {kvmix.__file__}")
    print(f"# B={args.batch} T={args.context} layers={args.layers} repeats={args.repeats}")
    rows: list[dict[str, Any]] = []
    if not args.skip_e2e:
        print("## end to end (seconds per prefill; phases synchronized, from prefill_timings)")
        rows = end_to_end(args, device)
    print("## kernels alone (column sums of every kv-head, one layer)")
    kernel_lines = kernel_alone(args, device)
    if rows:
        full = next((r["prefill_s"] for r in rows if r["method"] == "full"), float("nan"))
        print()
        print(
            f"{'method':10s} {'scoring':7s} {'prefill s':>9s} {'vs full':>7s} "
            f"{'attn s':>7s} {'score s':>7s} {'compr s':>7s} {'(sc+co)/full':>12s} "
            f"{'(prefill-full)/full':>19s}"
        )
        for r in rows:
            sc, co, at = r.get("scoring", 0.0), r.get("compression", 0.0), r.get("attention", 0.0)
            if r["method"] == "full":
                sc = co = at = float("nan")
            print(
                f"{r['method']:10s} {r['path']:7s} {r['prefill_s']:9.3f} "
                f"{r['prefill_s'] / full:7.2f} {at:7.3f} {sc:7.3f} {co:7.3f} "
                f"{(sc + co) / full:12.1%} {(r['prefill_s'] - full) / full:19.1%}"
            )
    print("kernels alone:")
    print("\n".join(kernel_lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
