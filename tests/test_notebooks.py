"""The notebooks run top to bottom (with a small configuration), so they cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

SMALL = {
    "quickstart.ipynb": "PROMPT_TOKENS = 512\nNEW_TOKENS = 8\n",
    "tradeoffs.ipynb": (
        "from kvmix.eval import EvalConfig\n"
        "RUN_EVAL = EvalConfig(methods=('full', 'uniform2', 'h2o@mikv', 'mikv', 'zipcache', "
        "'zipcache-accumulated', 'zipcache-tokenwise'), passkey_trials=1, passkey_tokens=512, "
        "new_tokens=6, passages=1, prefix_tokens=256, continuation_tokens=12)\n"
        "PROMPT_TOKENS = 512\n"
        "SAVE_FIGURES = False\n"
    ),
}


def _run(name: str, tmp_path: Path) -> object:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "each notebook has exactly one cell tagged `parameters`"
    nb.cells.insert(params[0] + 1, nbformat.v4.new_code_cell(SMALL[name]))
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    return nb


def _text(nb: object) -> str:
    out = []
    for cell in nb.cells:  # type: ignore[attr-defined]
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") + str(o.get("data", {}).get("text/markdown", "")))
    return "".join(out)


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
    text = _text(_run("quickstart.ipynb", tmp_path))
    assert "DynamicCache (full)" in text and "same as fused: True" in text
    assert "x smaller" in text


@pytest.mark.slow
def test_tradeoffs_runs(tmp_path):
    text = _text(_run("tradeoffs.ipynb", tmp_path))
    # The claims are computed for every method pair present in the small run.
    assert text.count("holds") + text.count("does NOT hold") >= 4
    assert "digits at high precision" in text
    assert not list(tmp_path.glob("*.png")), "SAVE_FIGURES = False must not write figures"
