"""Command line of the benchmarks: ``python -m kvmix.bench <benchmark> [options]``.

Each benchmark is a module of this package with ``add_arguments(parser)`` and
``main(args) -> int``; register it in :data:`BENCHMARKS` to get a subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). New benchmarks (attention, generate) register here.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "quantization": (
        "kvmix.bench.quantization",
        "quantize+pack and unpack+dequantize throughput, kvmix vs torch",
    ),
    "memory": (
        "kvmix.bench.memory",
        "bytes held by a compressed cache under each preset vs a dense fp16 cache",
    ),
    "attention": (
        "kvmix.bench.attention",
        "decode attention on a ZipCache store vs torch SDPA on dense fp32/bf16 caches",
    ),
    "generate": (
        "kvmix.bench.generate",
        "SmolLM2 prefill and decode speed: DynamicCache, QuantizedCache, kvmix presets",
    ),
    "gpu": (
        "kvmix.bench.gpu",
        "8B-shaped model on one GPU: prefill, decode step, memory and max batch of every cache",
    ),
    "host": (
        "kvmix.bench.host",
        "host work of a decoding step per layer: torch ops, Triton launches, host time",
    ),
}


def build_parser(prog: str = "python -m kvmix.bench") -> argparse.ArgumentParser:
    """The top-level parser with one subcommand per benchmark."""
    parser = argparse.ArgumentParser(prog=prog, description="kvmix benchmarks.")
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(run=module.main)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m kvmix.bench") -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the chosen benchmark."""
    args = build_parser(prog).parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
