"""One launch of the decode attention kernel at a preset's B8 x 32k (``benches/gpu_triton.py``'s
store, the default launch), for Nsight Compute to profile: where the field path's warps stall
and which pipes they keep busy (the kernel issues ~2.4x fewer instructions than its time
allows at one instruction a cycle per scheduler, and a ninth warp per SM did not speed it up:
session 25).

    ncu --kernel-name regex:_attend_kernel --launch-skip 2 --launch-count 1 \
        --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
        python3 gpu/ncu_attend.py [zipcache | kvmix-5x]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import gpu_triton as gt

name = sys.argv[1] if len(sys.argv) > 1 else "zipcache"
attn = gt.load_attention("cuda")
st = gt.store(name, "cuda", 8, 32768)
views = [st._tiers[t].view() for t in gt.TIERS]
q = torch.randn(8, gt.HQ, 1, gt.D, device="cuda", dtype=torch.bfloat16)
for _ in range(3):  # the first compiles; the profiler takes the third
    attn.attend_tiers(views, q, [32768], st._fv_dev, gt.D**-0.5, gt.HK, None)
torch.cuda.synchronize()
print(f"{name}: three launches done")
