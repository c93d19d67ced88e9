"""The measurements: passkey retrieval, fidelity on real text, greedy agreement, bytes held.

Each function takes one prompt (or passage) and a list of methods, runs the exact prefill once
(:mod:`kvmix.eval.prefill`) and returns one record per method. Records are plain dicts of
numbers and strings, ready for JSON.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from kvmix.cache import KvmixCache, KvmixLayer
from kvmix.data import KjvPassages, PasskeyPrompt
from kvmix.eval.methods import METHODS, Method
from kvmix.eval.prefill import PrefillStates, capture_prefill, replay_prefill

__all__ = [
    "PRECISION_SHADES",
    "cache_memory",
    "fidelity_records",
    "matching_prefix",
    "passkey_records",
    "precision_map",
]


def cache_memory(cache: Any) -> dict[str, Any]:
    """Bytes held by ``cache`` and by a dense fp16 cache of the same tokens, read from the cache.

    kvmix caches report their buffers; a ``DynamicCache`` is measured from its tensors (it holds
    the model's dtype, fp32 here, so it is *larger* than fp16).
    """
    if isinstance(cache, KvmixCache):
        r = cache.memory_report()
        return {k: r[k] for k in ("bytes", "fp16_bytes", "compression_ratio")}
    held = fp16 = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            held += t.numel() * t.element_size()
            fp16 += t.numel() * 2
    return {"bytes": held, "fp16_bytes": fp16, "compression_ratio": fp16 / held if held else 0.0}


def matching_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _generate_after(
    model: Any, states: PrefillStates, ids: torch.Tensor, cache: Any, new_tokens: int
) -> list[int]:
    """Greedy generation of ``new_tokens`` tokens from a replayed prefill. The first token comes
    from the exact prefill logits (the same for every method); the rest from ``generate()``."""
    assert states.logits is not None
    first = states.logits[:, -1].argmax(dim=-1, keepdim=True)
    if new_tokens == 1:
        return first[0].tolist()
    with torch.inference_mode():
        out = model.generate(
            torch.cat([ids, first], dim=1),
            past_key_values=cache,
            max_new_tokens=new_tokens - 1,
            do_sample=False,
            pad_token_id=0,
        )
    tokens: list[int] = out[0, ids.shape[1] :].tolist()
    return tokens


def passkey_records(
    model: Any,
    tokenizer: Any,
    prompt: PasskeyPrompt,
    methods: list[Method],
    new_tokens: int,
    trial: int,
) -> list[dict[str, Any]]:
    """Every method answers ``prompt``; agreement is measured against the full cache's answer."""
    ids = prompt.input_ids
    states = capture_prefill(model, ids)
    # The full cache answers first: every other answer is compared with it.
    full = next((m for m in methods if m.policy is None), METHODS["full"])
    reference: list[int] = []
    records = []
    for method in [full, *(m for m in methods if m is not full)]:
        t0 = time.perf_counter()
        cache = method.make_cache(model.config)
        replay_prefill(model, states, cache)
        tokens = _generate_after(model, states, ids, cache, new_tokens)
        if method is full:
            reference = tokens
            if full not in methods:
                continue
        answer = str(tokenizer.decode(tokens, skip_special_tokens=True)).strip()
        records.append(
            {
                "method": method.name,
                "trial": trial,
                "prompt_tokens": int(ids.shape[1]),
                "passkey": prompt.passkey,
                "depth": round(prompt.depth, 4),
                "answer": answer,
                "correct": prompt.is_correct(answer),
                "agreement": matching_prefix(tokens, reference),
                "new_tokens": len(tokens),
                **cache_memory(cache),
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
    return records


def _next_token_stats(reference: torch.Tensor, logits: torch.Tensor, target: int) -> list[float]:
    """KL(reference ‖ method) in nats, top-1 agreement and the method's NLL of ``target``;
    ``reference`` holds log-probabilities (float64), computed once per passage for all methods."""
    own = torch.log_softmax(logits.double(), dim=-1)
    kl = float((reference.exp() * (reference - own)).sum())
    top1 = float(int(reference.argmax()) == int(own.argmax()))
    return [max(kl, 0.0), top1, float(-own[target])]


def fidelity_records(
    model: Any,
    passages: KjvPassages,
    index: int,
    methods: list[Method],
    keep_steps: bool = False,
) -> list[dict[str, Any]]:
    """Teacher-force passage ``index``'s continuation through each method's cache after its
    compressed prefix, and compare every next-token distribution with the full-cache one.

    The reference is one exact forward pass over prefix + continuation; each method prefills the
    prefix (replayed) and then decodes the continuation one token at a time, as in generation,
    so its cache compresses the continuation as it would compress generated tokens.
    ``keep_steps`` adds each record's per-token ``kl`` / ``top1`` lists (``steps``), for
    paired comparisons between methods (:func:`paired_kl_change`).
    """
    prefix = passages.prefix_ids[index : index + 1]
    cont = passages.continuation_ids[index]
    p, c = prefix.shape[1], cont.shape[0]
    states = capture_prefill(model, torch.cat([prefix, cont[:-1].view(1, -1)], dim=1))
    assert states.logits is not None
    reference = torch.log_softmax(states.logits[0, p - 1 : p + c - 1].double(), dim=-1)
    prefill = states.prefix(p)
    records = []
    for method in methods:
        t0 = time.perf_counter()
        cache = method.make_cache(model.config)
        replay_prefill(model, prefill, cache)
        # The first prediction comes from the exact prefill, the same for every method.
        stats = [_next_token_stats(reference[0], reference[0], int(cont[0]))]
        with torch.inference_mode():
            for i in range(c - 1):
                out = model(input_ids=cont[i].view(1, 1), past_key_values=cache, use_cache=True)
                stats.append(
                    _next_token_stats(reference[i + 1], out.logits[0, -1], int(cont[i + 1]))
                )
        s = torch.tensor(stats)
        nll = float(s[:, 2].mean())
        record = {
            "method": method.name,
            "passage": passages.references[index],
            "prefix_tokens": p,
            "continuation_tokens": c,
            "kl": float(s[:, 0].mean()),
            "top1": float(s[:, 1].mean()),
            "nll": nll,
            "perplexity": float(torch.tensor(nll).exp()),
            **cache_memory(cache),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if keep_steps:
            record["steps"] = {"kl": s[:, 0].tolist(), "top1": s[:, 1].tolist()}
        records.append(record)
    return records


#: Shades of :func:`precision_map`.
PRECISION_SHADES = {"high": 1.0, "buffer": 0.6, "low": 0.25}


def precision_map(cache: KvmixCache, tokens: int, sequence: int = 0) -> Any:
    """Where each token of sequence ``sequence`` is held, per (layer, kv-head): a
    ``(layers * kv_heads, tokens)`` array with 1.0 for the high-precision tier, 0.6 for the
    full-precision buffer of not yet classified tokens, 0.25 for the low-precision tier and 0 for
    evicted tokens (:data:`PRECISION_SHADES`)."""
    import numpy as np

    rows = []
    for layer in cache.layers:
        assert isinstance(layer, KvmixLayer)  # a KvmixCache holds KvmixLayers only
        store = layer.store
        for h in range(store.kv_heads):
            row = np.zeros(tokens, dtype=np.float32)
            for tier, positions in store.tier_positions(sequence * store.kv_heads + h).items():
                positions = positions[positions < tokens]
                row[positions] = PRECISION_SHADES[tier]
            rows.append(row)
    return np.stack(rows)
