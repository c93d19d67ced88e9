"""Per-layer bits calibrated on a model's own text: where a few more bits pay most.

kvmix-5x spends some of its bytes on wider low-tier codes in a few layers (``layer_options``);
:data:`kvmix.cache.KVMIX5X_CALIBRATED_LAYERS` holds the choice made by hand for SmolLM2-135M.
:func:`calibrate_layer_options` makes that choice for any model from any text the user gives:

1. an exact forward pass over each passage's ``prefix + continuation`` (a row of ``input_ids``)
   gives the reference next-token distributions;
2. the preset without per-layer options, then the preset with one *upgrade* (e.g. 4-bit regular
   keys) in one layer, for every layer and upgrade: the prefix is replayed into the cache (as a
   prefill stores it), the continuation teacher-forced one token at a time (as generation
   compresses it), and the mean KL(reference || cache) measured over every passage, with the
   bytes the caches hold once the prompts are compressed (``memory_report()``, before any
   decoding step);
3. upgrades are taken greedily by KL saved per extra byte while the cache stays at least
   ``min_ratio`` times smaller than fp16; the chosen set is measured once more together (the
   layers interact), dropping the least efficient upgrade until the measured ratio holds.

Layers are scored one at a time, as in mixed-precision bit allocation by layer sensitivity
(e.g. HAWQ, Dong et al., 2019; KVTuner, Li et al., 2025, for KV caches). Tune on one text
family, report on another: the choice is a claim about the text it was measured on.

Cost per passage: ``1 + layers x len(upgrades) + (1 or a few)`` prefills and ``continuation``
decoding steps each (SmolLM2-135M, 30 layers, 2 upgrades, one passage of 1024 + 128 tokens:
62 runs, 50 minutes on 2 cores shared with other jobs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvmix.cache import Kvmix5xCache, KvmixCache
from kvmix.errors import ConfigError, ShapeError
from kvmix.eval.prefill import PrefillStates, capture_prefill, replay_prefill
from kvmix.eval.tasks import _next_token_stats

__all__ = ["DEFAULT_UPGRADES", "Calibration", "LayerUpgrade", "calibrate_layer_options"]

#: The upgrades tried in every layer: name -> the layer's options. kvmix-5x's regular tokens
#: hold 3-bit keys and 2-bit values; one more bit for either is what its hand calibration used.
DEFAULT_UPGRADES: Mapping[str, Mapping[str, int]] = {
    "keys": {"low_key_bits": 4},
    "values": {"low_bits": 3},
}

#: ``(config, layer_options) -> cache``: the preset being calibrated.
CacheFactory = Callable[[Any, Mapping[int, Mapping[str, Any]]], KvmixCache]


def _kvmix5x(config: Any, layer_options: Mapping[int, Mapping[str, Any]]) -> KvmixCache:
    return Kvmix5xCache(config, layer_options=layer_options)


@dataclass(frozen=True)
class LayerUpgrade:
    """One layer with one upgrade, measured alone on top of the preset."""

    layer: int
    upgrade: str
    options: Mapping[str, int]
    kl: float
    extra_bytes: int

    def saved_per_byte(self, base_kl: float) -> float:
        """KL saved per extra byte against the preset alone (0 if it costs nothing extra)."""
        return (base_kl - self.kl) / self.extra_bytes if self.extra_bytes > 0 else 0.0


@dataclass(frozen=True)
class Calibration:
    """The result: ``layer_options`` to pass to the preset, with every figure it came from.

    ``kl`` / ``ratio`` are measured with the chosen options together; ``base_*`` without any;
    ``ratio`` is fp16 bytes over the bytes the cache holds once the prompt is compressed."""

    layer_options: dict[int, dict[str, int]]
    kl: float
    ratio: float
    base_kl: float
    base_ratio: float
    candidates: tuple[LayerUpgrade, ...] = field(repr=False)


@dataclass(frozen=True)
class _Run:
    kl: float
    bytes: int
    fp16_bytes: int


@dataclass(frozen=True)
class _Passage:
    prefill: PrefillStates
    reference: torch.Tensor  # log-probabilities of each continuation token's prediction
    continuation: torch.Tensor


def _measure(model: Any, passages: Sequence[_Passage], make: Callable[[], KvmixCache]) -> _Run:
    """Mean KL(reference || cache) over every passage's continuation (a fresh cache each), and
    the bytes the caches hold after their prompts, summed."""
    kls: list[float] = []
    held = fp16 = 0
    for passage in passages:
        cache = make()
        replay_prefill(model, passage.prefill, cache)
        report = cache.memory_report()
        held, fp16 = held + int(report["bytes"]), fp16 + int(report["fp16_bytes"])
        # The first prediction comes from the exact prefill, the same for every cache.
        kls.append(0.0)
        cont, reference = passage.continuation, passage.reference
        with torch.inference_mode():
            for i in range(cont.shape[0] - 1):
                out = model(input_ids=cont[i].view(1, 1), past_key_values=cache, use_cache=True)
                stats = _next_token_stats(reference[i + 1], out.logits[0, -1], int(cont[i + 1]))
                kls.append(stats[0])
    return _Run(sum(kls) / len(kls), held, fp16)


def _merge(chosen: Sequence[LayerUpgrade]) -> dict[int, dict[str, int]]:
    merged: dict[int, dict[str, int]] = {}
    for c in sorted(chosen, key=lambda c: (c.layer, c.upgrade)):
        merged.setdefault(c.layer, {}).update(c.options)
    return merged


def _check(
    input_ids: Any, prefix_tokens: int, min_ratio: float, upgrades: Mapping[str, Any]
) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] < 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise ShapeError(
            f"`input_ids` must be a (passages, tokens) tensor of token ids, got {shape}"
        )
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise ShapeError(f"`input_ids` must hold integer token ids, got {input_ids.dtype}")
    if not 1 <= prefix_tokens <= input_ids.shape[1] - 2:
        raise ConfigError(
            f"`prefix_tokens` must leave at least 2 continuation tokens: 1 <= prefix_tokens <= "
            f"{input_ids.shape[1] - 2}, got {prefix_tokens}"
        )
    if not min_ratio > 0:
        raise ConfigError(f"`min_ratio` must be positive, got {min_ratio}")
    if not upgrades:
        raise ConfigError("`upgrades` must name at least one upgrade")
    for name, opts in upgrades.items():
        if not isinstance(opts, Mapping) or not opts:
            raise ConfigError(f"upgrade {name!r} must be a non-empty mapping of layer options")


def calibrate_layer_options(
    model: Any,
    input_ids: torch.Tensor,
    prefix_tokens: int,
    *,
    min_ratio: float = 4.9,
    upgrades: Mapping[str, Mapping[str, int]] = DEFAULT_UPGRADES,
    make_cache: CacheFactory = _kvmix5x,
    layers: Sequence[int] | None = None,
) -> Calibration:
    """Per-layer options for a preset, chosen on ``input_ids`` (see the module docstring).

    Args:
        model: a transformers causal LM with kvmix attention enabled as it will be used
            (``kvmix.enable_fused_attention(model)`` or ``enable_portable_scoring``), and an
            sdpa-style attention implementation (the prefill is recorded once and replayed).
        input_ids: ``(passages, tokens)`` token ids of the calibration text, one passage per
            row: the first ``prefix_tokens`` are the prompt, the rest is teacher-forced. KL is
            averaged over every passage's tokens (one passage of ~100 decoded tokens leaves
            single-layer differences near its noise: use several).
        prefix_tokens: the prompt's length.
        min_ratio: the smallest fp16-to-cache bytes ratio allowed once the prompt is compressed.
        upgrades: name -> layer options tried in each layer (:data:`DEFAULT_UPGRADES`).
        make_cache: ``(config, layer_options) -> cache``; default :class:`Kvmix5xCache`.
        layers: the layers to try (default: every layer of the cache).

    Returns:
        :class:`Calibration`; pass its ``layer_options`` to the preset, e.g.
        ``kvmix.Kvmix5xCache(config, layer_options=result.layer_options)``.

    Raises:
        ShapeError / ConfigError: bad arguments (before anything runs), or the preset without
            upgrades already holds more than ``fp16 / min_ratio`` bytes.
    """
    _check(input_ids, prefix_tokens, min_ratio, upgrades)
    config = model.config
    probe = make_cache(config, {})
    n_layers = len(probe.kvmix_layers)
    chosen_layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [i for i in chosen_layers if not (isinstance(i, int) and 0 <= i < n_layers)]
    if bad or len(set(chosen_layers)) != len(chosen_layers):
        raise ConfigError(
            f"`layers` must be distinct layer indices in [0, {n_layers}), got {layers}"
        )
    for opts in upgrades.values():  # the cache validates its options: refuse bad ones now
        make_cache(config, {chosen_layers[0] if chosen_layers else 0: dict(opts)})

    ids = input_ids.to(torch.long)
    passages = []
    for row in ids:
        states = capture_prefill(model, row[None, :-1])
        assert states.logits is not None
        reference = torch.log_softmax(states.logits[0, prefix_tokens - 1 :].double(), dim=-1)
        passages.append(_Passage(states.prefix(prefix_tokens), reference, row[prefix_tokens:]))

    def run(layer_options: Mapping[int, Mapping[str, Any]]) -> _Run:
        return _measure(model, passages, lambda: make_cache(config, layer_options))

    base = run({})
    budget = base.fp16_bytes / min_ratio
    if base.bytes > budget:
        raise ConfigError(
            f"the preset alone is {base.fp16_bytes / base.bytes:.3f}x smaller than fp16, below "
            f"`min_ratio` {min_ratio}: no room for upgrades"
        )
    candidates = []
    for layer in chosen_layers:
        for name, opts in upgrades.items():
            r = run({layer: dict(opts)})
            candidates.append(LayerUpgrade(layer, name, dict(opts), r.kl, r.bytes - base.bytes))

    # Greedy by KL saved per byte; only upgrades that help and cost bytes.
    useful = [c for c in candidates if c.kl < base.kl and c.extra_bytes > 0]
    useful.sort(key=lambda c: c.saved_per_byte(base.kl), reverse=True)
    chosen: list[LayerUpgrade] = []
    spent = base.bytes
    for c in useful:
        if spent + c.extra_bytes <= budget:
            chosen.append(c)
            spent += c.extra_bytes
    # Together the upgrades may hold a few bytes more than their sum (pages, segments):
    # measure, and drop the least efficient until the ratio holds.
    while True:
        final = run(_merge(chosen)) if chosen else base
        if final.bytes <= budget or not chosen:
            break
        chosen.pop()
    return Calibration(
        layer_options=_merge(chosen),
        kl=final.kl,
        ratio=final.fp16_bytes / final.bytes,
        base_kl=base.kl,
        base_ratio=base.fp16_bytes / base.bytes,
        candidates=tuple(candidates),
    )
