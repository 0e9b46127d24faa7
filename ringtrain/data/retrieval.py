"""RULER-style retrieval documents: several keys (one asked), several values of one key, variable tracking.

Passkey retrieval is easy to saturate; RULER (Hsieh et al. 2024, arXiv 2404.06654) made these the tasks long-context
results are reported on. The documents are built like passkey documents (`PasskeyGenerator._compose`): separately
tokenized pieces in a filler haystack, an exact token length, the answer as the document's last tokens. The
templates are short because the short model of the context-extension comparison must fit them into 127 tokens:

    multikey           [..Key QWE is 48213. ..Key ABC is 90125. ..Key ZUT is 11473. ..]Value of key ABC? Key ABC is [90125]
    multivalue         [..Key ABC is 48213. ..Key ABC is 90125. ..Key ABC is 11473. ..]Values of key ABC? Key ABC is
                       [48213, 90125, 11473]
    variable_tracking  [..VAR ABC = 48213. ..VAR QWE = ABC. ..VAR ZUT = QWE. ..]Which VARs equal 48213? They are
                       [ABC QWE ZUT]

Names are three random capital letters (never a filler word), values random numbers of `digits` digits; both are
distinct within a document. The requested depth places one needle: the asked key (multikey, the distractors at
uniform random depths), or the first value / the first assignment, the rest following at random depths between it
and the question, so a multi-part answer always reads in document order.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from typing import Any

from ringtrain.config.data import PASSKEY_TASKS
from ringtrain.data.passkey import PasskeyDocument, PasskeyGenerator

RETRIEVAL_TASKS = tuple(t for t in PASSKEY_TASKS if t != "passkey")

KEY_NEEDLE = "Key {name} is {value}. "
MULTIKEY_QUESTION = "Value of key {name}? Key {name} is "
MULTIVALUE_QUESTION = "Values of key {name}? Key {name} is "
VALUE_SEPARATOR = ", "
VAR_VALUE = "VAR {name} = {value}. "
VAR_COPY = "VAR {name} = {source}. "
VT_QUESTION = "Which VARs equal {value}? They are "
NAME_SEPARATOR = " "
NAME_LETTERS = 3
# RULER's defaults are 4 keys, 4 values and 1 chain of 4 hops; 3 values and a chain of 4 variables (3 hops) keep
# the shortest document at ~110 bytes, so a model trained at 128 tokens can learn every task.
DEFAULT_NEEDLES = {"multikey": 4, "multivalue": 3, "variable_tracking": 4}


class RetrievalGenerator(PasskeyGenerator):
    """Documents of one RULER-style task for one tokenizer; `needles` keys, values or chained variables."""

    def __init__(self, tokenizer: Any, task: str, digits: int = 5, filler: str = "repeat", needles: int = 0) -> None:
        if task not in RETRIEVAL_TASKS:
            raise ValueError(f"task={task!r} is not one of {', '.join(RETRIEVAL_TASKS)}")
        needles = needles or DEFAULT_NEEDLES[task]
        if needles < 2:
            raise ValueError(f"needles={needles} must be >= 2 (one needle is the passkey task)")
        super().__init__(tokenizer, digits=digits, filler=filler)
        self.task = task
        self.needles = needles

    def _parts(self, names: list[str], values: list[str], depths: list[float]) -> tuple[
            list[tuple[float, str]], str, str, int]:
        """(needles in document order, question, answer, index of the needle at the requested depth)."""
        if self.task == "multikey":
            # names[0] is asked; sorting keeps it first among equal depths.
            order = sorted(range(self.needles), key=lambda i: (depths[i], i))
            needles = [(depths[i], KEY_NEEDLE.format(name=names[i], value=values[i])) for i in order]
            question = MULTIKEY_QUESTION.format(name=names[0])
            return needles, question, values[0], order.index(0)
        if self.task == "multivalue":
            needles = [(d, KEY_NEEDLE.format(name=names[0], value=v)) for d, v in zip(depths, values, strict=True)]
            return needles, MULTIVALUE_QUESTION.format(name=names[0]), VALUE_SEPARATOR.join(values), 0
        needles = [(depths[0], VAR_VALUE.format(name=names[0], value=values[0]))]
        needles += [(d, VAR_COPY.format(name=n, source=src))
                    for d, n, src in zip(depths[1:], names[1:], names[:-1], strict=True)]
        return needles, VT_QUESTION.format(value=values[0]), NAME_SEPARATOR.join(names), 0

    def minimum_tokens(self) -> int:
        """Shortest possible document (no filler), with the widest names and values."""
        names = ["W" * NAME_LETTERS] * self.needles
        needles, question, answer, _ = self._parts(names, ["9" * self.digits] * self.needles, [0.0] * self.needles)
        return sum(len(self._ids(t)) for _, t in needles) + len(self._ids(question)) + len(self._ids(answer))

    def document(self, num_tokens: int, depth: float, seed: int) -> PasskeyDocument:
        """A document of exactly `num_tokens` tokens, the asked (or first) needle at `depth`."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth={depth} must be in [0, 1]")
        rng = random.Random(seed)
        names = _distinct(rng, self.needles, lambda: "".join(rng.choices(string.ascii_uppercase, k=NAME_LETTERS)))
        values = _distinct(rng, self.needles, lambda: str(rng.randrange(10 ** (self.digits - 1), 10**self.digits)))
        if self.task == "multikey":
            depths = [depth] + [rng.random() for _ in range(self.needles - 1)]
        else:
            # The chain / the list of values is read forwards: everything after the first needle.
            depths = [depth] + sorted(depth + (1.0 - depth) * rng.random() for _ in range(self.needles - 1))
        needles, question, answer, primary = self._parts(names, values, depths)
        return self._compose(num_tokens, rng, needles, question, answer, self.task, primary=primary)


def _distinct(rng: random.Random, n: int, draw: Callable[[], str]) -> list[str]:
    """`n` different draws (names, values) of one document."""
    out: list[str] = []
    while len(out) < n:
        x = draw()
        if x not in out:
            out.append(x)
    return out

