"""Run a notebook's code cells in order on a machine without Jupyter (the GPU machine has none).

Each code cell runs in one shared namespace, as a kernel would run it: its printed output is
captured, and a last bare expression is shown with `repr`, as Jupyter shows it.
`IPython.display` is replaced by a text stand-in (Markdown printed as its source). The executed
copy, with each cell's text output, is written to `--out`; the text is also printed.

    python3 gpu/run_notebook.py notebooks/quickstart.ipynb --out $OUT/quickstart-executed.ipynb
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import sys
import time
import traceback
import types


def _install_text_display() -> None:
    """A stand-in for `IPython.display` that prints Markdown as its source text."""
    # The output is text, so a rich display object would only print its repr.
    mod = types.ModuleType("IPython.display")

    class Markdown:
        def __init__(self, data: str) -> None:
            self.data = data

    def display(*objs: object) -> None:
        for o in objs:
            print(o.data if isinstance(o, Markdown) else repr(o))

    mod.Markdown = Markdown  # type: ignore[attr-defined]
    mod.display = display  # type: ignore[attr-defined]
    pkg = types.ModuleType("IPython")
    pkg.display = mod  # type: ignore[attr-defined]
    sys.modules["IPython"] = pkg
    sys.modules["IPython.display"] = mod


def _run_cell(source: str, namespace: dict[str, object]) -> str:
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(tree, "<cell>", "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
            if value is not None:
                print(repr(value))
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebook")
    ap.add_argument("--out", required=True, help="where the executed copy is written")
    args = ap.parse_args()
    _install_text_display()
    with open(args.notebook) as f:
        nb = json.load(f)
    namespace: dict[str, object] = {"__name__": "__main__"}
    status = 0
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        t0 = time.perf_counter()
        try:
            text = _run_cell("".join(cell["source"]), namespace)
        except Exception:
            text = traceback.format_exc()
            status = 1
        cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": text}]
        seconds = time.perf_counter() - t0
        print(f"--- cell {i} ({cell.get('id')}), {seconds:.1f} s\n{text}", flush=True)
        if status:
            break
    with open(args.out, "w") as f:
        json.dump(nb, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
