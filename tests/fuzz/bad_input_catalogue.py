# ruff: noqa: E501 - the catalogue lists one call per line
"""Throw a catalogue of bad inputs at kvmix's public store API and print what each raises.

Each case runs in a fresh subprocess, so an abort of the interpreter (what 2**40 repeats did
before issue 14's fix) is counted, not fatal. Asserts that nothing aborts, panics or raises
anything but a kvmix error. Run: `python tests/fuzz/bad_input_catalogue.py`.
"""

from __future__ import annotations

import collections
import subprocess
import sys

PRE = """
import numpy as np
from kvmix._kvmix import LayerStore, probe_positions, probe_scores
r = np.random.default_rng(0)
def f(*s, m=1.0): return (r.standard_normal(s) * m).astype(np.float32)
def st(p="zipcache", cfg=None, buf="float32", b=1, n=8):
    s = LayerStore(p, 1, 16, cfg, buf); s.append(f(b, 1, n, 16), f(b, 1, n, 16)); return s
"""

CASES: dict[str, list[str]] = {
    "sizes": [
        "st().repeat_interleave(2**40)",
        "st().repeat_interleave(2**62)",
        "st().repeat_interleave(-1)",
        "probe_positions(2**40)",
        "probe_positions(-1)",
        "st().select_batch([0]*70000)",
        "st().select_batch([5])",
        "st().select_batch([-1])",
        "st().crop(-1)",
    ],
    "shapes": [
        "st().append(f(1,1,2,15), f(1,1,2,15))",
        "st().append(f(2,1,2,16), f(2,1,2,16))",
        "st().append(f(1,1,2,16), f(1,1,3,16))",
        "LayerStore('full',1,4).append(f(0,1,2,4), f(0,1,2,4))",
        "st().attend(f(1,0,1,16), [7], 0.25)",
        "st().attend(f(1,3,1,16), [7], 0.25)",
        "st().attend(f(1,1,1,8), [7], 0.25)",
        "st().dense(5)",
        "LayerStore('full', 0, 16)",
    ],
    "non-finite": [
        "st().append(f(1,1,1,16)*np.nan, f(1,1,1,16))",
        "st().attend(f(1,1,1,16), [7], float('nan'))",
        "st().attend(f(1,1,1,16), [7], float('inf'))",
        "st().attend(f(1,1,1,16, m=1e38), [7], 1.0)",
        "st().add_scores(0, np.full((1,1,8), np.nan, np.float32), np.ones((1,1,8), np.float32))",
        "probe_scores(f(1,1,4,4), f(1,1,4,4), [3], float('nan'))",
        "st('full', buf='float16').append(f(1,1,2,16, m=1e5), f(1,1,2,16))",
        "st('mikv', {'low_bits': 1, 'key_balancer': False}).append(f(1,1,2,16, m=4e4), f(1,1,2,16))",
    ],
    "options": [
        "LayerStore('zipcache',1,16,{'salient_ratio':'0.4'})",
        "LayerStore('mikv',1,16,{'low_bits':-1})",
        "LayerStore('mikv',1,16,{'low_bits':5})",
        "LayerStore('uniform',1,16,{'bits':3})",
        "LayerStore('zipcache',1,16,{'nope':1})",
        "LayerStore('bogus',1,16)",
        "LayerStore('uniform',1,16,{'group_size':5})",
    ],
    "state": [
        "s=st('mikv'); s.maybe_classify(True)",
        "s=st('mikv'); s.set_key_balancer(np.ones((1,1,16),np.float32)); s.set_key_balancer(np.ones((1,1,16),np.float32))",
        "s=st(); s.set_first_valid([1,2])",
    ],
}


def main() -> int:
    table: dict[str, collections.Counter] = {}
    bad = []
    for cat, cases in CASES.items():
        table[cat] = collections.Counter()
        for code in cases:
            prog = (
                PRE
                + f"try:\n    {code}\n    print('accepted')\nexcept Exception as e:\n    print(type(e).__module__ + '.' + type(e).__name__)\n"
            )
            p = subprocess.run(
                [sys.executable, "-c", prog], capture_output=True, text=True, timeout=120
            )
            what = (
                p.stdout.strip().splitlines()[-1]
                if p.returncode == 0 and p.stdout.strip()
                else f"ABORT rc={p.returncode}"
            )
            table[cat][what] += 1
            if not (what.startswith("kvmix.") or what == "accepted"):
                bad.append((code, what))
    print(f"{'category':12s} {'count':>5s}  raises")
    for cat, c in table.items():
        print(
            f"{cat:12s} {sum(c.values()):5d}  "
            + ", ".join(f"{k} x{v}" for k, v in sorted(c.items()))
        )
    for code, what in bad:
        print("NOT A KVMIX ERROR:", code, "->", what)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
