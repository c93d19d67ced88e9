"""Storage engines: the Rust store (CPU) and the Triton device store (GPU, or the CPU under
Triton's interpreter). :func:`resolve_engine` picks one; :func:`make_store` builds it."""

from __future__ import annotations

from typing import Any, Literal

from kvmix.engines.base import ConfigError, Store, load_attention, load_kernels, load_scoring
from kvmix.types import BufferDtype, PolicyName

#: The engines a cache can ask for (``engine=``).
EngineName = Literal["auto", "rust", "triton"]
ENGINES: tuple[EngineName, ...] = ("auto", "rust", "triton")

__all__ = [
    "ENGINES",
    "EngineName",
    "Store",
    "load_attention",
    "load_kernels",
    "load_scoring",
    "make_store",
    "resolve_engine",
]


def resolve_engine(engine: str, device: Any) -> str:
    """``"rust"`` or ``"triton"`` for tensors on ``device``: ``auto`` is Rust for CPU tensors
    and Triton for every other device; ``triton`` on CPU tensors runs under the interpreter."""
    if engine not in ENGINES:
        raise ConfigError(
            f"`engine` must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}"
        )
    dev = getattr(device, "type", str(device))
    if engine == "auto":
        return "rust" if dev == "cpu" else "triton"
    if engine == "rust" and dev != "cpu":
        raise ConfigError(
            f"engine='rust' holds the cache in host memory and takes CPU tensors, got {dev} "
            "tensors; use engine='auto' or 'triton'"
        )
    return engine


def make_store(
    engine: str,
    policy: PolicyName,
    kv_heads: int,
    head_dim: int,
    config: dict[str, Any] | None = None,
    buffer_dtype: BufferDtype = "float32",
) -> Any:
    """A store of ``engine`` (already resolved) for one layer."""
    from kvmix._kvmix import LayerStore

    if engine == "rust":
        return LayerStore(policy, kv_heads, head_dim, config, buffer_dtype)
    from kvmix.engines.triton_store import TritonLayerStore

    return TritonLayerStore(policy, kv_heads, head_dim, config, buffer_dtype)
