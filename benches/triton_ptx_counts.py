"""Instruction counts of the decode attention kernel compiled offline for sm_90 (no GPU needed).

Runs ``attend_tiers`` once under the interpreter on ZipCache-shaped synthetic tiers (a 40-row
fp32 buffer; 4-bit and 2-bit tiers with per-channel keys and per-token values in one group of
128 with a separable factor; 32 query / 8 kv-heads, one query), captures the attend launch's
arguments, compiles the same kernel with Triton for ``cuda:90`` and prints, per loop of the
PTX (the buffer's page loop, then each packed tier's), the per-thread instruction count of one
iteration (one page of ``BLOCK_N`` rows: divide by ``BLOCK_N * 2 * D`` codes per page for a
per-code figure) and its shared-memory, barrier and mma parts.

    .venv/bin/python benches/triton_ptx_counts.py [flat] [join] [fast] [n128] [w8]
"""

import collections
import os
import re
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from kvmix.engines import load_attention
from kvmix.engines import triton_reference as ref
from kvmix.engines.base import _load

HK, HQ, D, B = 8, 32, 128, 1
DTYPES = {
    torch.float32: "*fp32",
    torch.int32: "*i32",
    torch.int16: "*i16",
    torch.uint8: "*u8",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
}


def capture(**kw):
    attn = load_attention("cpu")
    g = torch.Generator().manual_seed(0)
    views = [
        ref.synthetic_tier(B * HK, 40, D, ("dense", 0, D), ("dense", 0, D), generator=g),
        ref.synthetic_tier(
            B * HK, 256, D, ("channel", 4, D), ("token", 4, D), v_sep=True, generator=g
        ),
        ref.synthetic_tier(
            B * HK, 256, D, ("channel", 2, D), ("token", 2, D), v_sep=True, generator=g
        ),
    ]
    got = {}
    launch = attn._launch

    def spy(fn, grid, args, consts, nw, ns, fast, stream=None):
        if fn is attn._attend_kernel:
            got["a"] = (args, dict(consts), nw, ns)
        return launch(fn, grid, args, consts, nw, ns, fast, stream)

    attn._launch = spy
    try:
        q = torch.randn(B, HQ, 1, D).bfloat16()
        fv = torch.zeros(B, dtype=torch.int32)
        attn.attend_tiers(views, q, [600], fv, D**-0.5, HK, None, **kw)
    finally:
        attn._launch = launch
    return got["a"]


def compile_ptx(args, consts, num_warps, num_stages):
    os.environ["TRITON_INTERPRET"] = "0"
    kernel = _load("triton_attention", False)._attend_kernel
    sig, const = {}, {}
    for name, a in zip(kernel.arg_names, args, strict=False):
        if isinstance(a, torch.Tensor):
            sig[name] = DTYPES[a.dtype]
        else:
            sig[name] = "fp32" if isinstance(a, float) else "i32"
    for name in kernel.arg_names[len(args) :]:
        sig[name] = "constexpr"
        const[name] = consts[name]
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=const)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]


def loops(ptx):
    """Bodies of the PTX's loops (a backward branch to a label), debug lines left out."""
    lines = [x.strip() for x in ptx.split("\n")]
    labels = {}
    for i, x in enumerate(lines):
        m = re.match(r"^(\$L__BB\d+_\d+):", x)
        if m:
            labels[m.group(1)] = i
    for i, x in enumerate(lines):
        m = re.search(r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", x)
        if m and labels.get(m.group(1), i) < i:
            body = lines[labels[m.group(1)] : i + 1]
            skip = ("$", "//", "{", "}", ".loc")
            yield [x for x in body if x and not x.startswith(skip)]


def main():
    kw = dict(flat="flat" in sys.argv, join="join" in sys.argv, precise="fast" not in sys.argv)
    kw.update(block_n=128 if "n128" in sys.argv else 64, num_warps=8 if "w8" in sys.argv else 4)
    args, consts, nw, ns = capture(**kw)
    ptx = compile_ptx(args, consts, nw, ns)
    print(f"triton {triton.__version__}, sm_90, {kw}, {nw} warps, {ns} stages")
    names = ("buffer (fp32)", "high (4-bit)", "low (2-bit)")
    for name, body in zip(names, loops(ptx), strict=False):
        ops = collections.Counter(x.split()[1 if x.startswith("@") else 0] for x in body)

        def count(pre, ops=ops):
            return sum(v for k, v in ops.items() if k.startswith(pre))

        print(
            f"  {name:13s}: {len(body)} instructions per thread and page | "
            f"st.shared scalar b16 {count('st.shared.b16')}, vector {count('st.shared.v')} | "
            f"ld.shared {count('ld.shared')} + ldmatrix {count('ldmatrix')} | "
            f"bar.sync {count('bar.sync')} | mma {count('mma')} | shfl {count('shfl')}"
        )


if __name__ == "__main__":
    main()
