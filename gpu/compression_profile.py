"""Where one layer's prefill scoring and compression spend their device time, on one layer of
Llama-3.1-8B's shape, ``--batch`` x ``--context`` random bf16 keys/values, the Triton engine:

1. compression alone: ``maybe_classify`` of a store whose buffer holds the prompt with its
   scores (the classification that quantizes the prompt into the tiers: the torch glue
   around the quantize kernels and the kernels), synchronized, the median of ``--reps``
   after a warm-up, and the device memory it allocates beyond the filled store (its peak);
   With ``--kernel-table``, the last run is also profiled and its kernels tabled (where the
   classification's device time goes); ``--variant NAME=PRESET:key=value,...`` (repeatable,
   :func:`kvmix.eval.methods.parse_variant`) adds a preset with options overridden, e.g. the
   range search off: ``'mm=kvmix-5x:key_clip="minmax",value_clip="minmax"'``;
2. unless ``--skip-profile``, the torch profiler's kernel table for
   ``kvmix.attention._score_prefill`` (probe scoring, then the classification). Run twice
   (the first compiles); the second is profiled, with the rows' LSE from the flash forward
   (``_flash_attention_with_lse``) as the unpadded prefill passes it and, for comparison,
   without.

The first line names the kvmix it imported: to compare two versions of the engine, run the
script once per tree (``PYTHONPATH=<tree>/python``).

    python3 gpu/compression_profile.py                     # one H200: B=8 x 32k
    python3 gpu/compression_profile.py --skip-profile      # compression alone
    python3 gpu/compression_profile.py --device cpu --batch 1 --context 64 --tiny --reps 1
                                                           # smoke test (interpreter)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaForCausalLM

import kvmix
from kvmix import attention as kattn
from kvmix.bench.gpu import METHODS, llama_8b_config
from kvmix.eval.methods import parse_variant


def _config(args: argparse.Namespace) -> Any:
    """One layer of Llama-3.1-8B's shape, the config switched to kvmix's attention."""
    cfg = llama_8b_config(args.tiny)
    cfg.num_hidden_layers = 1
    with torch.device("meta"):  # no weights
        kvmix.enable_fused_attention(LlamaForCausalLM(cfg))
    return cfg


def _one(method: str, args: argparse.Namespace, lse: bool, table: bool) -> float:
    device = torch.device(args.device)
    cfg = _config(args)
    b, t = args.batch, args.context
    hk, hq, d = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim
    dtype = torch.float32 if args.tiny else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    k = torch.randn((b, hk, t, d), device=device, dtype=dtype, generator=g)
    v = torch.randn((b, hk, t, d), device=device, dtype=dtype, generator=g)
    q = torch.randn((b, hq, t, d), device=device, dtype=dtype, generator=g)
    cache = METHODS[method][1](cfg)
    with torch.inference_mode():
        cache.update(k, v, 0)
        layer = cache.kvmix_layers[0]
        row_lse = None
        if lse:
            flash = kattn._flash_attention_with_lse(q, k, v, d**-0.5)
            assert flash is not None, "no flash forward for these tensors"
            row_lse = flash[1]
        if device.type == "cuda":
            torch.cuda.synchronize()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            kattn._score_prefill(layer, q, k, None, d**-0.5, row_lse=row_lse)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
    if table:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows), flush=True)
    return seconds


#: (chunk, channel block, tile rows) of the channel kernels tried by ``--channel-sweep``.
CHANNEL_LAUNCHES = [
    (128, 16, 32),
    (256, 16, 32),
    (1024, 16, 32),
    (2048, 16, 32),
    (512, 32, 32),
    (512, 16, 64),
    (1024, 32, 16),
    (512, 8, 64),
]


def _make(method: str, cfg: Any, args: argparse.Namespace) -> Any:
    """A Triton-engine cache of preset ``method`` or of one of ``--variant``'s."""
    for spec in args.variant:
        preset = parse_variant(spec)
        if preset.name == method:
            return preset.make_cache(cfg, engine="triton")
    return kvmix.make_cache(method, cfg, engine="triton")


