"""End-to-end generation on SmolLM2-135M-Instruct: prefill time and decode speed of every cache.

One run loads the model once and, for each prompt length, times every method on the same
passkey prompt (``kvmix.data.passkey_prompt``, batch 1):

Methods are presets of :mod:`kvmix.registry` (``kvmix presets`` lists them):

* ``full``: transformers' ``DynamicCache`` (fp32, the reference);
* ``quanto-int4`` / ``quanto-int2``: transformers' ``QuantizedCache`` with the optimum-quanto
  backend (KIVI-style, 128-token residual), when ``optimum-quanto`` is installed;
* kvmix's presets with the fused attention (``attn_implementation="kvmix"``), e.g. ``zipcache``
  (40% 4-bit, 2-bit rest), ``mikv`` (20% fp16, int2), ``uniform2``/``uniform4`` (KIVI),
  ``kvmix-5x``;
* ``<preset>-portable``: the same kvmix cache under transformers' ``sdpa`` (dense dequantized
  keys/values every step), on request with ``--methods``.

Prefill: a forward pass over the prompt into an empty cache (logits of the last position only),
``--rounds`` times per method, methods interleaved. Decode: greedy steps (one forward pass per
token) on each method's last prefilled cache, timed in ``--chunks`` chunks of ``--steps`` steps,
methods interleaved, so that bursts of load from other processes hit them alike. The table shows
medians and, in the same run, ratios to ``full`` (DynamicCache): "overhead" is
the prefill time beyond ``DynamicCache``'s (scoring + compression, as a share of its prefill),
"decode" the decode speed over ``DynamicCache``'s. For kvmix caches, "compress" and "scoring"
are the shares of the method's own prefill spent building the compressed store (copying the
prompt in, quantizing it into tiers) and computing importance (probe queries, counts, MiKV's key
balancer), timed around those calls by the cache itself (``KvmixCache.prefill_timings``).
Memory is the cache's bytes against a dense fp16 cache of the same tokens (kvmix:
``memory_report()``, every byte; DynamicCache: fp32).

    python -m kvmix.bench generate --tokens 4096 8192 --rounds 3 --chunks 8 --json gen.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sysconfig
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

import kvmix
from kvmix.bench.quantization import machine_info
from kvmix.registry import PRESETS, Preset

PORTABLE = "-portable"


@dataclass(frozen=True)
class Method:
    """A preset timed under one attention implementation."""

    name: str
    preset: Preset
    #: ``"kvmix"``: the fused attention; ``"sdpa"``: sdpa with kvmix's portable scoring.
    implementation: str

    @property
    def label(self) -> str:
        if self.implementation == "sdpa":
            return f"{self.preset.description}, sdpa (portable)"
        return self.preset.description


def method(name: str) -> Method:
    """``<preset>`` or ``<kvmix preset>-portable`` (argparse type: a bad name names the valid
    ones)."""
    if name in PRESETS:
        return Method(name, PRESETS[name], "kvmix")
    base = name.removesuffix(PORTABLE)
    if name.endswith(PORTABLE) and base in PRESETS and PRESETS[base].is_kvmix:
        return Method(name, PRESETS[base], "sdpa")
    kvmix_names = [n for n, p in PRESETS.items() if p.is_kvmix]
    raise argparse.ArgumentTypeError(
        f"unknown method {name!r}; valid methods: {', '.join(PRESETS)}, or <preset>{PORTABLE} "
        f"for a kvmix preset ({', '.join(kvmix_names)})"
    )


DEFAULT_METHODS = ["full", "quanto-int4", "quanto-int2", "zipcache", "mikv", "uniform2"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tokens", type=int, nargs="+", default=[4096], help="prompt lengths (default 4096)"
    )
    p.add_argument("--rounds", type=int, default=3, help="prefills per method (median)")
    p.add_argument("--chunks", type=int, default=8, help="decode chunks per method (median)")
    p.add_argument("--steps", type=int, default=8, help="decode steps per chunk")
    p.add_argument(
        "--methods",
        nargs="+",
        type=method,
        default=[method(m) for m in DEFAULT_METHODS],
        metavar="METHOD",
        help=f"presets to time, <preset>{PORTABLE} for the portable path "
        f"(default: {' '.join(DEFAULT_METHODS)})",
    )
    p.add_argument("--seed", type=int, default=0, help="passkey prompt seed")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def quanto_available() -> bool:
    """Whether transformers' QuantizedCache can use its quanto backend here."""
    return PRESETS["quanto-int4"].available()


