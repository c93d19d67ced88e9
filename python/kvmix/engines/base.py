"""The store interface both engines implement, and how the Triton kernels are loaded.

A store holds one attention layer's keys and values for a batch, per ``(sequence, kv-head)``
stream, in three tiers (a full-precision buffer, a high and a low tier) and answers attention
on them. The Rust ``kvmix.LayerStore`` (CPU, numpy arrays) and
:class:`kvmix.engines.triton_store.TritonLayerStore` (torch tensors on any device) implement
it; ``tests/test_engine_contract.py`` runs one suite on both.
"""

from __future__ import annotations

import importlib.util
import operator
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

try:
    from kvmix.errors import ConfigError, DTypeError, KvmixError, NonFiniteError, ShapeError
except ImportError:  # the device engine loaded by path on a host without the compiled core

    class KvmixError(ValueError):  # type: ignore[no-redef]
        pass

    class ConfigError(KvmixError):  # type: ignore[no-redef]
        pass

    class DTypeError(KvmixError):  # type: ignore[no-redef]
        pass

    class NonFiniteError(KvmixError):  # type: ignore[no-redef]
        pass

    class ShapeError(KvmixError):  # type: ignore[no-redef]
        pass


__all__ = [
    "ConfigError",
    "DTypeError",
    "KvmixError",
    "NonFiniteError",
    "ShapeError",
    "Store",
    "as_integer",
    "load_attention",
    "load_kernels",
    "load_scoring",
]


def as_integer(v: Any) -> int | None:
    """``v`` as an int where it is one: an int or anything with ``__index__`` (a numpy
    integer, a 0-d integer tensor), but not a bool or a float, which ``int()`` would
    truncate without a word; else ``None``, for the caller to name the argument."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


@runtime_checkable
class Store(Protocol):
    """What a cache layer needs of its store (arrays are numpy for Rust, torch for Triton)."""

    @property
    def seen(self) -> int: ...
    @property
    def batch(self) -> int: ...
    @property
    def kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def layout(self) -> dict[str, Any]: ...

    def append(self, keys: Any, values: Any, bfloat16: bool = False) -> None:
        """Append ``[batch, kv_heads, tokens, head_dim]`` to the buffer."""

    def add_scores(self, start: int, acc: Any, count: Any) -> None:
        """Add importance to positions ``[start, start + n)``: ``[batch, kv_heads, n]``."""

    def maybe_classify(self, force: bool = False) -> bool:
        """Move the buffer to the tiers when the policy says it is due; whether it ran."""

    def attend(self, q: Any, q_positions: list[int], scale: float, track: bool = True) -> Any:
        """Attention ``[batch, q_heads, q_len, head_dim]``, tracking received attention."""

    def dense(self, stream: int) -> tuple[Any, Any, Any]:
        """A stream's held positions and its dequantized keys and values, position order."""

    def memory(self) -> dict[str, Any]:
        """Bytes held, per tier and component."""

    def crop(self, length: int) -> None: ...
    def select_batch(self, indices: list[int]) -> None: ...
    def repeat_interleave(self, repeats: int) -> None: ...
    def reset(self) -> None: ...


_HERE = Path(__file__).resolve().parent
_LOCK = threading.Lock()
_LOADED: dict[tuple[str, bool], ModuleType] = {}

#: The kernels' own reduction combine functions, and triton's standard ones they stand for.
#: The interpreter recognises the standard functions and reduces with one numpy call; any
#: other combine function it runs element by element in Python (95% of an interpreted
#: attention call). Compiled kernels keep their own (see ``triton_kernels.py``).
_STANDARD_COMBINE = {
    "_add": "_sum_combine",
    "_maxf": "_elementwise_max",
    "_minf": "_elementwise_min",
}


def _load(name: str, interpret: bool) -> ModuleType:
    """Load ``name``.py of this folder as a private module, compiled or interpreted.

    Triton decides at decoration time whether a ``@triton.jit`` function is compiled or run
    by its interpreter (``TRITON_INTERPRET``), so the CPU (interpreted) and the GPU (compiled)
    kernels are two loads of the same file under different module names.
    """
    key = (name, interpret)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        mod_name = f"kvmix.engines._{name}_{'interp' if interpret else 'jit'}"
        spec = importlib.util.spec_from_file_location(mod_name, _HERE / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            import triton

            knobs = getattr(triton, "knobs", None)
            prev = knobs.runtime.interpret if knobs is not None else None
            if knobs is not None:
                knobs.runtime.interpret = interpret
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
            if interpret:
                # The reductions look their combine function up in the module at each call.
                for own, standard in _STANDARD_COMBINE.items():
                    if hasattr(module, own):
                        setattr(module, own, getattr(triton.language.standard, standard))
        finally:
            if knobs is not None:
                knobs.runtime.interpret = prev
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old
        _LOADED[key] = module
        return module


def _interpret(device: Any) -> bool:
    return getattr(device, "type", str(device)) == "cpu"


def load_kernels(device: Any) -> ModuleType:
    """The quantize/dequantize kernels for tensors on ``device`` (interpreted on the CPU)."""
    return _load("triton_kernels", _interpret(device))


def load_attention(device: Any) -> ModuleType:
    """The decode attention kernels and launcher for ``device`` (interpreted on the CPU)."""
    return _load("triton_attention", _interpret(device))


def load_scoring(device: Any) -> ModuleType:
    """The prefill scoring kernels for tensors on ``device`` (interpreted on the CPU)."""
    return _load("triton_scoring", _interpret(device))
