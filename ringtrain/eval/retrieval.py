"""Retrieval scoring (passkey, needle, multikey, multivalue, variable tracking): exact match of each document's
answer, teacher-forced in one forward or decoded greedily, over the sequence-parallel forward."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ringtrain.eval.forward import (
    check_dims,
    device_of,
    full_batch,
    local_hidden,
    my_items,
    padded_length,
    sp_max,
    world_sum,
)
from ringtrain.eval.tasks import EvalDocument, answer_token_hits, exact_match

if TYPE_CHECKING:
    from ringtrain.parallel.dims import ParallelDims


def _retrieval_batches(docs: list[EvalDocument], batch_size: int) -> list[list[int]]:
    """Indices of `docs` in batches of one length (one tensor shape per forward)."""
    by_length: dict[int, list[int]] = {}
    for i, d in enumerate(docs):
        by_length.setdefault(len(d.doc.input_ids), []).append(i)
    return [idx[s:s + batch_size] for idx in by_length.values() for s in range(0, len(idx), batch_size)]


def _teacher_forced(lm: nn.Module, docs: list[EvalDocument], dims: ParallelDims | None, pad_id: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward: ([3, B] correct / total / NLL sum over answer tokens, [B, A] predicted ids, -1 where not here)."""
    answer_len = max(d.doc.answer_token_span[1] - d.doc.answer_token_span[0] for d in docs)
    padded = padded_length(max(len(d.doc.input_ids) for d in docs), dims)
    batch = full_batch([d.doc.input_ids for d in docs], padded, pad_id)
    answer = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for b, d in enumerate(docs):
        answer[b, d.doc.answer_token_span[0]:d.doc.answer_token_span[1]] = True
    batch["answer_mask"] = answer  # shard_batch shifts it with the labels: True where the *target* is a digit
    local, hidden = local_hidden(lm, batch, dims, device)
    sel = local["answer_mask"]  # [B, S_local]
    rows = sel.nonzero()[:, 0]
    logits = lm.get_output_embeddings()(hidden[sel])  # [N, V]: only the scored positions
    hits, nll = answer_token_hits(logits, local["shift_labels"][sel])
    stats = torch.zeros(3, len(docs), device=device)
    stats[0].index_add_(0, rows, hits.float())
    stats[1].index_add_(0, rows, torch.ones_like(nll))
    stats[2].index_add_(0, rows, nll)
    starts = torch.tensor([d.doc.answer_token_span[0] for d in docs], device=device)
    slot = local["position_ids"][sel] + 1 - starts[rows]  # which answer token each scored position predicts
    preds = torch.full((len(docs), answer_len), -1, dtype=torch.long, device=device)
    preds[rows, slot] = logits.argmax(dim=-1)
    return stats, preds


