"""kvmix's attention functions for transformers.

* ``"kvmix"`` — the fused path: decoding attention runs in Rust directly on the compressed
  store, and the probabilities it computes anyway feed the importance scores. Enable it with
  :func:`enable_fused_attention` (or ``from_pretrained(..., attn_implementation="kvmix")``).
* The portable path: kvmix wraps transformers' ``"sdpa"`` and ``"eager"`` implementations. For
  keys that do not come from a kvmix cache the wrappers are a plain pass-through; for a kvmix
  cache they run the original function on the dense dequantized keys/values and compute the
  importance the cache needs from the same queries.

Prefill is exact in both paths: attention runs on the prompt's own keys/values; importance
comes from probe queries (ZipCache) or from every query (MiKV's accumulated attention, H2O); the
prompt is compressed after.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvmix import _kvmix

__all__ = ["enable_fused_attention", "kvmix_attention"]

#: Query rows per block when computing explicit attention probabilities (bounds memory).
_ROWS_PER_BLOCK = 256


def _layer_of(key: torch.Tensor) -> Any:
    return getattr(key, "_kvmix_layer", None)


def _first_valid(attention_mask: torch.Tensor | None, batch: int) -> list[int]:
    """First non-padding key position of each sequence, from the 4-D mask's last query row."""
    if attention_mask is None:
        return [0] * batch
    last = attention_mask[:, 0, -1, :]
    visible = last if last.dtype == torch.bool else last == 0
    # argmax of a bool row finds the first True; an all-False row (cannot happen for the last,
    # real query) falls back to 0.
    return [int(i) for i in visible.to(torch.uint8).argmax(dim=-1).tolist()]


def _probe_rows(layer: Any, length: int) -> list[int] | None:
    """Query rows whose attention decides importance: ZipCache's probes, every row for
    H2O-style accumulation (MiKV, eviction), none for policies without importance."""
    opts = layer.options
    if layer.policy == "zipcache":
        return _kvmix.probe_positions(
            length, opts.get("probe_recent", 0.05), opts.get("probe_random", 0.05), 0
        )
    if layer.policy in ("mikv", "eviction"):
        return list(range(length))
    return None


def _probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: list[int],
    q_positions: list[int],
    k_positions: torch.Tensor,
    first_valid: list[int],
    scaling: float,
) -> torch.Tensor:
    """Softmax attention of the query rows ``rows`` over ``key``, summed over the query rows and
    over the query heads of each kv-head's GQA group: ``(B, H_kv, T)``. A key is visible to a
    query at or after its position unless it is left padding."""
    b, hq, _, d = query.shape
    hk, t = key.shape[1], key.shape[2]
    rep = hq // hk
    keys = key.float()
    kpos = k_positions.view(1, 1, 1, -1)
    fv = torch.tensor(first_valid).view(b, 1, 1, 1)
    out = torch.zeros(b, hk, t)
    for start in range(0, len(rows), _ROWS_PER_BLOCK):
        block = rows[start : start + _ROWS_PER_BLOCK]
        n = len(block)
        # Keys after the block's last query are invisible to all of it: skip them.
        hi = int(torch.searchsorted(k_positions, max(q_positions[r] for r in block), right=True))
        # Query heads h*rep .. h*rep+rep-1 share kv head h: fold them into the row axis.
        q = query[:, :, block].float().reshape(b, hk, rep * n, d)
        logits = torch.matmul(q, keys[:, :, :hi].transpose(-1, -2)) * scaling
        qpos = torch.tensor([q_positions[r] for r in block]).repeat(rep).view(1, 1, -1, 1)
        visible = (kpos[..., :hi] <= qpos) & (kpos[..., :hi] >= fv)
        logits.masked_fill_(~visible, float("-inf"))
        out[:, :, :hi] += torch.softmax(logits, dim=-1).nan_to_num_(0.0).sum(dim=2)
    return out


