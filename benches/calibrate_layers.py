"""kvmix-5x's per-layer bits chosen by :func:`kvmix.calibrate.calibrate_layer_options` on
SmolLM2-135M, beside the hand choice (:data:`kvmix.cache.KVMIX5X_CALIBRATED_LAYERS`).

Calibrates on the tuning text (the passkey suite's standard-library docstrings, one passage),
never on KJV; ``--kjv N`` then reports KL / top-1 on N of the evaluation's KJV passages for the
preset without per-layer options, with the hand choice and with the calibrated one.

    KVMIX_NUM_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python benches/calibrate_layers.py \
        --prefix-tokens 1024 --continuation-tokens 128 --kjv 4
"""

from __future__ import annotations

import argparse
import time

import torch
from fidelity_probe import stdlib_passages

from kvmix import enable_fused_attention
from kvmix.cache import _calibrated_layers
from kvmix.calibrate import calibrate_layer_options
from kvmix.data import kjv_passages
from kvmix.eval.methods import METHODS
from kvmix.eval.tasks import fidelity_records
from kvmix.models import load_smollm2


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--passages", type=int, default=1, help="stdlib passages to calibrate on")
    p.add_argument("--prefix-tokens", type=int, default=1024)
    p.add_argument("--continuation-tokens", type=int, default=128)
    p.add_argument("--min-ratio", type=float, default=4.9)
    p.add_argument("--kjv", type=int, default=0, help="KJV passages to report on (2048 + 256)")
    args = p.parse_args()

    model, tok = load_smollm2()
    enable_fused_attention(model)
    text = stdlib_passages(tok, args.passages, args.prefix_tokens, args.continuation_tokens)
    ids = torch.cat([text.prefix_ids, text.continuation_ids], dim=1)
    t0 = time.time()
    result = calibrate_layer_options(model, ids, args.prefix_tokens, min_ratio=args.min_ratio)
    length = f"{args.passages} x {args.prefix_tokens}+{args.continuation_tokens}"
    print(f"calibration: {time.time() - t0:.0f} s, stdlib {length}")
    print(f"preset alone: KL {result.base_kl:.4f} at {result.base_ratio:.3f}x after the prompt")
    print("layer upgrade  KL      extra bytes  KL saved per KiB")
    for c in sorted(result.candidates, key=lambda c: -c.saved_per_byte(result.base_kl)):
        print(
            f"{c.layer:5d} {c.upgrade:7s} {c.kl:.4f} {c.extra_bytes:12d} "
            f"{1024 * c.saved_per_byte(result.base_kl):.5f}"
        )
    print(f"chosen: {result.layer_options}")
    print(f"together: KL {result.kl:.4f} at {result.ratio:.3f}x after the prompt")
    hand = _calibrated_layers(model.config)
    print(f"hand choice (KVMIX5X_CALIBRATED_LAYERS): {hand}")
    if args.kjv:
        passages = kjv_passages(tok, args.kjv, 2048, 256)
        preset = METHODS["kvmix-5x"]
        methods = [
            preset.derive("none", "none", layer_options=None),
            preset.derive("hand", "hand", layer_options=hand),
            preset.derive("calibrated", "calibrated", layer_options=result.layer_options),
        ]
        recs = [
            r for i in range(len(passages)) for r in fidelity_records(model, passages, i, methods)
        ]
        for m in methods:
            rs = [r for r in recs if r["method"] == m.name]
            ratio = sum(r["fp16_bytes"] for r in rs) / sum(r["bytes"] for r in rs)
            kl = sum(r["kl"] for r in rs) / len(rs)
            top1 = sum(r["top1"] for r in rs) / len(rs)
            print(f"KJV {m.name:11s} KL {kl:.4f} top-1 {top1:.3f} ratio {ratio:.3f} (end of run)")


if __name__ == "__main__":
    main()
