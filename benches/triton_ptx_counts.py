"""Instruction counts of the decode attention kernel compiled offline for sm_90 (no GPU needed).

Runs ``attend_tiers`` once under the interpreter on ZipCache-shaped synthetic tiers (a 40-row
fp32 buffer; 4-bit and 2-bit tiers with per-channel keys and per-token values in one group of
128 with a separable factor; 32 query / 8 kv-heads, one query), captures the attend launch's
arguments, compiles the same kernel with Triton for ``cuda:90`` and prints, per loop of the
PTX (the buffer's page loop, then each packed tier's), the per-thread instruction count of one
iteration (one page of ``BLOCK_N`` rows: divide by ``BLOCK_N * 2 * D`` codes per page for a
per-code figure) and its shared-memory, barrier and mma parts.

    .venv/bin/python benches/triton_ptx_counts.py [flat] [join] [fast] [n128] [w8] [rot]
        [fields] [untrans] [fp16k] [fused] [only2 | only3 | only4] [nobuf]
"""

import collections
import os
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from kvmix.engines import load_attention
from kvmix.engines import triton_reference as ref
from kvmix.engines.base import _load

HK, HQ, D, B = 8, 32, 128, 1
# ``plain``: no argument specialization (how the counts in results/gpu/triton-kernel-h200.txt
# were made; byte loads are then not vectorized).
SPECIALIZE = "plain" not in sys.argv
BITS_LIST = (
    (2,) if "only2" in sys.argv
    else (4,) if "only4" in sys.argv
    else (3,) if "only3" in sys.argv  # kvmix-5x's low tier: 3-bit keys, 2-bit values
    else (4, 2)
)  # fmt: skip
#: ``r168`` etc.: compile with at most that many registers per thread (``maxnreg``).
MAXNREG = next((int(a[1:]) for a in sys.argv if re.fullmatch(r"r\d+", a)), None)
DTYPES = {
    "torch.float32": "*fp32",
    "torch.int32": "*i32",
    "torch.int16": "*i16",
    "torch.uint8": "*u8",
    "torch.bfloat16": "*bf16",
    "torch.float16": "*fp16",
}


def capture(bits=(4, 2), **kw):
    """The attend launch's arguments for a 40-row buffer and one ZipCache-shaped packed tier
    per entry of ``bits``."""
    attn = load_attention("cpu")
    g = torch.Generator().manual_seed(0)
    # ``nobuf``: an empty buffer, whose branch the kernel then leaves out (``ON0``), as in
    # ``benches/gpu_triton.py``'s stores; a decoding step's buffer holds the recent rows.
    rows = 0 if "nobuf" in sys.argv else 40
    views = [ref.synthetic_tier(B * HK, rows, D, ("dense", 0, D), ("dense", 0, D), generator=g)]
    for nb in bits:
        views.append(
            ref.synthetic_tier(
                B * HK,
                256,
                D,
                ("channel", nb, D),
                ("token", 2 if nb == 3 else nb, D),
                v_sep=True,
                generator=g,
            )
        )
    got = {}
    launch = attn._launch

    def spy(fn, grid, args, consts, nw, ns, fast, stream=None, *rest):
        if fn is attn._attend_kernel:
            # Tensors as what the compiler specializes on, so that a capture can be saved.
            desc = [
                ("tensor", str(a.dtype), a.data_ptr() % 16 == 0)
                if isinstance(a, torch.Tensor)
                else a
                for a in args
            ]
            got["a"] = (desc, dict(consts), nw, ns)
        return launch(fn, grid, args, consts, nw, ns, fast, stream, *rest)

    attn._launch = spy
    try:
        q = torch.randn(B, HQ, 1, D).bfloat16()
        fv = torch.zeros(B, dtype=torch.int32)
        # One split per tier: page loops of several pages, as at 32k (a split of one page
        # would be specialized into straight-line code).
        attn.attend_tiers(views, q, [600], fv, D**-0.5, HK, None, target_programs=1, **kw)
    finally:
        attn._launch = launch
    return got["a"]


def compile_ptx(args, consts, num_warps, num_stages):
    os.environ["TRITON_INTERPRET"] = "0"
    kernel = _load("triton_attention", False)._attend_kernel
    sig, const, attrs = {}, {}, {}
    plain = {p.name for p in kernel.params if p.do_not_specialize}  # as the launcher does
    for i, (name, a) in enumerate(zip(kernel.arg_names, args, strict=False)):
        # Specialized as Triton's launcher does on a GPU: 16-byte aligned tensors and integers
        # divisible by 16 get a divisibility hint (it decides how wide the loads are), and
        # integers equal to 1 become constants.
        if isinstance(a, tuple):  # a tensor: ("tensor", dtype, 16-byte aligned)
            sig[name] = DTYPES[a[1]]
            if a[2]:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[name] = "fp32"
        elif name in plain:
            sig[name] = "i32"
        elif SPECIALIZE and a == 1:
            sig[name] = "constexpr"
            const[name] = 1
        else:
            sig[name] = "i32"
            if SPECIALIZE and a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in kernel.arg_names[len(args) :]:
        sig[name] = "constexpr"
        const[name] = consts[name]
    if not SPECIALIZE:
        attrs = {}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    if MAXNREG:
        opts["maxnreg"] = MAXNREG
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm


