"""Where a prefill makes the host wait for the GPU, and the GPU wait for the host.

1. Each synchronizing call (``.item()``, ``bool(t)``, ``.tolist()``, a device-to-host copy)
   that torch's sync debug mode reports during one prefill of Llama-3.1-8B's shape (random
   bf16 weights, ``--layers`` layers) into each method's cache, with the kvmix / transformers
   frames that made it, counted per place.
2. The GPU's idle time in one more prefill (torch profiler, CPU and CUDA): every gap of at
   least ``--gap-us`` between one device operation's end and the next one's start, charged to
   the code that launched the next one (its innermost kvmix frames and torch op), summed per
   place: host work the GPU waited for; and the device time by kernel.

With ``--decode STEPS`` the same for decoding steps (one token per sequence each) after one
prefill, per step: a step is host bound where the GPU is busy for well under its wall time.

A synchronizing read costs more than its own time in a prefill: the host, which otherwise runs
ahead of the GPU, waits there until every queued kernel has run, then pays its own host work
with the GPU idle. The prefill's overhead over DynamicCache end to end (``prefill_profile.py``)
is the device time of kvmix's kernels plus such waits.

    python3 gpu/sync_points.py --batch 1 --context 32768 --layers 2
    python3 gpu/sync_points.py --batch 8 --context 32768 --layers 4 --decode 4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from prefill_profile import make_cache, prefill_once  # this folder's (DynamicCache for "full")

import kvmix
from kvmix.bench.gpu import _model, llama_8b_config


def frames() -> str:
    """The innermost kvmix / transformers frames of the current stack."""
    keep = [
        f
        for f in traceback.extract_stack()
        if ("kvmix" in f.filename or "transformers" in f.filename)
        and "sync_points" not in f.filename
    ]
    return " < ".join(
        f"{f.filename.rsplit('/', 1)[-1]}:{f.name}:{f.lineno}" for f in keep[-4:][::-1]
    )


def idle_gaps(
    trace: dict[str, Any], gap_us: float
) -> tuple[float, float, dict[str, float], Counter[str]]:
    """From a chrome trace of the torch profiler: the device's busy and idle microseconds
    between its first and last operation, and the idle time (gaps >= ``gap_us``) and gap
    count per place that launched the operation after the gap."""
    events = trace["traceEvents"]
    device = sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
        key=lambda e: e["ts"],
    )
    launch_at = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        # Runtime launches (torch's kernels) and driver launches (Triton's).
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    host = [
        e for e in events if e.get("cat") in ("python_function", "cpu_op") and "dur" in e
    ]  # fmt: skip
    busy, idle = 0.0, 0.0
    where_us: dict[str, float] = {}
    where_n: Counter[str] = Counter()
    end = None
    for e in device:
        start = float(e["ts"])
        if end is not None and start - end >= gap_us:
            idle += start - end
            at = launch_at.get(e.get("args", {}).get("correlation"))
            place = "(launch not found)" if at is None else describe(host, at)
            where_us[place] = where_us.get(place, 0.0) + start - end
            where_n[place] += 1
        busy += float(e["dur"])
        end = max(end or 0.0, start + float(e["dur"]))
    return busy, idle, where_us, where_n


def describe(host: list[dict[str, Any]], at: float) -> str:
    """The innermost kvmix frames (and torch op) running on the host at time ``at``."""
    around = [e for e in host if e["ts"] <= at <= e["ts"] + e["dur"]]
    around.sort(key=lambda e: e["ts"])  # outermost first
    op = next((e["name"] for e in reversed(around) if e.get("cat") == "cpu_op"), "")
    frames = [
        e["name"].split("kvmix/", 1)[-1]
        for e in around
        if e.get("cat") == "python_function" and "kvmix/" in e["name"]
    ]
    return " < ".join(frames[-3:][::-1]) + (f" [{op}]" if op else "")


def by_kernel(trace: dict[str, Any]) -> Counter[str]:
    """Device microseconds per kernel name (memcpy / memset included) in a chrome trace."""
    total: Counter[str] = Counter()
    for e in trace["traceEvents"]:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            total[e["name"][:70]] += float(e["dur"])
    return total


def report(label: str, work: Callable[[], None], per: int, args: argparse.Namespace) -> None:
    """The synchronizing calls of one ``work()`` and the GPU's idle gaps in a profiled one
    (without, then with Python stacks), ``per`` units (prefills or steps) per call."""
    seen: Counter[str] = Counter()

    def record(*_: object, **__: object) -> None:
        seen[frames()] += 1

    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    print(f"## {label}: {sum(seen.values())} synchronizing calls")
    for where, n in seen.most_common():
        print(f"  {n:4d}x  {where}")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    work()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / per
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    # Without Python stacks first (the idle total as it is), then with them (which slows
    # the host, so its gaps grow, but says which code launched what came after a gap).
    for stacks in (False, True):
        with profile(activities=acts, with_stack=stacks) as prof:
            work()
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                trace = json.load(f)
        busy, idle, where_us, where_n = idle_gaps(trace, args.gap_us)
        print(
            f"## {label}: wall {wall * 1e3:.2f} ms (unprofiled), GPU busy "
            f"{busy / 1e3 / per:.2f} ms, idle {idle / 1e3 / per:.2f} ms in gaps >= "
            f"{args.gap_us:.0f} us, per unit (profiled"
            f"{' with Python stacks' if stacks else ''}); idle by what launched next:"
        )
        for where, us in sorted(where_us.items(), key=lambda x: -x[1])[: args.top]:
            print(f"  {us / 1e3 / per:7.3f} ms {where_n[where] / per:6.1f}x  {where}")
        if not stacks:
            print(f"## {label}: device time by kernel, per unit")
            for name, us in by_kernel(trace).most_common(args.top):
                print(f"  {us / 1e3 / per:7.3f} ms  {name}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["full", "zipcache", "kvmix-5x"])
    p.add_argument(
        "--decode",
        type=int,
        default=0,
        metavar="STEPS",
        help="report decoding steps (this many per measurement) after one prefill, not prefills",
    )
    p.add_argument("--gap-us", type=float, default=20.0)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    dev = torch.device("cuda")
    config = llama_8b_config(False)
    config.num_hidden_layers = args.layers
    model = _model(config, dev, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.context), generator=gen).to(dev)
    print(f"# {torch.cuda.get_device_name()}, B={args.batch} T={args.context} layers={args.layers}")
    for method in args.methods:
        if method == "full":
            model.set_attn_implementation("sdpa")
        else:
            kvmix.enable_fused_attention(model)
        if args.decode:
            cache = make_cache(method, config, "triton")
            prefill_once(model, ids, cache)
            token = ids[:, -1:]

            # Each call decodes --decode more tokens into the same cache, so the reports'
            # passes (sync check, wall time, two profiles) time successive steps.
            def steps(cache: Any = cache, token: torch.Tensor = token) -> None:
                with torch.inference_mode():
                    for _ in range(args.decode):
                        model(token, past_key_values=cache, use_cache=True)

            steps()  # compiles the decoding kernels
            torch.cuda.synchronize()
            report(f"{method} decoding step", steps, args.decode, args)
            del cache, steps  # steps' default holds the cache
        else:

            def prefill(method: str = method) -> None:
                prefill_once(model, ids, make_cache(method, config, "triton"))

            prefill()  # compiles the kernels
            torch.cuda.synchronize()
            report(f"{method} prefill", prefill, 1, args)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
