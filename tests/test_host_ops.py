"""Host work of a decoding step on the Triton engine: a budget of torch ops and Triton launches
per layer (``python -m kvmix.bench host`` counts the same things).

On a GPU a decoding step is host bound: every torch op and every launch of every layer runs
one after another on the CPU while the GPU waits (an 8B-shaped model at 8k tokens decodes in
~90 ms against a ~4 ms bytes floor), so each op kvmix adds to a layer is paid 32 times a step.
The counts are the same under Triton's interpreter as on a GPU, so this catches, on the CPU, a
change that puts ops back into the decoding step. It counts, it does not time.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from transformers import DynamicCache

import kvmix
from kvmix.models import tiny_random_model

pytest.importorskip("triton")
from kvmix.bench.host import OpCounter, count_host_work

LAYERS = 2


def _step(preset: str, fused: bool) -> tuple[OpCounter, Counter[str], Any]:
    """Prefill 70 tokens of two sequences, decode two steps, then count a third that does not
    classify."""
    model = tiny_random_model("llama", num_hidden_layers=LAYERS)
    if preset == "dynamic":
        model.set_attn_implementation("sdpa")
        cache: Any = DynamicCache(config=model.config)
    else:
        (kvmix.enable_fused_attention if fused else kvmix.enable_portable_scoring)(model)
        cache = kvmix.make_cache(preset, model.config, engine="triton")
    ids = torch.randint(3, 128, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        for _ in range(2):
            token = model(token, past_key_values=cache, use_cache=True).logits.argmax(-1)
        if preset != "dynamic":
            store = cache.kvmix_layers[0].store
            assert store.gap is None or store._since + 1 < store.gap, "the step would classify"
        with count_host_work() as (ops, launches):
            model(token, past_key_values=cache, use_cache=True)
    return ops, launches, cache


def _per_layer(launches: Counter[str]) -> dict[str, float]:
    return {name: n / LAYERS for name, n in launches.items()}


def test_fused_decoding_step_makes_four_launches_and_one_op_per_layer() -> None:
    dyn, _, _ = _step("dynamic", True)
    zip_ops, zip_launches, _ = _step("zipcache", True)
    # Append, attend over every tier, merge the splits, add the received attention.
    assert _per_layer(zip_launches) == {
        "append_rows_kernel": 1,
        "_attend_kernel": 1,
        "_merge_kernel": 1,
        "_received_kernel": 1,
    }
    # The output tensor, plus, on the CPU only, reading the non-finite flag at once (`select`,
    # `is_nonzero`; a GPU reads it every 32 steps).
    cpu_flag = {("update", "select"): LAYERS, ("update", "is_nonzero"): LAYERS}
    kvmix_ops = {k: n for k, n in zip_ops.ops.items() if k[0] != "model"}
    assert kvmix_ops == {("attention", "empty"): LAYERS, **cpu_flag}, kvmix_ops
    # Fewer ops than DynamicCache (two cats) + sdpa (reshape, transpose, the call) at the
    # whole step, the model's own ops included.
    assert zip_ops.total() <= dyn.total() - LAYERS * 2
    assert zip_ops.total("model") == dyn.total("model")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "portable"])
def test_a_rotated_cache_makes_the_decoding_step_of_an_unrotated_one(fused: bool) -> None:
    """kvmix-5x rotates keys, values, queries and outputs in the Triton kernels (append,
    attention, merge; dequantize on the portable path), so its decoding step makes exactly
    ZipCache's launches and torch ops, by name (the rotation as torch ops cost 4 matmuls and
    6 conversions per layer, fused)."""
    zip_ops, zip_launches, _ = _step("zipcache", fused)
    rot_ops, rot_launches, cache = _step("kvmix-5x", fused)
    layer = cache.kvmix_layers[0]
    assert layer.rotation is not None and layer.store.rotation is not None
    assert rot_launches == zip_launches
    assert rot_ops.ops == zip_ops.ops


@pytest.mark.parametrize(
    ("preset", "fused", "launches", "budget"),
    [
        ("uniform2", True, 4, 3),
        # Portable: the three tiers dequantized into the dense buffers, and the scoring call.
        ("zipcache", False, 7, 8),
    ],
)
def test_other_decoding_steps_stay_within_their_budget(
    preset: str, fused: bool, launches: int, budget: int
) -> None:
    ops, counted, _ = _step(preset, fused)
    assert sum(counted.values()) / LAYERS == launches, counted
    kvmix_ops = ops.total("update") + ops.total("attention")
    assert kvmix_ops / LAYERS <= budget, ops.ops


@pytest.mark.parametrize(
    ("preset", "op_budget", "launch_budget"),
    [
        # The counts measured (session 26, 2 sequences of 1100 tokens, a fresh process):
        # ZipCache 57 ops and 16 launches, kvmix-5x 95 and 33 (its sinks' segment, its key
        # blocks' tail push, the range search's launches), 21 of the ops allocations. Session
        # 21: 104 and 146 ops, 12 and 28 launches, and 3 sorts (the ranking, a stable
        # partition per tier pushed to), before the scores, categories and ranking keys and
        # the partitions went into kernels (one sort left). Session 18: 119 and 161 (the
        # emptied buffer's positions and scores cloned, then its rows copied when it shrank);
        # session 17: 136 and 184 (the block table uploaded at every push, the shrink factors
        # once per layer); before the chunks' choice and the separable factors moved into
        # kernels: about 200 and 440 ops.
        ("zipcache", 57, 16),
        ("kvmix-5x", 95, 33),
    ],
)
def test_the_prompts_classification_stays_within_its_host_budget(
    preset: str, op_budget: int, launch_budget: int
) -> None:
    """The prompt's classification is host work per layer too: at batch 1 it is most of the
    prefill's overhead on a GPU (session 14, B=1 x 32k: ~10 ms of kvmix-5x's per layer). So
    are the prompt's scores going into the buffer: by slices (two ops each for the scores
    and the counts, four for taking the tensors; session 18: 22 ops, a gather per tensor)."""
    model = tiny_random_model("llama", num_hidden_layers=1)
    kvmix.enable_fused_attention(model)
    cache = kvmix.make_cache(preset, model.config, engine="triton")
    b, h, t, d = 2, model.config.num_key_value_heads, 1100, model.config.head_dim
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn((b, h, t, d), generator=g), torch.randn((b, h, t, d), generator=g)
    acc = torch.rand((b, h, t), generator=g)
    with torch.inference_mode():
        cache.update(k, v, 0)
        store = cache.kvmix_layers[0].store
        store.set_first_valid([0] * b)
        ones = torch.ones_like(acc)
        with count_host_work() as (score_ops, _):
            store.add_scores(0, acc, ones)
        with count_host_work() as (ops, launches):
            assert store.maybe_classify(True)
    assert score_ops.total() <= 8, score_ops.ops
    assert ops.total() <= op_budget, ops.ops
    assert sum(launches.values()) <= launch_budget, launches
    # The classification put every token somewhere (a count that could go wrong if a push
    # were skipped): each stream's tiers hold the t tokens.
    tiers = [store._tiers[name] for name in ("high", "low")]
    assert sum(int((tier.pos[:, : tier.fill] >= 0).sum()) for tier in tiers) == b * h * t


def test_direct_launches_are_counted() -> None:
    """The engines' direct launch calls a compiled kernel's launcher (its instance's ``run``)
    without Triton's runner, which the counter's class-level wraps do not see (session 26's
    direct launch made ``kvmix.bench host`` print 0 launches on a GPU). A compiled kernel as
    the attention module caches it, launched the direct way inside the block, is counted
    once, its launcher is called through, ops inside it are not counted, and the launcher
    is given back after the block."""
    from kvmix.engines import load_attention

    attn = load_attention("cpu")
    calls: list[tuple[Any, ...]] = []

    class Kernel:
        name = "fake_kernel"

        def __init__(self) -> None:
            self.run = lambda *args: calls.append(args) or torch.zeros(2).add_(1)

    kernel = Kernel()
    own = kernel.run
    attn._COMPILED[("test_direct_launches_are_counted",)] = (kernel, [])
    try:
        with count_host_work() as (ops, launches):
            kernel.run(1, 2, 3)
            torch.zeros(3).add_(1)  # one op of the block's own
    finally:
        del attn._COMPILED[("test_direct_launches_are_counted",)]
    assert launches == {"fake_kernel": 1}
    assert calls == [(1, 2, 3)]
    assert ops.total() == 2, ops.ops  # zeros + add_ outside the launch; the launch's paused
    assert kernel.run is own
