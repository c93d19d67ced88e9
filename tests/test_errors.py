"""Bad input is refused with the kvmix exception family and a message that names the
offending argument; awkward but valid input (non-contiguous, read-only, empty) is handled
correctly; and no call ever writes to the caller's arrays.

Fortran-ordered and transposed inputs are read in logical (row-major) order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import kvmix
from kvmix import ConfigError, DTypeError, KvmixError, NonFiniteError, ShapeError
from kvmix.reference import quantization as ref

F32 = np.float32


@pytest.fixture
def x(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((2, 3, 10, 8)).astype(F32)


def assert_same_result(a: kvmix.QuantizedTensor, b: kvmix.QuantizedTensor) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.codes, b.codes, strict=True)
    np.testing.assert_array_equal(a.scale, b.scale, strict=True)
    np.testing.assert_array_equal(a.offset, b.offset, strict=True)
    if b.channel_scale is None:
        assert a.channel_scale is None
    else:
        np.testing.assert_array_equal(a.channel_scale, b.channel_scale, strict=True)
    np.testing.assert_array_equal(kvmix.dequantize(a), kvmix.dequantize(b), strict=True)


# ---------------------------------------------------------------------------- the family


def test_exception_hierarchy() -> None:
    for cls in (ShapeError, DTypeError, ConfigError, NonFiniteError):
        assert issubclass(cls, KvmixError)
        assert cls is getattr(kvmix.errors, cls.__name__) is getattr(kvmix._kvmix, cls.__name__)
    assert issubclass(KvmixError, ValueError)
    assert len({ShapeError, DTypeError, ConfigError, NonFiniteError}) == 4


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("bits", [0, 9, -1, 255, 256])
def test_bits_out_of_range(x: np.ndarray, bits: int) -> None:
    for call in (
        lambda: kvmix.quantize(x, bits),
        lambda: kvmix.quantize(x, bits, grouping="channel"),
        lambda: kvmix.quantize_channel_separable(x, bits),
        lambda: kvmix.pack_bits(np.zeros(4, np.uint8), bits),
        lambda: kvmix.unpack_bits(np.zeros(4, np.uint8), bits, 4),
    ):
        with pytest.raises(ConfigError, match=rf"`bits`.*1 and 8.*{bits}"):
            call()


@pytest.mark.parametrize("group_size", [3, 5, 16, 0])
def test_group_size_must_divide_channels(x: np.ndarray, group_size: int) -> None:
    with pytest.raises(ConfigError, match=rf"`group_size`.*\(8\).*{group_size}"):
        kvmix.quantize(x, 2, group_size=group_size)


def test_token_block_must_be_positive(x: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="`token_block`"):
        kvmix.quantize(x, 2, grouping="channel", token_block=0)


def test_size_argument_must_match_grouping(x: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="`token_block`"):
        kvmix.quantize(x, 2, token_block=4)
    with pytest.raises(ConfigError, match="`group_size`"):
        kvmix.quantize(x, 2, grouping="channel", group_size=4)


def test_unknown_options(x: np.ndarray) -> None:
    with pytest.raises(ConfigError, match=r"`grouping`.*'token' or 'channel'.*tokens"):
        kvmix.quantize(x, 2, grouping="tokens")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"`param_dtype`.*float64"):
        kvmix.quantize(x, 2, param_dtype="float64")  # type: ignore[arg-type]
    q = kvmix.quantize(x, 2)
    with pytest.raises(DTypeError, match=r"`dtype`.*float64"):
        kvmix.dequantize(q, "float64")
    with pytest.raises(DTypeError, match=r"`dtype`.*int8"):
        q.dequantize("int8")


@pytest.mark.parametrize(
    "call",
    [
        lambda x: kvmix.quantize(x, 2, group_size=-1),
        lambda x: kvmix.quantize(x, 2, grouping="channel", token_block=-2),
        lambda x: kvmix.unpack_bits(np.zeros(1, np.uint8), 2, -1),
    ],
    ids=["group_size", "token_block", "unpack_n"],
)
def test_negative_sizes_are_config_errors(x: np.ndarray, call: Callable[[Any], Any]) -> None:
    with pytest.raises(KvmixError):
        call(x)


# ---------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "fn",
    [
        lambda a: kvmix.quantize(a, 2),
        lambda a: kvmix.quantize(a, 2, grouping="channel"),
        kvmix.channel_absmax,
        kvmix.separable_channel_scale,
        lambda a: kvmix.quantize_channel_separable(a, 2),
    ],
    ids=["token", "channel", "channel_absmax", "separable_channel_scale", "separable"],
)
@pytest.mark.parametrize("shape", [(8,), (), (0,)])
def test_rank_below_two_is_a_shape_error(fn: Callable[[Any], Any], shape: tuple[int, ...]) -> None:
    with pytest.raises(ShapeError, match=r"\[\.\.\., tokens, channels\].*rank"):
        fn(np.zeros(shape, F32))


@pytest.mark.parametrize("shape", [(4, 0), (2, 3, 0), (0, 0)])
def test_zero_channels_is_a_shape_error(shape: tuple[int, ...]) -> None:
    a = np.zeros(shape, F32)
    for call in (
        lambda: kvmix.quantize(a, 2),
        lambda: kvmix.quantize(a, 2, grouping="channel"),
        lambda: kvmix.channel_absmax(a),
        lambda: kvmix.separable_channel_scale(a),
    ):
        with pytest.raises(ShapeError, match="channel"):
            call()


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8), (0, 5, 8), (1, 2, 0, 3)])
@pytest.mark.parametrize("grouping", ["token", "channel"])
def test_empty_tensors_quantize_to_nothing(shape: tuple[int, ...], grouping: str) -> None:
    a = np.zeros(shape, F32)
    q = kvmix.quantize(a, 3, grouping=grouping)
    assert q.shape == list(shape)
    assert q.nbytes()["codes"] == 0
    assert q.unpacked_codes().shape == shape
    out = kvmix.dequantize(q)
    assert out.shape == shape and out.dtype == np.float32
    assert kvmix.dequantize(q, torch.bfloat16).shape == shape
    assert q.scale.shape[:-2] == shape[:-2] and q.scale.size == 0


def test_channel_scale_wrong_shape(x: np.ndarray) -> None:
    for bad in (np.ones((2, 3, 7), F32), np.ones((8,), F32), np.ones((2, 3, 10, 8), F32)):
        with pytest.raises(ShapeError, match=r"`channel_scale`.*\[2, 3, 8\]"):
            kvmix.quantize(x, 2, channel_scale=bad)


@pytest.mark.parametrize("value", [0.0, -1.0, np.nan, np.inf, 1e-9])
def test_channel_scale_must_be_positive_and_finite(x: np.ndarray, value: float) -> None:
    # 1e-9 is positive in float32 but rounds to 0 as an fp16 parameter.
    cs = np.ones((2, 3, 8), F32)
    cs[1, 2, 5] = value
    with pytest.raises(NonFiniteError, match=r"`channel_scale`.*float16"):
        kvmix.quantize(x, 2, channel_scale=cs)


def test_key_balancer_shapes(rng: np.random.Generator) -> None:
    q = rng.standard_normal((1, 6, 4, 8)).astype(F32)
    with pytest.raises(ShapeError, match="multiple of the kv heads"):
        kvmix.key_balancer(q, rng.standard_normal((1, 4, 4, 8)).astype(F32))
    with pytest.raises(ShapeError, match="head_dim"):
        kvmix.key_balancer(q, rng.standard_normal((1, 2, 4, 4)).astype(F32))
    with pytest.raises(ShapeError, match=r"\[batch, q_heads, tokens, head_dim\]"):
        kvmix.key_balancer(q[0], rng.standard_normal((2, 4, 8)).astype(F32))


def test_unpack_length_must_match(rng: np.random.Generator) -> None:
    packed = kvmix.pack_bits(rng.integers(0, 8, 10, dtype=np.uint8), 3)  # 30 bits: 4 bytes
    with pytest.raises(ShapeError, match="10 codes of 3 bits take 4 bytes, got 3"):
        kvmix.unpack_bits(packed[:3], 3, 10)
    with pytest.raises(ShapeError, match="take 4 bytes, got 5"):
        kvmix.unpack_bits(np.append(packed, np.uint8(0)), 3, 10)


@pytest.mark.parametrize("bits", range(1, 8))
def test_pack_refuses_codes_that_do_not_fit(bits: int) -> None:
    codes = np.zeros(20, np.uint8)
    codes[13] = 2**bits
    with pytest.raises(ConfigError, match=rf"`codes` must be < 2\*\*bits = {2**bits}"):
        kvmix.pack_bits(codes, bits)
    codes[13] = 255
    with pytest.raises(ConfigError, match="found 255"):
        kvmix.pack_bits(codes, bits)


@pytest.mark.parametrize("codes", [[256], [-1], [1.7]], ids=["256", "-1", "1.7"])
def test_pack_refuses_values_that_are_not_uint8_codes(codes: list[float]) -> None:
    with pytest.raises(KvmixError, match="`codes`"):
        kvmix.pack_bits(np.array(codes), 8)


# ---------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 4), np.float64),
        np.zeros((2, 4), np.int32),
        np.zeros((2, 4), np.uint16),
        np.zeros((2, 4), ">f4"),  # big-endian float32: refused, not misread
        torch.zeros(2, 4, dtype=torch.int64),
        torch.zeros(2, 4, dtype=torch.float64),
    ],
    ids=["np-float64", "np-int32", "np-uint16", "np-big-endian", "torch-int64", "torch-float64"],
)
def test_unsupported_dtypes(bad: Any) -> None:
    for call in (
        lambda: kvmix.quantize(bad, 2),
        lambda: kvmix.channel_absmax(bad),
        lambda: kvmix.separable_channel_scale(bad),
        lambda: kvmix.quantize_channel_separable(bad, 2),
    ):
        with pytest.raises(DTypeError, match="`x` must be") as info:
            call()
        msg = str(info.value)
        assert "float32" in msg and "float16" in msg  # names the valid options


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], np.float32(1.0), "x"], ids=["list", "scalar", "str"])
def test_non_arrays_are_refused(bad: Any) -> None:
    for call in (lambda: kvmix.quantize(bad, 2), lambda: kvmix.channel_absmax(bad)):
        with pytest.raises(DTypeError, match="`x` must be a numpy array or a CPU torch tensor"):
            call()


def test_non_cpu_tensor_is_refused() -> None:
    meta = torch.zeros(2, 4, 8, device="meta")
    with pytest.raises(DTypeError, match=r"`x` must be on the CPU.*meta"):
        kvmix.quantize(meta, 2)
    with pytest.raises(DTypeError, match="`k` must be on the CPU"):
        kvmix.key_balancer(torch.zeros(1, 2, 3, 8), torch.zeros(1, 1, 3, 8, device="meta"))


def test_key_balancer_dtypes_must_match(rng: np.random.Generator) -> None:
    q = rng.standard_normal((1, 2, 3, 8)).astype(F32)
    k = rng.standard_normal((1, 1, 3, 8)).astype(F32)
    with pytest.raises(DTypeError, match="`q` and `k` must have the same dtype"):
        kvmix.key_balancer(q, k.astype(np.float16))
    with pytest.raises(DTypeError, match="`q` and `k` must have the same dtype"):
        kvmix.key_balancer(torch.from_numpy(q).to(torch.bfloat16), k)


def test_raw_core_checks_the_bfloat16_flag() -> None:
    """The compiled function does not trust the wrapper: uint16 needs the bfloat16 flag and
    the flag needs uint16."""
    with pytest.raises(DTypeError, match="`x` must be a numpy array of float32"):
        kvmix._kvmix.quantize(np.zeros((2, 4), np.uint16), 2)
    with pytest.raises(DTypeError, match="bfloat16 data must be passed as a numpy uint16"):
        kvmix._kvmix.quantize(np.zeros((2, 4), F32), 2, bfloat16=True)


# ---------------------------------------------------------------------------- non-finite


def _inputs_with(value: float, shape: tuple[int, ...], where: tuple[int, ...]) -> list[Any]:
    a = np.random.default_rng(1).standard_normal(shape).astype(F32)
    a[where] = value
    t = torch.from_numpy(a)
    return [a, a.astype(np.float16), t.to(torch.bfloat16), t.to(torch.float16)]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    ("shape", "where"),
    [((2, 3, 10, 8), (0, 0, 0, 0)), ((2, 3, 10, 8), (1, 2, 9, 7)), ((4, 300, 64), (3, 299, 63))],
    ids=["first", "last", "last-of-parallel-job"],
)
def test_non_finite_input_is_refused(
    value: float, shape: tuple[int, ...], where: tuple[int, ...]
) -> None:
    """Documented policy: NaN/Inf are refused, whichever grouping, dtype or position."""
    calls: list[Callable[[Any], Any]] = [
        lambda a: kvmix.quantize(a, 4),
        lambda a: kvmix.quantize(a, 4, group_size=4, param_dtype="float32"),
        lambda a: kvmix.quantize(a, 4, grouping="channel"),
        lambda a: kvmix.quantize(a, 2, grouping="channel", token_block=3),
        lambda a: kvmix.quantize_channel_separable(a, 2),
        kvmix.channel_absmax,
        kvmix.separable_channel_scale,
    ]
    for a in _inputs_with(value, shape, where):
        for call in calls:
            with pytest.raises(NonFiniteError, match="NaN or Inf"):
                call(a)


def test_non_finite_attention_inputs_are_refused(rng: np.random.Generator) -> None:
    q = rng.standard_normal((1, 2, 3, 8)).astype(F32)
    k = rng.standard_normal((1, 1, 5, 8)).astype(F32)
    bad_q, bad_k = q.copy(), k.copy()
    bad_q[0, 1, 2, 3] = np.nan
    bad_k[0, 0, 4, 0] = -np.inf
    with pytest.raises(NonFiniteError):
        kvmix.key_balancer(bad_q, k)
    with pytest.raises(NonFiniteError):
        kvmix.key_balancer(q, bad_k)
    with pytest.raises(NonFiniteError):
        kvmix.quantize_balanced_keys(bad_k, 2, kvmix.key_balancer(q, k))


@pytest.mark.parametrize("grouping", ["token", "channel"])
def test_fp16_parameter_overflow(grouping: str, rng: np.random.Generator) -> None:
    x = (rng.standard_normal((2, 6, 8)) * 1e6).astype(F32)
    with pytest.raises(NonFiniteError, match=r"float16.*`param_dtype='float32'`"):
        kvmix.quantize(x, 4, grouping=grouping)
    # float32 parameters represent the range, and the result is the reference's.
    q = kvmix.quantize(x, 4, grouping=grouping, param_dtype="float32")
    if grouping == "token":
        r = ref.quantize_token_groups(x, 4, 8, "float32")
        want = ref.dequantize_token_groups(r, 8)
    else:
        r = ref.quantize_channel_blocks(x, 4, 6, "float32")
        want = ref.dequantize_channel_blocks(r, 6)
    np.testing.assert_array_equal(q.unpacked_codes(), r.codes)
    np.testing.assert_allclose(kvmix.dequantize(q), want, rtol=1e-6, atol=1e-6)


def test_fp16_parameter_boundary() -> None:
    # scale = range / 1 in 1 bit: 6e4 fits fp16 (max 65504), 7e4 does not; offsets likewise.
    q = kvmix.quantize(np.array([[0.0, 6e4]], F32), 1)
    assert q.scale[0, 0] == np.float16(6e4)
    np.testing.assert_array_equal(q.unpacked_codes(), [[0, 1]])
    with pytest.raises(NonFiniteError, match="float16"):
        kvmix.quantize(np.array([[0.0, 7e4]], F32), 1)
    q = kvmix.quantize(np.array([[-6e4, -6e4]], F32), 1)
    assert q.offset[0, 0] == np.float16(-6e4) and q.scale[0, 0] == 0
    with pytest.raises(NonFiniteError, match="float16"):
        kvmix.quantize(np.array([[-7e4, -7e4]], F32), 1)


# ---------------------------------------------------------------------------- layouts


def _layouts(a: np.ndarray) -> dict[str, np.ndarray]:
    """Non-contiguous arrays holding the same values as the C-contiguous ``a`` (rank 4)."""
    padded = np.zeros((*a.shape[:-1], a.shape[-1] + 3), a.dtype)
    padded[..., : a.shape[-1]] = a
    strided = np.zeros((*a.shape[:-2], 2 * a.shape[-2], a.shape[-1]), a.dtype)
    strided[..., ::2, :] = a
    return {
        "swapped-last-axes": np.ascontiguousarray(a.swapaxes(-1, -2)).swapaxes(-1, -2),
        "swapped-lead-axes": np.ascontiguousarray(a.swapaxes(0, 1)).swapaxes(0, 1),
        "padded-rows": padded[..., : a.shape[-1]],
        "every-other-token": strided[..., ::2, :],
        "negative-strides": np.ascontiguousarray(a[::-1, :, ::-1])[::-1, :, ::-1],
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_non_contiguous_numpy_equals_contiguous_copy(dtype: type, x: np.ndarray) -> None:
    a = x.astype(dtype)
    cs = np.random.default_rng(3).uniform(0.5, 2.0, (2, 3, 8)).astype(F32)
    for name, view in _layouts(a).items():
        assert not view.flags.c_contiguous, name
        np.testing.assert_array_equal(view, a)
        copy = np.ascontiguousarray(view)
        for kw in ({"group_size": 4}, {"grouping": "channel", "token_block": 3}):
            assert_same_result(kvmix.quantize(view, 3, **kw), kvmix.quantize(copy, 3, **kw))
            assert_same_result(
                kvmix.quantize(view, 3, channel_scale=cs, **kw),
                kvmix.quantize(copy, 3, channel_scale=cs, **kw),
            )
        np.testing.assert_array_equal(kvmix.channel_absmax(view), kvmix.channel_absmax(copy))
        np.testing.assert_array_equal(
            kvmix.separable_channel_scale(view), kvmix.separable_channel_scale(copy)
        )


def test_broadcast_input_with_zero_strides() -> None:
    row = np.arange(8, dtype=F32)
    view = np.broadcast_to(row, (3, 5, 8))  # read-only, strides (0, 0, 4)
    assert_same_result(kvmix.quantize(view, 2), kvmix.quantize(np.ascontiguousarray(view), 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_contiguous_torch_equals_contiguous_copy(dtype: torch.dtype, x: np.ndarray) -> None:
    t = torch.from_numpy(x).to(dtype)
    views = {
        "swapped-lead-axes": t.transpose(0, 1).contiguous().transpose(0, 1),
        "every-other-token": torch.zeros(2, 3, 20, 8, dtype=dtype)[..., ::2, :],
        "expanded": t[:1].expand(2, 3, 10, 8),
    }
    views["every-other-token"][...] = t
    q = torch.from_numpy(np.random.default_rng(5).standard_normal((2, 6, 4, 8)).astype(F32))
    for name, view in views.items():
        assert not view.is_contiguous(), name
        copy = view.contiguous()
        assert_same_result(kvmix.quantize(view, 3), kvmix.quantize(copy, 3))
        assert_same_result(
            kvmix.quantize(view, 2, grouping="channel"), kvmix.quantize(copy, 2, grouping="channel")
        )
        np.testing.assert_array_equal(kvmix.channel_absmax(view), kvmix.channel_absmax(copy))
        np.testing.assert_array_equal(
            kvmix.key_balancer(q.to(dtype), view), kvmix.key_balancer(q.to(dtype), copy)
        )


@pytest.mark.parametrize("shape", [(2, 3), (5, 8), (2, 3, 4)])
def test_fortran_order_numpy_equals_contiguous_copy(shape: tuple[int, ...]) -> None:
    a = np.asfortranarray(np.arange(np.prod(shape), dtype=F32).reshape(shape))
    assert a.flags.f_contiguous and not a.flags.c_contiguous
    copy = np.ascontiguousarray(a)
    np.testing.assert_array_equal(kvmix.channel_absmax(a), np.abs(copy).max(axis=-2))
    assert_same_result(
        kvmix.quantize(a, 8, param_dtype="float32"),
        kvmix.quantize(copy, 8, param_dtype="float32"),
    )


def test_transposed_torch_matrix_equals_contiguous_copy() -> None:
    t = torch.arange(24, dtype=torch.float32).reshape(8, 3).T  # [3 tokens, 8 channels]
    assert not t.is_contiguous()
    assert_same_result(kvmix.quantize(t, 4), kvmix.quantize(t.contiguous(), 4))


def test_read_only_input(x: np.ndarray) -> None:
    ro = x.copy()
    ro.setflags(write=False)
    assert_same_result(kvmix.quantize(ro, 2), kvmix.quantize(x, 2))
    np.testing.assert_array_equal(kvmix.channel_absmax(ro), kvmix.channel_absmax(x))


def test_torch_tensor_requiring_grad(x: np.ndarray) -> None:
    t = torch.from_numpy(x).requires_grad_(True)
    assert_same_result(kvmix.quantize(t, 2), kvmix.quantize(x, 2))
    np.testing.assert_array_equal(
        kvmix.separable_channel_scale(t), kvmix.separable_channel_scale(x)
    )


# ---------------------------------------------------------------------------- inputs untouched


CALLS: dict[str, Callable[[Any, Any, Any], Any]] = {
    "quantize-token": lambda x, q, cs: kvmix.quantize(x, 3, group_size=4),
    "quantize-channel": lambda x, q, cs: kvmix.quantize(x, 2, grouping="channel", token_block=4),
    "quantize-channel-scale": lambda x, q, cs: kvmix.quantize(x, 4, channel_scale=cs),
    "channel-separable": lambda x, q, cs: kvmix.quantize_channel_separable(x, 2),
    "channel_absmax": lambda x, q, cs: kvmix.channel_absmax(x),
    "separable_channel_scale": lambda x, q, cs: kvmix.separable_channel_scale(x),
    "key_balancer": lambda x, q, cs: kvmix.key_balancer(q, x),
    "balanced-keys": lambda x, q, cs: kvmix.quantize_balanced_keys(x, 2, cs),
}


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("source", ["np32", "np16", "torch32", "torchbf16"])
def test_inputs_are_not_modified(name: str, source: str, rng: np.random.Generator) -> None:
    x32 = rng.standard_normal((1, 2, 12, 8)).astype(F32)
    q32 = rng.standard_normal((1, 4, 5, 8)).astype(F32)
    cs = rng.uniform(0.5, 2.0, (1, 2, 8)).astype(F32)
    convert = {
        "np32": lambda a: a.copy(),
        "np16": lambda a: a.astype(np.float16),
        "torch32": lambda a: torch.from_numpy(a.copy()),
        "torchbf16": lambda a: torch.from_numpy(a).to(torch.bfloat16),
    }[source]
    x, q = convert(x32), convert(q32)
    snapshots = [(v, v.clone() if isinstance(v, torch.Tensor) else v.copy()) for v in (x, q, cs)]
    CALLS[name](x, q, cs)
    for now, before in snapshots:
        if isinstance(now, torch.Tensor):
            assert torch.equal(now, before)
        else:
            np.testing.assert_array_equal(now, before, strict=True)


def test_packing_inputs_are_not_modified(rng: np.random.Generator) -> None:
    codes = rng.integers(0, 8, 100, dtype=np.uint8)
    before = codes.copy()
    packed = kvmix.pack_bits(codes, 3)
    packed_before = packed.copy()
    kvmix.unpack_bits(packed, 3, 100)
    np.testing.assert_array_equal(codes, before)
    np.testing.assert_array_equal(packed, packed_before)


def test_results_do_not_alias_each_other_or_the_input(x: np.ndarray) -> None:
    q = kvmix.quantize(x, 4)
    a, b = kvmix.dequantize(q), kvmix.dequantize(q)
    a[...] = 0
    assert not np.shares_memory(a, x)
    np.testing.assert_array_equal(kvmix.dequantize(q), b)
    codes = q.codes
    codes[...] = 0
    assert q.codes.any()  # the getter returns a copy


# ---------------------------------------------------------------------------- balancer wrapper


def test_zero_balancer_is_refused_naming_balancer(x: np.ndarray) -> None:
    b = np.ones((2, 3, 8), F32)
    b[0, 0, 0] = 0.0
    with pytest.raises(KvmixError, match="`balancer`"):
        kvmix.quantize_balanced_keys(x, 2, b)


def test_missing_balancer_is_a_config_error(x: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="`balancer`"):
        kvmix.quantize_balanced_keys(x, 2, None)


def test_scoring_threads_come_from_the_environment(monkeypatch):
    """`KVMIX_SCORING_THREADS` sets the threads of the prefill's scoring loops (torch's count by
    default); a bad value is a clear ConfigError."""
    import torch

    from kvmix import attention

    monkeypatch.setenv("KVMIX_SCORING_THREADS", "3")
    assert attention._scoring_threads() == 3
    monkeypatch.setenv("KVMIX_SCORING_THREADS", "")
    assert attention._scoring_threads() == torch.get_num_threads()
    for bad in ("0", "two"):
        monkeypatch.setenv("KVMIX_SCORING_THREADS", bad)
        with pytest.raises(kvmix.ConfigError, match="`KVMIX_SCORING_THREADS` must be a positive"):
            attention._scoring_threads()
