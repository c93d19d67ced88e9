"""How often a decode compiles a kernel variant: each decoding step's wall time and the number
of kernel specializations compiled so far (Triton specializes integer arguments on being 1 or
a multiple of 16, so a count or a position that moves between steps can ask for a new
compile, which takes seconds for the attention kernel).

    python3 gpu/compile_count.py --context 4096 --steps 80
"""

from __future__ import annotations

import argparse
import time

import torch
from prefill_profile import make_cache, prefill_once  # this folder's

import kvmix
from kvmix.bench.gpu import _model, llama_8b_config
from kvmix.engines import load_attention


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["zipcache", "kvmix-5x"])
    args = p.parse_args()
    dev = torch.device("cuda")
    config = llama_8b_config(False)
    config.num_hidden_layers = args.layers
    model = _model(config, dev, torch.bfloat16)
    kvmix.enable_fused_attention(model)
    attn = load_attention(dev)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.context), generator=gen).to(dev)
    print(f"# {torch.cuda.get_device_name()}, B={args.batch} T={args.context}, "
          f"{args.layers} layers")  # fmt: skip
    for method in args.methods:
        cache = make_cache(method, config, "triton")
        before = len(attn._COMPILED)
        prefill_once(model, ids, cache)
        token = ids[:, -1:]
        times, compiled = [], []
        with torch.inference_mode():
            for _ in range(args.steps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(token, past_key_values=cache, use_cache=True)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
                compiled.append(len(attn._COMPILED) - before)
        slow = [(i, round(t), compiled[i]) for i, t in enumerate(times) if t > 100]
        med = sorted(times)[len(times) // 2]
        print(f"## {method}: median step {med:.1f} ms; {compiled[-1]} launch keys after "
              f"{args.steps} steps; steps over 100 ms (step, ms, keys so far): {slow}")  # fmt: skip
        del cache
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
