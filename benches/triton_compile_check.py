"""Compile the Triton store's classification kernels for sm_90 offline (no GPU needed): a
check that what the interpreter runs in CI also compiles for the GPU, with the Triton found on
the path, e.g. the GPU machine's version unpacked from its wheel:

    pip download triton==3.6.0 --no-deps --python-version 3.11 --only-binary=:all: \\
        --platform manylinux_2_27_x86_64 -d /tmp/t36w && unzip -q /tmp/t36w/*.whl -d /tmp/t36
    PYTHONPATH=/tmp/t36 .venv/bin/python benches/triton_compile_check.py

Prints, per kernel and signature, the PTX size, the cubin size (ptxas ran) and whether the
PTX divides with ``div.rn.f32`` (the rank kernel's normalized score must be correctly
rounded, as the Rust store's).
"""

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
import triton
from triton.backends.compiler import GPUTarget

from kvmix.engines.base import _load

PARTITION = dict(n="i32", width="i32", code="i32", sp_pick="i32", sp_p="i32")
RANK = dict(
    ACC="*fp32", CNT="*fp32", FV="*i32", KEY="*fp32", CAT="*i8",
    n="i32", n_sink="i32", kv_heads="i32", sa="i32", sc="i32", sp="i32",
)  # fmt: skip


def main() -> None:
    k = _load("triton_kernels", False)
    cases = [
        ("partition, bool pick, int16 positions", k.partition_kernel,
         dict(PICK="*i1", P="*i16", IDX="*i64", GP="*i16", **PARTITION), dict(BLOCK=1024)),
        ("partition, int8 categories, int32 positions", k.partition_kernel,
         dict(PICK="*i8", P="*i32", IDX="*i64", GP="*i32", **PARTITION), dict(BLOCK=1024)),
        ("rank, layer selection, normalized", k.zipcache_rank_kernel, dict(P="*i16", **RANK),
         dict(LAYER=True, NORMALIZED=True, BLOCK=1024)),
        ("rank, kv_head selection, raw scores", k.zipcache_rank_kernel, dict(P="*i32", **RANK),
         dict(LAYER=False, NORMALIZED=False, BLOCK=1024)),
        ("mark salient", k.mark_salient_kernel,
         dict(ORDER="*i64", CAT="*i8", KS="*i64", n="i32", kv_heads="i32"), dict(BLOCK=1024)),
    ]  # fmt: skip
    print(f"triton {triton.__version__} ({triton.__file__}), sm_90, 4 warps, 3 stages")
    for name, fn, sig, consts in cases:
        signature = {**sig, **dict.fromkeys(consts, "constexpr")}
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts)
        opts = {"num_warps": 4, "num_stages": 3, "enable_fp_fusion": False}
        asm = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm
        ptx = asm["ptx"]
        print(f"  {name}: PTX {len(ptx.splitlines())} lines, cubin {len(asm['cubin'])} bytes, "
              f"div.rn.f32 {'div.rn.f32' in ptx}")  # fmt: skip


if __name__ == "__main__":
    main()
