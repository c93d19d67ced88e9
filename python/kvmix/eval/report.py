"""Summaries, the markdown table and the plots of an evaluation's records."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "load_suites",
    "markdown_table",
    "paired_kl_change",
    "plot_high_precision",
    "plot_tradeoffs",
    "suite_overall",
    "summarize",
]


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-method aggregates of the passkey and fidelity records, in the methods' order.

    Compression ratios are medians over the runs of a method (each read from its cache at the end
    of the run); KL, top-1 and NLL are means over passages of per-passage means; perplexity is
    ``exp`` of the mean NLL.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, info in results["methods"].items():
        pk = [r for r in results["passkey"] if r["method"] == name]
        fi = [r for r in results["fidelity"] if r["method"] == name]
        s: dict[str, Any] = {"label": info["label"], "family": info["family"]}
        ratios = [r["compression_ratio"] for r in pk + fi]
        s["compression_ratio"] = statistics.median(ratios) if ratios else None
        if pk:
            s["passkey_correct"] = sum(r["correct"] for r in pk)
            s["passkey_trials"] = len(pk)
            s["passkey_accuracy"] = s["passkey_correct"] / len(pk)
            s["agreement"] = statistics.mean(r["agreement"] for r in pk)
            s["new_tokens"] = statistics.mean(r["new_tokens"] for r in pk)
            s["passkey_ratio"] = statistics.median(r["compression_ratio"] for r in pk)
        if fi:
            s["passages"] = len(fi)
            s["kl"] = statistics.mean(r["kl"] for r in fi)
            s["top1"] = statistics.mean(r["top1"] for r in fi)
            s["nll"] = statistics.mean(r["nll"] for r in fi)
            s["perplexity"] = float(np.exp(s["nll"]))
            s["fidelity_ratio"] = statistics.median(r["compression_ratio"] for r in fi)
        out[name] = s
    return out


def paired_kl_change(
    records: list[dict[str, Any]],
    method: str,
    baseline: str,
    block: int = 32,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """How much ``method``'s mean KL differs from ``baseline``'s on the same tokens, with a
    95% interval: is a difference between two variants more than the text's noise?

    Per-token KL is heavy-tailed (on SmolLM2 the 1% largest tokens carry ~10-20% of the sum),
    so two variants' means on a few passages differ by several percent by chance. The
    records (``fidelity_records(..., keep_steps=True)``) pair the two methods token by token;
    the interval resamples blocks of ``block`` consecutive tokens (neighbouring tokens' errors
    are correlated: they share the cache's last classification) from every passage, with
    replacement, and takes the 2.5th / 97.5th percentiles of the ratio of means.

    Returns:
        ``change``: ``mean(method) / mean(baseline) - 1``; ``low`` / ``high``: its interval.

    Raises:
        ValueError: a method has no records, or a record has no ``steps``, or the two methods'
            passages or lengths differ.
    """

    def by_passage(name: str) -> dict[str, np.ndarray]:
        out = {}
        for r in records:
            if r["method"] != name:
                continue
            if "steps" not in r:
                raise ValueError(
                    f"record of {name!r} on {r['passage']!r} has no per-token steps: measure "
                    "with fidelity_records(..., keep_steps=True)"
                )
            out[r["passage"]] = np.asarray(r["steps"]["kl"], dtype=np.float64)
        if not out:
            raise ValueError(f"no fidelity records of {name!r}")
        return out

    a, b = by_passage(method), by_passage(baseline)
    if a.keys() != b.keys() or any(len(a[k]) != len(b[k]) for k in a):
        raise ValueError(f"{method!r} and {baseline!r} were not measured on the same tokens")
    if block < 1:
        raise ValueError(f"`block` must be at least 1, got {block}")
    # Per-block sums of both methods, every passage's blocks pooled (a shorter last block
    # weighs by its tokens, as in the plain means).
    sums = np.array(
        [
            (a[k][i : i + block].sum(), b[k][i : i + block].sum())
            for k in a
            for i in range(0, len(a[k]), block)
        ]
    )
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sums), size=(resamples, len(sums)))
    total = sums[picks].sum(axis=1)
    ratios = total[:, 0] / total[:, 1]
    change = sums[:, 0].sum() / sums[:, 1].sum() - 1
    low, high = np.percentile(ratios - 1, [2.5, 97.5])
    return {"change": float(change), "low": float(low), "high": float(high)}


def _ratio(r: float | None) -> str:
    if r is None:
        return "–"
    return f"{r:.2f}x smaller" if r >= 1 else f"{1 / r:.2f}x larger"


def markdown_table(results: dict[str, Any]) -> str:
    """The results as a markdown table, one row per method. The two size columns are medians of
    the ratios measured at the end of the passkey runs and of the KJV runs."""
    rows = [
        "| method | vs fp16 (passkey) | vs fp16 (KJV) | passkey | greedy agreement "
        "| KL(full ‖ method) | top-1 | ppl |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summarize(results).values():
        pk = f"{s['passkey_correct']}/{s['passkey_trials']}" if "passkey_trials" in s else "–"
        agree = f"{s['agreement']:.1f}/{s['new_tokens']:.0f}" if "agreement" in s else "–"
        kl = f"{s['kl']:.4f}" if "kl" in s else "–"
        top1 = f"{s['top1']:.1%}" if "top1" in s else "–"
        ppl = f"{s['perplexity']:.2f}" if "perplexity" in s else "–"
        rows.append(
            f"| {s['label']} | {_ratio(s.get('passkey_ratio'))} | "
            f"{_ratio(s.get('fidelity_ratio'))} | {pk} | {agree} | {kl} | {top1} | {ppl} |"
        )
    return "\n".join(rows) + "\n"


_FAMILY_STYLE = {
    "full": ("black", "*"),
    "uniform": ("tab:gray", "s"),
    "eviction": ("tab:red", "v"),
    "mikv": ("tab:blue", "o"),
    "zipcache": ("tab:green", "D"),
    "zipcache-ablation": ("tab:olive", "x"),
    "zipcache-keys": ("tab:purple", "P"),
    "kvmix": ("tab:orange", "h"),
    "kvmix-ablation": ("goldenrod", "p"),
}

# Families drawn as separate points rather than a budget sweep joined by a line.
_UNJOINED = ("full", "zipcache-ablation", "zipcache-keys", "kvmix", "kvmix-ablation")


def load_suites(folder: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The passkey-suite runs saved beside an evaluation: ``folder/suite-<N>k/suite.json``
    (every haystack family, as the README's suite runs), records by folder name, shortest
    prompts first. Single-family runs (``suite-filler-2k``) do not match the pattern."""
    found = []
    for d in Path(folder).glob("suite-*k"):
        m = re.fullmatch(r"suite-(\d+)k", d.name)
        if m and (d / "suite.json").exists():
            found.append((int(m.group(1)), d.name, json.loads((d / "suite.json").read_text())))
    return {name: saved["records"] for _, name, saved in sorted(found)}


def suite_overall(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method of a passkey-suite run (``kvmix.eval.suite``'s records), in the records' order:
    ``correct``, ``total``, ``accuracy``, the median ``compression_ratio`` and the prompt
    ``length`` (the suite's requested token count; one per run, else the median)."""
    out: dict[str, dict[str, Any]] = {}
    for m in dict.fromkeys(r["method"] for r in records):
        mine = [r for r in records if r["method"] == m]
        correct = sum(bool(r["correct"]) for r in mine)
        out[m] = {
            "correct": correct,
            "total": len(mine),
            "accuracy": correct / len(mine),
            "compression_ratio": statistics.median(r["compression_ratio"] for r in mine),
            "length": statistics.median(r["length"] for r in mine),
        }
    return out


def plot_tradeoffs(
    results: dict[str, Any],
    path: str | Path | None = None,
    suites: Mapping[str, list[dict[str, Any]]] | None = None,
) -> Any:
    """The memory/quality trade-off: compression ratio against KL and against passkey accuracy,
    one marker per method, one line per family. A method with fewer passkey prompts than the
    most any method ran is annotated with its count (its accuracy rests on fewer trials).

    ``suites``: passkey-suite runs (``kvmix.eval.suite`` records, by a name such as ``"4k"``)
    add a third panel, overall suite accuracy against prompt length, one line per method
    labelled with its measured size, so that every method sits beside the full cache at each
    length. Saves a PNG to ``path`` if given; returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    summary = summarize(results)
    panels = 3 if suites else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.6))
    ax_kl, ax_pk = axes[0], axes[1]
    most = max((s.get("passkey_trials", 0) for s in summary.values()), default=0)
    for family, (color, marker) in _FAMILY_STYLE.items():
        members = [s for s in summary.values() if s["family"] == family]
        # Each panel's sizes are those measured at the end of its own runs.
        for ax, key, size in (
            (ax_kl, "kl", "fidelity_ratio"),
            (ax_pk, "passkey_accuracy", "passkey_ratio"),
        ):
            pts = sorted((s[size], s[key], _point_label(s, key, most)) for s in members if key in s)
            if not pts:
                continue
            xs, ys, _ = zip(*pts, strict=True)
            line = "-" if family not in _UNJOINED else "none"
            ax.plot(xs, ys, linestyle=line, marker=marker, color=color, label=family)
            for x, y, label in pts:
                ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax_kl.set_yscale("symlog", linthresh=1e-4)
    ax_kl.set_ylabel("mean KL(full ‖ method), nats (lower is better)")
    ax_pk.set_ylabel("passkey accuracy (higher is better)")
    ax_pk.set_ylim(-0.05, 1.05)
    for ax in (ax_kl, ax_pk):
        ax.set_xlabel("cache size vs fp16 (x smaller, measured)")
        ax.grid(alpha=0.3)
    ax_pk.legend(fontsize=7, loc="lower left")
    if suites:
        _plot_suites(axes[2], results, suites)
    meta = results.get("meta", {})
    fig.suptitle(
        f"{meta.get('model', 'model')}: memory vs quality "
        f"(passkey {meta.get('passkey_tokens', '?')} tokens, KJV "
        f"{meta.get('prefix_tokens', '?')}+{meta.get('continuation_tokens', '?')})",
        fontsize=10,
    )
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig


def _point_label(s: dict[str, Any], key: str, most: int) -> str:
    if key == "passkey_accuracy" and s["passkey_trials"] < most:
        return f"{s['label']} ({s['passkey_correct']}/{s['passkey_trials']} prompts)"
    return str(s["label"])


def _plot_suites(
    ax: Any, results: dict[str, Any], suites: Mapping[str, list[dict[str, Any]]]
) -> None:
    """Overall suite accuracy per method against prompt length (one line per method). A point
    from fewer prompts than its run's most (a method stopped early) is annotated with its
    count, so a partial score is not read as the whole suite's."""
    per_run = {name: suite_overall(records) for name, records in suites.items() if records}
    for run in per_run.values():
        most = max(r["total"] for r in run.values())
        for m, r in run.items():
            if r["total"] < most:
                ax.annotate(
                    f"{m}: {r['correct']}/{r['total']} prompts",
                    (r["length"], r["accuracy"]),
                    fontsize=6,
                    xytext=(-4, 4),
                    textcoords="offset points",
                    ha="right",
                )
    methods = list(dict.fromkeys(m for run in per_run.values() for m in run))
    families = {name: info.get("family") for name, info in results.get("methods", {}).items()}
    lengths: set[float] = set()
    for m in methods:
        pts = sorted(
            (run[m]["length"], run[m]["accuracy"], run[m]["compression_ratio"])
            for run in per_run.values()
            if m in run
        )
        xs, ys, ratios = zip(*pts, strict=True)
        lengths.update(xs)
        color, marker = _FAMILY_STYLE.get(families.get(m) or "", ("tab:brown", "o"))
        lo, hi = min(ratios), max(ratios)
        # The runs' sizes differ slightly with the prompt length; a range where they differ.
        if hi - lo < 0.005 or lo < 1:
            size = _ratio(statistics.median(ratios))
        else:
            size = f"{lo:.2f}–{hi:.2f}x smaller"
        # The full cache is drawn dashed and on top: methods that equal it stay visible under it.
        style, z = ("--", 3) if m == "full" else ("-", 2)
        ax.plot(
            xs, ys, linestyle=style, marker=marker, color=color, label=f"{m} ({size})", zorder=z
        )
    ax.set_xscale("log", base=2)
    ticks = sorted(lengths)
    ax.set_xticks(ticks, [f"{t / 1024:g}k" for t in ticks])
    ax.minorticks_off()
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("prompt length, tokens")
    ax.set_ylabel("passkey suite, overall accuracy (higher is better)")
    most = max(r["total"] for run in per_run.values() for r in run.values())
    ax.set_title(f"passkey suite, overall ({most} prompts per length)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")


def plot_high_precision(
    maps: dict[str, np.ndarray],
    span: tuple[int, int] | None = None,
    path: str | Path | None = None,
) -> Any:
    """Which tokens each method keeps at high precision: one panel per method, one row per
    (layer, kv-head), one column per token (dark: high precision or kept, light: low precision
    or evicted). ``span`` marks a token range (e.g. the passkey's needle)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(maps), 1, figsize=(12, 2.2 * len(maps)), squeeze=False)
    for ax, (name, m) in zip(axes[:, 0], maps.items(), strict=True):
        ax.imshow(m, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1)
        share = float((m == 1.0).mean())
        ax.set_title(f"{name}: {share:.0%} of tokens at high precision", fontsize=9)
        ax.set_ylabel("layer × kv-head", fontsize=8)
        if span is not None:
            for x in span:
                ax.axvline(x - 0.5, color="tab:red", linewidth=0.8)
    axes[-1, 0].set_xlabel("token position (red: the passkey sentence)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
