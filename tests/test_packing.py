"""Dense bit packing (``pack_bits``/``unpack_bits``) and the byte accounting of
``QuantizedTensor.nbytes()``.

The layout is specified by the reference packer: code ``i`` occupies bits
``[i*bits, (i+1)*bits)`` of a little-endian bit stream, so ``n`` codes take exactly
``ceil(n*bits/8)`` bytes for every width, 3 bits included.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kvmix
from kvmix.reference import quantization as ref


@st.composite
def codes_and_bits(draw: st.DrawFn, max_len: int = 200) -> tuple[np.ndarray, int]:
    bits = draw(st.integers(1, 8))
    codes = draw(st.lists(st.integers(0, 2**bits - 1), max_size=max_len))
    return np.array(codes, dtype=np.uint8), bits


@given(cb=codes_and_bits())
def test_pack_matches_reference_and_round_trips(cb: tuple[np.ndarray, int]) -> None:
    codes, bits = cb
    packed = kvmix.pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert packed.size == math.ceil(codes.size * bits / 8)
    np.testing.assert_array_equal(packed, ref.pack_bits(codes, bits), strict=True)

    back = kvmix.unpack_bits(packed, bits, codes.size)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, codes, strict=True)
    np.testing.assert_array_equal(back, ref.unpack_bits(packed, bits, codes.size), strict=True)


@given(
    bits=st.integers(1, 8),
    n=st.integers(0, 100),
    seed=st.integers(0, 2**32 - 1),
)
def test_unpack_ignores_padding_bits(bits: int, n: int, seed: int) -> None:
    """Bits past the last code in the final byte do not leak into the codes."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, n, dtype=np.uint8)
    packed = ref.pack_bits(codes, bits)
    used = n * bits
    if used % 8:
        packed[-1] |= np.uint8((0xFF << (used % 8)) & 0xFF)
    np.testing.assert_array_equal(kvmix.unpack_bits(packed, bits, n), codes, strict=True)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 65, 1000, 12_345, 100_003])
def test_long_streams_round_trip(bits: int, n: int, rng: np.random.Generator) -> None:
    codes = rng.integers(0, 2**bits, n, dtype=np.uint8)
    packed = kvmix.pack_bits(codes, bits)
    assert packed.size == (n * bits + 7) // 8
    np.testing.assert_array_equal(packed, ref.pack_bits(codes, bits), strict=True)
    np.testing.assert_array_equal(kvmix.unpack_bits(packed, bits, n), codes, strict=True)


def test_pack_accepts_any_integer_array_shape() -> None:
    codes2d = np.arange(16, dtype=np.int64).reshape(4, 4) % 4
    np.testing.assert_array_equal(kvmix.pack_bits(codes2d, 2), ref.pack_bits(codes2d.ravel(), 2))
    np.testing.assert_array_equal(kvmix.pack_bits([1, 0, 1], 1), [0b101])


def test_three_bit_codes_are_dense() -> None:
    # Eight 3-bit codes are exactly three bytes: c0 + c1<<3 + ... + c7<<21, little endian.
    codes = [1, 2, 3, 4, 5, 6, 7, 0]
    word = sum(c << (3 * i) for i, c in enumerate(codes))
    packed = kvmix.pack_bits(np.array(codes, np.uint8), 3)
    assert packed.tobytes() == word.to_bytes(3, "little")
    # No padding to 4 bits: 1000 codes take 375 bytes, not 500.
    assert kvmix.pack_bits(np.zeros(1000, np.uint8), 3).size == 375
    assert kvmix.pack_bits(np.zeros(1001, np.uint8), 3).size == 376


def test_hand_computed_bytes() -> None:
    np.testing.assert_array_equal(kvmix.pack_bits([0, 1, 2, 3], 2), [0b11_10_01_00])
    np.testing.assert_array_equal(kvmix.pack_bits([1, 0, 0, 0, 0, 0, 0, 1, 1], 1), [0x81, 0x01])
    np.testing.assert_array_equal(kvmix.pack_bits([0xA, 0x5, 0xF], 4), [0x5A, 0x0F])
    np.testing.assert_array_equal(kvmix.pack_bits([200, 7], 8), [200, 7])
    np.testing.assert_array_equal(kvmix.unpack_bits([0x5A, 0x0F], 4, 3), [0xA, 0x5, 0xF])


def test_empty_streams() -> None:
    for bits in range(1, 9):
        packed = kvmix.pack_bits(np.zeros(0, np.uint8), bits)
        assert packed.size == 0 and packed.dtype == np.uint8
        assert kvmix.unpack_bits(packed, bits, 0).size == 0


# ---------------------------------------------------------------------------- nbytes


