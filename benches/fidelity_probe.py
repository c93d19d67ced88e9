"""Quick fidelity probe for tuning a preset: KL(full || method), top-1 and perplexity on a
chosen text, through the evaluation's own measurement (:func:`kvmix.eval.tasks.fidelity_records`).

Issue 16's rule of evidence: tune on one family, report on others. ``--text stdlib`` (the
passkey suite's standard-library docstrings, technical English) is the tuning text; ``--text
kjv`` is the evaluation's own passages (``python -m kvmix.eval``'s fidelity task, the same cut
with the same seed), for reporting only; ``--text pydoc`` (Python's reference topics, shipped
with CPython) a third family, also for reporting only.

    KVMIX_NUM_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python benches/fidelity_probe.py \
        --text stdlib --passages 2 --methods kvmix-5x \
        --variant 'sinks=kvmix-5x:sink_tokens=4'

``--variant NAME=PRESET:key=value,key=value`` derives a method from a preset with overrides
(values parsed as Python literals). Prints one line per method: bytes ratio against fp16 (read
from the cache at the end, as the eval does), mean KL, top-1, perplexity, and for every method
after the first its KL change against the first on the same tokens with a 95% interval
(:func:`kvmix.eval.report.paired_kl_change`): a change whose interval holds 0 is not shown by
this text. ``--json PATH`` keeps the records, per-token figures included.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from kvmix.data import KjvPassages, _bos_ids, kjv_passages
from kvmix.eval.methods import METHODS, parse_variant
from kvmix.eval.report import paired_kl_change
from kvmix.eval.tasks import fidelity_records


def pydoc_text() -> str:
    """Python's language and library reference topics as shipped with every CPython
    (``pydoc_data.topics``: ~465k characters of reference-manual prose with grammar rules and
    examples), a text family that no kvmix choice was tuned on."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def stdlib_passages(
    tokenizer: Any, n: int, prefix: int, cont: int, text: str | None = None
) -> KjvPassages:
    """``n`` passages of the stdlib docstring haystack (or of ``text``), evenly spaced
    through it."""
    from kvmix.passkey import haystack_sentences

    if text is None:
        text = " ".join(haystack_sentences("stdlib"))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = _bos_ids(tokenizer)
    need = prefix + cont - len(bos)
    if len(ids) < need:
        raise ValueError(f"the stdlib text has {len(ids)} tokens, fewer than {need}")
    step = (len(ids) - need) // max(1, n - 1) if n > 1 else 0
    rows = [bos + ids[i * step : i * step + need] for i in range(n)]
    batch = torch.tensor(rows, dtype=torch.long)
    return KjvPassages(
        prefix_ids=batch[:, :prefix].contiguous(),
        continuation_ids=batch[:, prefix:].contiguous(),
        references=tuple(f"text@{i * step}" for i in range(n)),
        texts=tuple("" for _ in range(n)),
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--text", choices=("stdlib", "kjv", "pydoc"), default="stdlib")
    p.add_argument("--passages", type=int, default=2)
    p.add_argument("--prefix-tokens", type=int, default=2048)
    p.add_argument("--continuation-tokens", type=int, default=256)
    p.add_argument("--methods", default="")
    p.add_argument("--variant", action="append", default=[])
    p.add_argument("--json", metavar="PATH", help="also write the records (per-token figures too)")
    args = p.parse_args()

    from kvmix import enable_fused_attention
    from kvmix.models import load_smollm2

    model, tok = load_smollm2()
    enable_fused_attention(model)
    methods = [METHODS[m] for m in args.methods.split(",") if m]
    methods += [parse_variant(v) for v in args.variant]
    if args.text == "kjv":
        passages = kjv_passages(tok, args.passages, args.prefix_tokens, args.continuation_tokens)
    else:
        text = pydoc_text() if args.text == "pydoc" else None
        passages = stdlib_passages(
            tok, args.passages, args.prefix_tokens, args.continuation_tokens, text
        )
    t0 = time.time()
    recs = []
    for i in range(len(passages)):
        recs += fidelity_records(model, passages, i, methods, keep_steps=True)
    for m in methods:
        rs = [r for r in recs if r["method"] == m.name]
        kl = sum(r["kl"] for r in rs) / len(rs)
        top1 = sum(r["top1"] for r in rs) / len(rs)
        nll = sum(r["nll"] for r in rs) / len(rs)
        ratio = sum(r["fp16_bytes"] for r in rs) / sum(r["bytes"] for r in rs)
        versus = ""
        if m is not methods[0]:
            c = paired_kl_change(recs, m.name, methods[0].name)
            versus = (
                f"  KL {c['change']:+.1%} [{c['low']:+.1%}, {c['high']:+.1%}] vs {methods[0].name}"
            )
        print(
            f"{m.name:28s} ratio {ratio:5.3f}  KL {kl:.4f}  top1 {top1:.3f}  "
            f"ppl {float(torch.tensor(nll).exp()):.2f}  ({args.text}, {len(rs)} x "
            f"{args.prefix_tokens}+{args.continuation_tokens}){versus}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(recs, f)
    print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
