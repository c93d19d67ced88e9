"""The evaluation module: prefill replay, metrics against independent computations, budgets,
results files. The real-model run is marked slow."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import kvmix
from kvmix.data import KjvPassages
from kvmix.eval import EvalConfig, markdown_table, resolve_methods, summarize
from kvmix.eval.methods import METHODS, eviction_budget_matching
from kvmix.eval.prefill import capture_prefill, replay_prefill
from kvmix.eval.report import paired_kl_change
from kvmix.eval.tasks import (
    _next_token_stats,
    cache_memory,
    fidelity_records,
    matching_prefix,
    precision_map,
)
from kvmix.models import tiny_random_model

# Short gaps so that decoding crosses classification boundaries within a few steps.
REPLAYED = {
    "full": METHODS["full"],
    "uniform2": METHODS["uniform2"].derive("u", "u", residual=8),
    "h2o": METHODS["h2o20"].derive("e", "e", budget=0.3),
    "mikv": METHODS["mikv"],
    "zipcache": METHODS["zipcache"].derive("z", "z", streaming_gap=5),
    "zipcache-accumulated": METHODS["zipcache-accumulated"].derive("za", "za", streaming_gap=5),
}


@pytest.fixture(scope="module")
def tiny():
    model = tiny_random_model("llama", seed=3)
    kvmix.enable_fused_attention(model)
    return model


@pytest.mark.parametrize("name", sorted(REPLAYED))
def test_replayed_prefill_generates_like_generate(tiny, name):
    """A cache filled by replaying a recorded prefill ends where generate()'s own prefill leaves
    it: the same tokens afterwards, the same bytes."""
    method = REPLAYED[name]
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(7))
    direct = method.make_cache(tiny.config)
    with torch.inference_mode():
        expected = tiny.generate(ids, past_key_values=direct, max_new_tokens=12, do_sample=False)
    states = capture_prefill(tiny, ids)
    replayed = method.make_cache(tiny.config)
    replay_prefill(tiny, states, replayed)
    first = states.logits[:, -1].argmax(-1, keepdim=True)
    assert first.item() == expected[0, 40].item()
    with torch.inference_mode():
        got = tiny.generate(
            torch.cat([ids, first], 1), past_key_values=replayed, max_new_tokens=11, do_sample=False
        )
    assert got.tolist() == expected.tolist()
    assert cache_memory(replayed) == cache_memory(direct)


def test_replay_refuses_eager_masks(tiny):
    states = capture_prefill(tiny, torch.arange(1, 9).view(1, -1))
    tiny.set_attn_implementation("eager")
    try:
        with pytest.raises(ValueError, match="sdpa masks"):
            replay_prefill(tiny, states, METHODS["zipcache"].make_cache(tiny.config))
    finally:
        kvmix.enable_fused_attention(tiny)


def test_next_token_stats_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    ref, own = torch.randn(50, generator=g) * 3, torch.randn(50, generator=g) * 3
    p = np.exp(ref.double().numpy() - ref.double().numpy().max())
    p /= p.sum()
    q = np.exp(own.double().numpy() - own.double().numpy().max())
    q /= q.sum()
    ref_logp = torch.log_softmax(ref.double(), dim=-1)
    kl, top1, nll = _next_token_stats(ref_logp, own, 7)
    assert kl == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-9)
    assert top1 == float(ref.argmax() == own.argmax())
    assert nll == pytest.approx(-math.log(q[7]), rel=1e-9)
    assert _next_token_stats(ref_logp, ref, 3)[:2] == [0.0, 1.0]


def test_matching_prefix():
    assert matching_prefix([1, 2, 3, 4], [1, 2, 5, 4]) == 2
    assert matching_prefix([1, 2], [1, 2, 3]) == 2
    assert matching_prefix([], [1]) == 0


def _passages(n_tokens: int, cont: int) -> KjvPassages:
    ids = torch.randint(1, 128, (1, n_tokens + cont), generator=torch.Generator().manual_seed(1))
    return KjvPassages(ids[:, :n_tokens], ids[:, n_tokens:], ("Test 1:1",), ("",))


def test_fidelity_of_the_full_cache_is_exact_and_compression_is_not(tiny):
    """Teacher-forcing through a full cache reproduces the one-pass reference (KL at the float
    noise floor, every top-1 equal); a 2-bit cache does not."""
    methods = [METHODS["full"], REPLAYED["uniform2"]]
    full, low = fidelity_records(tiny, _passages(48, 16), 0, methods)
    assert full["kl"] < 1e-9 and full["top1"] == 1.0
    assert low["kl"] > 1e-6  # a random tiny model's distributions are flat: KL stays small
    # Perplexity is exp of the mean NLL of the true next tokens.
    assert full["perplexity"] == pytest.approx(math.exp(full["nll"]))
    assert low["compression_ratio"] > 1 > full["compression_ratio"]


def test_kept_steps_are_the_records_means(tiny):
    """``keep_steps`` adds the per-token figures whose means are the record's ``kl``/``top1``."""
    methods = [METHODS["full"], REPLAYED["uniform2"]]
    for r in fidelity_records(tiny, _passages(48, 16), 0, methods, keep_steps=True):
        assert len(r["steps"]["kl"]) == len(r["steps"]["top1"]) == 16
        assert np.mean(r["steps"]["kl"]) == pytest.approx(r["kl"], rel=1e-5, abs=1e-12)
        assert np.mean(r["steps"]["top1"]) == pytest.approx(r["top1"])


