"""The direct launch with device tensors passed as their addresses (``RAW_POINTERS``).

Triton's launcher calls ``data_ptr()`` and asks the driver about every tensor argument
(``cuPointerGetAttribute``) at every launch; an int it takes as it is. The attention's
launch has ~40 tensor arguments, and a B=1 decoding step is host bound (session 32). Checks
that the outputs are the same bit for bit with and without, then times eager calls (host
bound at this size: what a decoding step pays per layer) alternately, medians.

    python3 -u gpu/raw_pointers.py
"""

from __future__ import annotations

import statistics
import time

import torch

from kvmix.engines import load_attention
from kvmix.engines import triton_reference as ref

attn = load_attention("cuda")
S, HK, HQ, D = 8, 8, 32, 128
g = torch.Generator().manual_seed(0)
kw = dict(device="cuda", generator=g)
views = [
    ref.synthetic_tier(S, 40, D, ("dense", 0, D), ("dense", 0, D), **kw),
    ref.synthetic_tier(S, 3000, D, ("channel", 4, D), ("token", 4, D), pos_offset=40, **kw),
    ref.synthetic_tier(S, 5000, D, ("channel", 2, D), ("token", 2, D), pos_offset=3040, **kw),
]
q = torch.randn(1, HQ, 1, D, generator=g).cuda().bfloat16()
fv = torch.zeros(1, dtype=torch.int32, device="cuda")
acc = [(torch.zeros(S, v.cap, device="cuda"), torch.zeros(S, v.cap, device="cuda")) for v in views]
out = torch.empty(1, 1, HQ, D, dtype=torch.bfloat16, device="cuda")


def call(track: bool) -> torch.Tensor:
    attn.attend_tiers(views, q, [8039], fv, D**-0.5, HK, [True, False, False] if track else None,
                      accumulate=acc if track else None, out=out, out_layout="bthd")  # fmt: skip
    return out


res = {}
for raw in (False, True, False, True):
    attn.RAW_POINTERS = raw
    a = call(False).clone()
    b = call(False).clone()  # the second takes the direct launch
    res.setdefault(raw, []).append(b)
    assert torch.equal(a, b)
same = all(torch.equal(x, res[False][0]) for x in res[True] + res[False])
print(f"outputs with and without raw pointers identical: {same}", flush=True)

times: dict[bool, list[float]] = {False: [], True: []}
for _ in range(5):
    for raw in (False, True):
        attn.RAW_POINTERS = raw
        for _ in range(20):
            call(True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            call(True)
        torch.cuda.synchronize()
        times[raw].append((time.perf_counter() - t0) / 200 * 1e6)
for raw in (False, True):
    ts = times[raw]
    print(
        f"raw pointers {raw}: eager us a call (B=1, 8k, 3 launches), median "
        f"{statistics.median(ts):.1f} (runs {' '.join(f'{t:.0f}' for t in ts)})",
        flush=True,
    )
