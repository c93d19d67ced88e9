"""A passkey suite with several prompt families: haystacks x phrasings x depths x lengths.

One family of prompts (the repeated grass/sky filler with "The pass key is ...") is a claim about
that family only: issue 16 found a preset that answered 17/20 on it and 2/10 with scripture
verses as the haystack and another phrasing. The suite crosses four haystacks (the standard
filler, King James verses, the Python standard library's docstrings, Python's reference manual
topics) with three phrasings of the key and the question, at depths spread evenly over each
prompt, at several lengths, all seeded.
"""

from __future__ import annotations

import functools
import inspect
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from kvmix.data import _FILLER_SENTENCES, PASSKEY_INTRO, PasskeyPrompt, kjv_books

__all__ = [
    "HAYSTACKS",
    "PHRASINGS",
    "Phrasing",
    "SuitePrompt",
    "haystack_sentences",
    "passkey_suite",
    "suite_prompt",
]


@dataclass(frozen=True)
class Phrasing:
    """How the key is hidden and asked for. ``needle`` has a ``{key}`` field; the model completes
    ``answer_prefix`` with the key."""

    needle: str
    question: str
    answer_prefix: str


PHRASINGS: dict[str, Phrasing] = {
    "standard": Phrasing(
        "The pass key is {key}. Remember it. {key} is the pass key.",
        "What is the pass key?",
        "The pass key is",
    ),
    "secret-code": Phrasing(
        "The secret code is {key}. Keep it in mind: the secret code is {key}.",
        "What is the secret code?",
        "The secret code is",
    ),
    "magic-number": Phrasing(
        "One of the special magic numbers is {key}. Note it down: the magic number is {key}.",
        "What is the special magic number mentioned in the text?",
        "The special magic number is",
    ),
}