def _compression(method: str, args: argparse.Namespace) -> None:
    """Compression alone (1. above): a fresh Triton-engine cache per run, filled with the
    prompt and random scores, then its classification timed."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = _config(args)
    b, t = args.batch, args.context
    hk, d = cfg.num_key_value_heads, cfg.head_dim
    dtype = torch.float32 if args.tiny else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    k = torch.randn((b, hk, t, d), device=device, dtype=dtype, generator=g)
    v = torch.randn((b, hk, t, d), device=device, dtype=dtype, generator=g)
    acc = torch.rand((b, hk, t), device=device, generator=g)
    times: list[float] = []
    peaks: list[int] = []
    for rep in range(args.reps + 1 + args.kernel_table):  # the first compiles; then timed
        cache = _make(method, cfg, args)
        with torch.inference_mode():
            cache.update(k, v, 0)
            store = cache.kvmix_layers[0].store
            store.set_first_valid([0] * b)
            store.add_scores(0, acc, torch.ones_like(acc))
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = torch.cuda.memory_allocated()
            table = args.kernel_table and rep == args.reps + 1  # after the timed runs
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) if table else contextlib.nullcontext() as prof:
                t0 = time.perf_counter()
                store.maybe_classify(True)
                if cuda:
                    torch.cuda.synchronize()
            if table:
                sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
                print(prof.key_averages().table(sort_by=sort, row_limit=args.rows), flush=True)
            elif rep:
                times.append(time.perf_counter() - t0)
                if cuda:
                    peaks.append(torch.cuda.max_memory_allocated() - start)
        del cache, store
    peak = f", peak device memory +{max(peaks) / 2**30:.2f} GiB" if peaks else ""
    print(
        f"   {method}: compression alone {1e3 * statistics.median(times):.2f} ms (median of "
        f"{len(times)}, min {1e3 * min(times):.2f}){peak}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--methods", nargs="+", default=["zipcache", "kvmix-5x"])
    p.add_argument("--rows", type=int, default=14, help="profiler table rows")
    p.add_argument("--tiny", action="store_true", help="toy head shapes (CPU smoke test)")
    p.add_argument("--reps", type=int, default=5, help="timed runs of compression alone")
    p.add_argument(
        "--variant", action="append", default=[], help="NAME=PRESET:key=value,... (repeatable)"
    )
    p.add_argument(
        "--kernel-table", action="store_true", help="profile compression alone's last run"
    )
    p.add_argument(
        "--search",
        choices=["fp32", "float64", "fp32-unchecked"],
        default="fp32",
        help="how the range searches decide (kvmix.engines.triton_store.SEARCH)",
    )
    p.add_argument("--skip-profile", action="store_true", help="compression alone only")
    p.add_argument(
        "--channel-sweep",
        action="store_true",
        help="compression alone for several launches of the channel kernels (chunk, block, tile)",
    )
    args = p.parse_args()
    print(
        f"# {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'} "
        f"torch {torch.__version__}, B={args.batch} T={args.context}, one layer; kvmix from "
        f"{kvmix.__file__}",
        flush=True,
    )
    from kvmix.engines import triton_store

    if hasattr(triton_store, "SEARCH"):  # a tree before session 17 has no such switch
        triton_store.SEARCH = args.search
    print(
        f"## compression alone (maybe_classify of the filled store, synchronized), range "
        f"search {getattr(triton_store, 'SEARCH', 'float64')}",
        flush=True,
    )
    for method in args.methods + [spec.partition("=")[0] for spec in args.variant]:
        _compression(method, args)
    if args.channel_sweep:
        default = (
            triton_store.CHANNEL_CHUNK,
            triton_store.CHANNEL_BLOCK,
            triton_store.CHANNEL_TILE,
        )
        for launch in CHANNEL_LAUNCHES:
            print(f"## channel kernels: chunk {launch[0]}, block {launch[1]}, tile {launch[2]}")
            triton_store.CHANNEL_CHUNK, triton_store.CHANNEL_BLOCK, triton_store.CHANNEL_TILE = (
                launch
            )
            for method in args.methods:
                _compression(method, args)
        triton_store.CHANNEL_CHUNK, triton_store.CHANNEL_BLOCK, triton_store.CHANNEL_TILE = default
    if args.skip_profile:
        return
    for method in args.methods:
        _one(method, args, True, False)  # compile
        for lse in (True, False):
            print(f"## {method}, rows' LSE from the flash forward: {lse}", flush=True)
            s = _one(method, args, lse, True)
            print(
                f"   {method} lse={lse}: scoring + compression {1e3 * s:.1f} ms (profiled)",
                flush=True,
            )


if __name__ == "__main__":
    main()
