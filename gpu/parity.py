"""Real-device parity of the Triton engine with the Rust engine (run on the GPU machine after
``source gpu/setup.sh``): the same inputs appended to a Rust store (CPU) and a Triton store
(CUDA) must give the same tiers, bit-identical dequantized rows and attention within fp32
tolerance. The CPU test suite checks the same contract under Triton's interpreter."""

import os

import numpy as np
import torch

import kvmix
from kvmix.engines.triton_store import TritonLayerStore

B, H, HQ, D = 2, 4, 16, 128
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1
LENGTHS = [int(x) for x in os.environ.get("PARITY_LENGTHS", "300,5000").split(",")]
CASES = [
    ("zipcache", {"streaming_gap": 16}),
    # The range search of clip="mse" (float64 error sums on the device, `mid - s * half`
    # rounded twice: the store's kernels are compiled without fp contraction).
    ("zipcache", {"streaming_gap": 16, "key_clip": "mse", "value_clip": "mse", "low_key_bits": 3}),
    ("zipcache", {"streaming_gap": 16, "key_clip": "mse_unbiased", "value_clip": "mse_unbiased"}),
    ("uniform", {"residual": 64}),
    ("full", None),
]

for n in LENGTHS:
    for policy, config in CASES:
        torch.manual_seed(0)
        rust = kvmix.LayerStore(policy, H, D, config, "float32")
        tri = TritonLayerStore(policy, H, D, config, "float32")
        k, v = torch.randn(B, H, n, D), torch.randn(B, H, n, D)
        k[..., ::17] *= 5  # outlier channels
        rust.append(k.numpy(), v.numpy())
        tri.append(k.to(DEV), v.to(DEV))
        if policy == "zipcache":
            acc, cnt = torch.rand(B, H, n), torch.ones(B, H, n)
            rust.add_scores(0, acc.numpy(), cnt.numpy())
            tri.add_scores(0, acc.to(DEV), cnt.to(DEV))
        rust.maybe_classify(True)
        tri.maybe_classify(True)
        same_tiers, max_row, differ, total = True, 0.0, 0, 0
        for s in range(B * H):
            rp, tp = rust.tier_positions(s), tri.tier_positions(s)
            for tier in ("buffer", "high", "low"):
                same_tiers &= np.array_equal(rp[tier], tp[tier].cpu().numpy())
            _, kr, vr = rust.dense(s)
            _, kt, vt = tri.dense(s)
            kd, vd = np.abs(kr - kt.cpu().numpy()).max(), np.abs(vr - vt.cpu().numpy()).max()
            max_row = max(max_row, kd, vd)
            differ += int((kr != kt.cpu().numpy()).sum() + (vr != vt.cpu().numpy()).sum())
            total += kr.size + vr.size
        q = torch.randn(B, HQ, 1, D)
        want = rust.attend(q.numpy(), [n - 1], D**-0.5, False)
        got = tri.attend(q.to(DEV), [n - 1], D**-0.5, track=False).cpu().numpy()
        err = np.abs(np.asarray(want) - got).max()
        ok = same_tiers and max_row == 0 and err < 1e-4
        name = policy + (f"+{config['key_clip']}" if config and "key_clip" in config else "")
        print(
            f"{name:14s} n={n:5d} | tiers equal {same_tiers} | max |row diff| {max_row:.1e} "
            f"({differ}/{total} values) | max |attn diff| {err:.1e} | {'OK' if ok else 'FAIL'}"
        )
