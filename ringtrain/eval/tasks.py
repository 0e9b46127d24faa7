"""What is evaluated and how it is scored, on plain tensors: evaluation documents, sliding windows, exact match.

Nothing here runs a model, so the scorers are tested on logits constructed by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ringtrain.config.eval import NEEDLE_TASK, RETRIEVAL_EVAL_TASKS
from ringtrain.data.passkey import PasskeyDocument
from ringtrain.data.synthetic import build_generator
from ringtrain.errors import ConfigError

# Evaluation task -> (document generator of data.passkey_tasks, haystack). The needle task hides the passkey sentence
# in seeded random sentences ("A cat is warm. The road is ..."): unlike the repeated passkey filler, the haystack
# cannot be memorised, and its many "X is Y" phrases are near-misses. The other tasks use the filler their
# training documents have (data.passkey_filler's default): what RULER's tasks add is several needles, not a haystack.
TASK_DOCUMENTS = {task: ("passkey", "random") if task == NEEDLE_TASK else (task, "repeat")
                  for task in RETRIEVAL_EVAL_TASKS}


@dataclass
class EvalDocument:
    """One evaluation document and where it sits in the grid."""

    task: str
    length: int
    depth: float
    """Requested depth (the grid's value); `doc.depth` is the realised one."""
    sample: int
    doc: PasskeyDocument


def eval_documents(
    tokenizer: Any, task: str, lengths: list[int], depths: list[float], samples_per_cell: int, seed: int,
    digits: int,
) -> list[EvalDocument]:
    """The grid's documents, length-major. Document (task, length, depth index, sample) depends on those and
    `seed` only, so a grid can be extended or re-run and the shared cells keep their documents."""
    if task not in TASK_DOCUMENTS:
        raise ValueError(f"task={task!r} is not a retrieval task: one of {', '.join(TASK_DOCUMENTS)}")
    source, filler = TASK_DOCUMENTS[task]
    gen = build_generator(tokenizer, source, digits=digits, filler=filler)
    shortest = gen.minimum_tokens()
    too_short = [n for n in lengths if n < shortest]
    if too_short:
        raise ConfigError([f"eval.lengths={lengths} has lengths shorter than a {digits}-digit {source} document "
                           f"({shortest} tokens with this tokenizer): use lengths >= {shortest}"])
    task_id = RETRIEVAL_EVAL_TASKS.index(task)  # the tuple's order seeds the documents: new tasks go at its end
    docs = []
    for length in lengths:
        for j, depth in enumerate(depths):
            for k in range(samples_per_cell):
                doc_seed = int(np.random.SeedSequence([seed, task_id, length, j, k]).generate_state(1)[0])
                docs.append(EvalDocument(task, length, depth, k, gen.document(length, depth, doc_seed)))
    return docs


def answer_token_hits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per answer token: (argmax == target [N] bool, negative log-likelihood of the target [N] fp32).

    `logits` [N, V] are the predictions *for* the answer tokens (i.e. taken one position before each), `targets` [N].
    """
    logits = logits.float()  # log-softmax in fp32: bf16 loses the small differences that decide the NLL
    hits = logits.argmax(dim=-1) == targets
    nll = F.cross_entropy(logits, targets, reduction="none")
    return hits, nll


def exact_match(correct: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Per document: every answer token right (teacher-forced), i.e. greedy decoding reproduces the answer.

    `correct`, `total`: answer tokens predicted right / answer tokens, per document. A document without answer
    tokens (cannot happen with generated documents) counts as wrong rather than vacuously right.
    """
    return (correct == total) & (total > 0)


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) windows over a stream of `n_tokens`: the usual strided perplexity evaluation.

    The window [begin, end) is fed to the model and only tokens at positions >= first_target are scored (predicted
    from the tokens before them in the window). Every token but the stream's first is scored exactly once; after the
    first window each is predicted with at least `window - stride` tokens of context.
    """
    if window < 2:
        raise ValueError(f"window={window} must be >= 2 tokens")
    if not 1 <= stride < window:
        # A window's first token is only context, so windows must overlap by one token for none to be skipped.
        raise ValueError(f"stride={stride} must be in 1..{window - 1} (below the window of {window}): "
                         "a larger stride would leave tokens unscored")
    out: list[tuple[int, int, int]] = []
    scored_until = 1  # the stream's first token has no context: never a target
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + window, n_tokens)
        out.append((begin, end, scored_until))
        scored_until = end
        begin += stride
    return out
