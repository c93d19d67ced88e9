"""The Triton device engine against the Rust engine (its reference), under Triton's
interpreter on CPU tensors: same tokens in the same tiers, the same codes (dequantized rows
equal), attention within fp32 tolerances, with a float32 and a half-precision buffer (whose
rows the Triton quantizers read as they are stored, widening them in the kernel). Small
shapes: the interpreter runs the kernels in numpy."""

import numpy as np
import pytest
import torch

import kvmix

pytest.importorskip("triton")
from kvmix.engines import resolve_engine
from kvmix.engines.triton_store import TritonLayerStore

B, H, D, N = 2, 2, 32, 150
# On a GPU (`pytest -m cuda`) the same contract at gpu/parity.py's size (10M values with
# outlier channels), where codes at rounding boundaries show whether the kernels divide and
# round as the Rust quantizer (correctly rounded, no fp contraction): with the GPU's default
# fp32 division (within 2 ulp) some 600 of them differed.
SIZES = {"cpu": (B, H, D, N), "cuda": (2, 4, 128, 5000)}
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ],
    ),
]
CASES = [
    ("zipcache", {"streaming_gap": 4}),
    # clip="mse": the range search runs in both engines' quantizers and picks the same grids.
    ("zipcache", {"streaming_gap": 4, "key_clip": "mse", "value_clip": "mse", "low_key_bits": 3}),
    ("zipcache", {"streaming_gap": 4, "key_clip": "mse_unbiased", "value_clip": "mse_unbiased"}),
    ("uniform", {"residual": 32}),
    ("full", None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("buffer_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("policy", "config"), CASES)
def test_triton_matches_rust(policy, config, buffer_dtype, device):
    b, h, d, n = SIZES[device]
    torch.manual_seed(0)
    rust = kvmix.LayerStore(policy, h, d, config, buffer_dtype)
    tri = TritonLayerStore(policy, h, d, config, buffer_dtype)
    k, v = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    k[..., ::17] *= 5  # outlier channels
    rust.append(k.numpy(), v.numpy())
    tri.append(k.to(device), v.to(device))
    if policy == "zipcache":
        acc, cnt = torch.rand(b, h, n), torch.ones(b, h, n)
        rust.add_scores(0, acc.numpy(), cnt.numpy())
        tri.add_scores(0, acc.to(device), cnt.to(device))
    assert rust.maybe_classify() and tri.maybe_classify()
    for s in range(b * h):
        rp, tp = rust.tier_positions(s), tri.tier_positions(s)
        for tier in ("buffer", "high", "low"):
            np.testing.assert_array_equal(rp[tier], tp[tier].cpu().numpy())
        pr, kr, vr = rust.dense(s)
        pt, kt, vt = tri.dense(s)
        np.testing.assert_array_equal(pr, pt.cpu().numpy())
        # Same codes and parameters: the dequantized rows are bit-identical.
        np.testing.assert_array_equal(kr, kt.cpu().numpy())
        np.testing.assert_array_equal(vr, vt.cpu().numpy())
    q = torch.randn(b, 4 * h, 1, d)
    out_r = rust.attend(q.numpy(), [n - 1], d**-0.5, True)
    out_t = tri.attend(q.to(device), [n - 1], d**-0.5, True)
    # fp32 sums in other orders: over 5000 tokens (cuda) the outputs differ by up to ~1e-5.
    tol = 1e-5 if device == "cpu" else 3e-5
    np.testing.assert_allclose(out_t.cpu().numpy(), out_r, rtol=1e-5, atol=tol)


def test_engine_resolution_and_refusals():
    assert resolve_engine("auto", torch.device("cpu")) == "rust"
    assert resolve_engine("auto", torch.device("cuda")) == "triton"
    assert resolve_engine("triton", torch.device("cpu")) == "triton"
    with pytest.raises(kvmix.ConfigError, match="engine"):
        resolve_engine("gpu", torch.device("cpu"))
    with pytest.raises(kvmix.ConfigError, match=r"triton engine.*MiKV.*high_bits"):
        TritonLayerStore("mikv", H, D, {"high_bits": 4})
