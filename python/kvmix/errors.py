"""kvmix's exception family. Every error kvmix raises on bad input is one of these, and all
are ``ValueError`` subclasses, so ``except ValueError`` keeps working for callers that do
not care which problem it was."""

from kvmix._kvmix import ConfigError, DTypeError, KvmixError, NonFiniteError, ShapeError

__all__ = ["ConfigError", "DTypeError", "KvmixError", "NonFiniteError", "ShapeError"]
