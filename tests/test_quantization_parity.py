"""Parity of the Rust quantization core with the NumPy reference (the specification).

The core and the reference use the same float32 operation order and ``floor(v + 0.5)``
rounding, so codes, scales, offsets and channel factors must be *identical*; only the
dequantized values get a tolerance (and even those are expected to match bit for bit).

Inputs come in every supported form: float32/float16 numpy arrays, float32/float16 torch
tensors and bfloat16 torch tensors (which the wrapper hands to the core as uint16 bits). The
reference always receives the float32 upcast of exactly the values kvmix saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kvmix
from kvmix.reference import quantization as ref

F32 = np.float32
CHANNELS = [1, 3, 8, 12, 64, 128]
SOURCES = ["np32", "np16", "torch32", "torch16", "torchbf16"]
LAYOUTS = ["contiguous", "transposed", "strided", "reversed"]
# Value distributions, each aimed at a different corner of the quantizer.
KINDS = [
    "normal",  # plain Gaussian data
    "grid",  # multiples of 1/4: many exact rounding ties (v + 0.5 lands on an integer)
    "integers",  # small integers: ties and groups whose range is a power of two
    "constant",  # constant channels and tokens: scale 0 groups
    "outliers",  # one channel 100x larger than the rest (the case both papers fight)
    "tiny",  # ~1e-6: scales that underflow to fp16 subnormals or zero
    "zeros_mixed",  # many exact zeros (and negative zeros) mixed with normal data
]

# Dequantized float32 values: same op order, so exact in practice; allow 1e-6 anyway.
DEQ_RTOL, DEQ_ATOL = 1e-6, 1e-6
# Narrow outputs: at most one unit in the last place of the output dtype apart.
F16_RTOL, F16_ATOL = 2.0**-10, 2.0**-24
BF16_RTOL, BF16_ATOL = 2.0**-7, 1e-38


# ---------------------------------------------------------------------------- data


def make_values(kind: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Float32 data of ``shape`` with the distribution ``kind``, bounded by ~1e3 in magnitude
    so that every dtype and fp16 parameters can represent it."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal(shape) * rng.choice([0.01, 1.0, 30.0])
    elif kind == "grid":
        x = rng.integers(-12, 13, shape) * 0.25
    elif kind == "integers":
        x = rng.integers(-4, 5, shape).astype(np.float64)
    elif kind == "constant":
        x = np.broadcast_to(rng.standard_normal(shape[-1:]), shape).copy()
        if len(shape) >= 2 and shape[-2] > 1:
            x[..., ::2, :] = 1.5  # whole tokens constant too
    elif kind == "outliers":
        x = rng.standard_normal(shape)
        if shape[-1] > 1:
            x[..., rng.integers(shape[-1])] *= 100.0
    elif kind == "tiny":
        x = rng.standard_normal(shape) * 1e-6
    elif kind == "zeros_mixed":
        x = rng.standard_normal(shape)
        x[rng.random(shape) < 0.5] = 0.0
        x[rng.random(shape) < 0.1] = -0.0
    else:
        raise AssertionError(kind)
    return np.asarray(x, dtype=F32)


def with_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """The same values as ``a`` in a non-contiguous memory layout.

    Fortran-ordered arrays are deliberately not produced here: they have a test of their own
    in ``test_errors.py`` (see the known bug recorded there).
    """
    if layout == "contiguous":
        return a
    if layout == "transposed":  # channels-major storage with a padding token, viewed as [..., t, d]
        t = a.shape[-2]
        buf = np.zeros((*a.shape[:-2], a.shape[-1], t + 1), dtype=a.dtype)
        buf[..., :t] = a.swapaxes(-1, -2)
        return buf[..., :t].swapaxes(-1, -2)
    if layout == "strided":  # every other element of a twice-as-wide buffer
        big = np.zeros((*a.shape[:-1], 2 * a.shape[-1]), dtype=a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if layout == "reversed":  # negative strides
        return np.ascontiguousarray(a[..., ::-1, ::-1])[..., ::-1, ::-1]
    raise AssertionError(layout)


def _not_fortran_only(a: Any) -> bool:
    """Whether the core reads ``a`` in row-major order (bfloat16 is made contiguous first)."""
    if isinstance(a, torch.Tensor):
        if a.dtype == torch.bfloat16:
            return True
        a = a.numpy()
    flags = a.flags
    return bool(flags.c_contiguous or not flags.f_contiguous)


def as_source(x32: np.ndarray, source: str, layout: str = "contiguous") -> tuple[Any, np.ndarray]:
    """(input for kvmix in the form ``source``, float32 values the reference must see)."""
    if source == "np32":
        return with_layout(x32, layout), x32
    if source == "np16":
        a = x32.astype(np.float16)
        return with_layout(a, layout), a.astype(F32)
    if source in ("torch32", "torch16", "torchbf16"):
        dtype = {"torch32": torch.float32, "torch16": torch.float16, "torchbf16": torch.bfloat16}
        t = torch.from_numpy(x32.copy()).to(dtype[source])
        if layout == "transposed":
            n = t.shape[-2]
            buf = torch.zeros((*t.shape[:-2], t.shape[-1], n + 1), dtype=t.dtype)
            buf[..., :n] = t.transpose(-1, -2)
            t = buf[..., :n].transpose(-1, -2)
        elif layout == "strided":
            big = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
            big[..., ::2] = t
            t = big[..., ::2]
        # (torch has no negative strides: "reversed" stays contiguous)
        return t, t.float().numpy().copy()
    raise AssertionError(source)


@dataclass
class Case:
    x32: np.ndarray  # the generated float32 data
    xin: Any  # what kvmix gets
    xref: np.ndarray  # what the reference gets (float32 of the same rounded values)
    bits: int
    param_dtype: str
    source: str

    @property
    def lead(self) -> tuple[int, ...]:
        return self.x32.shape[:-2]

    @property
    def tokens(self) -> int:
        return self.x32.shape[-2]

    @property
    def channels(self) -> int:
        return self.x32.shape[-1]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    rank = draw(st.integers(2, 4))
    lead = tuple(draw(st.integers(0, 3)) for _ in range(rank - 2))
    tokens = draw(st.integers(0, 40))
    channels = draw(st.sampled_from(CHANNELS))
    shape = (*lead, tokens, channels)
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2**32 - 1))
    source = draw(st.sampled_from(SOURCES))
    layout = draw(st.sampled_from(LAYOUTS))
    x32 = make_values(kind, shape, seed)
    xin, xref = as_source(x32, source, layout)
    assert _not_fortran_only(xin)
    return Case(
        x32=x32,
        xin=xin,
        xref=xref,
        bits=draw(st.integers(1, 8)),
        param_dtype=draw(st.sampled_from(["float16", "float32"])),
        source=source,
    )


def channel_factors(
    draw: st.DrawFn, lead: tuple[int, ...], channels: int, seed: int
) -> np.ndarray | None:
    """Optional positive per-(leading index, channel) factors, some of them exact powers of 2."""
    if not draw(st.booleans()):
        return None
    rng = np.random.default_rng(seed)
    f = rng.uniform(0.25, 4.0, (*lead, channels))
    f[rng.random(f.shape) < 0.3] = 2.0
    return f.astype(F32)


# ---------------------------------------------------------------------------- checks


def assert_same_quantization(q: kvmix.QuantizedTensor, r: ref.Quantized, case: Case) -> None:
    """Everything the core stores equals the reference's, exactly."""
    shape = case.x32.shape
    assert q.shape == list(shape)
    assert q.bits == case.bits
    assert q.param_dtype == case.param_dtype

    codes = q.unpacked_codes()
    assert codes.dtype == np.uint8
    assert codes.shape == shape
    np.testing.assert_array_equal(codes, r.codes, strict=True)
    assert int(codes.max(initial=0)) < 2**case.bits

    # The packed buffer is the documented dense LSB-first stream of the row-major codes.
    packed = q.codes
    assert packed.dtype == np.uint8 and packed.ndim == 1
    np.testing.assert_array_equal(packed, ref.pack_bits(r.codes, case.bits), strict=True)

    for name, got, want in (("scale", q.scale, r.scale), ("offset", q.offset, r.offset)):
        assert got.dtype == np.dtype(case.param_dtype), name
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got.astype(F32), want, err_msg=name, strict=True)

    if r.channel_scale is None:
        assert q.channel_scale is None
    else:
        cs = q.channel_scale
        assert cs is not None
        assert cs.dtype == np.dtype(case.param_dtype)
        np.testing.assert_array_equal(cs.astype(F32), r.channel_scale, strict=True)