def _check_nbytes(q: kvmix.QuantizedTensor) -> dict[str, int]:
    nb = q.nbytes()
    assert set(nb) == {"codes", "scale", "offset", "channel_scale", "total"}
    assert nb["codes"] == q.codes.nbytes
    assert nb["scale"] == q.scale.nbytes
    assert nb["offset"] == q.offset.nbytes
    cs = q.channel_scale
    assert nb["channel_scale"] == (0 if cs is None else cs.nbytes)
    assert nb["total"] == nb["codes"] + nb["scale"] + nb["offset"] + nb["channel_scale"]
    return nb


@given(
    lead=st.lists(st.integers(0, 3), max_size=2),
    tokens=st.integers(0, 40),
    channels=st.sampled_from([1, 3, 8, 12, 64, 128]),
    bits=st.integers(1, 8),
    param_dtype=st.sampled_from(["float16", "float32"]),
    grouping=st.sampled_from(["token", "channel"]),
    size_index=st.integers(0, 100),
    with_channel_scale=st.booleans(),
)
def test_nbytes_equals_buffer_sizes_and_formula(
    lead: list[int],
    tokens: int,
    channels: int,
    bits: int,
    param_dtype: str,
    grouping: str,
    size_index: int,
    with_channel_scale: bool,
) -> None:
    shape = (*lead, tokens, channels)
    x = np.random.default_rng(size_index).standard_normal(shape).astype(np.float32)
    rows = math.prod(lead)
    cs = np.full((*lead, channels), 2.0, np.float32) if with_channel_scale else None
    if grouping == "token":
        divisors = [g for g in range(1, channels + 1) if channels % g == 0]
        size = divisors[size_index % len(divisors)]
        q = kvmix.quantize(x, bits, group_size=size, channel_scale=cs, param_dtype=param_dtype)
        n_params = rows * tokens * (channels // size)
    else:
        size = 1 + size_index % 45
        q = kvmix.quantize(
            x, bits, grouping="channel", token_block=size, channel_scale=cs, param_dtype=param_dtype
        )
        n_params = rows * math.ceil(tokens / size) * channels
    nb = _check_nbytes(q)
    p = 2 if param_dtype == "float16" else 4
    assert nb["codes"] == math.ceil(x.size * bits / 8)
    assert nb["scale"] == nb["offset"] == n_params * p
    assert nb["channel_scale"] == (rows * channels * p if with_channel_scale else 0)


def test_nbytes_hand_computed() -> None:
    # The docstring example: [1, 2, 16, 64], 2 bits, groups of 32 channels, fp16 parameters.
    x = np.random.default_rng(0).standard_normal((1, 2, 16, 64), dtype=np.float32)
    q = kvmix.quantize(x, bits=2, group_size=32)
    nb = _check_nbytes(q)
    assert nb["codes"] == 2 * 16 * 64 * 2 // 8 == 512
    assert nb["scale"] == nb["offset"] == 2 * 16 * 2 * 2 == 128
    assert nb["channel_scale"] == 0
    assert nb["total"] == 768

    # 3-bit channel-separable values with a single token of 3 channels: 9 bits -> 2 bytes.
    q3 = kvmix.quantize_channel_separable(np.array([[1.0, -2.0, 3.0]], np.float32), 3)
    assert _check_nbytes(q3) == {
        "codes": 2,
        "scale": 2,
        "offset": 2,
        "channel_scale": 6,
        "total": 12,
    }


def test_nbytes_of_bfloat16_input_counts_only_stored_buffers() -> None:
    """The input dtype does not change what is stored."""
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(0))
    a = _check_nbytes(kvmix.quantize(x.to(torch.bfloat16), 4, group_size=8))
    b = _check_nbytes(kvmix.quantize(x, 4, group_size=8))
    assert a == b
    assert a["codes"] == 2 * 10 * 16 * 4 // 8


def test_dequantize_into_a_reused_buffer_equals_a_fresh_result(rng: np.random.Generator) -> None:
    x = rng.standard_normal((2, 3, 40, 16), dtype=np.float32)
    q = kvmix.quantize(x, 3, group_size=8)
    out = np.full(x.shape, np.nan, np.float32)
    assert kvmix.dequantize(q, out=out) is out
    np.testing.assert_array_equal(out, kvmix.dequantize(q))
    half = np.zeros(x.shape, np.float16)
    q.dequantize_into(half)
    np.testing.assert_array_equal(half, q.dequantize("float16"))
    with pytest.raises(kvmix.ShapeError, match="shape"):
        q.dequantize_into(np.zeros((2, 3, 40, 8), np.float32))
    with pytest.raises(kvmix.ShapeError, match="C-contiguous"):
        q.dequantize_into(np.zeros((16, 40, 3, 2), np.float32).T)
    with pytest.raises(kvmix.DTypeError, match="float32 or float16"):
        q.dequantize_into(np.zeros(x.shape, np.float64))
