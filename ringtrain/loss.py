"""Chunked next-token cross-entropy: the [tokens, vocab] logits exist one chunk at a time, in fp32.

A 128K-token shard with a 128K vocabulary would need 31 GiB of bf16 logits. Each chunk's logits are
recomputed in backward (activation checkpointing of lm_head + CE), so only the hidden states stay alive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    token_weights: torch.Tensor | None) -> torch.Tensor:
    # Logits in fp32: log-softmax over a large vocabulary loses too much in bf16.
    logits = F.linear(hidden, weight).float()  # [n, V]
    losses = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    if token_weights is not None:
        losses = losses * token_weights
    return losses.sum()


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int = 2048,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over tokens of CE(hidden @ weight.T, labels), never holding more than one chunk of logits.

    hidden: [..., d] final hidden states; weight: [V, d] output embedding; labels: [...] already
    shifted (IGNORE_INDEX where no target); token_weights: optional [...] per-token weights.
    The caller divides by the global number of valid tokens (see `count_valid_tokens`).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    weights = token_weights.reshape(-1).to(torch.float32) if token_weights is not None else None
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = start + chunk_tokens
        w = weights[start:end] if weights is not None else None
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, hidden[start:end], weight, labels[start:end], w,
                                       use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hidden[start:end], weight, labels[start:end], w)
    return total


def count_valid_tokens(labels: torch.Tensor, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The loss denominator of this shard: labels that are not ignored (or their total weight)."""
    valid = labels != IGNORE_INDEX
    if token_weights is not None:
        return (token_weights.to(torch.float32) * valid).sum()
    return valid.sum().to(torch.float32)