def _steps_records(name: str, kls: dict[str, np.ndarray]) -> list[dict]:
    return [{"method": name, "passage": k, "steps": {"kl": v.tolist()}} for k, v in kls.items()]


def test_paired_kl_change_against_the_delta_method():
    """The bootstrap interval of the ratio of two paired means: exact for a constant ratio,
    and for independent per-token noise (block 1) as wide as the delta method's normal
    interval, ``1.96 * sd(a - R b) / (sqrt(n) mean(b))``, within 15%."""
    rng = np.random.default_rng(3)
    base = {f"p{i}": rng.exponential(0.01, 500) for i in range(4)}
    doubled = {k: 2 * v for k, v in base.items()}
    recs = _steps_records("base", base) + _steps_records("doubled", doubled)
    c = paired_kl_change(recs, "doubled", "base")
    assert c == pytest.approx({"change": 1.0, "low": 1.0, "high": 1.0})
    assert paired_kl_change(recs, "base", "base") == pytest.approx(
        {"change": 0.0, "low": 0.0, "high": 0.0}
    )
    noisy = {k: v * 0.9 + rng.normal(0, 0.004, v.size) for k, v in base.items()}
    recs += _steps_records("noisy", noisy)
    c = paired_kl_change(recs, "noisy", "base", block=1, resamples=4000)
    a, b = np.concatenate(list(noisy.values())), np.concatenate(list(base.values()))
    ratio = a.sum() / b.sum()
    half = 1.96 * np.std(a - ratio * b) / (np.sqrt(a.size) * b.mean())
    assert c["change"] == pytest.approx(ratio - 1)
    assert c["low"] < ratio - 1 < c["high"]
    assert (c["high"] - c["low"]) / 2 == pytest.approx(half, rel=0.15)


def test_paired_kl_change_refuses_what_it_cannot_pair():
    base = {"p0": np.ones(8)}
    recs = _steps_records("a", base) + _steps_records("b", {"p1": np.ones(8)})
    recs += _steps_records("c", {"p0": np.ones(7)})
    recs.append({"method": "d", "passage": "p0", "kl": 0.1})
    with pytest.raises(ValueError, match="same tokens"):
        paired_kl_change(recs, "b", "a")
    with pytest.raises(ValueError, match="same tokens"):
        paired_kl_change(recs, "c", "a")
    with pytest.raises(ValueError, match="no per-token steps"):
        paired_kl_change(recs, "d", "a")
    with pytest.raises(ValueError, match="no fidelity records of 'e'"):
        paired_kl_change(recs, "e", "a")
    with pytest.raises(ValueError, match="`block` must be at least 1"):
        paired_kl_change(recs, "a", "a", block=0)


