"""Per-layer bits calibration (`kvmix.calibrate`): every figure checked against the evaluation's
own fidelity measurement and against caches built independently; the budget holds; bad
arguments are refused before anything runs."""

from __future__ import annotations

import pytest
import torch

import kvmix
from kvmix.calibrate import DEFAULT_UPGRADES, calibrate_layer_options
from kvmix.data import KjvPassages
from kvmix.eval.methods import METHODS
from kvmix.eval.prefill import capture_prefill, replay_prefill
from kvmix.eval.tasks import fidelity_records
from kvmix.models import tiny_random_model

PREFIX, TOKENS = 96, 120
#: fidelity_records averages its per-token figures in float32; this module in float64.
_REL = 1e-6


@pytest.fixture(scope="module")
def tiny():
    model = tiny_random_model("llama", seed=5, num_hidden_layers=3)
    kvmix.enable_fused_attention(model)
    return model


@pytest.fixture(scope="module")
def ids():
    # Two passages: KL is averaged over both, bytes summed.
    return torch.randint(1, 128, (2, TOKENS), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def generous(tiny, ids):
    """A budget every upgrade fits in."""
    return calibrate_layer_options(tiny, ids, PREFIX, min_ratio=1.0)


def _kl(model, ids, layer_options):
    """Mean KL over the passages (equal lengths) through the evaluation's own code path."""
    passages = KjvPassages(ids[:, :PREFIX], ids[:, PREFIX:], ("a", "b"), ("", ""))
    method = METHODS["kvmix-5x"].derive("x", "x", layer_options=layer_options)
    kls = [fidelity_records(model, passages, i, [method])[0]["kl"] for i in range(len(ids))]
    return sum(kls) / len(kls)


def _ratio_after_prompt(model, ids, layer_options):
    held = fp16 = 0
    for row in ids:
        cache = kvmix.Kvmix5xCache(model.config, layer_options=layer_options)
        replay_prefill(model, capture_prefill(model, row[None, :PREFIX]), cache)
        report = cache.memory_report()
        held, fp16 = held + report["bytes"], fp16 + report["fp16_bytes"]
    return fp16 / held


def test_every_layer_and_upgrade_is_measured_and_costs_bytes(generous):
    got = {(c.layer, c.upgrade) for c in generous.candidates}
    assert got == {(i, u) for i in range(3) for u in DEFAULT_UPGRADES}
    assert all(c.extra_bytes > 0 for c in generous.candidates)


def test_the_figures_match_the_evaluations_fidelity_measurement(tiny, ids, generous):
    assert generous.base_kl == pytest.approx(_kl(tiny, ids, None), rel=_REL)
    assert generous.kl == pytest.approx(_kl(tiny, ids, generous.layer_options), rel=_REL)
    one = generous.candidates[0]
    assert one.kl == pytest.approx(_kl(tiny, ids, {one.layer: dict(one.options)}), rel=_REL)
    assert generous.base_ratio == pytest.approx(_ratio_after_prompt(tiny, ids, None), rel=1e-12)


def test_a_generous_budget_takes_every_upgrade_that_helps(generous):
    helps = {(c.layer, c.upgrade) for c in generous.candidates if c.kl < generous.base_kl}
    taken = {
        (layer, name)
        for layer, opts in generous.layer_options.items()
        for name, up in DEFAULT_UPGRADES.items()
        if all(opts.get(k) == v for k, v in up.items())
    }
    assert helps and taken == helps


def test_the_budget_holds_and_no_room_means_no_upgrade(tiny, ids, generous):
    # Halfway between the preset alone and every helpful upgrade: some, not all, fit.
    target = (generous.base_ratio + generous.ratio) / 2
    mid = calibrate_layer_options(tiny, ids, PREFIX, min_ratio=target)
    assert mid.ratio >= target
    assert _ratio_after_prompt(tiny, ids, mid.layer_options) == pytest.approx(mid.ratio, rel=1e-12)
    assert 0 < sum(len(o) for o in mid.layer_options.values())
    assert sum(len(o) for o in mid.layer_options.values()) < sum(
        len(o) for o in generous.layer_options.values()
    )
    none = calibrate_layer_options(tiny, ids, PREFIX, min_ratio=generous.base_ratio, layers=[1])
    assert none.layer_options == {} and none.kl == none.base_kl


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prefix_tokens": TOKENS - 1}, kvmix.ConfigError, "prefix_tokens"),
        ({"prefix_tokens": 0}, kvmix.ConfigError, "prefix_tokens"),
        ({"min_ratio": 0.0}, kvmix.ConfigError, "min_ratio"),
        ({"min_ratio": 1e6}, kvmix.ConfigError, "no room"),
        ({"upgrades": {}}, kvmix.ConfigError, "upgrade"),
        ({"upgrades": {"bad": {"low_bits": 5}}}, kvmix.ConfigError, "low_bits"),
        ({"layers": [0, 7]}, kvmix.ConfigError, "layers"),
        ({"layers": [1, 1]}, kvmix.ConfigError, "layers"),
    ],
)
def test_bad_arguments_are_refused(tiny, ids, kwargs, error, match):
    args = {"prefix_tokens": PREFIX, **kwargs}
    with pytest.raises(error, match=match):
        calibrate_layer_options(tiny, ids, **args)


@pytest.mark.parametrize(
    "bad", [torch.zeros(0, 40, dtype=torch.long), torch.zeros(40), torch.zeros(1, 40)]
)
def test_bad_input_ids_are_refused(tiny, bad):
    with pytest.raises(kvmix.ShapeError, match="input_ids"):
        calibrate_layer_options(tiny, bad, 10)
