"""Perplexity by context length: sliding windows over a token stream, scored with the chunked loss on each rank's
shard."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ringtrain.eval.forward import check_dims, device_of, full_batch, local_hidden, my_items, padded_length, world_sum
from ringtrain.eval.tasks import sliding_windows
from ringtrain.model.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from ringtrain.config import TrainConfig
    from ringtrain.parallel.dims import ParallelDims


def evaluate_perplexity(
    lm: nn.Module, tokens: np.ndarray, window: int, stride: int, *, dims: ParallelDims | None = None,
    batch_size: int = 4, loss_chunk_tokens: int = 0,
) -> dict[str, Any]:
    """Perplexity of the token stream `tokens` with `window`-token contexts advancing by `stride` (see
    `sliding_windows`); identical on every rank. Call under `evaluation_mode`."""
    from ringtrain.model.loss import chunked_cross_entropy_sum

    check_dims(dims)
    device = device_of(lm, dims)
    windows = sliding_windows(len(tokens), window, stride)
    padded = padded_length(window, dims)
    totals = torch.zeros(2, device=device, dtype=torch.float64)  # NLL sum, scored tokens
    batches = [windows[s:s + batch_size] for s in range(0, len(windows), batch_size)]
    for i in my_items(len(batches), dims):
        rows = [tokens[b:e].tolist() for b, e, _ in batches[i]]
        batch = full_batch(rows, padded, pad_id=0)
        labels = batch["input_ids"].clone()
        for r, (b, e, first) in enumerate(batches[i]):
            labels[r, :first - b] = IGNORE_INDEX  # context only: scored by an earlier window
            labels[r, e - b:] = IGNORE_INDEX
        batch["labels"] = labels
        local, hidden = local_hidden(lm, batch, dims, device)
        weight = lm.get_output_embeddings().weight
        totals[0] += chunked_cross_entropy_sum(hidden, weight, local["shift_labels"],
                                               chunk_tokens=loss_chunk_tokens).double()
        totals[1] += (local["shift_labels"] != IGNORE_INDEX).sum()
    world_sum(totals, dims)
    nll = float(totals[0] / totals[1])
    return {"length": window, "stride": stride, "tokens": int(totals[1]), "windows": len(windows),
            "nll": nll, "ppl": math.exp(nll)}


def perplexity_tokens(cfg: TrainConfig, tokenizer: Any, dims: ParallelDims | None = None) -> np.ndarray:
    """The first `eval.ppl_max_tokens` tokens of the eval text (documents joined with EOS), via the data pipeline."""
    import dataclasses

    from ringtrain.data.pipeline import load_documents, rank_zero_first, tokenize_documents

    e = cfg.eval
    dcfg = dataclasses.replace(cfg.data, source=e.ppl_source, path=e.ppl_path, subset=e.ppl_subset,
                               split=e.ppl_split, text_field=e.ppl_text_field)
    ds = rank_zero_first(lambda: tokenize_documents(load_documents(dcfg), tokenizer, dcfg), dims,
                         what="loading the perplexity text")
    out: list[int] = []
    for row in ds:
        out += list(row["input_ids"]) + [tokenizer.eos_token_id]
        if len(out) >= e.ppl_max_tokens:
            break
    return np.asarray(out[:e.ppl_max_tokens], dtype=np.int64)
