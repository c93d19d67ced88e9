"""The string choices of kvmix's API as ``Literal`` types, for type checkers.

The values are defined by the Rust core (``kvmix.POLICIES``, ``kvmix.BUFFER_DTYPES``, the
options of :func:`kvmix.policy_defaults`); ``tests/test_policy.py`` checks that these types
list exactly those values.
"""

from typing import Literal

__all__ = [
    "AttentionMode",
    "BufferDtype",
    "Clip",
    "CountMode",
    "PolicyName",
    "Scoring",
    "Selection",
]

#: A store policy (``kvmix.POLICIES``).
PolicyName = Literal["full", "uniform", "mikv", "zipcache", "eviction"]
#: Storage of the not-yet-classified tokens (``kvmix.BUFFER_DTYPES``).
BufferDtype = Literal["float16", "bfloat16", "float32"]
#: ZipCache's ``count_mode``.
CountMode = Literal["exact", "full_matrix"]
#: ZipCache's ``selection``.
Selection = Literal["layer", "kv_head"]
#: How a quantizer's groups choose their range (``kvmix._kvmix.CLIPS``): ``"minmax"``, ``"mse"``
#: (the range of least squared error) or ``"mse_unbiased"`` (the same among the ranges that do
#: not shrink the group; ``src/quant/clip.rs``).
Clip = Literal["minmax", "mse", "mse_unbiased"]
#: Which queries' attention a policy scores tokens with (``LayerStore.scoring``).
Scoring = Literal["none", "every_query", "probes"]
#: How a model was enabled for kvmix (``KvmixCache.attention_mode``).
AttentionMode = Literal["fused", "portable"]
