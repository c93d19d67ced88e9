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


@pytest.mark.parametrize(
    "config",
    [
        {"selection": "layer", "normalized": True, "sink_tokens": 0},
        {"selection": "kv_head", "normalized": True, "sink_tokens": 3},
        {"selection": "kv_head", "normalized": False, "sink_tokens": 0},
        {"selection": "layer", "normalized": False, "sink_tokens": 4},
    ],
)
def test_zipcache_ranking_edge_cases_match_rust(config):
    """ZipCache's ranking (``zipcache_rank_kernel``, one sort, ``mark_salient_kernel``)
    against the Rust store's ``importance::top_k`` where ranking is delicate: scores of three
    values (ties go to the more recent token), zero counts (a normalized score of 0), a
    left-padded sequence, attention sinks, both selections. (NaN scores, which the kernel
    ranks lowest as the Rust store does, cannot be given to the Rust store: it refuses them.)"""
    b, h, d, n = 2, 3, 32, 90
    g = torch.Generator().manual_seed(11)
    rust = kvmix.LayerStore("zipcache", h, d, {"streaming_gap": 4, **config}, "float32")
    tri = TritonLayerStore("zipcache", h, d, {"streaming_gap": 4, **config}, "float32")
    k, v = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    rust.append(k.numpy(), v.numpy())
    tri.append(k, v)
    for store in (rust, tri):
        store.set_first_valid([7, 0])
    acc = torch.randint(0, 3, (b, h, n), generator=g).float() / 2
    cnt = torch.randint(0, 3, (b, h, n), generator=g).float()
    rust.add_scores(0, acc.numpy(), cnt.numpy())
    tri.add_scores(0, acc, cnt)
    assert rust.maybe_classify() and tri.maybe_classify()
    for s in range(b * h):
        rp, tp = rust.tier_positions(s), tri.tier_positions(s)
        for tier in ("buffer", "high", "low"):
            np.testing.assert_array_equal(rp[tier], tp[tier].numpy(), err_msg=f"{s} {tier}")


def test_engine_resolution_and_refusals():
    assert resolve_engine("auto", torch.device("cpu")) == "rust"
    assert resolve_engine("auto", torch.device("cuda")) == "triton"
    assert resolve_engine("triton", torch.device("cpu")) == "triton"
    with pytest.raises(kvmix.ConfigError, match="engine"):
        resolve_engine("gpu", torch.device("cpu"))
    with pytest.raises(kvmix.ConfigError, match=r"triton engine.*MiKV.*high_bits"):
        TritonLayerStore("mikv", H, D, {"high_bits": 4})


