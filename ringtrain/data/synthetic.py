"""The synthetic task mix of source='passkey': which generator builds each task, and datasets drawn from them.

The task names are `ringtrain.config.data.PASSKEY_TASKS` (the config validates them without importing generators);
`GENERATORS` is keyed by exactly those names (a test holds them equal). It sits above data/passkey.py and
data/retrieval.py, since the retrieval generators build on the passkey one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from ringtrain.config.data import PASSKEY_TASKS
from ringtrain.data.passkey import PasskeyGenerator
from ringtrain.data.retrieval import RetrievalGenerator

# Task -> its generator, called as (tokenizer, digits=..., filler=...).
GENERATORS: dict[str, Callable[..., PasskeyGenerator]] = {
    "passkey": PasskeyGenerator,
    "multikey": partial(RetrievalGenerator, task="multikey"),
    "multivalue": partial(RetrievalGenerator, task="multivalue"),
    "variable_tracking": partial(RetrievalGenerator, task="variable_tracking"),
}


def build_generator(tokenizer: Any, task: str, digits: int = 5, filler: str = "repeat") -> PasskeyGenerator:
    """The document generator of a task of `data.passkey_tasks`: passkey, or one of the RULER-style tasks."""
    if task not in GENERATORS:
        raise ValueError(f"task={task!r} is not one of {', '.join(PASSKEY_TASKS)}")
    return GENERATORS[task](tokenizer, digits=digits, filler=filler)


def document_seed(seed: int, index: int) -> int:
    """Independent per-document seed from (dataset seed, document index): any document can be rebuilt alone."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def generate_passkey_documents(
    tokenizer: Any, num_samples: int, min_tokens: int, max_tokens: int, seed: int,
    digits: int = 5, filler: str = "repeat", edge_depths: float = 0.0, tasks: tuple[str, ...] | list[str] = ("passkey",),
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`num_samples` documents with lengths uniform in [min_tokens, max_tokens] and depths uniform in [0, 1],
    except a share `edge_depths` of them at depth exactly 0 or 1 (half each).

    `tasks` (`ringtrain.config.data.PASSKEY_TASKS`) are drawn uniformly per document; a task whose shortest
    document exceeds `min_tokens` draws its length from [its shortest, max_tokens].
    Returns (token arrays, answer masks): the mask is True on the answer's tokens, for loss weighting.
    """
    gens = {task: build_generator(tokenizer, task, digits, filler) for task in dict.fromkeys(tasks)}
    shortest = {task: gen.minimum_tokens() for task, gen in gens.items()}
    easiest = min(shortest, key=shortest.__getitem__)
    if min_tokens < shortest[easiest]:
        raise ValueError(f"passkey_min_tokens={min_tokens} is below the shortest {easiest} document "
                         f"({shortest[easiest]} tokens with {digits} digits): raise it or use longer sequences")
    too_long = {task: n for task, n in shortest.items() if n > max_tokens}
    if too_long:
        raise ValueError(f"passkey_max_tokens={max_tokens} is below the shortest document of "
                         f"{', '.join(f'{t} ({n} tokens)' for t, n in too_long.items())} with {digits} digits: "
                         "raise it (or train.seq_len) or drop the task")
    task_names = list(gens)
    tokens, masks = [], []
    for i in range(num_samples):
        rng = random.Random(document_seed(seed, i))
        # One task draws nothing here: passkey-only datasets keep the documents they had before tasks existed.
        task = task_names[rng.randrange(len(task_names))] if len(task_names) > 1 else task_names[0]
        length = rng.randint(max(min_tokens, shortest[task]), max_tokens)
        depth = rng.random()
        if edge_depths and rng.random() < edge_depths:  # no extra draw at 0: existing datasets stay as they were
            depth = float(rng.random() < 0.5)
        doc = gens[task].document(length, depth, rng.getrandbits(63))
        ids = np.asarray(doc.input_ids, dtype=np.int32)
        mask = np.zeros(len(ids), dtype=bool)
        mask[doc.answer_token_span[0]: doc.answer_token_span[1]] = True
        tokens.append(ids)
        masks.append(mask)
    return tokens, masks