def _greedy(lm: nn.Module, docs: list[EvalDocument], dims: ParallelDims | None, pad_id: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode each answer's length in tokens from its prompt, one full sharded forward per token (no KV cache:
    a cache would hold one shard). Returns the same shapes as `_teacher_forced` (NLL is not measured: NaN)."""
    answer_len = max(d.doc.answer_token_span[1] - d.doc.answer_token_span[0] for d in docs)
    # Every row decodes the batch's longest answer: a row whose own answer is shorter (another task, or a key a BPE
    # tokenizer splits into fewer tokens) grows past its document, so size the batch for prompt + answer_len.
    padded = padded_length(max(len(d.doc.prompt_ids) for d in docs) + answer_len, dims)
    seqs = [list(d.doc.prompt_ids) for d in docs]
    preds = torch.full((len(docs), answer_len), -1, dtype=torch.long, device=device)
    for k in range(answer_len):
        local, hidden = local_hidden(lm, full_batch(seqs, padded, pad_id), dims, device)
        last = torch.tensor([len(s) - 1 for s in seqs], device=device)
        sel = local["position_ids"] == last[:, None]  # the rank holding each row's last token predicts the next
        rows = sel.nonzero()[:, 0]
        step = torch.full((len(docs),), -1, dtype=torch.long, device=device)
        step[rows] = lm.get_output_embeddings()(hidden[sel]).argmax(dim=-1)
        step = sp_max(step, dims)
        preds[:, k] = step
        for b, s in enumerate(seqs):
            s.append(int(step[b]))
    stats = torch.zeros(3, len(docs), device=device)
    for b, d in enumerate(docs):
        target = d.doc.input_ids[d.doc.answer_token_span[0]:d.doc.answer_token_span[1]]
        got = preds[b, :len(target)].tolist()
        stats[0, b] = sum(int(g == t) for g, t in zip(got, target, strict=True))
        stats[1, b] = len(target)
    stats[2] = float("nan")
    # Every SP rank now holds the complete decode; only SP rank 0 contributes it to the world sum.
    if dims is not None and dims.sp_rank != 0:
        stats.zero_()
        preds.fill_(-1)
    return stats, preds


def evaluate_retrieval(
    lm: nn.Module, tokenizer: Any, docs: list[EvalDocument], *, dims: ParallelDims | None = None,
    batch_size: int = 4, mode: str = "teacher_forced",
) -> list[dict[str, Any]]:
    """Score each document's answer by exact match; one record per document, identical on every rank.

    `lm` is a transformers causal LM built for `dims` (`build_model(cfg, dims, "eval")`; with `dims=None`, one
    process and the model's own attention). Call it under `evaluation_mode`.
    """
    from ringtrain.data.tokenizer import pad_id_of

    check_dims(dims)
    device = device_of(lm, dims)
    pad_id = pad_id_of(tokenizer)
    answer_len = max(d.doc.answer_token_span[1] - d.doc.answer_token_span[0] for d in docs)
    stats = torch.zeros(3, len(docs), device=device)
    preds = torch.full((len(docs), answer_len), -1, dtype=torch.long, device=device)
    score = _teacher_forced if mode == "teacher_forced" else _greedy
    batches = _retrieval_batches(docs, batch_size)
    for i in my_items(len(batches), dims):
        idx = batches[i]
        s, p = score(lm, [docs[j] for j in idx], dims, pad_id, device)
        stats[:, idx] = s
        preds[idx, :p.shape[1]] = p
    # Unfilled predictions are -1 everywhere, so a MAX completes them like the SUM completes the stats.
    world_sum(stats, dims)
    world_sum(preds, dims, op=dist.ReduceOp.MAX)
    correct = exact_match(stats[0], stats[1])
    records = []
    for j, d in enumerate(docs):
        n = d.doc.answer_token_span[1] - d.doc.answer_token_span[0]
        pred_ids = [t for t in preds[j, :n].tolist() if t >= 0]
        records.append({
            "task": d.task, "length": d.length, "depth": d.depth, "sample": d.sample, "key": d.doc.key,
            "prediction": tokenizer.decode(pred_ids), "correct": bool(correct[j]),
            "answer_nll": float(stats[2, j] / max(float(stats[1, j]), 1.0)),
        })
    return records


def summarize_retrieval(records: list[dict[str, Any]], lengths: list[int], depths: list[float]) -> dict[str, Any]:
    """Accuracy and mean answer NLL per (depth, length) cell, as [depth][length] grids (the heatmap's layout)."""
    acc = [[math.nan] * len(lengths) for _ in depths]
    nll = [[math.nan] * len(lengths) for _ in depths]
    for i, depth in enumerate(depths):
        for j, length in enumerate(lengths):
            cell = [r for r in records if r["length"] == length and r["depth"] == depth]
            if cell:
                acc[i][j] = sum(r["correct"] for r in cell) / len(cell)
                nll[i][j] = sum(r["answer_nll"] for r in cell) / len(cell)
    by_length = [sum(acc[i][j] for i in range(len(depths))) / len(depths) for j in range(len(lengths))]
    return {"lengths": list(lengths), "depths": list(depths), "accuracy": acc, "answer_nll": nll,
            "accuracy_by_length": by_length, "accuracy_mean": sum(by_length) / len(by_length)}
