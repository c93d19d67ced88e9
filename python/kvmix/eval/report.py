"""Summaries, the markdown table and the plots of an evaluation's records."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["markdown_table", "plot_high_precision", "plot_tradeoffs", "summarize"]


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
}


def plot_tradeoffs(results: dict[str, Any], path: str | Path | None = None) -> Any:
    """The memory/quality trade-off: compression ratio against KL and against passkey accuracy,
    one marker per method, one line per family. Saves a PNG to ``path`` if given; returns the
    matplotlib figure."""
    import matplotlib.pyplot as plt

    summary = summarize(results)
    fig, (ax_kl, ax_pk) = plt.subplots(1, 2, figsize=(12, 4.6))
    for family, (color, marker) in _FAMILY_STYLE.items():
        members = [s for s in summary.values() if s["family"] == family]
        # Each panel's sizes are those measured at the end of its own runs.
        for ax, key, size in (
            (ax_kl, "kl", "fidelity_ratio"),
            (ax_pk, "passkey_accuracy", "passkey_ratio"),
        ):
            pts = sorted((s[size], s[key], s["label"]) for s in members if key in s)
            if not pts:
                continue
            xs, ys, _ = zip(*pts, strict=True)
            line = "-" if family not in ("full", "zipcache-ablation", "zipcache-keys") else "none"
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
