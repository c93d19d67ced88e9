"""The hand-written stub ``python/kvmix/_kvmix.pyi`` matches the compiled module, as checked
by ``mypy.stubtest`` (the same command ``make py-test`` runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stub_matches_compiled_module() -> None:
    cmd = [sys.executable, "-m", "mypy.stubtest", "kvmix._kvmix"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"stubtest failed:\n{proc.stdout}\n{proc.stderr}"
