"""Quantization throughput: the kvmix Rust core against the same math written in torch.

Both sides do exactly the same work on the same fp32 KV-cache tensor
``[batch, kv_heads, tokens, head_dim]``: fp16-rounded scale and offset per group,
round-to-nearest codes, dense LSB-first packing (and the reverse: unpacking and
reconstruction). Before timing, every case checks that torch produces the same packed
bytes and parameters as kvmix and the same reconstruction within 1e-5, so the two numbers
compare the same work. Throughput is fp32 input (or output) bytes / median wall time.

Dequantization is timed twice: into a fresh array (both sides pay the page faults of 64 MiB of
new memory, which dominate), and into a reused output buffer (what a cache that dequantizes
every step does; torch's unpacked codes remain a temporary).

    python -m kvmix.bench quantization --tokens 16384 --repeats 10 --json quant.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

import kvmix

TARGET_SPEEDUP = 3.0
DIRECTIONS = ("quantize+pack", "unpack+dequantize", "dequantize into buffer")


@dataclass(frozen=True)
class Case:
    """One quantizer configuration, as a method uses it."""

    name: str
    tensor: Literal["keys", "values"]
    bits: int
    # "token": groups of `group_size` channels within a token; "channel": each channel over
    # all tokens; "separable": ZipCache's channel factors, then one group per token.
    grouping: Literal["token", "channel", "separable"]
    group_size: int | None = None


def cases(head_dim: int) -> list[Case]:
    """The configurations MiKV, ZipCache and KIVI use, for a given head_dim."""
    half = head_dim // 2
    return [
        Case(f"MiKV keys/values int2, g={half}", "keys", 2, "token", half),
        Case(f"MiKV keys/values int3, g={half}", "values", 3, "token", half),
        Case("ZipCache values int2, chan-separable", "values", 2, "separable"),
        Case("ZipCache values int4, chan-separable", "values", 4, "separable"),
        Case("ZipCache/KIVI keys int2, per-channel", "keys", 2, "channel"),
    ]


def kv_tensors(shape: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    """Gaussian keys and values with the structure real caches have: a few key channels with
    large magnitude and a per-channel bias (the outliers that motivate per-channel key
    quantization), and milder outlier channels in the values."""
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    keys = torch.randn(shape, generator=gen)
    values = torch.randn(shape, generator=gen)
    outliers = torch.randperm(d, generator=gen)[: max(1, d // 32)]
    keys[..., outliers] *= 15.0
    keys += 2.0 * torch.randn(d, generator=gen)
    values[..., outliers[:1]] *= 4.0
    return {"keys": keys, "values": values}


# --- the torch implementation --------------------------------------------------------------


@dataclass
class TorchQuantized:
    """Packed codes and fp16 parameters, as torch tensors."""

    shape: torch.Size
    grouped_shape: torch.Size
    bits: int
    packed: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    channel_scale: torch.Tensor | None


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes densely, LSB first: code i at bits [i*bits, (i+1)*bits)."""
    if 8 % bits == 0:
        per_byte = codes.view(-1, 8 // bits)
        out = per_byte[:, 0].clone()
        for k in range(1, 8 // bits):
            out |= per_byte[:, k] << (k * bits)
        return out
    # Other widths (3 bits): 8 codes fill exactly `bits` bytes; build them in an int32
    # accumulator and keep its low `bits` bytes (little-endian, as the stream is).
    assert 8 * bits <= 32, "8 codes must fit the int32 accumulator"
    blocks = codes.view(-1, 8)
    acc = blocks[:, 0].to(torch.int32)
    for k in range(1, 8):
        acc |= blocks[:, k].to(torch.int32) << (k * bits)
    return acc.view(torch.uint8).view(-1, 4)[:, :bits].reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: all codes, as an integer tensor (uint8 or int32)."""
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return ((packed.unsqueeze(-1) >> shifts) & mask).view(-1)
    blocks = packed.view(-1, bits).to(torch.int32)
    acc = blocks[:, 0]
    for k in range(1, bits):
        acc = acc | (blocks[:, k] << (8 * k))
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int32)
    return ((acc.unsqueeze(-1) >> shifts) & mask).view(-1)


@torch.inference_mode()
def torch_quantize(x: torch.Tensor, case: Case) -> TorchQuantized:
    """Quantize and pack ``x`` with the same float32 operations, in the same order, as kvmix."""
    top = (1 << case.bits) - 1
    channel_scale = None
    if case.grouping == "separable":
        absmax = x.abs().amax(dim=-2, keepdim=True)
        channel_scale = torch.where(absmax > 0, absmax.sqrt(), 1.0).half()
        x = x / channel_scale.float()
    if case.grouping == "channel":
        groups, dim = x, -2
    else:
        size = case.group_size or x.shape[-1]
        groups, dim = x.view(*x.shape[:-1], x.shape[-1] // size, size), -1
    # Separate amin/amax: on CPU they are several times faster than torch.aminmax here.
    lo, hi = groups.amin(dim, keepdim=True), groups.amax(dim, keepdim=True)
    scale = ((hi - lo) / top).half()
    offset = lo.half()
    # A constant group (scale 0) gets code 0: dividing by inf yields it without a mask pass.
    step = scale.float().masked_fill_(scale == 0, float("inf"))
    codes = (groups - offset.float()).div_(step).add_(0.5).floor_().clamp_(0, top)
    packed = pack_codes(codes.to(torch.uint8).view(-1), case.bits)
    return TorchQuantized(x.shape, groups.shape, case.bits, packed, scale, offset, channel_scale)


@torch.inference_mode()
def torch_dequantize(q: TorchQuantized) -> torch.Tensor:
    """Unpack the codes and rebuild ``scale * code + offset`` (times the channel factor)."""
    codes = unpack_codes(q.packed, q.bits).view(q.grouped_shape)
    x = codes.to(torch.float32).mul_(q.scale.float()).add_(q.offset.float()).view(q.shape)
    if q.channel_scale is not None:
        x.mul_(q.channel_scale.float())
    return x


@torch.inference_mode()
def torch_dequantize_into(q: TorchQuantized, out: torch.Tensor) -> torch.Tensor:
    """:func:`torch_dequantize` writing the result into a preallocated ``out`` (the unpacked
    codes are still a temporary: that is what the straightforward torch version needs)."""
    codes = unpack_codes(q.packed, q.bits).view(q.grouped_shape)
    grouped = out.view(q.grouped_shape)
    grouped.copy_(codes)
    grouped.mul_(q.scale.float()).add_(q.offset.float())
    if q.channel_scale is not None:
        out.mul_(q.channel_scale.float())
    return out


# --- kvmix ------------------------------------------------------------------------------------


def kvmix_quantize(x: torch.Tensor, case: Case) -> kvmix.QuantizedTensor:
    """The kvmix call a method makes for ``case``."""
    if case.grouping == "separable":
        return kvmix.quantize_channel_separable(x, case.bits)
    if case.grouping == "channel":
        return kvmix.quantize(x, case.bits, grouping="channel")
    return kvmix.quantize(x, case.bits, group_size=case.group_size)


def kvmix_dequantize(q: kvmix.QuantizedTensor) -> torch.Tensor:
    out: torch.Tensor = kvmix.dequantize(q, torch.float32)
    return out


def check_same_work(x: torch.Tensor, case: Case) -> None:
    """Assert that torch and kvmix produce the same bytes, parameters and reconstruction."""
    kq, tq = kvmix_quantize(x, case), torch_quantize(x, case)
    assert np.array_equal(kq.codes, tq.packed.numpy()), f"{case.name}: packed codes differ"
    assert np.array_equal(kq.scale.ravel(), tq.scale.numpy().ravel()), f"{case.name}: scale"
    assert np.array_equal(kq.offset.ravel(), tq.offset.numpy().ravel()), f"{case.name}: offset"
    if tq.channel_scale is not None:
        assert kq.channel_scale is not None
        assert np.array_equal(kq.channel_scale.ravel(), tq.channel_scale.numpy().ravel())
    torch.testing.assert_close(
        torch_dequantize(tq), kvmix_dequantize(kq), rtol=1e-6, atol=1e-5, msg=case.name
    )


# --- timing and reporting ---------------------------------------------------------------------


def median_seconds(
    fns: Sequence[Callable[[], Any]], repeats: int, warmup: int = 2, run: int = 3
) -> list[float]:
    """Median wall time of each of ``fns`` over ``repeats`` rounds of ``run`` calls, after
    ``warmup`` untimed calls. Rounds interleave the contenders (a a a, b b b, a a a, ...) so that
    a burst of load from other processes hits each alike; each turn starts with one untimed call,
    which absorbs the hand-over from the other contender (torch's OpenMP threads keep spinning
    for about a millisecond after its last op, and slowed the next kvmix call 1.9x when the
    calls alternated one by one). Results are freed outside the timed region."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times, strict=True):
            fn()  # untimed: absorbs the hand-over; its result is freed at once
            for _ in range(run):
                start = time.perf_counter()
                out = fn()
                samples.append(time.perf_counter() - start)
                del out
    return [statistics.median(t) for t in times]


@dataclass
class Result:
    case: str
    direction: str
    bits: int
    kvmix_ms: float
    torch_ms: float
    kvmix_gbps: float
    torch_gbps: float
    speedup: float


def measure(x: torch.Tensor, case: Case, repeats: int) -> list[Result]:
    """Both directions of one case, kvmix and torch, on the same tensor."""
    nbytes = x.numel() * x.element_size()
    kq, tq = kvmix_quantize(x, case), torch_quantize(x, case)
    # Reused outputs (as a cache's portable path reuses its dense buffer), touched once first.
    kout, tout = torch.zeros_like(x), torch.zeros_like(x)
    torch.testing.assert_close(
        kvmix.dequantize(kq, out=kout), torch_dequantize_into(tq, tout), rtol=1e-6, atol=1e-5
    )
    pairs = {
        DIRECTIONS[0]: (lambda: kvmix_quantize(x, case), lambda: torch_quantize(x, case)),
        DIRECTIONS[1]: (lambda: kvmix_dequantize(kq), lambda: torch_dequantize(tq)),
        DIRECTIONS[2]: (
            lambda: kvmix.dequantize(kq, out=kout),
            lambda: torch_dequantize_into(tq, tout),
        ),
    }
    results = []
    for direction, (kvmix_fn, torch_fn) in pairs.items():
        tk, tt = median_seconds([kvmix_fn, torch_fn], repeats)
        results.append(
            Result(
                case.name,
                direction,
                case.bits,
                tk * 1e3,
                tt * 1e3,
                nbytes / tk / 1e9,
                nbytes / tt / 1e9,
                tt / tk,
            )
        )
    return results


def machine_info() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "kvmix_threads": kvmix.num_threads(),
        "torch_threads": torch.get_num_threads(),
        "kvmix": kvmix.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(results: list[Result]) -> str:
    """An aligned text table, one line per (case, direction)."""
    cw = max([len("case"), *(len(r.case) for r in results)])
    dw = max([len("direction"), *(len(r.direction) for r in results)])
    header = (
        f"{'case':<{cw}} {'direction':<{dw}} {'bits':>4} {'kvmix ms':>9} {'torch ms':>9} "
        f"{'kvmix GB/s':>10} {'torch GB/s':>10} {'speedup':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        flag = "" if r.speedup >= TARGET_SPEEDUP else "  < target"
        lines.append(
            f"{r.case:<{cw}} {r.direction:<{dw}} {r.bits:>4} {r.kvmix_ms:>9.2f} "
            f"{r.torch_ms:>9.2f} {r.kvmix_gbps:>10.2f} {r.torch_gbps:>10.2f} "
            f"{r.speedup:>7.2f}x{flag}"
        )
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=16384, help="tokens (default 16384)")
    parser.add_argument("--heads", type=int, default=8, help="kv heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="head_dim (default 128)")
    parser.add_argument(
        "--repeats", type=int, default=10, help="rounds of 3 timed calls each (default 10)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for both kvmix (KVMIX_NUM_THREADS) and torch (default: all cores)",
    )
    parser.add_argument("--json", metavar="PATH", help="also save the results as JSON")


def main(args: argparse.Namespace) -> int:
    threads = args.threads or len(os.sched_getaffinity(0))
    # `python -m kvmix.bench` has imported kvmix already, but its thread pool is built on the
    # first kernel call, so setting the variable here (before any kernel runs) still applies.
    os.environ["KVMIX_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    if kvmix.num_threads() != threads:
        print(f"warning: kvmix uses {kvmix.num_threads()} threads, asked for {threads}")

    shape = (1, args.heads, args.tokens, args.head_dim)
    data = kv_tensors(shape)
    info = machine_info()
    print("kvmix quantization benchmark: kvmix (Rust core) vs torch, same data, same run")
    print(", ".join(f"{k}={v}" for k, v in info.items()))
    mib = data["keys"].numel() * 4 / 2**20
    print(
        f"shape {list(shape)} fp32 ({mib:.0f} MiB), median of {args.repeats} rounds x 3 calls "
        "after 2 warm-up (each contender's turn starts with 1 untimed call)\n"
    )

    results = []
    for case in cases(args.head_dim):
        x = data[case.tensor]
        check_same_work(x, case)
        results.extend(measure(x, case, args.repeats))
    print(format_table(results))

    missed = [r for r in results if r.speedup < TARGET_SPEEDUP]
    target = f"target kvmix >= {TARGET_SPEEDUP:g}x torch"
    if missed:
        print(f"\n{target}: NOT met in {len(missed)} of {len(results)}:")
        for r in missed:
            print(f"  {r.case}, {r.direction}: {r.speedup:.2f}x")
    else:
        print(f"\n{target}: met in all {len(results)}")

    if args.json:
        payload = {
            "machine": info,
            "config": {"shape": list(shape), "repeats": args.repeats},
            "target_speedup": TARGET_SPEEDUP,
            "results": [asdict(r) for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"saved {args.json}")
    return 0