def test_cache_memory_of_a_dynamic_cache_is_read_from_its_tensors(tiny):
    states = capture_prefill(tiny, torch.arange(1, 21).view(1, -1))
    cache = METHODS["full"].make_cache(tiny.config)
    replay_prefill(tiny, states, cache)
    cfg = tiny.config
    elements = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 20 * cfg.head_dim
    assert cache_memory(cache) == {
        "bytes": elements * 4,
        "fp16_bytes": elements * 2,
        "compression_ratio": 0.5,
    }


def test_eviction_budget_holds_the_bytes_of_its_target():
    """The matched eviction baseline holds (within 1%) the bytes of the method it is matched
    with, both measured on real stores of the same token count."""
    for target in ("zipcache", "mikv", "kvmix-5x"):
        (method,) = resolve_methods([f"h2o@{target}"], 4096, 3, 64)
        assert method.options["budget"] == eviction_budget_matching(METHODS[target], 4096, 3, 64)
        ratios = []
        for m in (method, METHODS[target]):
            options = m.store_options()
            r = kvmix.bench.memory.measure(
                m.policy, options, tokens=4096, decode=0, layers=2, kv_heads=3, head_dim=64
            )
            ratios.append(r["bytes"])
        assert abs(ratios[0] / ratios[1] - 1) < 0.01


def test_a_variant_is_its_preset_with_the_options_it_names():
    """``NAME=PRESET:key=value,...`` (the suite's and the fidelity probe's ``--variant``)
    builds the preset's cache with those options and nothing else changed; a malformed spec
    is refused with the format it needs."""
    spec = 'clipu=kvmix-5x:key_clip="mse_unbiased",value_clip="mse_unbiased",sink_tokens=2'
    (method,) = resolve_methods([spec], 128, 1, 16)
    base = METHODS["kvmix-5x"]
    assert method.name == "clipu" and method.factory is base.factory
    want = {**base.options, "key_clip": "mse_unbiased", "value_clip": "mse_unbiased"}
    want["sink_tokens"] = 2
    assert method.options == want
    # A value may hold commas: per-layer options are a dict of dicts.
    nested = 'l=kvmix-5x:layer_options={18: {"low_key_bits": 4, "low_bits": 3}},salient_ratio=0.2'
    (method,) = resolve_methods([nested], 128, 1, 16)
    assert method.options == {
        **base.options,
        "layer_options": {18: {"low_key_bits": 4, "low_bits": 3}},
        "salient_ratio": 0.2,
    }
    for bad in (
        "=kvmix-5x:a=1",
        "x=nope:a=1",
        "x=kvmix-5x:sink_tokens=two",
        "x=kvmix-5x:sink_tokens=(1",
        "x=kvmix-5x:2",
        "x=kvmix-5x:**d",
        "x=kvmix-5x:sink_tokens=1,sink_tokens=2",
    ):
        with pytest.raises(ValueError, match="variant"):
            resolve_methods([bad], 128, 1, 16)


def test_unknown_methods_and_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown method 'zip'; valid methods: full"):
        resolve_methods(["zip"], 128, 1, 16)
    with pytest.raises(ValueError, match="`passkey_tokens` must be at least 1"):
        EvalConfig(passkey_tokens=0)
    with pytest.raises(ValueError, match="`methods` must name at least one method"):
        EvalConfig(methods=())


def test_precision_map_marks_each_tier(tiny):
    ids = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    cache = METHODS["mikv"].make_cache(tiny.config)
    replay_prefill(tiny, capture_prefill(tiny, ids), cache)
    m = precision_map(cache, 30)
    cfg = tiny.config
    assert m.shape == (cfg.num_hidden_layers * cfg.num_key_value_heads, 30)
    store = cache.layers[1].store
    high = store.tier_positions(1)["high"]
    row = m[1 * cfg.num_key_value_heads + 1]
    assert set(np.flatnonzero(row == 1.0)) == set(high.tolist())
    assert set(np.flatnonzero(row == 0.25)) == set(store.tier_positions(1)["low"].tolist())


