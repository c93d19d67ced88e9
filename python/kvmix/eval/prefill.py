"""One exact prefill shared by every method of an evaluation.

kvmix's caches run the prompt's attention exactly and compress afterwards, so the prefill forward
pass is the same for every method: only what each cache keeps of it differs. An evaluation
therefore runs the prompt through the model once, records what every attention layer received
(its queries, keys, values and mask), and *replays* that into each method's fresh cache: the
same ``cache.update()`` and attention-function calls the model's own layers make, in the same
order, so each cache ends in the state a real ``generate()`` prefill leaves it in (the tests
check tokens and bytes against a direct ``generate()``). The recording runs transformers' sdpa;
a cache whose own prefill computes the exact attention another way (MiKV and H2O take it from one
explicit softmax, with their scores) would see inputs that differ in float rounding only. This
saves one full prefill per method and trial, which dominates the cost of long-prompt evaluations
on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["LayerCall", "PrefillStates", "capture_prefill", "replay_prefill"]

_CAPTURE = "kvmix_eval_capture"
#: Implementations whose masks are built by `sdpa_mask`, like the recorded ones.
_SDPA_MASKED = frozenset({"kvmix", "sdpa", "kvmix_portable_sdpa"})


@dataclass
class LayerCall:
    """What one attention layer received during the prefill."""

    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    kwargs: dict[str, Any]

    def prefix(self, length: int) -> LayerCall:
        """The same call for the first ``length`` tokens (attention is causal, so their queries,
        keys and values do not depend on what follows)."""
        mask = self.attention_mask
        if mask is not None:
            mask = mask[..., :length, :length]
        return LayerCall(
            self.module,
            self.query[:, :, :length],
            self.key[:, :, :length],
            self.value[:, :, :length],
            mask,
            self.kwargs,
        )


@dataclass
class PrefillStates:
    """The recorded prefill: one :class:`LayerCall` per attention layer, in call order, and the
    logits of every position."""

    calls: list[LayerCall] = field(default_factory=list)
    logits: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return int(self.calls[0].key.shape[2]) if self.calls else 0

    def prefix(self, length: int) -> PrefillStates:
        """The recorded prefill of the first ``length`` tokens only."""
        logits = None if self.logits is None else self.logits[:, :length]
        return PrefillStates([c.prefix(length) for c in self.calls], logits)


_recording: list[PrefillStates] = []


def _capture_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    if _recording:
        _recording[-1].calls.append(LayerCall(module, query, key, value, attention_mask, kwargs))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def capture_prefill(model: Any, input_ids: torch.Tensor) -> PrefillStates:
    """Run ``input_ids`` through ``model`` (exact sdpa attention, no cache) and record every
    attention layer's inputs and the logits of every position."""
    config = model.config
    previous = config._attn_implementation
    states = PrefillStates()
    # Registered here, not at import: importing kvmix changes nothing in transformers.
    AttentionInterface.register(_CAPTURE, _capture_attention)
    AttentionMaskInterface.register(_CAPTURE, sdpa_mask)
    _recording.append(states)
    try:
        model.set_attn_implementation(_CAPTURE)
        with torch.inference_mode():
            states.logits = model(input_ids=input_ids, use_cache=False).logits
    finally:
        _recording.pop()
        model.set_attn_implementation(previous)
    return states


def replay_prefill(model: Any, states: PrefillStates, cache: Any) -> None:
    """Put the recorded prefill into ``cache`` as the model's own layers would: for each layer,
    ``cache.update()`` then the model's current attention function on what it returns."""
    implementation = model.config._attn_implementation
    if implementation not in _SDPA_MASKED:
        # The recorded masks are sdpa masks; eager or flash attention would misread them.
        raise ValueError(
            f"replaying a prefill needs an attention implementation with sdpa masks "
            f"({sorted(_SDPA_MASKED)}), the model uses {implementation!r}"
        )
    attention = ALL_ATTENTION_FUNCTIONS[implementation]
    with torch.inference_mode():
        for call in states.calls:
            # A fresh tensor object per replay: caches may tag the keys they return.
            key, value = cache.update(call.key.detach(), call.value.detach(), call.module.layer_idx)
            attention(call.module, call.query, key, value, call.attention_mask, **call.kwargs)