# The field path (2-, 4- and 8-bit tiers read as int16 elements, 3-bit keys as 24-bit groups,
# one dot per bit field) needs
# D * bits >= 256, so the contract's CPU size (D = 32) never takes it; a GPU takes it by
# default. Here, at D = 128 with segments of several pages (key_block=128: two 64-row pages
# each, the layout kvmix-5x's keys use), on the store's own tiers, with the default launch
# (a page per program here) and one program per tier (a program walks all of its tier's
# pages: runs of several pages, rescalings between them, as at long contexts): the output
# against the Rust engine's, the received attention against the float64 reference.
@pytest.mark.parametrize("programs", [None, 1])
@pytest.mark.parametrize(
    "config",
    [
        {"streaming_gap": 4},
        {"streaming_gap": 4, "key_block": 128, "salient_ratio": 0.2, "sink_tokens": 4},
        # kvmix-5x's low tier: 3-bit keys (24-bit groups).
        {
            "streaming_gap": 4,
            "key_block": 128,
            "salient_ratio": 0.2,
            "sink_tokens": 4,
            "low_key_bits": 3,
        },
    ],
)
def test_field_path_matches_rust_on_store_tiers(config, programs):
    from kvmix.engines import load_attention
    from kvmix.engines import triton_reference as ref

    b, h, d, n = 2, 2, 128, 600
    torch.manual_seed(1)
    rust = kvmix.LayerStore("zipcache", h, d, config, "float32")
    tri = TritonLayerStore("zipcache", h, d, config, "float32")
    k, v = torch.randn(b, h, n + 3, d), torch.randn(b, h, n + 3, d)
    k[..., ::17] *= 5
    rust.append(k[:, :, :n].numpy(), v[:, :, :n].numpy())
    tri.append(k[:, :, :n], v[:, :, :n])
    acc, cnt = torch.rand(b, h, n), torch.ones(b, h, n)
    rust.add_scores(0, acc.numpy(), cnt.numpy())
    tri.add_scores(0, acc, cnt)
    assert rust.maybe_classify() and tri.maybe_classify()
    # Rows in the buffer too, so that every tier has rows.
    rust.append(k[:, :, n:].numpy(), v[:, :, n:].numpy())
    tri.append(k[:, :, n:], v[:, :, n:])
    q = torch.randn(b, 4 * h, 1, d) * 3
    views = [tri._tiers[t].view() for t in ("buffer", "high", "low")]
    assert all(vw.fill for vw in views)
    attn = load_attention("cpu")
    assert [attn._fields_tier(vw, d) for vw in views] == [False, True, True]
    out, rec = attn.attend_tiers(
        views, q, [n + 2], tri._fv_dev, d**-0.5, h, [True] * 3,
        fields=True, target_programs=programs,
    )  # fmt: skip
    out_r = rust.attend(q.numpy(), [n + 2], d**-0.5, False)
    np.testing.assert_allclose(out.numpy(), out_r, rtol=1e-5, atol=1e-5)
    _, want_rec = ref.attention(views, q, [n + 2], tri._fv_dev, d**-0.5, h)
    # fp32 rounding of the logits: a large received attention (a sink token's ~0.6-0.7) is
    # ~1e-6 off on either path, the integer one too (2e-6 relative), so a few ulps relative.
    for got, want in zip(rec, want_rec, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=4e-6, atol=1e-6)


def test_both_engines_refuse_the_same_queries_and_keep_their_scores():
    """The stores' ``attend`` refuses the same bad queries with the same exceptions, before
    anything changes (a refused call adds nothing to the scores: the next classification
    puts every token where a store that never saw it does), and gives an empty output for no
    queries. The Triton store used to take integer queries, negative or fractional
    positions and (on the CPU) NaN, and failed inside the kernel on no queries."""
    b, h, d, n = 1, 2, 32, 60
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    config = {"streaming_gap": 4}
    rust, rust_clean = (kvmix.LayerStore("zipcache", h, d, config) for _ in range(2))
    tri, tri_clean = (TritonLayerStore("zipcache", h, d, config) for _ in range(2))
    for store in (rust, rust_clean):
        store.append(k.numpy(), v.numpy())
    for store in (tri, tri_clean):
        store.append(k, v)
    q = torch.randn(b, 2 * h, 1, d, generator=g)
    nan = q.clone()
    nan[0, 1, 0, 3] = float("nan")
    bad = [
        (q.int(), [n - 1], kvmix.DTypeError, "`q` must be"),
        (nan, [n - 1], kvmix.NonFiniteError, "NaN"),
        (q, [-1], kvmix.ConfigError, "`q_positions` must hold non-negative integers, got -1"),
        (q, [2.5], kvmix.ConfigError, "`q_positions` must hold non-negative integers, got 2.5"),
        (q, [True], kvmix.ConfigError, "`q_positions` must hold non-negative integers, got True"),
        (q[:, :3], [n - 1], kvmix.ShapeError, "3, 1, 32"),
        (q, [n - 1, n], kvmix.ShapeError, "q_len|q_positions"),
    ]
    for x, positions, error, match in bad:
        for store, arg in ((rust, x.numpy()), (tri, x)):
            with pytest.raises(error, match=match):
                store.attend(arg, positions, d**-0.5, True)
    empty = torch.randn(b, 2 * h, 0, d)
    assert rust.attend(empty.numpy(), [], d**-0.5, True).shape == (b, 2 * h, 0, d)
    assert tri.attend(empty, [], d**-0.5, True).shape == (b, 2 * h, 0, d)
    for store, arg in ((rust, q.numpy()), (rust_clean, q.numpy()), (tri, q), (tri_clean, q)):
        store.attend(arg, [n - 1], d**-0.5, True)
        assert store.maybe_classify(True)
    for s in range(b * h):
        held = [store.tier_positions(s) for store in (rust, rust_clean, tri, tri_clean)]
        for tier in ("buffer", "high", "low"):
            want = held[1][tier]
            for got in held[0], held[2], held[3]:
                np.testing.assert_array_equal(np.asarray(got[tier]), want, err_msg=tier)