def _score_prefill(
    layer: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> None:
    """Importance of the prompt tokens, the key balancer if needed, then compression."""
    store = layer.store
    b, _, t, _ = query.shape
    first_valid = _first_valid(attention_mask, b)
    store.set_first_valid(first_valid)
    layer.first_valid = first_valid
    if store.needs_balancer:
        store.set_key_balancer(_kvmix.key_balancer(*_as_numpy(query, key)))
    rows = _probe_rows(layer, t)
    if rows:
        positions = list(range(t))
        acc = _probabilities(query, key, rows, positions, torch.arange(t), first_valid, scaling)
        count = _visible_counts(rows, t, first_valid, layer.options.get("count_mode", "exact"))
        store.add_scores(0, acc.numpy(), count.expand_as(acc).contiguous().numpy())
    store.maybe_classify(True)
    layer.needs_prefill = False


def _visible_counts(rows: list[int], t: int, first_valid: list[int], mode: str) -> torch.Tensor:
    """How many scored query rows can see each key: ``(B, 1, T)``."""
    j = torch.arange(t)
    if mode == "full_matrix":
        base = (t - j).float()
    else:
        r = torch.tensor(rows)
        base = (r.view(-1, 1) >= j.view(1, -1)).sum(dim=0).float()
    fv = torch.tensor(first_valid).view(-1, 1)
    return torch.where(j.view(1, -1) >= fv, base.view(1, -1), 0.0).unsqueeze(1)


def _as_numpy(query: torch.Tensor, key: torch.Tensor) -> tuple[Any, Any]:
    return query.detach().float().contiguous().numpy(), key.detach().float().contiguous().numpy()


def kvmix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``"kvmix"`` attention implementation (see the module docstring)."""
    layer = _layer_of(key)
    if layer is None:  # not a kvmix cache: behave as sdpa
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    if layer.needs_prefill:
        out = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scale, dropout=dropout, **kwargs
        )
        _score_prefill(layer, query, key, attention_mask, scale)
        return out
    tq = query.shape[2]
    end = layer.cumulative_length
    q = query.detach().float().contiguous().numpy()
    out = layer.store.attend(q, list(range(end - tq, end)), scale, True)
    layer.store.maybe_classify()
    attn = torch.from_numpy(out).to(query.dtype).transpose(1, 2).contiguous()
    return attn, None


def _portable(original_name: str, original: Callable[..., Any] | None) -> Callable[..., Any]:
    """Wrap a standard attention implementation so that kvmix caches get their importance."""

    def wrapped(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> Any:
        fn = original
        if fn is None:  # "eager" is per model file
            fn = sys.modules[type(module).__module__].eager_attention_forward
        out = fn(module, query, key, value, attention_mask, **kwargs)
        layer = _layer_of(key)
        if layer is None:
            return out
        scaling = kwargs.get("scaling")
        scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
        if layer.needs_prefill:
            _score_prefill(layer, query, key, attention_mask, scale)
            return out
        _track_dense(layer, query, key, scale)
        return out

    wrapped.__name__ = f"kvmix_portable_{original_name}"
    wrapped._kvmix_wrapped = True  # type: ignore[attr-defined]
    return wrapped


def _track_dense(layer: Any, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
    """Importance of this step's queries over the dense keys, then classification. The dense
    keys hold every position ``0 .. end-1`` in order (the portable path never evicts)."""
    store = layer.store
    tq, t = query.shape[2], key.shape[2]
    end = layer.cumulative_length
    if _probe_rows(layer, 0) is not None:
        qpos = list(range(end - tq, end))
        fv = layer.first_valid
        acc = _probabilities(query, key, list(range(tq)), qpos, torch.arange(t), fv, scale)
        j = torch.arange(t)
        seen = (torch.tensor(qpos).view(-1, 1) >= j.view(1, -1)).sum(dim=0).view(1, 1, -1)
        count = torch.where(j.view(1, 1, -1) >= torch.tensor(fv).view(-1, 1, 1), seen, 0)
        store.add_scores(0, acc.numpy(), count.float().expand_as(acc).contiguous().numpy())
    store.maybe_classify()


def _register() -> None:
    AttentionInterface.register("kvmix", kvmix_attention)
    # A custom implementation needs a mask function too, or transformers silently drops the
    # padding mask (masking_utils: unknown implementations get `None`).
    AttentionMaskInterface.register("kvmix", sdpa_mask)
    mapping = AttentionInterface._global_mapping
    sdpa = mapping.get("sdpa")
    if sdpa is not None and not getattr(sdpa, "_kvmix_wrapped", False):
        AttentionInterface.register("sdpa", _portable("sdpa", sdpa))
    eager = mapping.get("eager")
    if not getattr(eager, "_kvmix_wrapped", False):
        AttentionInterface.register("eager", _portable("eager", eager))


def enable_fused_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` run kvmix's fused attention (``attn_implementation="kvmix"``).

    With a kvmix cache, decoding attention then runs on the compressed store; with any other
    cache the function behaves as transformers' sdpa. Returns the model.
    """
    set_impl = getattr(model, "set_attn_implementation", None)
    if set_impl is None:
        raise TypeError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    set_impl("kvmix")
    return model


_register()
