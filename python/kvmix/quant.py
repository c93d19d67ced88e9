"""Quantization of key/value tensors, on numpy arrays or CPU torch tensors.

Every function takes a tensor shaped ``[..., tokens, channels]`` (e.g. a cache layer's
``[batch, kv_heads, tokens, head_dim]``) in float32, float16 or bfloat16, and keeps separate
statistics for every leading index (sequence, head). The math is specified by the NumPy
reference in :mod:`kvmix.reference.quantization`; the work is done by the Rust core.

>>> import numpy as np, kvmix
>>> x = np.random.default_rng(0).standard_normal((1, 2, 16, 64), dtype=np.float32)
>>> q = kvmix.quantize(x, bits=2, group_size=32)        # MiKV-style per-token groups
>>> q.nbytes()["codes"]                                   # 2 bits per element, packed
512
>>> kvmix.dequantize(q).shape
(1, 2, 16, 64)
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from kvmix import _kvmix
from kvmix._kvmix import QuantizedTensor
from kvmix.errors import DTypeError
from kvmix.types import Clip

__all__ = [
    "channel_absmax",
    "dequantize",
    "key_balancer",
    "pack_bits",
    "quantize",
    "quantize_balanced_keys",
    "quantize_channel_separable",
    "separable_channel_scale",
    "unpack_bits",
]

ParamDtype = Literal["float16", "float32"]


def _is_torch(x: object) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def as_core_array(x: Any, name: str = "x") -> tuple[npt.NDArray[Any], bool]:
    """``x`` as a numpy array the core accepts, and whether it holds bfloat16 bits.

    CPU torch tensors are viewed without a copy (bfloat16 as its uint16 bits); anything
    else must already be a float32 or float16 numpy array.
    """
    if _is_torch(x):
        import torch

        if x.device.type != "cpu":
            raise DTypeError(f"`{name}` must be on the CPU, got a tensor on {x.device}")
        t = x.detach()
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.uint16).numpy(), True
        if t.dtype not in (torch.float32, torch.float16):
            raise DTypeError(
                f"`{name}` must be float32, float16 or bfloat16, got torch tensor of {t.dtype}"
            )
        return t.numpy(), False
    if isinstance(x, np.ndarray):
        if x.dtype not in (np.float32, np.float16):
            raise DTypeError(
                f"`{name}` must be float32 or float16 (bfloat16 as a torch tensor), "
                f"got numpy array of {x.dtype}"
            )
        return x, False
    raise DTypeError(
        f"`{name}` must be a numpy array or a CPU torch tensor, got {type(x).__name__}"
    )


def _channel_scale_array(channel_scale: Any) -> npt.NDArray[np.float32] | None:
    if channel_scale is None:
        return None
    if _is_torch(channel_scale):
        channel_scale = channel_scale.detach().float().numpy()
    return np.ascontiguousarray(channel_scale, dtype=np.float32)


def quantize(
    x: Any,
    bits: int,
    *,
    grouping: Literal["token", "channel"] = "token",
    group_size: int | None = None,
    token_block: int | None = None,
    channel_scale: Any = None,
    param_dtype: ParamDtype = "float16",
    clip: Clip = "minmax",
) -> QuantizedTensor:
    """Asymmetric round-to-nearest quantization of ``x`` (``[..., tokens, channels]``).

    Args:
        x: float32/float16 numpy array or float32/float16/bfloat16 CPU torch tensor.
        bits: code width, 1 to 8.
        grouping: ``"token"`` — groups of ``group_size`` channels within each token
            (default: all channels); ``"channel"`` — each channel over blocks of
            ``token_block`` tokens (default: all tokens).
        group_size: channels per group for ``grouping="token"``; must divide ``channels``.
        token_block: tokens per block for ``grouping="channel"``.
        channel_scale: optional positive factors ``[..., channels]``: ``x / f`` is quantized
            and ``f · x̂`` reconstructed (channel-separable values, balanced keys).
        param_dtype: storage of scales, offsets and channel factors.
        clip: each group's range: ``"minmax"`` (its values' min and max) or ``"mse"`` (of
            min-max and that range shrunk about its midpoint by ``kvmix._kvmix.CLIP_SHRINK``'s
            factors, the grid of least squared error; never more error than min-max).

    Returns:
        A :class:`QuantizedTensor` holding packed codes and parameters.

    Raises:
        ShapeError, DTypeError, ConfigError, NonFiniteError: on bad input (NaN/Inf refused).
    """
    arr, bf16 = as_core_array(x)
    if grouping == "token":
        if token_block is not None:
            raise _kvmix.ConfigError("`token_block` applies to grouping='channel' only")
        size = group_size
    else:
        if group_size is not None:
            raise _kvmix.ConfigError("`group_size` applies to grouping='token' only")
        size = token_block
    return _kvmix.quantize(
        arr, bits, grouping, size, _channel_scale_array(channel_scale), param_dtype, bf16, clip
    )


def quantize_channel_separable(
    x: Any, bits: int, *, param_dtype: ParamDtype = "float16"
) -> QuantizedTensor:
    """ZipCache's channel-separable tokenwise quantization: divide each channel by
    ``sqrt(max|x_c|)``, quantize each token as one group, multiply back on reconstruction."""
    return quantize(
        x, bits, grouping="token", channel_scale=separable_channel_scale(x), param_dtype=param_dtype
    )


def quantize_balanced_keys(
    k: Any,
    bits: int,
    balancer: Any,
    *,
    group_size: int | None = None,
    param_dtype: ParamDtype = "float16",
) -> QuantizedTensor:
    """MiKV's outlier-aware keys: store ``Q(k · b)`` with per-token groups (default
    ``head_dim/2``); reconstruction divides by ``b``, so ``q · k̂`` approximates ``q · k``.

    ``balancer`` is :func:`key_balancer` of the prompt's queries and keys, ``[..., head_dim]``.
    """
    arr, _ = as_core_array(k, "k")
    if balancer is None:
        raise _kvmix.ConfigError("`balancer` is required (see `kvmix.key_balancer`)")
    b = _channel_scale_array(balancer)
    assert b is not None  # `balancer` is not None
    if not (np.all(np.isfinite(b)) and np.all(b > 0)):
        raise _kvmix.NonFiniteError("`balancer` factors must be finite and positive")
    if group_size is None:
        group_size = max(arr.shape[-1] // 2, 1)
    return quantize(k, bits, group_size=group_size, channel_scale=1.0 / b, param_dtype=param_dtype)


def dequantize(q: QuantizedTensor, dtype: Any = "float32", *, out: Any = None) -> Any:
    """Reconstruct ``q``. ``dtype`` is a numpy dtype name ('float32', 'float16') for a numpy
    result, or a torch dtype (``torch.float32/float16/bfloat16``) for a torch tensor.

    ``out`` (a float32/float16 numpy array or CPU torch tensor of ``q.shape``) receives the
    result instead of a new array, e.g. a buffer reused across steps; it is returned.
    """
    if out is not None:
        q.dequantize_into(out.numpy() if _is_torch(out) else out)
        return out
    if _is_torch(dtype):
        import torch

        name = str(dtype).removeprefix("torch.")
        result = torch.from_numpy(q.dequantize(name))
        return result.view(torch.bfloat16) if dtype == torch.bfloat16 else result
    name = np.dtype(dtype).name
    return q.dequantize(name)


def channel_absmax(x: Any) -> npt.NDArray[np.float32]:
    """``max_t |x|`` for every leading index and channel: ``[..., channels]``."""
    arr, bf16 = as_core_array(x)
    return _kvmix.channel_absmax(arr, bf16)


def separable_channel_scale(x: Any) -> npt.NDArray[np.float32]:
    """ZipCache's channel factors ``sqrt(max_t |x|)`` (1 for an all-zero channel)."""
    arr, bf16 = as_core_array(x)
    return _kvmix.separable_channel_scale(arr, bf16)


