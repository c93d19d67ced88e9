"""Where the host time of one eager ``attend_tiers`` call goes (B=1 x 8k, ZipCache-shaped).

A decoding step at B=1 is host bound (session 32's profile: GPU busy ~9 of ~50 ms a step),
and an eager call of the attention took 212 us of host time on an H100's host (session 33,
three launches) where SDPA takes ~35. Passing device tensors as their addresses changed
nothing (session 33), so the driver's pointer checks are not where it goes. This times, per
call, alternately and as medians:

- ``call``: the whole eager call (what a layer of a decoding step pays);
- ``python``: the same with every compiled kernel's launcher replaced by a no-op (kvmix's own
  host work: the plan, the arguments, ``_launch``'s specialization key);
- ``launcher``: the recorded launches replayed through Triton's launcher object alone
  (``CompiledKernel.run``: its Python wrapper and the C launch);
- ``c launch``: the same through the C function alone (no Python wrapper);
- ``sdpa``: torch's SDPA on a dense bf16 cache of the same shape, for scale;
- ``fused merge``: the whole call with ``fused_merge=True`` (no merge launch);

then the ``python`` part under cProfile, by own time.

    python3 -u gpu/launch_cost.py
"""

from __future__ import annotations

import cProfile
import io
import pstats
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
kd = torch.randn(1, HK, 8040, D, generator=g).cuda().bfloat16()
vd = torch.randn(1, HK, 8040, D, generator=g).cuda().bfloat16()


def call(**kw) -> None:
    attn.attend_tiers(views, q, [8039], fv, D**-0.5, HK, [True, False, False],
                      accumulate=acc, out=out, out_layout="bthd", **kw)  # fmt: skip


def fused() -> None:
    call(fused_merge=True)  # session 33: the merge in the attend launch (two launches)


def sdpa() -> None:
    torch.nn.functional.scaled_dot_product_attention(q, kd, vd, enable_gqa=True)


class Recorder:
    """Stands in for a compiled kernel's launcher: records the launch, launches nothing."""

    def __init__(self, real, log):
        self.real, self.log = real, log

    def __call__(self, *args):
        self.log.append((self.real, args))


for _ in range(3):
    call()  # compiles, then takes the direct launch
torch.cuda.synchronize()
kernels = [k for k, _ in attn._COMPILED.values()]
real = {id(k): k._run for k in kernels}
log: list = []


def stubbed(on: bool) -> None:
    for k in kernels:
        k._run = Recorder(real[id(k)], log) if on else real[id(k)]


stubbed(True)
call()
stubbed(False)
launches = list(log)
print(f"{len(launches)} launches a call, {[len(a) for _, a in launches]} arguments each")


def launcher() -> None:
    for run, args in launches:
        run(*args)


def c_launch() -> None:
    # CudaLauncher.__call__ without its scratch closures (no scratch in these kernels).
    for run, (gx, gy, gz, st, fn, *rest) in launches:
        run.launch(gx, gy, gz, st, fn, run.launch_cooperative_grid, run.launch_pdl, None, None,
                   *rest)  # fmt: skip


assert all(r.global_scratch_size == 0 and r.profile_scratch_size == 0 for r, _ in launches)

variants = {"call": call, "python": call, "launcher": launcher, "c launch": c_launch,
            "sdpa": sdpa, "fused merge": fused}  # fmt: skip
times: dict[str, list[float]] = {name: [] for name in variants}
N = 300
for _ in range(7):
    for name, fn in variants.items():
        stubbed(name == "python")
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        log.clear()
        t0 = time.perf_counter()
        for _ in range(N):
            fn()
        torch.cuda.synchronize()
        times[name].append((time.perf_counter() - t0) / N * 1e6)
        stubbed(False)
        log.clear()
print("us a call (B=1, 8k; medians of 7 runs of 300, alternating):")
for name, ts in times.items():
    print(f"  {name:9s} {statistics.median(ts):7.1f}   (runs {' '.join(f'{t:.0f}' for t in ts)})")

stubbed(True)
prof = cProfile.Profile()
prof.enable()
for _ in range(N):
    call()
prof.disable()
stubbed(False)
buf = io.StringIO()
pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
print(f"the python part under cProfile, {N} calls, by own time:")
print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[-2200:])
