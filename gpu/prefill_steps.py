"""Where one layer's prefill phases spend their time, step by step, as the phase timers see it:
each step below is wrapped so that it waits for the device before and after (as
``gpu/prefill_profile.py``'s synchronized timers do), and its wall time is the host work plus
the device work it queued, nothing overlapped.

One layer of Llama-3.1-8B's shape, ``--batch`` x ``--context`` random bf16 queries, keys and
values in the model's layout (``(B, T, H, D)`` transposed, as the attention receives them), the
Triton engine; the rows' LSE from the flash forward, as an unpadded prefill passes it. Steps:
the cache's ``update`` (the prompt into the store: the compression phase's first part), then
``_score_prefill``'s parts (probe rows, counts, the column kernel, ``add_scores``) and the
classification (``maybe_classify``: the compression phase's second part). Median of
``--reps`` after one warm-up.

    python3 -u gpu/prefill_steps.py                 # one H200: B=8 x 32k
    TRITON_INTERPRET=1 python3 gpu/prefill_steps.py --device cpu --batch 1 --context 64 --tiny
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from transformers import LlamaForCausalLM

import kvmix
from kvmix import attention as kattn
from kvmix.bench.gpu import llama_8b_config
from kvmix.engines import triton_store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--methods", nargs="+", default=["zipcache", "kvmix-5x"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tiny", action="store_true")
    p.add_argument(
        "--cprofile",
        type=int,
        default=0,
        help="then one more prefill per method, unwrapped, under cProfile: its top N functions",
    )
    p.add_argument(
        "--kernel-table",
        type=int,
        default=0,
        help="then one more prefill per method, unwrapped, under torch's profiler: its top N "
        "operators by device time",
    )
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    spent: dict[str, list[float]] = defaultdict(list)
    current: dict[str, float] = defaultdict(float)

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            current[name] += time.perf_counter() - t0
            return out

        return wrapper

    # The steps, wrapped where the prefill calls them (the originals kept for --cprofile).
    store_cls = triton_store.TritonLayerStore
    steps = [
        (kattn, "_scoring_plan", "probe rows and counts (host)"),
        (kattn, "_received", "column sums (kernel + setup)"),
        (store_cls, "add_scores", "add_scores"),
        (store_cls, "set_first_valid", "set_first_valid"),
        (store_cls, "maybe_classify", "classification"),
        (store_cls, "append", "append (prompt into the buffer)"),
    ]
    originals = {(owner, name): getattr(owner, name) for owner, name, _ in steps}
    for owner, name, label in steps:
        setattr(owner, name, timed(label, getattr(owner, name)))

    cfg = llama_8b_config(args.tiny)
    cfg.num_hidden_layers = 1
    with torch.device("meta"):
        kvmix.enable_fused_attention(LlamaForCausalLM(cfg))
    b, t = args.batch, args.context
    hk, hq, d = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim
    dtype = torch.float32 if args.tiny else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)

    def model_layout(h: int) -> torch.Tensor:
        x = torch.randn((b, t, h, d), device=device, dtype=dtype, generator=g)
        return x.transpose(1, 2)

    q, k, v = model_layout(hq), model_layout(hk), model_layout(hk)
    flash = kattn._flash_attention_with_lse(q, k, v, d**-0.5) if cuda else None
    row_lse = None if flash is None else flash[1]
    print(
        f"# {torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}, "
        f"B={b} T={t}, one layer, rows' LSE from the flash forward: {row_lse is not None}"
    )
    for method in args.methods:
        spent.clear()
        walls = []
        for rep in range(args.reps + 1):
            current.clear()
            cache = kvmix.make_cache(method, cfg, engine="triton")
            layer = cache.kvmix_layers[0]
            with torch.inference_mode():
                sync()
                t0 = time.perf_counter()
                cache.update(k, v, 0)
                kattn._score_prefill(layer, q, k, None, d**-0.5, row_lse=row_lse)
                sync()
                wall = time.perf_counter() - t0
            del cache, layer
            if rep:  # the first compiles
                walls.append(wall)
                for name, sec in current.items():
                    spent[name].append(sec)
        total = statistics.median(walls)
        print(f"## {method}: update + _score_prefill {1e3 * total:.2f} ms (median of {args.reps})")
        listed = 0.0
        for name, secs in spent.items():
            ms = 1e3 * statistics.median(secs)
            listed += ms
            print(f"   {name:34s} {ms:8.2f} ms")
        print(f"   {'(the rest: host glue)':34s} {1e3 * total - listed:8.2f} ms", flush=True)
    if args.cprofile:
        for method in args.methods:

            def prefill(method: str = method) -> None:
                cache = kvmix.make_cache(method, cfg, engine="triton")
                with torch.inference_mode():
                    cache.update(k, v, 0)
                    kattn._score_prefill(
                        cache.kvmix_layers[0], q, k, None, d**-0.5, row_lse=row_lse
                    )
                    sync()

            print(f"## {method}: host profile of one prefill (cProfile, by own time)", flush=True)
            host_profile(originals, prefill, args.cprofile)
    if args.kernel_table and cuda:
        from torch.profiler import ProfilerActivity, profile

        for (owner, name), fn in originals.items():
            setattr(owner, name, fn)
        for method in args.methods:
            cache = kvmix.make_cache(method, cfg, engine="triton")
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                cache.update(k, v, 0)
                kattn._score_prefill(cache.kvmix_layers[0], q, k, None, d**-0.5, row_lse=row_lse)
                sync()
            del cache
            events = prof.key_averages()
            device_us = sum(e.self_device_time_total for e in events)
            print(f"## {method}: device time of one prefill {device_us / 1e3:.2f} ms, by operator")
            for e in sorted(events, key=lambda e: -e.self_device_time_total)[: args.kernel_table]:
                print(f"   {e.self_device_time_total / 1e3:8.3f} ms {e.count:5d}x  {e.key[:70]}")


def host_profile(originals: dict[tuple[Any, str], Any], run: Callable[[], None], top: int) -> None:
    """One more ``run()`` with the steps unwrapped (no synchronization but the prefill's own)
    under cProfile: where the host's time goes, waits for the device included (a function
    that synchronizes shows the device's queued work as its own time)."""
    import cProfile
    import pstats

    for (owner, name), fn in originals.items():
        setattr(owner, name, fn)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):  # one prefill is ~5 ms: five give each line a readable total
        run()
    prof.disable()
    # pstats prints seconds to 3 decimals, which reads 0.000 for nearly every line here.
    pstats.f8 = lambda x: f"{x * 1e6:8.1f}"  # type: ignore[attr-defined]
    print("(cProfile over 5 prefills; times in microseconds: tottime and cumtime over all 5)")
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats("kvmix", top)  # kvmix's own functions


if __name__ == "__main__":
    main()
