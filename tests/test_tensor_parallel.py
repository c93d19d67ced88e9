"""kvmix caches under transformers tensor parallelism: each rank holds a share of the kv-heads.

The torchrun test runs ``examples/tensor_parallel.py`` on two CPU processes (gloo) against one
process, on a tiny random Llama; the in-process tests feed a layer a slice of the heads, as a rank
receives them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import kvmix

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tensor_parallel.py"


def _config() -> Any:
    """The config of a tiny Llama enabled for kvmix's fused attention (the layers here are fed
    directly, as that attention would feed them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    return kvmix.enable_fused_attention(LlamaForCausalLM(config)).config


def _kv(heads: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, tokens, 16, generator=g) for _ in range(2))  # type: ignore[return-value]


def test_layer_builds_its_store_from_the_heads_it_receives() -> None:
    """A rank's layer gets one of two kv-heads: its store holds one head, and that head's tiers
    and bytes equal head 1 of a layer that got both (salient sets per kv-head)."""
    cfg = _config()
    whole = kvmix.ZipCache(cfg, selection="kv_head")
    share = kvmix.ZipCache(cfg, selection="kv_head")
    k, v = _kv(2, 200, 0)
    scores = torch.rand(1, 2, 200, generator=torch.Generator().manual_seed(1)).numpy()
    for cache, sl in ((whole, slice(0, 2)), (share, slice(1, 2))):
        layer = cache.layers[0]
        layer.update(k[:, sl].contiguous(), v[:, sl].contiguous())
        layer.store.add_scores(0, np.ascontiguousarray(scores[:, sl]), np.ones_like(scores[:, sl]))
        layer.store.maybe_classify(True)
    assert share.layers[0].store.kv_heads == 1
    assert whole.layers[0].store.kv_heads == 2
    got = share.layers[0].store.tier_positions(0)
    want = whole.layers[0].store.tier_positions(1)
    assert {t: sorted(p) for t, p in got.items()} == {t: sorted(p) for t, p in want.items()}
    assert 2 * share.memory_report()["fp16_bytes"] == whole.memory_report()["fp16_bytes"]
    # dense(stream) -> (positions, keys, values); stream = sequence * kv_heads + head.
    for got_part, want_part in zip(
        share.layers[0].store.dense(0), whole.layers[0].store.dense(1), strict=True
    ):
        np.testing.assert_array_equal(got_part, want_part)


def test_layer_pooling_across_sharded_heads_is_refused_and_changes_nothing() -> None:
    cfg = _config()
    cache = kvmix.ZipCache(cfg)  # selection="layer", the default
    layer = cache.layers[0]
    k, v = _kv(1, 10, 2)
    with pytest.raises(kvmix.ConfigError, match="selection='kv_head'"):
        layer.update(k, v)
    assert not layer.is_initialized
    assert layer.store.kv_heads == 2 and layer.store.seen == 0
    # The whole layer is still accepted.
    k2, v2 = _kv(2, 10, 3)
    layer.update(k2, v2)
    assert layer.store.seen == 10


def test_more_heads_than_the_config_are_a_shape_error() -> None:
    cache = kvmix.FullPrecisionCache(_config())
    k, v = _kv(3, 4, 4)
    with pytest.raises(kvmix.ShapeError):
        cache.layers[0].update(k, v)


def test_memory_report_across_ranks_without_a_process_group_is_this_process() -> None:
    cache = kvmix.FullPrecisionCache(_config())
    k, v = _kv(2, 5, 5)
    cache.layers[0].update(k, v)
    report = cache.memory_report_across_ranks()
    assert report["ranks"] == [cache.memory_report()]
    assert report["total"] == cache.memory_report()


def _run(model_dir: Path, out: Path, world: int, fused: bool) -> dict[str, Any]:
    cmd = [sys.executable]
    if world > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc-per-node", str(world)]
    cmd += [str(EXAMPLE), str(model_dir), "--cache", "dynamic,full,zipcache", "--json", str(out)]
    cmd += ["--fused"] if fused else []
    env = dict(os.environ, OMP_NUM_THREADS="1", KVMIX_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "portable"])
def test_two_ranks_match_one_process(tmp_path: Path, fused: bool) -> None:
    """torchrun, 2 CPU ranks (gloo): FullPrecisionCache gives DynamicCache's tokens; ZipCache
    (per-kv-head sets) gives one process's tokens, holds the same tokens in the same tiers, and
    the ranks' bytes add up to one process's."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(_config()).save_pretrained(model_dir)
    one = _run(model_dir, tmp_path / "one.json", 1, fused)
    two = _run(model_dir, tmp_path / "two.json", 2, fused)
    assert two["full"]["tokens"] == two["dynamic"]["tokens"] == one["dynamic"]["tokens"]
    assert two["zipcache"]["tokens"] == one["zipcache"]["tokens"]
    for name in ("full", "zipcache"):
        ranks = two[name]["memory"]["ranks"]
        assert len(ranks) == 2
        total = two[name]["memory"]["total"]
        assert (
            total["bytes"]
            == sum(r["bytes"] for r in ranks)
            == one[name]["memory"]["total"]["bytes"]
        )
        assert total["fp16_bytes"] == one[name]["memory"]["total"]["fp16_bytes"]
        # Rank r holds kv-head r: per layer, the ranks' heads in order are one process's heads.
        (single,) = one[name]["tiers"]
        for layer, heads in enumerate(single):
            assert [two[name]["tiers"][r][layer][0] for r in range(2)] == heads