#: Modules whose docstrings make the third haystack: technical English, unlike either other.
_DOC_MODULES = (
    "textwrap",
    "json",
    "collections",
    "functools",
    "itertools",
    "string",
    "re",
    "pathlib",
    "argparse",
    "shutil",
    "tempfile",
    "fractions",
    "decimal",
    "statistics",
    "heapq",
    "bisect",
    "calendar",
    "difflib",
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@functools.lru_cache(maxsize=4)
def haystack_sentences(name: str) -> tuple[str, ...]:
    """The sentences of haystack ``name`` (one of :data:`HAYSTACKS`), in order.

    ``"kjv"`` is every verse of the King James Bible (one verse per "sentence"); ``"stdlib"`` the
    docstrings of a fixed list of standard-library modules and their public members; ``"pydoc"``
    Python's language and library reference topics as every CPython ships them
    (``pydoc_data.topics``: reference-manual prose with grammar rules and examples, the fourth
    family, added after every kvmix choice had been made so that one family stays untuned). The
    last two are split into sentences, with whitespace collapsed, keeping only sentences of 4 to
    60 words without digits (a digit in the haystack could pass for the key).
    """
    if name == "filler":
        return tuple(_FILLER_SENTENCES)
    if name == "kjv":
        return tuple(v.text for _, verses in kjv_books() for v in verses)
    if name == "stdlib":
        import importlib

        out: list[str] = []
        for module_name in _DOC_MODULES:
            module = importlib.import_module(module_name)
            objects = [module] + [
                getattr(module, n) for n in sorted(dir(module)) if not n.startswith("_")
            ]
            for obj in objects:
                doc = inspect.getdoc(obj) if inspect.getmodule(obj) is module else None
                if not doc:
                    continue
                out.append(doc)
        # A docstring shared by aliases appears once.
        return _sentences(dict.fromkeys(out))
    if name == "pydoc":
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        # Table rows (lines drawn with "|" and "+---") are layout, not prose: dropped.
        return _sentences(
            "\n".join(line for line in topics[k].splitlines() if line.strip()[:1] not in "|+")
            for k in sorted(topics)
        )
    raise ValueError(f"unknown haystack {name!r}; valid: {', '.join(HAYSTACKS)}")


HAYSTACKS: tuple[str, ...] = ("filler", "kjv", "stdlib", "pydoc")


def _sentences(texts: Iterable[str]) -> tuple[str, ...]:
    """The sentences of ``texts`` (whitespace collapsed) of 4 to 60 words without digits, each
    once, in order."""
    out: list[str] = []
    for text in texts:
        for sentence in _SENTENCE_END.split(" ".join(text.split())):
            if 4 <= len(sentence.split()) <= 60 and not any(c.isdigit() for c in sentence):
                out.append(sentence)
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class SuitePrompt:
    """One prompt of the suite: the prompt itself and the family it belongs to."""

    prompt: PasskeyPrompt
    haystack: str
    phrasing: str
    n_tokens: int

    @property
    def family(self) -> str:
        return f"{self.haystack}/{self.phrasing}"


def _text(sentences: list[str], n_before: int, needle: str, phrasing: Phrasing) -> str:
    parts = [PASSKEY_INTRO]
    if n_before:
        parts.append(" ".join(sentences[:n_before]))
    parts.append(needle)
    if n_before < len(sentences):
        parts.append(" ".join(sentences[n_before:]))
    parts.append(f"{phrasing.question} {phrasing.answer_prefix}")
    return "\n".join(parts)


def suite_prompt(
    tokenizer: PreTrainedTokenizerBase,
    haystack: str,
    phrasing: str,
    n_tokens: int,
    depth: float,
    seed: int,
) -> SuitePrompt:
    """A prompt of at most ``n_tokens`` tokens (and at most one haystack sentence shorter) with a
    seeded five-digit key at relative ``depth`` of the haystack.

    The haystack starts at a seeded sentence (the filler at its first) and wraps around.

    Raises:
        ValueError: unknown haystack or phrasing, ``depth`` outside ``[0, 1]``, or ``n_tokens`` too
            small to hold the instructions, the key and the question.
    """
    if phrasing not in PHRASINGS:
        raise ValueError(f"unknown phrasing {phrasing!r}; valid: {', '.join(PHRASINGS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"`depth` must be in [0, 1], got {depth}")
    pool = haystack_sentences(haystack)
    rng = random.Random(f"{haystack}/{phrasing}/{n_tokens}/{seed}")
    key = str(rng.randint(10000, 99999))
    start = 0 if haystack == "filler" else rng.randrange(len(pool))
    style = PHRASINGS[phrasing]
    needle = style.needle.format(key=key)

    def sentences(n: int) -> list[str]:
        return [pool[(start + i) % len(pool)] for i in range(n)]

    def encode(text: str) -> list[int]:
        return list(tokenizer(text)["input_ids"])

    def length(n: int) -> int:
        return len(encode(_text(sentences(n), round(depth * n), needle, style)))

    if length(0) > n_tokens:
        raise ValueError(f"`n_tokens`={n_tokens} cannot hold the instructions, key and question")
    # Binary search for the largest sentence count that fits (lengths grow with the count).
    lo, hi = 0, 1
    while length(hi) <= n_tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if length(mid) <= n_tokens:
            lo = mid
        else:
            hi = mid
    chosen = sentences(lo)
    n_before = round(depth * lo)
    text = _text(chosen, n_before, needle, style)
    ids = encode(text)
    offset = text.index(needle)
    needle_start = len(encode(text[:offset].rstrip()))
    needle_end = len(encode(text[: offset + len(needle)]))
    prompt = PasskeyPrompt(
        input_ids=torch.tensor([ids], dtype=torch.long),
        text=text,
        passkey=key,
        depth=depth,
        needle_span=(needle_start, needle_end),
        chat_template=False,
    )
    return SuitePrompt(prompt, haystack, phrasing, n_tokens)


def passkey_suite(
    tokenizer: PreTrainedTokenizerBase,
    lengths: tuple[int, ...] = (2048,),
    depths: int = 3,
    haystacks: tuple[str, ...] = HAYSTACKS,
    phrasings: tuple[str, ...] = tuple(PHRASINGS),
    seed: int = 0,
) -> list[SuitePrompt]:
    """Every haystack x phrasing x length, each at ``depths`` depths spread evenly
    (``(i + 0.5) / depths``), seeded by ``seed``."""
    if depths < 1:
        raise ValueError(f"`depths` must be at least 1, got {depths}")
    return [
        suite_prompt(tokenizer, h, p, n, (i + 0.5) / depths, seed * 1000 + i)
        for n in lengths
        for h in haystacks
        for p in phrasings
        for i in range(depths)
    ]