def _synthetic_results():
    methods = {
        "a": {"label": "A", "family": "mikv", "policy": "mikv", "options": {}},
        "b": {"label": "B", "family": "eviction", "policy": "eviction", "options": {}},
    }
    pk = [
        dict(method=m, trial=t, correct=c, agreement=g, new_tokens=8, compression_ratio=r)
        for m, t, c, g, r in [
            ("a", 0, True, 8, 3.0), ("a", 1, False, 2, 3.2), ("a", 2, True, 6, 2.9),
            ("b", 0, False, 1, 5.0), ("b", 1, False, 0, 5.0), ("b", 2, True, 8, 5.0),
        ]
    ]  # fmt: skip
    fi = [
        {"method": m, "passage": p, "kl": k, "top1": t, "nll": n, "compression_ratio": r}
        for m, p, k, t, n, r in [
            ("a", "x", 0.1, 0.9, 2.0, 2.5), ("a", "y", 0.3, 0.7, 3.0, 2.7),
            ("b", "x", 0.5, 0.6, 4.0, 4.0), ("b", "y", 0.7, 0.5, 5.0, 4.2),
        ]
    ]  # fmt: skip
    meta = {"model": "m", "passkey_tokens": 64, "prefix_tokens": 32, "continuation_tokens": 8}
    return {"meta": meta, "methods": methods, "passkey": pk, "fidelity": fi}


def test_summary_and_table_aggregate_the_records():
    s = summarize(_synthetic_results())
    assert s["a"]["passkey_correct"] == 2 and s["a"]["passkey_trials"] == 3
    assert s["a"]["agreement"] == pytest.approx(16 / 3)
    assert s["a"]["kl"] == pytest.approx(0.2) and s["b"]["top1"] == pytest.approx(0.55)
    assert s["b"]["perplexity"] == pytest.approx(math.exp(4.5))
    assert s["a"]["passkey_ratio"] == 3.0 and s["a"]["fidelity_ratio"] == pytest.approx(2.6)
    table = markdown_table(_synthetic_results())
    assert "| A | 3.00x smaller | 2.60x smaller | 2/3 | 5.3/8 | 0.2000 | 80.0% | 12.18 |" in table


