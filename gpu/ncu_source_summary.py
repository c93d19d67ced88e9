"""Summarize Nsight Compute's source page of one kernel (``ncu --import R --page source --csv
--print-source sass``, as ``gpu/pending.sh C26A`` saves it, gzipped or not): the SASS in runs
of instructions executed equally often (a loop body, a prologue run once per program), each
with its share of the warp-stall samples and its first instruction, then the instructions
with the most excess global sectors (uncoalesced accesses).

    python3 gpu/ncu_source_summary.py source.csv.gz [--min-share 0.4] [--top 8]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
from collections import Counter

SAMPLES = "Warp Stall Sampling (All Samples)"
EXEC = "Instructions Executed"
EXCESS = "L2 Theoretical Sectors Global Excessive"
SECTORS = "L2 Theoretical Sectors Global"


def _num(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv")
    p.add_argument("--min-share", type=float, default=0.4, help="runs below this %% are left out")
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()
    raw = (
        gzip.open(args.csv, "rb").read()
        if args.csv.endswith(".gz")
        else open(args.csv, "rb").read()
    )
    rows = list(csv.reader(io.StringIO(raw.decode())))
    hdr = next(r for r in rows if "Address" in r and "Source" in r)
    lines = [
        dict(zip(hdr, r, strict=False))
        for r in rows[rows.index(hdr) + 1 :]
        if len(r) >= len(hdr) - 1
    ]
    total = sum(_num(d[SAMPLES]) for d in lines) or 1.0
    print(f"{len(lines)} SASS lines, {total:.0f} samples, "
          f"{sum(_num(d[EXEC]) for d in lines):.0f} warp instructions executed")  # fmt: skip
    runs: list[list[float]] = []  # [first, last, executions, samples]
    for i, d in enumerate(lines):
        e = _num(d[EXEC])
        if runs and runs[-1][2] == e:
            runs[-1][1] = i
            runs[-1][3] += _num(d[SAMPLES])
        else:
            runs.append([i, i, e, _num(d[SAMPLES])])
    print("lines        executed  length  samples  first instruction")
    for first, last, e, smp in runs:
        if smp / total * 100 >= args.min_share:
            src = lines[int(first)]["Source"].strip()[:48]
            share = smp / total * 100
            print(f"{first:5.0f}-{last:5.0f} {e:9.0f} {last - first + 1:7.0f} {share:7.1f}%  {src}")
    ex = sum(_num(d[EXCESS]) for d in lines)
    print(f"global sectors {sum(_num(d[SECTORS]) for d in lines):.0f}, excess {ex:.0f}")
    ops = Counter(d["Source"].split()[0] for d in lines if _num(d[EXCESS]) > 0)
    print(f"  instructions with excess sectors, by opcode: {dict(ops)}")
    for d in sorted(lines, key=lambda d: -_num(d[EXCESS]))[: args.top]:
        if _num(d[EXCESS]) > 0:
            print(f"  {d['Source'].strip()[:56]:56s} sectors {_num(d[SECTORS]):8.0f} "
                  f"excess {_num(d[EXCESS]):8.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
