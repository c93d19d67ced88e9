"""Reference quantizers in NumPy (float32 arithmetic, the same operation order as the core).

Asymmetric round-to-nearest: ``scale = (max - min) / (2**bits - 1)``, ``offset = min``, both
rounded to the parameter dtype first; ``code = clip(floor((x - offset) / scale + 0.5))``;
``x̂ = scale * code + offset``. A group with ``scale == 0`` gets code 0. With a channel factor
``f``, ``x / f`` is quantized and ``(scale * code + offset) * f`` reconstructed.

Rounding ties: ``floor(v + 0.5)`` rounds halves up (not to even, as ``np.round`` would); the
core does the same, so codes match exactly.

``clip="mse"`` (``src/quant/clip.rs``): each group tries its min-max range, then that range
shrunk about its midpoint by each factor of ``CLIP_SHRINK``, and keeps the grid of least squared
error (the first on a tie; errors summed in float64 from exact squares). A group whose min-max
scale is 0 keeps it. ``clip="mse_unbiased"``: the same among the candidates whose reconstruction
does not shrink the group (``sum((x̂ - x) * x) >= 0``, float64); min-max when none qualifies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kvmix._kvmix import CLIP_SHRINK

F32 = np.float32
Array = npt.NDArray[np.float32]


@dataclass
class Quantized:
    """Unpacked reference result. ``scale``/``offset`` are the stored values as float32."""

    codes: npt.NDArray[np.uint8]
    scale: Array
    offset: Array
    channel_scale: Array | None


def _round_param(v: npt.ArrayLike, param_dtype: str) -> Array:
    return np.asarray(v, dtype=F32).astype(param_dtype).astype(F32)


def affine_params(lo: Array, hi: Array, bits: int, param_dtype: str) -> tuple[Array, Array]:
    """Stored (scale, offset) of groups spanning ``[lo, hi]``."""
    scale = _round_param((hi - lo) / F32(2**bits - 1), param_dtype)
    offset = _round_param(lo, param_dtype)
    return scale, offset


def fit_params(
    x: Array, axis: int, bits: int, param_dtype: str, clip: str = "minmax"
) -> tuple[Array, Array]:
    """Stored (scale, offset) of the groups of ``x`` along ``axis`` (the axis is dropped)."""
    lo, hi = x.min(axis), x.max(axis)
    scale, offset = affine_params(lo, hi, bits, param_dtype)
    if clip == "minmax":
        return scale, offset

    unbiased = clip == "mse_unbiased"

    def error(sc: Array, of: Array) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        """Squared error, and whether the grid keeps the group from shrinking."""
        sc_x, of_x = np.expand_dims(sc, axis), np.expand_dims(of, axis)
        d = (sc_x * encode(x, sc_x, of_x, bits) + of_x - x).astype(np.float64)
        grows = (d * x.astype(np.float64)).sum(axis) >= 0
        return np.asarray((d * d).sum(axis)), np.asarray(grows | (not unbiased))

    best, allowed = error(scale, offset)
    best = np.where(allowed, best, np.finfo(np.float64).max)
    searched = scale != 0
    mid, half = (lo + hi) * F32(0.5), (hi - lo) * F32(0.5)
    for s in map(F32, CLIP_SHRINK):
        sc, of = affine_params(mid - s * half, mid + s * half, bits, param_dtype)
        err, allowed = error(sc, of)
        better = searched & allowed & (err < best)
        scale, offset = np.where(better, sc, scale), np.where(better, of, offset)
        best = np.where(better, err, best)
    return scale, offset


def encode(x: Array, scale: Array, offset: Array, bits: int) -> npt.NDArray[np.uint8]:
    """Codes of ``x`` given broadcastable stored parameters."""
    safe = np.where(scale == 0, F32(1), scale)
    v = np.floor((x - offset) / safe + F32(0.5))
    codes = np.clip(v, 0, 2**bits - 1).astype(np.uint8)
    return np.where(scale == 0, np.uint8(0), codes).astype(np.uint8)


def _normalize(
    x: npt.ArrayLike, channel_scale: npt.ArrayLike | None, param_dtype: str
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
    arr: npt.NDArray[np.float32] = np.asarray(x, dtype=F32)
    if channel_scale is None:
        return arr, None
    f = _round_param(channel_scale, param_dtype)
    return arr / f[..., None, :], f


def quantize_token_groups(
    x: npt.ArrayLike,
    bits: int,
    group_size: int,
    param_dtype: str = "float16",
    channel_scale: npt.ArrayLike | None = None,
    clip: str = "minmax",
) -> Quantized:
    """Groups of ``group_size`` consecutive channels within each token."""
    xn, f = _normalize(x, channel_scale, param_dtype)
    *lead, t, d = xn.shape
    g = xn.reshape(*lead, t, d // group_size, group_size)
    scale, offset = fit_params(g, -1, bits, param_dtype, clip)
    codes = encode(g, scale[..., None], offset[..., None], bits).reshape(xn.shape)
    return Quantized(codes, scale, offset, f)


def quantize_channel_blocks(
    x: npt.ArrayLike,
    bits: int,
    token_block: int,
    param_dtype: str = "float16",
    channel_scale: npt.ArrayLike | None = None,
    clip: str = "minmax",
) -> Quantized:
    """Each channel over blocks of ``token_block`` consecutive tokens (last block shorter)."""
    xn, f = _normalize(x, channel_scale, param_dtype)
    t = xn.shape[-2]
    codes = np.zeros(xn.shape, dtype=np.uint8)
    scales, offsets = [], []
    for start in range(0, t, token_block):
        blk = xn[..., start : start + token_block, :]
        scale, offset = fit_params(blk, -2, bits, param_dtype, clip)
        codes[..., start : start + token_block, :] = encode(
            blk, scale[..., None, :], offset[..., None, :], bits
        )
        scales.append(scale)
        offsets.append(offset)
    if not scales:  # no tokens: no blocks
        empty = np.zeros((*xn.shape[:-2], 0, xn.shape[-1]), F32)
        return Quantized(codes, empty, empty.copy(), f)
    return Quantized(codes, np.stack(scales, axis=-2), np.stack(offsets, axis=-2), f)


def dequantize_token_groups(q: Quantized, group_size: int) -> Array:
    *lead, t, d = q.codes.shape
    g = q.codes.reshape(*lead, t, d // group_size, group_size).astype(F32)
    x = (q.scale[..., None] * g + q.offset[..., None]).reshape(q.codes.shape)
    return x if q.channel_scale is None else x * q.channel_scale[..., None, :]


def dequantize_channel_blocks(q: Quantized, token_block: int) -> Array:
    t = q.codes.shape[-2]
    block_of_token = np.arange(t) // token_block
    scale = q.scale[..., block_of_token, :]
    offset = q.offset[..., block_of_token, :]
    x = scale * q.codes.astype(F32) + offset
    return x if q.channel_scale is None else x * q.channel_scale[..., None, :]


def separable_channel_scale(x: npt.ArrayLike) -> Array:
    """ZipCache: ``c = sqrt(max_t |x|)`` per leading index and channel; 1 where it is 0."""
    m = np.abs(np.asarray(x, dtype=F32)).max(axis=-2)
    return np.where(m > 0, np.sqrt(m), F32(1)).astype(F32)


def key_balancer(q: npt.ArrayLike, k: npt.ArrayLike) -> Array:
    """MiKV: ``b = sqrt(max|q_c| / max|k_c|)`` per (batch, kv-head, channel); query heads are
    grouped as in transformers' ``repeat_kv`` (head h serves query heads h*rep .. h*rep+rep-1)."""
    q = np.abs(np.asarray(q, dtype=F32))
    k = np.abs(np.asarray(k, dtype=F32))
    b, hq, _, d = q.shape
    hk = k.shape[1]
    qmax = q.max(axis=2).reshape(b, hk, hq // hk, d).max(axis=2)
    kmax = k.max(axis=2)
    ok = (qmax > 0) & (kmax > 0)
    ratio = np.divide(qmax, kmax, out=np.ones_like(qmax), where=ok)
    return np.where(ok, np.sqrt(ratio), F32(1)).astype(F32)


def pack_bits(codes: npt.ArrayLike, bits: int) -> npt.NDArray[np.uint8]:
    """Dense LSB-first packing: code i occupies bits [i*bits, (i+1)*bits) of the stream."""
    c = np.asarray(codes, dtype=np.uint8).ravel()
    stream = ((c[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8).ravel()
    return np.packbits(stream, bitorder="little")


def unpack_bits(packed: npt.ArrayLike, bits: int, n: int) -> npt.NDArray[np.uint8]:
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")[: n * bits]
    weights = (1 << np.arange(bits)).astype(np.uint16)
    codes: npt.NDArray[np.uint8] = (
        (stream.reshape(n, bits).astype(np.uint16) * weights).sum(axis=1).astype(np.uint8)
    )
    return codes