def assert_same_reconstruction(q: kvmix.QuantizedTensor, want: np.ndarray) -> None:
    """Dequantization in every output dtype matches the reference's float32 result."""
    got = kvmix.dequantize(q)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=DEQ_RTOL, atol=DEQ_ATOL)

    got16 = kvmix.dequantize(q, "float16")
    assert got16.dtype == np.float16 and got16.shape == want.shape
    np.testing.assert_allclose(
        got16.astype(F32), want.astype(np.float16).astype(F32), rtol=F16_RTOL, atol=F16_ATOL
    )

    got_bf = kvmix.dequantize(q, torch.bfloat16)
    assert isinstance(got_bf, torch.Tensor) and got_bf.dtype == torch.bfloat16
    want_bf = torch.from_numpy(want).to(torch.bfloat16).float().numpy()
    np.testing.assert_allclose(got_bf.float().numpy(), want_bf, rtol=BF16_RTOL, atol=BF16_ATOL)
    # The raw method returns the same bfloat16 values as uint16 bits.
    bits = q.dequantize("bfloat16")
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(bits, got_bf.view(torch.uint16).numpy())

    got_t32 = kvmix.dequantize(q, torch.float32)
    assert isinstance(got_t32, torch.Tensor) and got_t32.dtype == torch.float32
    np.testing.assert_array_equal(got_t32.numpy(), got)