def prefill(model: Any, ids: torch.Tensor, cache: Any) -> tuple[float, torch.Tensor]:
    """Prefill ``ids`` into ``cache``: ``(seconds, greedy next token)``."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        seconds = time.perf_counter() - t0
    return seconds, logits[:, -1].argmax(dim=-1, keepdim=True)


def decode(model: Any, token: torch.Tensor, cache: Any, steps: int) -> tuple[float, list[int]]:
    """``steps`` greedy decoding steps from ``token``: ``(seconds, tokens)`` (the last token
    is the next input)."""
    tokens = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = model(token, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens.append(int(token))
        seconds = time.perf_counter() - t0
    return seconds, tokens


def cache_ratio(cache: Any) -> float | None:
    """How many times smaller than a dense fp16 cache of the same tokens, if known."""
    if isinstance(cache, kvmix.KvmixCache):
        return float(cache.memory_report()["compression_ratio"])
    if type(cache) is DynamicCache:
        layer = cache.layers[0]
        assert isinstance(layer, DynamicLayer) and layer.keys is not None  # filled by prefill
        return 2.0 / layer.keys.element_size()
    return None


def _use(model: Any, implementation: str) -> None:
    """``"kvmix"``: the fused attention; ``"sdpa"``: sdpa with kvmix's portable scoring (both
    run other caches as plain sdpa)."""
    if implementation == "kvmix":
        kvmix.enable_fused_attention(model)
    else:
        model.set_attn_implementation(implementation)
        kvmix.enable_portable_scoring(model)


def measure(
    model: Any, ids: torch.Tensor, methods: list[Method], rounds: int, chunks: int, steps: int
) -> dict[str, dict[str, Any]]:
    """Interleaved prefill rounds of every method on one prompt, then interleaved decode chunks
    of ``steps`` tokens on each method's last prefilled cache; medians and same-run ratios."""
    for m in methods:  # warm up on a short prompt (quanto's extension, first-call paths)
        _use(model, m.implementation)
        cache = m.preset.make_cache(model.config)
        decode(model, prefill(model, ids[:, :256], cache)[1], cache, 2)
    names = [m.name for m in methods]
    prefills: dict[str, list[float]] = {m: [] for m in names}
    phases: dict[str, list[dict[str, float]]] = {m: [] for m in names}
    state: dict[str, tuple[Any, torch.Tensor, list[int]]] = {}
    for _ in range(rounds):
        for m in methods:
            _use(model, m.implementation)
            cache = m.preset.make_cache(model.config)
            seconds, token = prefill(model, ids, cache)
            prefills[m.name].append(seconds)
            if isinstance(cache, kvmix.KvmixCache):
                shares = {k: v / seconds for k, v in cache.prefill_timings().items()}
                phases[m.name].append(shares)
            state[m.name] = (cache, token, [int(token)])
    # Decoding is timed in short chunks, alternating methods, so that a burst of load from
    # other processes hits every method alike.
    speeds: dict[str, list[float]] = {m: [] for m in names}
    for _ in range(chunks):
        for m in methods:
            _use(model, m.implementation)
            cache, token, tokens = state[m.name]
            seconds, new = decode(model, token, cache, steps)
            speeds[m.name].append(steps / seconds)
            state[m.name] = (cache, torch.tensor([[new[-1]]]), tokens + new)
    _use(model, "kvmix")
    results: dict[str, dict[str, Any]] = {}
    for m in methods:
        cache, _, tokens = state[m.name]
        res = results[m.name] = {
            "label": m.label,
            "prefill_s": statistics.median(prefills[m.name]),
            "decode_tok_s": statistics.median(speeds[m.name]),
            "prefill_runs": prefills[m.name],
            "decode_runs": speeds[m.name],
            "tokens": tokens,
            "cache_vs_fp16": cache_ratio(cache),
        }
        if phases[m.name]:
            # Shares of the method's own prefill, median over rounds.
            for phase in phases[m.name][0]:
                share = statistics.median(p[phase] for p in phases[m.name])
                res[f"{phase}_share"] = share
    if "full" in results:
        base = results["full"]
        for res in results.values():
            res["prefill_overhead"] = res["prefill_s"] / base["prefill_s"] - 1.0
            res["decode_vs_dynamic"] = res["decode_tok_s"] / base["decode_tok_s"]
            res["same_tokens_as_dynamic"] = res["tokens"] == base["tokens"]
    return results


def format_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"{'method':50} {'prefill s':>9} {'overhead':>9} {'decode tok/s':>12} "
        f"{'vs dynamic':>10} {'vs fp16':>8} {'compress':>8} {'scoring':>8}"
    ]
    lines.append("-" * len(lines[0]))
    for res in results.values():
        over = res.get("prefill_overhead")
        rel = res.get("decode_vs_dynamic")
        ratio = res["cache_vs_fp16"]
        lines.append(
            f"{res['label']:50} {res['prefill_s']:9.2f} "
            f"{'' if over is None else f'{100 * over:+.1f}%':>9} {res['decode_tok_s']:12.2f} "
            f"{'' if rel is None else f'{rel:.2f}x':>10} "
            f"{'n/a' if ratio is None else f'{ratio:.2f}x':>8} "
            f"{_share(res.get('compression_share')):>8} {_share(res.get('scoring_share')):>8}"
        )
    shares = [r["compression_share"] for r in results.values() if "compression_share" in r]
    if shares:
        lines.append(
            f"compression of the prefilled cache: at most {100 * max(shares):.1f}% of the prefill "
            f"(target <10%: {'met' if max(shares) < 0.10 else 'NOT met'})"
        )
    return "\n".join(lines)


def _share(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def main(args: argparse.Namespace) -> int:
    from kvmix.data import passkey_prompt
    from kvmix.models import load_smollm2

    methods = list({m.name: m for m in args.methods}.values())
    if not quanto_available():
        skipped = [m.name for m in methods if not m.preset.available()]
        if skipped:
            print(f"optimum-quanto is not installed: skipping {', '.join(skipped)}")
        methods = [m for m in methods if m.preset.available()]
    else:
        # quanto compiles its CPU kernels with ninja on first use; torch looks for the `ninja`
        # command on PATH, which misses the environment's own scripts folder unless activated.
        scripts = sysconfig.get_path("scripts")
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    model, tokenizer = load_smollm2()
    kvmix.enable_fused_attention(model)
    print(machine_info(), flush=True)
    out: dict[str, Any] = {"machine": machine_info(), "results": {}}
    for length in args.tokens:
        ids = passkey_prompt(tokenizer, length, seed=args.seed).input_ids
        print(
            f"\nprompt {ids.shape[1]} tokens; medians of {args.rounds} interleaved prefills and "
            f"of {args.chunks} interleaved decode chunks of {args.steps} steps",
            flush=True,
        )
        results = measure(model, ids, methods, args.rounds, args.chunks, args.steps)
        print(format_table(results), flush=True)
        out["results"][str(length)] = results
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
