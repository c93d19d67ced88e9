"""Where one layer's prefill scoring and compression spend their device time: the torch
profiler's kernel table for ``kvmix.attention._score_prefill`` (probe scoring, then the
classification that quantizes the prompt into the tiers) on one layer of Llama-3.1-8B's
shape, ``--batch`` x ``--context`` random bf16 keys/values, the Triton engine. Run twice
(the first compiles); the second is profiled, with the rows' LSE from the flash forward
(``_flash_attention_with_lse``) as the unpadded prefill passes it and, for comparison,
without.

    python3 gpu/compression_profile.py                     # one H200: B=8 x 32k
    python3 gpu/compression_profile.py --device cpu --batch 1 --context 64 --tiny
                                                           # smoke test (interpreter)
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaForCausalLM

import kvmix
from kvmix import attention as kattn
from kvmix.bench.gpu import METHODS, llama_8b_config


def _one(method: str, args: argparse.Namespace, lse: bool, table: bool) -> float:
    device = torch.device(args.device)
    cfg = llama_8b_config(args.tiny)
    cfg.num_hidden_layers = 1
    with torch.device("meta"):  # the config switched to kvmix's attention, no weights
        kvmix.enable_fused_attention(LlamaForCausalLM(cfg))
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--methods", nargs="+", default=["zipcache", "kvmix-5x"])
    p.add_argument("--rows", type=int, default=14, help="profiler table rows")
    p.add_argument("--tiny", action="store_true", help="toy head shapes (CPU smoke test)")
    args = p.parse_args()
    print(
        f"# {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'} "
        f"torch {torch.__version__}, B={args.batch} T={args.context}, one layer",
        flush=True,
    )
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
