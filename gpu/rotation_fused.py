"""kvmix-5x's rotation inside the Triton kernels, on one GPU: exactness, then decode time.

1. Kernel: ``attend_tiers(..., rotation=R)`` (the query rotated in the attention launch, the
   output rotated back in the merge) against a float64 reference with the rotation outside,
   compiled, at head_dim 64 and 128, the default path and the field path (inline PTX):
   largest error relative to the output's largest value (the interpreter tests ask < 2e-5).
2. Cache: a tiny random Llama (fp32, a left-padded batch) decoding with kvmix-5x on the GPU,
   the rotation in the kernels against the same cache with the rotation as torch ops around
   the store (``_Shared.fuse_rotation = False``), fused and portable: attention outputs,
   scores, tiers (``tests/test_rotation.py``'s run, on CUDA).
3. Decode step: Llama-3.1-8B-shaped random bf16 model, median step after the prefill, for
   DynamicCache, ZipCache, kvmix-5x (rotation in the kernels) and kvmix-5x with the torch
   rotation, fused (and kvmix-5x portable), at B=1 and B=8 x 8k (``--contexts``,
   ``--batches``).

    python3 -u gpu/rotation_fused.py > $OUT/rotation-fused-h200.txt 2>&1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

import kvmix
from kvmix.bench import gpu as bench
from kvmix.cache import randomized_hadamard
from kvmix.engines import load_attention
from kvmix.engines import triton_reference as ref


def kernel_check(device: torch.device) -> None:
    attn = load_attention(device)
    b, hk, hq = 2, 8, 32
    s = b * hk
    for d in (64, 128):
        g = torch.Generator().manual_seed(d)
        views = [
            ref.synthetic_tier(s, 40, d, ("dense", 0, d), ("dense", 0, d), pos_offset=600,
                               generator=g, device=device),
            ref.synthetic_tier(s, 300, d, ("channel", 4, d), ("token", 2, d), v_sep=True,
                               generator=g, device=device),
            ref.synthetic_tier(s, 300, d, ("channel", 2, d), ("token", 2, d), v_sep=True,
                               pos_offset=300, generator=g, device=device),
        ]  # fmt: skip
        r = randomized_hadamard(d, 0).to(device)
        q = torch.randn(b, hq, 1, d, generator=g).to(device)
        fv = torch.tensor([0, 17], dtype=torch.int32, device=device)
        want, want_rec = ref.attention(views, q.double() @ r.double(), [639], fv, d**-0.5, hk)
        want = want @ r.double().T
        for fields in (False, True):
            out, rec = attn.attend_tiers(
                views, q, [639], fv, d**-0.5, hk, [True] * 3, rotation=r, fields=fields
            )
            err = ((out.double() - want).abs().max() / want.abs().max()).item()
            pairs = zip(rec, want_rec, strict=True)
            rerr = max((x.double() - y).abs().max().item() for x, y in pairs)
            print(f"  kernel D={d} fields={fields}: output rel err {err:.2e}, received {rerr:.2e}")


def cache_check(device: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_rotation import _rotated_run

    for fused_attention in (True, False):
        got = _rotated_run(True, fused_attention, device)
        want = _rotated_run(False, fused_attention, device)
        err = max(
            ((x - y).abs().max() / y.abs().max()).item()
            for x, y in zip(got["out"][1:], want["out"][1:], strict=True)
        )
        serr = max(
            (a[0] - b[0]).abs().max().item() if a[0].numel() else 0.0
            for x, y in zip(got["scores"], want["scores"], strict=True)
            for a, b in zip(x, y, strict=True)
        )
        same = got["tiers"] == want["tiers"]
        mode = "fused" if fused_attention else "portable"
        print(f"  cache {mode}: output rel err {err:.2e}, scores {serr:.2e}, same tiers {same}")


def torch_rotation(name: str) -> Any:
    def make(config: Any) -> Any:
        cache = kvmix.make_cache(name, config)
        cache._shared.fuse_rotation = False
        return cache

    return make


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--contexts", type=int, nargs="+", default=[8192])
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args()
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "kvmix", kvmix.__file__)
    print("1. kernel vs float64 reference")
    kernel_check(device)
    print("2. cache: rotation in the kernels vs torch rotation around the store")
    cache_check("cuda")
    print("3. decode step (median ms), 8B-shaped bf16")
    bench.METHODS["kvmix-5x-torchrot"] = ("fused", torch_rotation("kvmix-5x"))
    methods = ["full", "zipcache", "kvmix-5x", "kvmix-5x-torchrot", "kvmix-5x-portable"]
    model = bench._model(bench.llama_8b_config(), device, torch.bfloat16)
    for context in args.contexts:
        for batch in args.batches:
            for method in methods:
                r = bench.run_one(model, method, batch, context, args.steps, device)
                if r["oom"]:
                    print(f"  {method:20s} B={batch} T={context}: out of memory")
                    continue
                print(
                    f"  {method:20s} B={batch} T={context}: step {r['step_ms']:7.2f} ms, "
                    f"prefill {r['prefill_s']:6.2f} s, peak {r['peak_mib']:8.0f} MiB"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
