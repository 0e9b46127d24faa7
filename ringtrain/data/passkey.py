"""Synthetic passkey / needle-in-a-haystack documents of an exact token length, for training, eval and tests.

Layout of a document (no download, deterministic in its seed):
    [filler before][The pass key is K. Remember it. ][filler after]
    [What is the pass key? The pass key is ][K]
It is built from separately tokenized pieces, so its token length is exact for any tokenizer and the answer's
token span is known without re-tokenizing (re-tokenizing the joined text with a BPE tokenizer may merge
differently; use `input_ids`, not `text`, when token positions matter).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from ringtrain.data.tokenizer import encode

NEEDLE = "The pass key is {key}. Remember it. "
QUESTION = "What is the pass key? The pass key is "
# The classic haystack of the passkey-retrieval literature (Landmark Attention, LongLoRA).
REPEAT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_NOUNS = ("grass", "sky", "sun", "river", "road", "house", "garden", "city", "forest", "sea", "cat", "bird",
          "train", "lamp", "door", "field", "hill", "cloud", "stone", "book")
_ADJECTIVES = ("green", "blue", "yellow", "quiet", "old", "warm", "long", "bright", "small", "wide", "calm",
               "cold", "dark", "tall", "slow", "soft", "clear", "busy", "empty", "near")
_OPENERS = ("The", "A", "That", "This", "Every", "Our")


@dataclass
class PasskeyDocument:
    """One generated document; spans are [start, end) in tokens of `input_ids` or characters of `text`."""

    input_ids: list[int]
    """The document's tokens (no BOS/EOS); exactly the requested length."""
    text: str
    """The same document as text (pieces joined)."""
    key: str
    """The answer, the document's last tokens: the pass key digits (other tasks: see data/retrieval.py)."""
    answer_token_span: tuple[int, int]
    """Tokens of the final key (the answer): a teacher-forced evaluator predicts them from everything before."""
    answer_char_span: tuple[int, int]
    """Characters of the final key in `text`."""
    needle_token_span: tuple[int, int]
    """Tokens of the inserted needle sentence (with several needles: the one at the requested depth)."""
    depth: float
    """Where that needle starts, as a fraction of the filler: the requested depth up to rounding to one token."""
    needle_token_spans: list[tuple[int, int]] = field(default_factory=list)
    """Every inserted needle in document order (one for passkey; several for the tasks of data/retrieval.py)."""

    @property
    def prompt_ids(self) -> list[int]:
        """Everything before the answer: what a greedy evaluator feeds the model."""
        return self.input_ids[: self.answer_token_span[0]]


