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
CASES = [
    ("zipcache", {"streaming_gap": 4}),
    # clip="mse": the range search runs in both engines' quantizers and picks the same grids.
    ("zipcache", {"streaming_gap": 4, "key_clip": "mse", "value_clip": "mse", "low_key_bits": 3}),
    ("zipcache", {"streaming_gap": 4, "key_clip": "mse_unbiased", "value_clip": "mse_unbiased"}),
    ("uniform", {"residual": 32}),
    ("full", None),
]


@pytest.mark.parametrize("buffer_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("policy", "config"), CASES)
def test_triton_matches_rust(policy, config, buffer_dtype):
    torch.manual_seed(0)
    rust = kvmix.LayerStore(policy, H, D, config, buffer_dtype)
    tri = TritonLayerStore(policy, H, D, config, buffer_dtype)
    k, v = torch.randn(B, H, N, D), torch.randn(B, H, N, D)
    rust.append(k.numpy(), v.numpy())
    tri.append(k, v)
    if policy == "zipcache":
        acc, cnt = torch.rand(B, H, N), torch.ones(B, H, N)
        rust.add_scores(0, acc.numpy(), cnt.numpy())
        tri.add_scores(0, acc, cnt)
    assert rust.maybe_classify() and tri.maybe_classify()
    for s in range(B * H):
        rp, tp = rust.tier_positions(s), tri.tier_positions(s)
        for tier in ("buffer", "high", "low"):
            np.testing.assert_array_equal(rp[tier], tp[tier].numpy())
        pr, kr, vr = rust.dense(s)
        pt, kt, vt = tri.dense(s)
        np.testing.assert_array_equal(pr, pt.numpy())
        # Same codes and parameters: the dequantized rows are bit-identical.
        np.testing.assert_array_equal(kr, kt.numpy())
        np.testing.assert_array_equal(vr, vt.numpy())
    q = torch.randn(B, 8, 1, D)
    out_r = rust.attend(q.numpy(), [N - 1], 0.2, True)
    out_t = tri.attend(q, [N - 1], 0.2, True)
    np.testing.assert_allclose(out_t.numpy(), out_r, rtol=1e-5, atol=1e-5)


def test_engine_resolution_and_refusals():
    assert resolve_engine("auto", torch.device("cpu")) == "rust"
    assert resolve_engine("auto", torch.device("cuda")) == "triton"
    assert resolve_engine("triton", torch.device("cpu")) == "triton"
    with pytest.raises(kvmix.ConfigError, match="engine"):
        resolve_engine("gpu", torch.device("cpu"))
    with pytest.raises(kvmix.ConfigError, match=r"triton engine.*MiKV.*high_bits"):
        TritonLayerStore("mikv", H, D, {"high_bits": 4})
