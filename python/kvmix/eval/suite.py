"""``python -m kvmix.eval.suite``: the passkey suite (:mod:`kvmix.passkey`) per family and overall.

Every prompt's prefill runs once (replayed into each method's cache, :mod:`kvmix.eval.prefill`);
each method answers by greedy decoding with kvmix's fused attention. Prints one table per
haystack family and one overall, the full cache's score beside each method's, and writes
``suite.json`` (every record) and ``suite.md`` (the tables) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvmix.eval.methods import resolve_methods
from kvmix.eval.tasks import passkey_records
from kvmix.passkey import HAYSTACKS, PHRASINGS, passkey_suite

__all__ = ["main", "run_suite", "suite_tables"]


def run_suite(
    model: Any,
    tokenizer: Any,
    methods: list[str],
    lengths: tuple[int, ...] = (2048,),
    depths: int = 3,
    haystacks: tuple[str, ...] = HAYSTACKS,
    phrasings: tuple[str, ...] = tuple(PHRASINGS),
    seed: int = 0,
    new_tokens: int = 8,
    progress: bool = False,
    earlier: list[dict[str, Any]] | None = None,
    on_prompt: Callable[[list[dict[str, Any]]], None] | None = None,
    redo: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """One record per (prompt, method), tagged with the prompt's haystack, phrasing and length.

    ``earlier``: records of an interrupted run with the same arguments (other than ``methods``);
    they are kept and only the missing (prompt, method) pairs run. ``redo``: methods whose
    earlier records are dropped and run again (records are keyed by method name, so after a
    preset's definition changes its old records would otherwise count as done, or be mixed with
    the new ones). ``on_prompt`` is called with all records after every prompt (to save them as
    they come).
    """
    unknown = sorted(set(redo) - set(methods))
    if unknown:
        raise ValueError(f"redo names {unknown}, not among the methods {methods}")
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    resolved = resolve_methods(methods, max(lengths), cfg.num_key_value_heads, head_dim)
    records = [r for r in earlier or [] if r["method"] not in redo]
    prompts = passkey_suite(tokenizer, lengths, depths, haystacks, phrasings, seed)
    for i, sp in enumerate(prompts):
        have = {r["method"] for r in records if r["trial"] == i}
        todo = [m for m in resolved if m.name not in have]
        if not todo:
            continue
        for r in passkey_records(model, tokenizer, sp.prompt, todo, new_tokens, i):
            r.update(haystack=sp.haystack, phrasing=sp.phrasing, length=sp.n_tokens)
            records.append(r)
        if on_prompt is not None:
            on_prompt(records)
        if progress:
            done = [r for r in records if r["trial"] == i]
            line = " ".join(f"{r['method']}={'Y' if r['correct'] else 'n'}" for r in done)
            print(f"[{i + 1}/{len(prompts)}] {sp.family} {sp.n_tokens}: {line}", flush=True)
    return records


def suite_tables(records: list[dict[str, Any]]) -> str:
    """Markdown: per haystack (and overall) each method's correct/total, the full cache's beside,
    and the median bytes ratio measured by ``memory_report()``."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r["haystack"]].append(r)
        groups[f"{r['haystack']}/{r['phrasing']}"].append(r)
        groups["overall"].append(r)
    keys = [h for h in HAYSTACKS if h in groups]
    keys += [*sorted(k for k in groups if "/" in k), "overall"]

    def score(rs: list[dict[str, Any]], m: str) -> str:
        mine = [r for r in rs if r["method"] == m]
        return f"{sum(r['correct'] for r in mine)}/{len(mine)}" if mine else "-"

    header = "| family | full | " + " | ".join(m for m in methods if m != "full") + " |"
    lines = [header, "|" + "---|" * (len(methods) + 1)]
    for k in keys:
        cells = [score(groups[k], m) for m in methods if m != "full"]
        lines.append(f"| {k} | {score(groups[k], 'full')} | " + " | ".join(cells) + " |")
    ratios = []
    for m in methods:
        rs = sorted(r["compression_ratio"] for r in records if r["method"] == m)
        ratios.append(f"{rs[len(rs) // 2]:.2f}x" if rs else "-")
    full_ratio = ratios[methods.index("full")] if "full" in methods else "-"
    others = [x for m, x in zip(methods, ratios, strict=True) if m != "full"]
    lines.append(f"| smaller than fp16 | {full_ratio} | " + " | ".join(others) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m kvmix.eval.suite") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--methods", default="full,uniform4,uniform2,mikv,zipcache,kvmix-5x")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="a method derived from a preset, NAME=PRESET:key=value,... (repeatable)",
    )
    p.add_argument("--lengths", default="2048", help="comma-separated token counts")
    p.add_argument("--depths", type=int, default=3)
    p.add_argument("--haystacks", default=",".join(HAYSTACKS))
    p.add_argument("--phrasings", default=",".join(PHRASINGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/suite")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the records of an earlier run in --out (same arguments but --methods)",
    )
    p.add_argument(
        "--redo",
        default="",
        help="with --resume: comma-separated methods (among --methods) whose earlier records "
        "are replaced by a new run (a preset whose definition changed)",
    )
    a = p.parse_args(argv)
    redo = tuple(m for m in a.redo.split(",") if m)
    if redo and not a.resume:
        p.error("--redo needs --resume (without it no earlier record is kept)")
    if set(redo) - set(a.methods.split(",")):
        p.error(f"--redo {a.redo}: every method it names must be in --methods ({a.methods})")
    out = Path(a.out)
    earlier: list[dict[str, Any]] = []
    if a.resume and (out / "suite.json").exists():
        saved = json.loads((out / "suite.json").read_text())
        ignored = ("methods", "variant", "out", "resume", "redo")
        mine = {k: v for k, v in vars(a).items() if k not in ignored}
        theirs = {k: saved["args"].get(k) for k in mine}
        if theirs != mine:
            print(
                f"error: {out / 'suite.json'} was written with {theirs}, not {mine}; only "
                "--methods may differ when resuming",
                file=sys.stderr,
            )
            return 2
        earlier = saved["records"]

    def save(records: list[dict[str, Any]]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "suite.json.tmp"
        tmp.write_text(json.dumps({"args": vars(a), "records": records}, indent=1))
        tmp.replace(out / "suite.json")

    import kvmix
    from kvmix.models import load_smollm2

    model, tokenizer = load_smollm2()
    kvmix.enable_fused_attention(model)
    records = run_suite(
        model,
        tokenizer,
        a.methods.split(",") + a.variant,
        tuple(int(x) for x in a.lengths.split(",")),
        a.depths,
        tuple(a.haystacks.split(",")),
        tuple(a.phrasings.split(",")),
        a.seed,
        progress=True,
        earlier=earlier,
        on_prompt=save,
        redo=redo,
    )
    tables = suite_tables(records)
    print(tables)
    save(records)
    (out / "suite.md").write_text(tables + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