class PasskeyGenerator:
    """Builds passkey documents for one tokenizer, caching the tokenization of the repeated filler words."""

    def __init__(self, tokenizer: Any, digits: int = 5, filler: str = "repeat") -> None:
        if filler not in ("repeat", "random"):
            raise ValueError(f"filler={filler!r} is not one of repeat, random")
        if not 1 <= digits <= 18:
            raise ValueError(f"digits={digits} must be in 1..18")
        self.tokenizer = tokenizer
        self.digits = digits
        self.filler = filler
        self._cache: dict[str, list[int]] = {}
        space = self._ids(" ")
        # One-token space lets the haystack end exactly at a word boundary; otherwise the last word is cut.
        self._space: list[int] | None = space if len(space) == 1 else None

    def _ids(self, piece: str) -> list[int]:
        ids = self._cache.get(piece)
        if ids is None:
            ids = encode(self.tokenizer, piece).tolist()
            self._cache[piece] = ids
        return ids

    def _words(self, rng: random.Random):
        """An endless stream of filler words, each carrying its trailing space."""
        if self.filler == "repeat":
            words = REPEAT_FILLER.split(" ")[:-1]
            start = rng.randrange(len(words))  # vary the phase so documents do not all start alike
            i = start
            while True:
                yield words[i % len(words)] + " "
                i += 1
        while True:
            sentence = f"{rng.choice(_OPENERS)} {rng.choice(_NOUNS)} is {rng.choice(_ADJECTIVES)}."
            for word in sentence.split(" "):
                yield word + " "

    def minimum_tokens(self) -> int:
        """Shortest possible document (no filler) for a key of `digits` digits."""
        key = "9" * self.digits
        return len(self._ids(NEEDLE.format(key=key))) + len(self._ids(QUESTION)) + len(self._ids(key))

    def document(self, num_tokens: int, depth: float, seed: int) -> PasskeyDocument:
        """A document of exactly `num_tokens` tokens, the needle at `depth` (0: first, 1: right before the question)."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth={depth} must be in [0, 1]")
        rng = random.Random(seed)
        key = str(rng.randrange(10 ** (self.digits - 1), 10**self.digits))
        return self._compose(num_tokens, rng, [(depth, NEEDLE.format(key=key))], QUESTION, key, "passkey")

    def _compose(
        self, num_tokens: int, rng: random.Random, needles: list[tuple[float, str]], question_text: str,
        answer_text: str, what: str, primary: int = 0,
    ) -> PasskeyDocument:
        """[filler][needle 1][filler] ... [needle n][filler][question][answer] of exactly `num_tokens` tokens.

        `needles` are (depth, text) in document order (non-decreasing depths): needle i follows
        round(depth_i * filler tokens) filler tokens. `needle_token_span` and `depth` describe needle `primary` (the
        one the question asks about, or the first of several it asks about).
        Every retrieval task is built here, so all of them share the exact-length and answer-span guarantees.
        """
        needle_ids = [self._ids(text) for _, text in needles]
        question, answer = self._ids(question_text), self._ids(answer_text)
        n_filler = num_tokens - sum(map(len, needle_ids)) - len(question) - len(answer)
        if n_filler < 0:
            raise ValueError(f"num_tokens={num_tokens} is too short for a {what} document: needs at least "
                             f"{num_tokens - n_filler} tokens with {self.digits} digits")
        words = self._words(rng)
        pending: list[str] = []

        def fill(n: int) -> tuple[str, list[int]]:
            """Exactly n filler tokens: whole words, then single-token spaces (or a cut word) for the rest."""
            text, ids = [], []
            while True:
                word = pending.pop() if pending else next(words)
                word_ids = self._ids(word)
                if len(ids) + len(word_ids) > n:
                    pending.append(word)  # the word that did not fit starts the next stretch of filler
                    break
                text.append(word)
                ids += word_ids
            rest = n - len(ids)
            if rest and self._space is not None:
                text.append(" " * rest)
                ids += self._space * rest
            elif rest:
                cut = self._ids(pending[-1])[:rest]
                text.append(self.tokenizer.decode(cut))
                ids += cut
            return "".join(text), ids

        pieces_text: list[str] = []
        input_ids: list[int] = []
        spans: list[tuple[int, int]] = []
        placed = 0  # filler tokens laid down so far
        primary_filler = 0  # filler tokens before needle `primary`
        for i, ((depth, text), ids) in enumerate(zip(needles, needle_ids, strict=True)):
            target = max(round(depth * n_filler), placed)
            stretch_text, stretch = fill(target - placed)
            placed = target
            if i == primary:
                primary_filler = placed
            pieces_text += [stretch_text, text]
            spans.append((len(input_ids) + len(stretch), len(input_ids) + len(stretch) + len(ids)))
            input_ids += stretch + ids
        after_text, after = fill(n_filler - placed)
        pieces_text += [after_text, question_text, answer_text]
        input_ids += after + question + answer
        if len(input_ids) != num_tokens:  # construction invariant: a tokenizer producing empty pieces breaks it
            raise RuntimeError(f"{what} document has {len(input_ids)} tokens, wanted {num_tokens}")
        text = "".join(pieces_text)
        n = len(input_ids)
        return PasskeyDocument(
            input_ids=input_ids,
            text=text,
            key=answer_text,
            answer_token_span=(n - len(answer), n),
            answer_char_span=(len(text) - len(answer_text), len(text)),
            needle_token_span=spans[primary],
            depth=primary_filler / n_filler if n_filler else 0.0,
            needle_token_spans=spans,
        )


def make_passkey_document(
    tokenizer: Any, num_tokens: int, depth: float, seed: int, digits: int = 5, filler: str = "repeat"
) -> PasskeyDocument:
    """One passkey document of exactly `num_tokens` tokens; see `PasskeyGenerator.document`."""
    return PasskeyGenerator(tokenizer, digits, filler).document(num_tokens, depth, seed)
