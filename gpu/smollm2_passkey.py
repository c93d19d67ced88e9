"""SmolLM2-135M answers the test suite's passkey prompts (``tests/test_smollm2.py``: 10 prompts
of ~4096 tokens, seed 0, 7 greedy tokens) with a kvmix ZipCache, on the engine of the model's
device: ``--reference OUT.json`` on the CPU (Rust engine) writes the prompts' token ids and the
answers; on a GPU (Triton engine) ``--compare REF.json`` generates from the same ids and
compares token by token.

    python gpu/smollm2_passkey.py --reference gpu/smollm2_passkey_cpu.json   # here, CPU
    python3 gpu/smollm2_passkey.py --compare gpu/smollm2_passkey_cpu.json    # GPU machine
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import kvmix
from kvmix.data import passkey_correct, passkey_prompts
from kvmix.models import load_smollm2

MODES = {"fused": kvmix.enable_fused_attention, "portable": kvmix.enable_portable_scoring}


def _answers(model, prompts_ids, device, mode):
    MODES[mode](model)
    out = []
    for ids in prompts_ids:
        x = torch.tensor([ids], device=device)
        cache = kvmix.ZipCache(model.config)
        t0 = time.perf_counter()
        with torch.inference_mode():
            gen = model.generate(
                x, past_key_values=cache, max_new_tokens=7, do_sample=False, pad_token_id=0
            )
        if device != "cpu":
            torch.cuda.synchronize()
        rep = cache.memory_report()
        out.append(
            {
                "tokens": gen[0, len(ids) :].tolist(),
                "engine": cache.layers[0].engine_name,
                "ratio": rep["compression_ratio"],
                "seconds": time.perf_counter() - t0,
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference")
    ap.add_argument("--compare")
    args = ap.parse_args()
    if args.reference:
        model, tok = load_smollm2()
        prompts = passkey_prompts(tok, 10, 4096, seed=0)
        ids = [p.input_ids[0].tolist() for p in prompts]
        res = {"ids": ids, "passkeys": [p.passkey for p in prompts]}
        for mode in MODES:
            res[mode] = _answers(model, ids, "cpu", mode)
            for p, a in zip(prompts, res[mode], strict=True):
                a["correct"] = bool(p.is_correct(tok.decode(a["tokens"], skip_special_tokens=True)))
            print(mode, sum(a["correct"] for a in res[mode]), "/ 10 correct (CPU, Rust engine)")
        with open(args.reference, "w") as f:
            json.dump(res, f)
        return
    ref = json.load(open(args.compare))
    model, tok = load_smollm2()
    model = model.to("cuda")
    print("device", torch.cuda.get_device_name(), "torch", torch.__version__)
    for mode in MODES:
        got = _answers(model, ref["ids"], "cuda", mode)
        same = correct = 0
        for i, (g, r) in enumerate(zip(got, ref[mode], strict=True)):
            text = tok.decode(g["tokens"], skip_special_tokens=True)
            ok = passkey_correct(text, ref["passkeys"][i])
            correct += ok
            same += g["tokens"] == r["tokens"]
            print(
                f"{mode:8s} prompt {i}: engine {g['engine']}, passkey {ref['passkeys'][i]}, "
                f"GPU {text!r} ({'correct' if ok else 'wrong'}), same tokens as CPU: "
                f"{g['tokens'] == r['tokens']}, ratio {g['ratio']:.2f} (CPU {r['ratio']:.2f}), "
                f"{g['seconds']:.2f} s"
            )
        cpu_correct = sum(r["correct"] for r in ref[mode])
        print(
            f"{mode}: GPU {correct}/10 correct, CPU {cpu_correct}/10; identical answers {same}/10"
        )


if __name__ == "__main__":
    main()