def test_both_stores_refuse_the_same_arguments_of_their_other_methods():
    """``crop``, ``select_batch``, ``repeat_interleave``, ``set_first_valid``, ``add_scores``
    and ``append`` on both stores: the same kvmix exception for the same bad argument (the
    Rust store raised numpy's and PyO3's ``TypeError`` / ``OverflowError`` for some; the
    Triton store took a negative crop length, emptying every tier, negative first-valid
    positions, NaN or negative scores and keys of any dtype), and a refused call changes
    nothing."""
    b, h, d, n = 2, 2, 16, 40
    k = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(4))
    f32 = np.ones((b, h, 5), np.float32)
    nan = f32.copy()
    nan[1, 0, 2] = np.nan
    calls = [
        (kvmix.ConfigError, "`length` must be a non-negative integer", "crop", (-1,)),
        (kvmix.ConfigError, "`length` must be a non-negative integer", "crop", (2.5,)),
        (kvmix.ConfigError, "`indices` must hold non-negative integers", "select_batch", ([-1],)),
        (kvmix.ConfigError, "`indices` must hold non-negative integers", "select_batch", ([0.5],)),
        (kvmix.ShapeError, "batch index 2 out of range", "select_batch", ([2],)),
        (kvmix.ConfigError, "`repeats` must be a non-negative integer", "repeat_interleave", (-2,)),
        (kvmix.ConfigError, "`first_valid` must hold non-negative", "set_first_valid", ([-1, 0],)),
        (kvmix.ShapeError, "one entry per sequence", "set_first_valid", ([0],)),
        (kvmix.ConfigError, "`start` must be a non-negative integer", "add_scores", (-1, f32, f32)),
        (kvmix.NonFiniteError, "finite and non-negative", "add_scores", (0, nan, f32)),
        (kvmix.NonFiniteError, "finite and non-negative", "add_scores", (0, f32, -f32)),
        (kvmix.DTypeError, "`acc` must be a f", "add_scores", (0, f32.astype(np.int32), f32)),
        (kvmix.ShapeError, "got 20 and 16 values", "add_scores", (0, f32, f32[..., :4])),
        (kvmix.DTypeError, "`keys` must be a ", "append", (k.numpy().astype(np.int32),) * 2),
        (kvmix.DTypeError, "`keys` must be a ", "append", (k.numpy().astype(np.float64),) * 2),
        (kvmix.DTypeError, "same dtype", "append", (k.numpy(), k.numpy().astype(np.float16))),
    ]
    rust = kvmix.LayerStore("zipcache", h, d, {"streaming_gap": 4})
    tri = TritonLayerStore("zipcache", h, d, {"streaming_gap": 4})
    rust.append(k.numpy(), k.numpy())
    tri.append(k, k)
    for store, host in ((rust, True), (tri, False)):
        before = [store.tier_positions(s) for s in range(b * h)], store.seen, store.batch
        for error, match, method, args in calls:
            if not host:  # the device store takes torch tensors
                args = tuple(torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args)
            with pytest.raises(error, match=match):
                getattr(store, method)(*args)
        after = [store.tier_positions(s) for s in range(b * h)], store.seen, store.batch
        assert after[1:] == before[1:]
        for x, y in zip(after[0], before[0], strict=True):
            for tier in x:
                np.testing.assert_array_equal(np.asarray(x[tier]), np.asarray(y[tier]))
