"""The fused merge end to end: a decoding step with ``attend_tiers(fused_merge=True)`` against
the default (a merge launch), in one process, on one cache.

Session 35 (H100, `benches/gpu_triton.py --current`): the fused merge's attend kernel takes
108.3 us of GPU time at B=8 x 32k (ZipCache) against the default's 97.5 + 3.5 for its merge,
while the B=1 x 8k eager call's host time falls from 210 to 178 us (one launch less). Which
of the two a decoding step feels depends on whether the step is host or GPU bound, so this
times whole steps of the 8B-shaped random-weight model: per method and shape, one prefill,
then rounds of ``--steps`` steps with each variant in turn (the same cache: the flag changes
no stored state), each step synchronized, and prints the medians.

    python3 -u gpu/fused_merge_e2e.py [--shapes 1x8192 8x8192 1x32768 8x32768]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import kvmix
from kvmix.bench.gpu import METHODS, _enable, _model, llama_8b_config
from kvmix.engines import load_attention

FUSED = [False]
CALLS = {False: 0, True: 0}  # attend_tiers calls made with each flag: the patch took effect


def patch(dev: torch.device) -> None:
    """Every store's ``attend`` calls ``attend_tiers`` through the module: inject the flag."""
    mod = load_attention(dev)
    orig = mod.attend_tiers

    def attend_tiers(*args: Any, **kw: Any) -> Any:
        kw.setdefault("fused_merge", FUSED[0])
        CALLS[kw["fused_merge"]] += 1
        return orig(*args, **kw)

    mod.attend_tiers = attend_tiers


def one(model: Any, method: str, batch: int, context: int, steps: int, rounds: int) -> None:
    _enable(model, METHODS[method][0])
    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(context)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(dev)
    with torch.inference_mode():
        # On the CPU (`--tiny`) the Triton engine under the interpreter: a smoke test.
        engine = "triton" if dev.type == "cpu" else "auto"
        cache = kvmix.make_cache(method, model.config, engine=engine)
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = ids[:, -1:]

        def step() -> float:
            nonlocal token
            sync()
            t0 = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            sync()
            return 1e3 * (time.perf_counter() - t0)

        for flag in (False, True, False, True):  # compiles both, then warm
            FUSED[0] = flag
            for _ in range(2):
                step()
        walls: dict[bool, list[float]] = {False: [], True: []}
        for r in range(rounds):
            for flag in (False, True) if r % 2 == 0 else (True, False):
                FUSED[0] = flag
                walls[flag] += [step() for _ in range(steps)]
    d, f = statistics.median(walls[False]), statistics.median(walls[True])
    print(
        f"{method:10s} B={batch} T={context:6d}: step default {d:7.2f} ms, fused merge "
        f"{f:7.2f} ms ({100 * (f - d) / d:+.1f}%), {len(walls[False])} steps each "
        f"(attend calls so far: {CALLS[False]} default, {CALLS[True]} fused)",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["1x8192", "8x8192", "1x32768", "8x32768"])
    p.add_argument("--methods", nargs="+", default=["zipcache", "kvmix-5x"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tiny", action="store_true", help="a tiny fp32 model on the CPU")
    args = p.parse_args()
    dev = torch.device("cpu" if args.tiny else "cuda")
    model = _model(llama_8b_config(args.tiny), dev, torch.float32 if args.tiny else torch.bfloat16)
    patch(dev)
    print(kvmix.__file__, torch.__version__, dev, flush=True)
    for shape in args.shapes:
        batch, context = (int(x) for x in shape.split("x"))
        for method in args.methods:
            try:
                one(model, method, batch, context, args.steps, args.rounds)
            except torch.OutOfMemoryError:
                print(f"{method:10s} B={batch} T={context:6d}: out of memory", flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
