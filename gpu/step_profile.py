"""Where a decoding step's time goes, at two context lengths, on the 8B-shaped model.

Session 32 (H100, `kvmix.bench gpu` at B=1 x 32k): ZipCache's step took 51.6 ms against
26.7 ms at B=1 x 8k (session 30), DynamicCache's 53.1 against 51.0, quanto int4's 34.2
against 26.7. A step at B=1 is host bound (~5 ms of weights to read), so something the host
does per step grows with the context. Per method and context: the prefill, a few warm-up
steps, then ``--steps`` steps under the profiler (CPU and CUDA): each step's synchronized wall
time, the GPU's busy time (kernel durations summed), the CPU ops with the most self time per
step, and the kernels with the most GPU time per step; then the same steps under cProfile
(the host's Python: what no torch op records, Triton launches included), by own time.

    python3 -u gpu/step_profile.py [--contexts 8192 32768] [--methods full zipcache] [--tiny]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import kvmix
from kvmix.bench.gpu import METHODS, _enable, _model, llama_8b_config


def one(model: Any, method: str, batch: int, context: int, steps: int, top: int) -> None:
    dev = next(model.parameters()).device
    _enable(model, METHODS[method][0])
    gen = torch.Generator().manual_seed(context)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        cache = METHODS[method][1](model.config)
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = ids[:, -1:]

        def step() -> None:
            nonlocal token
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)

        for _ in range(4):
            step()
        sync()
        walls = []
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                walls.append(1e3 * (time.perf_counter() - t0))
    kernels: dict[str, float] = {}
    cpu: dict[str, float] = {}
    calls: dict[str, int] = {}
    for ev in prof.key_averages():
        # Kernels only: a CPU op's device time is its kernels' again (session 32's call 3
        # summed both, up to twice the GPU's busy time).
        if ev.device_type.name == "CUDA":
            kernels[ev.key] = kernels.get(ev.key, 0.0) + ev.self_device_time_total
        if ev.self_cpu_time_total > 0:
            cpu[ev.key] = ev.self_cpu_time_total
            calls[ev.key] = ev.count
    gpu_ms = sum(kernels.values()) / 1e3 / steps
    print(
        f"## {method} B={batch} T={context}: step {statistics.median(walls):.2f} ms "
        f"(each: {' '.join(f'{w:.1f}' for w in walls)}), GPU busy {gpu_ms:.2f} ms a step",
        flush=True,
    )
    print("  CPU self time a step (ms, calls a step): " + ", ".join(
        f"{k[:40]} {v / 1e3 / steps:.2f} ({calls[k] // steps})"
        for k, v in sorted(cpu.items(), key=lambda x: -x[1])[:top]
    ))  # fmt: skip
    if kernels:
        print("  GPU time a step (ms): " + ", ".join(
            f"{k[:40]} {v / 1e3 / steps:.2f}"
            for k, v in sorted(kernels.items(), key=lambda x: -x[1])[:top]
        ))  # fmt: skip
    prof_py = cProfile.Profile()
    with torch.inference_mode():
        prof_py.enable()
        for _ in range(steps):
            step()
        sync()
        prof_py.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof_py, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    lines = [x for x in text.getvalue().splitlines() if x.strip()]
    start = next(i for i, x in enumerate(lines) if x.lstrip().startswith("ncalls"))
    print("  host Python under cProfile, all steps (own time first):")
    for x in lines[start - 1 : start + 1 + top]:
        print("   ", x[:150])
    # kvmix's own functions by cumulative time: what a step's cache work costs the host.
    text = io.StringIO()
    pstats.Stats(prof_py, stream=text).sort_stats("cumulative").print_stats(r"kvmix/", top)
    lines = [x for x in text.getvalue().splitlines() if x.strip()]
    start = next((i for i, x in enumerate(lines) if x.lstrip().startswith("ncalls")), None)
    if start is not None:  # (a cache of transformers' calls none)
        print("  kvmix's functions under cProfile, all steps (cumulative time first):")
        for x in lines[start : start + 1 + top]:
            print("   ", x[:150])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--methods", nargs="+", default=["full", "zipcache"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--tiny", action="store_true", help="a tiny fp32 model on the CPU")
    args = p.parse_args()
    dev = torch.device("cpu" if args.tiny else "cuda")
    model = _model(llama_8b_config(args.tiny), dev, torch.float32 if args.tiny else torch.bfloat16)
    print(kvmix.__file__, torch.__version__, dev, flush=True)
    for context in args.contexts:
        for method in args.methods:
            one(model, method, args.batch, context, args.steps, args.top)
            if dev.type == "cuda":  # the cache went with one()'s frame
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
