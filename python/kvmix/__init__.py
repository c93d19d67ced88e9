"""kvmix: importance-aware mixed-precision KV-cache compression for transformers.

The compiled core lives in the private module ``kvmix._kvmix``; this package re-exports
the public parts of it next to the pure-Python layers.
"""

from kvmix import quant, reference
from kvmix._kvmix import (
    BUFFER_DTYPES,
    POLICIES,
    LayerStore,
    QuantizedTensor,
    __version__,
    default_buffer_dtype,
    num_threads,
    policy_defaults,
    probe_positions,
    probe_scores,
    top_k,
)
from kvmix.attention import enable_fused_attention, enable_portable_scoring, kvmix_attention
from kvmix.cache import (
    EvictionCache,
    FullPrecisionCache,
    Kvmix5xCache,
    KvmixCache,
    MiKVCache,
    QuantizedKVCache,
    ZipCache,
)
from kvmix.errors import ConfigError, DTypeError, KvmixError, NonFiniteError, ShapeError
from kvmix.quant import (
    channel_absmax,
    dequantize,
    key_balancer,
    pack_bits,
    quantize,
    quantize_balanced_keys,
    quantize_channel_separable,
    separable_channel_scale,
    unpack_bits,
)
from kvmix.registry import Preset, make_cache, preset_info, presets

__all__ = [
    "BUFFER_DTYPES",
    "POLICIES",
    "ConfigError",
    "DTypeError",
    "EvictionCache",
    "FullPrecisionCache",
    "Kvmix5xCache",
    "KvmixCache",
    "KvmixError",
    "LayerStore",
    "MiKVCache",
    "NonFiniteError",
    "Preset",
    "QuantizedKVCache",
    "QuantizedTensor",
    "ShapeError",
    "ZipCache",
    "__version__",
    "channel_absmax",
    "default_buffer_dtype",
    "dequantize",
    "enable_fused_attention",
    "enable_portable_scoring",
    "key_balancer",
    "kvmix_attention",
    "make_cache",
    "num_threads",
    "pack_bits",
    "policy_defaults",
    "preset_info",
    "presets",
    "probe_positions",
    "probe_scores",
    "quant",
    "quantize",
    "quantize_balanced_keys",
    "quantize_channel_separable",
    "reference",
    "separable_channel_scale",
    "top_k",
    "unpack_bits",
]