def registers(cubin):
    """Registers per thread and local-memory (spill) bytes of ``cubin``'s kernel, from the
    cuobjdump that ships with Triton."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    reg = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return tuple(int(m.group(1)) if m else -1 for m in (reg, stack, local))


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


def sass_loops(cubin):
    """Bodies of the SASS loops (a backward branch to a label) of ``cubin``, disassembled by
    the nvdisasm that ships with Triton: what the GPU issues, after ptxas."""
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True).stdout
    lines = text.split("\n")
    labels = {}
    for i, x in enumerate(lines):
        m = re.match(r"^(\.L_x_\d+):", x)
        if m:
            labels[m.group(1)] = i
    for i, x in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", x)
        if m and labels.get(m.group(1), i) < i:
            body = lines[labels[m.group(1)] : i + 1]
            yield [re.sub(r"^\s*/\*[0-9a-f]+\*/\s*", "", x) for x in body if "/*" in x]


def main():
    kw = dict(flat="flat" in sys.argv, join="join" in sys.argv, precise="fast" not in sys.argv)
    kw.update(block_n=128 if "n128" in sys.argv else 64)
    kw.update(num_warps=next((int(a[1:]) for a in sys.argv if re.fullmatch(r"w\d", a)), 4))
    if "fields" in sys.argv:
        kw["fields"] = True
    # Per-channel keys' dots in int8 (session 28's option, session 29's default); ``fp16k``:
    # the fp16 fields' dots (``i8`` is still accepted and changes nothing).
    kw["int8_keys"] = "fp16k" not in sys.argv
    # ``fused``: the merge in the attend launch (session 33's ``fused_merge``).
    kw["fused_merge"] = "fused" in sys.argv
    if "untrans" in sys.argv:  # the field path's key dots untransposed (before session 27)
        kw["transposed"] = False
    if "rot" in sys.argv:
        # kvmix-5x's rotation in the kernel (the query rotated into a slab per program).
        from kvmix.cache import randomized_hadamard

        kw["rotation"] = randomized_hadamard(D, 0)
    shown = {k: "R" if k == "rotation" else v for k, v in kw.items()}
    mode = "specialized" if SPECIALIZE else "plain"
    print(f"triton {triton.__version__}, sm_90, {shown}, {mode}")
    codes = kw["block_n"] * 2 * D  # key and value codes of one page
    threads = kw["num_warps"] * 32
    # One kernel per packed tier (a buffer and that tier), so that each loop is known.
    # save=FILE / load=FILE: the captured launches pickled, to compile them with another
    # Triton (the capture runs this Triton's interpreter), e.g.
    #   PYTHONPATH=<triton 3.6 unpacked> python benches/triton_ptx_counts.py fields load=FILE
    path = next((a.split("=", 1) for a in sys.argv if a.startswith(("save=", "load="))), None)
    if path and path[0] == "load":
        with open(path[1], "rb") as f:
            captured = pickle.load(f)
    else:
        captured = {nb: capture(bits=(nb,), **kw) for nb in BITS_LIST}
        if path:
            with open(path[1], "wb") as f:
                pickle.dump(captured, f)
            print(f"saved {path[1]}")
    for nb in BITS_LIST:
        args, consts, nw, ns = captured[nb]
        if consts["FIELDS"]:
            # The inline-PTX unpacking a GPU runs (the capture interprets), same page loop.
            consts["FIELDS"] = (consts["FIELDS"] & ~3) | 2
        asm = compile_ptx(args, consts, nw, ns)
        name = f"{nb}-bit tier"
        # The packed tier's loop is the one with mma (the buffer's fp32 dots use FMAs).
        body = next(b for b in loops(asm["ptx"]) if any(x.startswith("mma") for x in b))
        ops = collections.Counter(x.split()[1 if x.startswith("@") else 0] for x in body)

        def count(pre, ops=ops):
            return sum(v for k, v in ops.items() if k.startswith(pre))

        print(
            f"  PTX  {name}: {len(body)} per thread and page ({len(body) * threads / codes:.2f}"
            f" per code) | st.shared scalar b16 {count('st.shared.b16')} b8 "
            f"{count('st.shared.b8')}, vector {count('st.shared.v')} | "
            f"ld.shared {count('ld.shared')} + ldmatrix {count('ldmatrix')} | "
            f"bar.sync {count('bar.sync')} | mma {count('mma')} | shfl {count('shfl')}"
        )
        body = next(b for b in sass_loops(asm["cubin"]) if any("HMMA" in x for x in b))
        ops = collections.Counter(
            re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in body
        )
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(10))
        reg, stack, local = registers(asm["cubin"])
        print(
            f"  SASS {name}: {len(body)} per thread and page ({len(body) * threads / codes:.2f}"
            f" per code) | {top} | LDL {ops['LDL']} STL {ops['STL']} | registers {reg}, "
            f"stack {stack} B, local {local} B"
        )


if __name__ == "__main__":
    main()
