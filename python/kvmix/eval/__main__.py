"""``python -m kvmix.eval``: the memory/quality trade-off of each method on SmolLM2-135M.

Defaults are the README's table: the full cache, uniform 4/2-bit, H2O eviction at MiKV's bytes,
MiKV, ZipCache and ZipCache's two ablations; 20 passkey prompts of 4096 tokens; 4 KJV passages of
2048 + 256 tokens. ``--sweep`` adds the other budgets of the trade-off plot (and eviction at
ZipCache's bytes).
"""

from __future__ import annotations

import argparse
import sys

from kvmix.eval import DEFAULT_METHODS, METHODS, SWEEP_METHODS, EvalConfig, evaluate


def build_parser(prog: str = "python -m kvmix.eval") -> argparse.ArgumentParser:
    d = EvalConfig()
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    names = ", ".join(sorted(METHODS))
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated: {names}, or h2o@<method> (eviction at that method's bytes)",
    )
    p.add_argument("--sweep", action="store_true", help="add " + ", ".join(SWEEP_METHODS))
    p.add_argument("--passkey-trials", type=int, default=d.passkey_trials)
    p.add_argument("--passkey-tokens", type=int, default=d.passkey_tokens)
    p.add_argument("--passkey-seed", type=int, default=d.passkey_seed)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--passages", type=int, default=d.passages)
    p.add_argument("--prefix-tokens", type=int, default=d.prefix_tokens)
    p.add_argument("--continuation-tokens", type=int, default=d.continuation_tokens)
    p.add_argument("--passage-seed", type=int, default=d.passage_seed)
    p.add_argument("--out", default="results", help="folder for eval.json/.md and tradeoffs.png")
    p.add_argument("--resume", action="store_true", help="keep the records already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--replot",
        action="store_true",
        help="run nothing: rewrite eval.md and tradeoffs.png from --out's eval.json and its "
        "suite-<N>k/ runs",
    )
    return p


def main(argv: list[str] | None = None, prog: str = "python -m kvmix.eval") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.replot:
        import json
        from pathlib import Path

        from kvmix.eval import save_results

        saved = Path(args.out) / "eval.json"
        if not saved.exists():
            print(f"error: --replot needs {saved}", file=sys.stderr)
            return 2
        save_results(json.loads(saved.read_text()), args.out)
        print(f"rewritten: {args.out}/eval.md, tradeoffs.png")
        return 0
    methods = [m for m in args.methods.split(",") if m]
    if args.sweep:
        methods += [m for m in SWEEP_METHODS if m not in methods]
    try:
        config = EvalConfig(
            methods=tuple(methods),
            passkey_trials=args.passkey_trials,
            passkey_tokens=args.passkey_tokens,
            passkey_seed=args.passkey_seed,
            new_tokens=args.new_tokens,
            passages=args.passages,
            prefix_tokens=args.prefix_tokens,
            continuation_tokens=args.continuation_tokens,
            passage_seed=args.passage_seed,
        )
        results = evaluate(config, out=args.out, resume=args.resume, progress=not args.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from kvmix.eval.report import markdown_table

    print(markdown_table(results))
    print(f"written to {args.out}/eval.json, eval.md, tradeoffs.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