def test_tradeoff_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    from kvmix.eval import plot_tradeoffs

    fig = plot_tradeoffs(_synthetic_results(), tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 10_000
    assert len(fig.axes) == 2


def _suite_records(length, answers):
    return [
        {"method": m, "trial": t, "correct": c, "compression_ratio": r, "length": length}
        for t, (m, c, r) in enumerate(answers)
    ]


def test_suite_overall_and_the_suite_panel(tmp_path):
    """The suite panel: one line per method through its lengths, at the suites' accuracies."""
    pytest.importorskip("matplotlib")
    from kvmix.eval import plot_tradeoffs
    from kvmix.eval.report import suite_overall

    two = _suite_records(
        2048, [("full", True, 0.5), ("a", True, 3.0), ("a", False, 3.2), ("a", True, 2.8)]
    )
    four = _suite_records(4096, [("full", False, 0.5), ("a", True, 3.1), ("b", False, 5.0)])
    s = suite_overall(two)
    assert list(s) == ["full", "a"]
    assert (s["a"]["correct"], s["a"]["total"]) == (2, 3)
    assert s["a"]["accuracy"] == pytest.approx(2 / 3) and s["a"]["compression_ratio"] == 3.0
    assert s["a"]["length"] == 2048
    fig = plot_tradeoffs(_synthetic_results(), tmp_path / "t.png", suites={"2k": two, "4k": four})
    assert (tmp_path / "t.png").stat().st_size > 10_000
    panel = fig.axes[2]
    lines = {line.get_label().split(" (")[0]: line for line in panel.get_lines()}
    assert set(lines) == {"full", "a", "b"}
    assert list(lines["a"].get_xdata()) == [2048, 4096]
    assert list(lines["a"].get_ydata()) == pytest.approx([2 / 3, 1.0])
    assert list(lines["full"].get_ydata()) == [1.0, 0.0]
    assert lines["a"].get_label() == "a (3.00–3.10x smaller)"
    assert lines["full"].get_label() == "full (2.00x larger)"
    # At 4k every method has 1 prompt (none partial); at 2k "full" has 1 against "a"'s 3, so
    # only that point is annotated with its count.
    notes = [t.get_text() for t in panel.texts]
    assert notes == ["full: 1/1 prompts"]


@pytest.mark.slow
def test_evaluate_on_smollm2_writes_consistent_results(tmp_path):
    """A small run on the real model: files written, records consistent with the summary, the
    full cache answers every passkey and is its own reference; resume adds nothing."""
    config = EvalConfig(
        methods=("full", "zipcache", "h2o@zipcache"),
        passkey_trials=2,
        passkey_tokens=768,
        new_tokens=8,
        passages=1,
        prefix_tokens=384,
        continuation_tokens=24,
    )
    results = kvmix.eval.evaluate(config, out=tmp_path, progress=False)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["passkey"] == results["passkey"] and len(saved["passkey"]) == 6
    assert {r["method"] for r in saved["fidelity"]} == {"full", "zipcache", "h2o@zipcache"}
    full = results["summary"]["full"]
    assert full["passkey_correct"] == 2 and full["agreement"] == 8 and full["kl"] < 1e-9
    assert 4.0 < results["summary"]["zipcache"]["passkey_ratio"] < 5.5
    assert (tmp_path / "eval.md").read_text().count("\n| ") == 4
    assert (tmp_path / "tradeoffs.png").stat().st_size > 10_000
    # Resuming with one more method runs only that method; the earlier records stay as they are.
    more = dataclasses.replace(config, methods=("uniform4",))
    again = kvmix.eval.evaluate(more, out=tmp_path, resume=True, progress=False)
    assert again["passkey"][:6] == results["passkey"]
    assert [r["method"] for r in again["passkey"][6:]] == ["uniform4", "uniform4"]
    assert list(again["summary"]) == ["full", "zipcache", "h2o@zipcache", "uniform4"]
    with pytest.raises(ValueError, match="only `methods` may differ"):
        kvmix.eval.evaluate(
            dataclasses.replace(config, passkey_trials=3), out=tmp_path, resume=True
        )


def test_replot_reads_the_suites_beside_the_evaluation(tmp_path):
    """``--replot`` rewrites the table and the plot from saved records alone; the suite panel
    takes every ``suite-<N>k`` run (shortest first), not single-family runs."""
    pytest.importorskip("matplotlib")
    from kvmix.eval.__main__ import main
    from kvmix.eval.report import load_suites

    results = _synthetic_results()
    results["meta"].update(transformers="5", torch="2", kvmix="0", passkey_trials=3, passages=2)
    (tmp_path / "eval.json").write_text(json.dumps(results))
    for name, length in (("suite-4k", 4096), ("suite-2k", 2048), ("suite-filler-2k", 2048)):
        (tmp_path / name).mkdir()
        records = _suite_records(length, [("full", True, 0.5), ("a", True, 3.0)])
        (tmp_path / name / "suite.json").write_text(json.dumps({"records": records}))
    suites = load_suites(tmp_path)
    assert list(suites) == ["suite-2k", "suite-4k"]
    assert suites["suite-4k"][0]["length"] == 4096
    assert main(["--out", str(tmp_path), "--replot"]) == 0
    assert (tmp_path / "tradeoffs.png").stat().st_size > 10_000
    assert "| A | 3.00x smaller |" in (tmp_path / "eval.md").read_text()
    assert main(["--out", str(tmp_path / "none"), "--replot"]) == 2