def key_balancer(q: Any, k: Any) -> npt.NDArray[np.float32]:
    """MiKV's key balancer ``sqrt(max|q_c| / max|k_c|)`` per (batch, kv-head, channel), from
    queries ``[batch, q_heads, tokens, head_dim]`` and keys ``[batch, kv_heads, tokens, head_dim]``;
    the max over queries covers every query head of the kv-head's GQA group."""
    qa, qb = as_core_array(q, "q")
    ka, kb = as_core_array(k, "k")
    if qb != kb:
        raise DTypeError("`q` and `k` must have the same dtype")
    return _kvmix.key_balancer(qa, ka, qb)


def pack_bits(codes: npt.ArrayLike, bits: int) -> npt.NDArray[np.uint8]:
    """Pack codes (each ``< 2**bits``) densely, least significant bit first."""
    arr = np.asarray(codes)
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 255):
        raise _kvmix.ConfigError(
            f"`codes` must be integers in [0, 2**bits), got dtype {arr.dtype} "
            f"with range [{arr.min()}, {arr.max()}]"
        )
    return _kvmix.pack_bits(np.ascontiguousarray(arr, dtype=np.uint8).ravel(), bits)


def unpack_bits(packed: npt.ArrayLike, bits: int, n: int) -> npt.NDArray[np.uint8]:
    """Inverse of :func:`pack_bits`: the first ``n`` codes."""
    return _kvmix.unpack_bits(np.ascontiguousarray(packed, dtype=np.uint8).ravel(), bits, n)