# ---------------------------------------------------------------------------- quantize


@given(data=st.data(), case=cases())
def test_token_groups_match_reference(data: st.DataObject, case: Case) -> None:
    d = case.channels
    divisors = [g for g in range(1, d + 1) if d % g == 0]
    group_size = data.draw(st.one_of(st.none(), st.sampled_from(divisors)), label="group_size")
    cs = channel_factors(data.draw, case.lead, d, seed=d + case.tokens)
    clip = data.draw(st.sampled_from(kvmix._kvmix.CLIPS), label="clip")

    q = kvmix.quantize(
        case.xin,
        case.bits,
        group_size=group_size,
        channel_scale=cs,
        param_dtype=case.param_dtype,
        clip=clip,
    )
    g = d if group_size is None else group_size
    r = ref.quantize_token_groups(case.xref, case.bits, g, case.param_dtype, cs, clip)

    assert q.grouping == "token"
    assert q.group_size == g
    assert q.scale.shape == (*case.lead, case.tokens, d // g)
    assert_same_quantization(q, r, case)
    assert_same_reconstruction(q, ref.dequantize_token_groups(r, g))


@given(data=st.data(), case=cases())
def test_channel_blocks_match_reference(data: st.DataObject, case: Case) -> None:
    d, t = case.channels, case.tokens
    token_block = data.draw(st.one_of(st.none(), st.integers(1, 45)), label="token_block")
    cs = channel_factors(data.draw, case.lead, d, seed=d * 7 + t)
    clip = data.draw(st.sampled_from(kvmix._kvmix.CLIPS), label="clip")

    q = kvmix.quantize(
        case.xin,
        case.bits,
        grouping="channel",
        token_block=token_block,
        channel_scale=cs,
        param_dtype=case.param_dtype,
        clip=clip,
    )
    # Default: one block of all tokens (a zero-token tensor still reports a positive block).
    tb = max(t, 1) if token_block is None else token_block
    r = ref.quantize_channel_blocks(case.xref, case.bits, tb, case.param_dtype, cs, clip)

    assert q.grouping == "channel"
    assert q.group_size == tb
    assert q.scale.shape == (*case.lead, -(-t // tb), d)
    assert_same_quantization(q, r, case)
    assert_same_reconstruction(q, ref.dequantize_channel_blocks(r, tb))


# Shapes past the parallel threshold (2**15 elements), token runs longer than one work unit
# (64 tokens) and rows whose codes do not fill whole bytes (channels * bits % 8 != 0).
LARGE = [
    ((4, 70, 128), 2, "token", 64),
    ((2, 3, 1500, 12), 3, "token", 12),
    ((2, 3, 1500, 12), 3, "token", 4),
    ((3, 4000, 3), 5, "token", 1),
    ((2, 2, 257, 64), 4, "token", 32),
    ((4, 70, 128), 2, "channel", 16),
    ((2, 3, 1500, 12), 3, "channel", 7),
    ((3, 4000, 3), 5, "channel", None),
    ((2, 2, 257, 64), 1, "channel", 100),
]


@pytest.mark.parametrize("clip", ["minmax", "mse", "mse_unbiased"])
@pytest.mark.parametrize("param_dtype", ["float16", "float32"])
@pytest.mark.parametrize(("shape", "bits", "grouping", "size"), LARGE)
def test_large_tensors_match_reference(
    shape: tuple[int, ...], bits: int, grouping: str, size: int | None, param_dtype: str, clip: str
) -> None:
    x = make_values("outliers", shape, seed=sum(shape) + bits)
    case = Case(x, x, x, bits, param_dtype, "np32")
    if grouping == "token":
        q = kvmix.quantize(x, bits, group_size=size, param_dtype=param_dtype, clip=clip)
        r = ref.quantize_token_groups(x, bits, size, param_dtype, clip=clip)
        want = ref.dequantize_token_groups(r, size)
    else:
        q = kvmix.quantize(
            x, bits, grouping="channel", token_block=size, param_dtype=param_dtype, clip=clip
        )
        tb = shape[-2] if size is None else size
        r = ref.quantize_channel_blocks(x, bits, tb, param_dtype, clip=clip)
        want = ref.dequantize_channel_blocks(r, tb)
    assert_same_quantization(q, r, case)
    assert_same_reconstruction(q, want)


@pytest.mark.parametrize("grouping", ["token", "channel"])
def test_statistics_are_per_leading_index(grouping: str, rng: np.random.Generator) -> None:
    """Quantizing a batch equals quantizing each (sequence, head) alone: nothing is shared."""
    x = rng.standard_normal((3, 2, 50, 12)).astype(F32)
    x[1] *= 50.0  # a very different sequence must not change the others' parameters
    kw: dict[str, Any] = {"group_size": 6} if grouping == "token" else {"token_block": 16}
    cs = rng.uniform(0.5, 2.0, (3, 2, 12)).astype(F32)
    whole = kvmix.quantize(x, 3, grouping=grouping, channel_scale=cs, **kw)
    codes, deq = whole.unpacked_codes(), kvmix.dequantize(whole)
    for b in range(3):
        for h in range(2):
            part = kvmix.quantize(
                x[b : b + 1, h : h + 1],
                3,
                grouping=grouping,
                channel_scale=cs[b : b + 1, h : h + 1],
                **kw,
            )
            np.testing.assert_array_equal(part.unpacked_codes()[0, 0], codes[b, h])
            np.testing.assert_array_equal(part.scale[0, 0], whole.scale[b, h])
            np.testing.assert_array_equal(part.offset[0, 0], whole.offset[b, h])
            np.testing.assert_array_equal(kvmix.dequantize(part)[0, 0], deq[b, h])


# ---------------------------------------------------------------------------- small examples


def test_hand_computed_two_bit_group() -> None:
    # range [0, 3] in 2 bits: scale 1, offset 0; 0.5 and 1.5 are ties and round half *up*
    # (np.round would give 0 and 2).
    x = np.array([[0.0, 0.5, 1.5, 3.0]], dtype=F32)
    q = kvmix.quantize(x, 2, param_dtype="float32")
    np.testing.assert_array_equal(q.unpacked_codes(), [[0, 1, 2, 3]])
    np.testing.assert_array_equal(q.scale, [[1.0]])
    np.testing.assert_array_equal(q.offset, [[0.0]])
    np.testing.assert_array_equal(kvmix.dequantize(q), [[0.0, 1.0, 2.0, 3.0]])
    # 0 + 1*1 + 2*4 + 3*16 in one LSB-first byte.
    np.testing.assert_array_equal(q.codes, [0b11_10_01_00])


def test_hand_computed_channel_blocks() -> None:
    # Two channels over 3 tokens, blocks of 2 tokens: block 0 spans tokens 0-1, block 1 token 2.
    x = np.array([[-1.0, 10.0], [1.0, 20.0], [5.0, 5.0]], dtype=F32)
    q = kvmix.quantize(x, 1, grouping="channel", token_block=2, param_dtype="float32")
    np.testing.assert_array_equal(q.scale, [[2.0, 10.0], [0.0, 0.0]])
    np.testing.assert_array_equal(q.offset, [[-1.0, 10.0], [5.0, 5.0]])
    np.testing.assert_array_equal(q.unpacked_codes(), [[0, 0], [1, 1], [0, 0]])
    np.testing.assert_array_equal(kvmix.dequantize(q), x)


def test_constant_group_reconstructs_its_value() -> None:
    x = np.full((2, 8), 0.1, dtype=F32)
    q = kvmix.quantize(x, 3, group_size=4, param_dtype="float32")
    np.testing.assert_array_equal(q.unpacked_codes(), np.zeros((2, 8), np.uint8))
    np.testing.assert_array_equal(q.scale, np.zeros((2, 2), F32))
    np.testing.assert_array_equal(kvmix.dequantize(q), x)


@pytest.mark.parametrize("grouping", ["token", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_clip_never_loses_to_min_max_and_halves_gaussian_two_bit_error(
    grouping: str, bits: int, rng: np.random.Generator
) -> None:
    """Per group, `clip="mse"`'s squared error is at most min-max's (min-max is a candidate);
    on Gaussian 64-value groups at 2 bits it is about 0.55x (the MSE-optimal uniform grid,
    Max 1960), well below; the stored format and its bytes are the same."""
    x = rng.standard_normal((3, 64, 64)).astype(F32)
    mm = kvmix.quantize(x, bits, grouping=grouping)
    mse = kvmix.quantize(x, bits, grouping=grouping, clip="mse")
    assert mse.nbytes() == mm.nbytes()
    axis = -1 if grouping == "token" else -2  # 64 channels per token / 64 tokens per channel
    x64 = x.astype(np.float64)

    def err(q: kvmix.QuantizedTensor) -> np.ndarray:
        return ((kvmix.dequantize(q).astype(np.float64) - x64) ** 2).sum(axis)

    e_mm, e_mse = err(mm), err(mse)
    assert (e_mse <= e_mm).all()
    ratio = e_mse.sum() / e_mm.sum()
    if bits == 2:
        assert 0.45 < ratio < 0.65, ratio
    else:
        assert ratio < 0.95, ratio


def test_mse_clip_is_deterministic_and_validated() -> None:
    x = make_values("outliers", (2, 300, 64), seed=3)
    a = kvmix.quantize(x, 2, grouping="channel", clip="mse")
    b = kvmix.quantize(x.copy(), 2, grouping="channel", clip="mse")
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scale, b.scale)
    with pytest.raises(kvmix.ConfigError, match="`clip` must be 'minmax', 'mse' or 'mse_unbiased'"):
        kvmix.quantize(x, 2, clip="max")  # type: ignore[arg-type]


def test_parameters_are_rounded_before_encoding() -> None:
    # Range [0, 1.1] in 2 bits: exact step 1.1/3 = 0.36666667, in fp16 0.36669922. The middle
    # value sits exactly half a float32 step above 0, so it rounds up against the float32 grid
    # but down against the (slightly coarser) fp16 grid that dequantization really uses.
    half_step = np.float32(1.1) / np.float32(6)
    x = np.array([[0.0, half_step, 1.1]], dtype=F32)
    q32 = kvmix.quantize(x, 2, param_dtype="float32")
    q16 = kvmix.quantize(x, 2, param_dtype="float16")
    assert q16.scale[0, 0] == np.float16(q32.scale[0, 0])
    assert q16.scale[0, 0] > q32.scale[0, 0]
    np.testing.assert_array_equal(q32.unpacked_codes(), [[0, 1, 3]])
    np.testing.assert_array_equal(q16.unpacked_codes(), [[0, 0, 3]])


# ---------------------------------------------------------------------------- channel factors


@given(case=cases())
def test_channel_absmax_matches_numpy(case: Case) -> None:
    got = kvmix.channel_absmax(case.xin)
    assert got.dtype == np.float32
    assert got.shape == (*case.lead, case.channels)
    np.testing.assert_array_equal(got, np.abs(case.xref).max(axis=-2, initial=0.0), strict=True)


@given(case=cases())
def test_separable_channel_scale_matches_reference(case: Case) -> None:
    got = kvmix.separable_channel_scale(case.xin)
    assert got.dtype == np.float32
    assert got.shape == (*case.lead, case.channels)
    if case.tokens == 0:  # no values: every channel is "all zero" and gets factor 1
        want = np.ones((*case.lead, case.channels), F32)
    else:
        want = ref.separable_channel_scale(case.xref)
    np.testing.assert_array_equal(got, want, strict=True)


@given(case=cases())
def test_channel_separable_quantization_matches_reference(case: Case) -> None:
    q = kvmix.quantize_channel_separable(case.xin, case.bits, param_dtype=case.param_dtype)
    if case.tokens == 0:
        cs = np.ones((*case.lead, case.channels), F32)
    else:
        cs = ref.separable_channel_scale(case.xref)
    r = ref.quantize_token_groups(case.xref, case.bits, case.channels, case.param_dtype, cs)
    assert q.grouping == "token" and q.group_size == case.channels
    assert_same_quantization(q, r, case)
    assert_same_reconstruction(q, ref.dequantize_token_groups(r, case.channels))


@st.composite
def attention_inputs(draw: st.DrawFn) -> tuple[Any, Any, np.ndarray, np.ndarray, str]:
    """Queries [b, hq, tq, d] and keys [b, hk, tk, d] (hq a multiple of hk), in one source
    form, with some all-zero channels; plus their float32 values for the reference."""
    batch = draw(st.integers(0, 2))
    kv_heads = draw(st.integers(1, 3))
    rep = draw(st.integers(1, 3))
    d = draw(st.sampled_from(CHANNELS))
    tq, tk = draw(st.integers(1, 12)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    source = draw(st.sampled_from(SOURCES))
    rng = np.random.default_rng(seed)
    q32 = (rng.standard_normal((batch, kv_heads * rep, tq, d)) * 4).astype(F32)
    k32 = rng.standard_normal((batch, kv_heads, tk, d)).astype(F32)
    q32[..., rng.random(d) < 0.2] = 0.0  # zero query channels -> factor 1
    k32[..., rng.random(d) < 0.2] = 0.0  # zero key channels -> factor 1
    k32[..., rng.integers(d)] *= 30.0  # a key outlier channel
    qin, qref = as_source(q32, source)
    kin, kref = as_source(k32, source)
    return qin, kin, qref, kref, source


@given(inputs=attention_inputs())
def test_key_balancer_matches_reference(
    inputs: tuple[Any, Any, np.ndarray, np.ndarray, str],
) -> None:
    qin, kin, qref, kref, _ = inputs
    got = kvmix.key_balancer(qin, kin)
    want = ref.key_balancer(qref, kref)
    assert got.dtype == np.float32
    assert got.shape == (kref.shape[0], kref.shape[1], kref.shape[3])
    np.testing.assert_array_equal(got, want, strict=True)
    assert np.all(got > 0)


@given(data=st.data(), inputs=attention_inputs())
def test_balanced_keys_match_reference(
    data: st.DataObject, inputs: tuple[Any, Any, np.ndarray, np.ndarray, str]
) -> None:
    qin, kin, qref, kref, source = inputs
    d = kref.shape[-1]
    bits = data.draw(st.integers(1, 8), label="bits")
    param_dtype = data.draw(st.sampled_from(["float16", "float32"]), label="param_dtype")
    divisors = [g for g in range(1, d + 1) if d % g == 0]
    group_size = data.draw(st.one_of(st.none(), st.sampled_from(divisors)), label="group_size")

    balancer = kvmix.key_balancer(qin, kin)
    q = kvmix.quantize_balanced_keys(
        kin, bits, balancer, group_size=group_size, param_dtype=param_dtype
    )
    g = max(d // 2, 1) if group_size is None else group_size  # default: half a head
    b = ref.key_balancer(qref, kref)
    r = ref.quantize_token_groups(kref, bits, g, param_dtype, channel_scale=F32(1.0) / b)
    assert q.group_size == g
    assert_same_quantization(q, r, Case(kref, kin, kref, bits, param_dtype, source))
    assert_same_reconstruction(q, ref.dequantize_token_groups(r, g))


def test_zero_token_statistics_give_unit_factors() -> None:
    q = np.zeros((1, 2, 0, 4), F32)
    k = np.zeros((1, 1, 0, 4), F32)
    np.testing.assert_array_equal(kvmix.key_balancer(q, k), np.ones((1, 1, 4), F32))
    np.testing.assert_array_equal(kvmix.channel_absmax(k), np.zeros((1, 1, 4), F32))
    np.testing.assert_array_equal(kvmix.separable_channel_scale(k), np.ones((1, 1, 4), F32))


def test_key_balancer_hand_computed() -> None:
    # 2 query heads share 1 kv head; max|q| per channel = (8, 1), max|k| = (2, 4).
    q = np.array([2.0, 1.0, -8.0, 1.0], F32).reshape(1, 2, 1, 2)
    k = np.array([2.0, -4.0], F32).reshape(1, 1, 1, 2)
    np.testing.assert_array_equal(kvmix.key_balancer(q, k), [[[2.0, 0.5]]])


def test_separable_scale_hand_computed() -> None:
    x = np.array([[1.0, -4.0, 0.0], [-9.0, 0.0, 0.0]], F32)
    np.testing.assert_array_equal(kvmix.separable_channel_scale(x), [3.0, 2.0, 1.0])
    np.testing.assert_array_equal(kvmix.channel_absmax(x), [9.0, 4.0, 0.0])
