"""Plain NumPy implementations of kvmix's math. They are the specification: small, slow and
readable. The Rust core is tested against them."""

from kvmix.reference import importance, quantization

__all__ = ["importance", "quantization"]
