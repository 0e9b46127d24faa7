"""Shard a full-sequence batch for sequence parallelism: global positions and next-token labels shifted before sharding.

Shifting before sharding is what keeps the label of the last token of every shard: after sharding, token t+1
usually lives on another rank. The returned labels are therefore already aligned with the logits
(`shift_labels[:, t]` is the target of `logits[:, t]`) and must not be shifted again; that is why the key is
`shift_labels` (transformers' own name for pre-shifted labels in `ForCausalLMLoss`) and never `labels`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ringtrain.data.packing import ignore_cross_document_labels
from ringtrain.model.loss import IGNORE_INDEX
from ringtrain.ring import SequenceParallel
from ringtrain.ring.balance import document_position_ids
from ringtrain.ring.layout import Layout

# Per-token tensors the data pipeline may add (docs/data.md). Label-aligned ones describe the label at t (the
# prediction of token t), so they shift with the labels; token-aligned ones describe token t and only shard.
LABEL_ALIGNED_KEYS = ("token_weights", "answer_mask", "response_ids")
NO_LABEL_VALUES = {"response_ids": -1}  # what a label-aligned key holds where no label is (else 0 / False)
TOKEN_ALIGNED_KEYS = ("document_ids",)


def check_right_padding(attention_mask: torch.Tensor, what: str = "attention_mask") -> None:
    """Raise unless every row of a 2-D 0/1 mask is real tokens followed by padding (right padding).

    Right padding needs no attention mask under a causal ring (real tokens never look ahead at the pads);
    left padding or holes are refused (pack documents with `document_ids` instead).
    """
    if attention_mask.ndim != 2:
        raise ValueError(
            f"{what} has shape {tuple(attention_mask.shape)}: ring attention takes a 2-D [batch, seq] padding mask "
            "(or none); 4-D or custom masks are not supported"
        )
    mask = attention_mask.to(torch.bool)
    holes = mask[:, 1:] & ~mask[:, :-1]  # a real token right after a pad
    if bool(holes.any()):
        row, col = (int(i) for i in holes.nonzero()[0])
        raise ValueError(
            f"{what} is not right padding: row {row} has a real token at position {col + 1} after padding "
            "(left padding or a hole). Ring attention only supports right padding: tokenize with "
            "padding_side='right', or pack documents without padding"
        )


def shard_batch(
    batch: Mapping[str, torch.Tensor],
    sp: SequenceParallel | None = None,
    layout: str | Layout | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    ignore_index: int = IGNORE_INDEX,
    document_positions: str = "restart",
) -> dict[str, Any]:
    """This rank's shard of a full-sequence batch, ready for a model prepared with `apply_ring_attention`.

    `sp`: the model's `SequenceParallel` (the same object `apply_ring_attention` got), or none and a pure ring over
    `group` (None: the default group) with `layout` (default zigzag); conflicting `group`/`layout` are refused.
    `batch`: `input_ids` [B, S] (the full sequence, identical on every rank of `sp`), optional `labels` [B, S]
    (unshifted, `ignore_index` where no loss is wanted; default: the input ids), optional `attention_mask` [B, S]
    (right padding only). Returns
      - `input_ids` [B, S_local]: this rank's tokens,
      - `position_ids` [B, S_local]: their global positions (pass to the model: RoPE must see global positions);
        with `document_ids` in the batch and `document_positions="restart"` (default), positions restarting at 0
        at each document (each document is then positioned as if alone); "global" keeps global positions,
      - `shift_labels` [B, S_local]: the next-token target of each local token, shifted *before* sharding; the last
        position of each sequence and every padding position hold `ignore_index`. Do not shift these again,
      - `num_label_tokens` (0-d LongTensor): non-ignored labels in the full batch, the same on every rank of the
        group: divide the summed local loss by it (and by its sum over data-parallel ranks) to get a mean,
      - `token_weights`, `answer_mask`, `response_ids` if given: shifted exactly like the labels (aligned with
        `shift_labels`; 0 / False / -1 at the last position), and `document_ids` [B, S_local] if given (non-decreasing per row):
        sharded, not shifted. The label of a document's last token (the next document's first token) is
        ignored: no loss crosses a document boundary,
      - `documents` (with `document_ids`): a `RingDocuments` built from the full ids, without communication; pass
        it to the model as `document_ids=` with `input_ids` and `position_ids` so attention stays inside each
        document (the plans made from it are kept for every layer of the forward).
    No attention mask is returned: with right padding the causal ring needs none. Any other key is an error,
    because whether it should shift cannot be guessed.
    """
    sp = SequenceParallel.of(sp, layout, group=group)
    input_ids = batch["input_ids"]  # [B, S]
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: shard_batch takes [batch, seq]")
    unknown = set(batch) - {"input_ids", "labels", "attention_mask", *LABEL_ALIGNED_KEYS, *TOKEN_ALIGNED_KEYS}
    if unknown:
        raise ValueError(
            f"shard_batch does not know the batch keys {sorted(unknown)}: per-label keys "
            f"({', '.join(LABEL_ALIGNED_KEYS)}) are shifted, per-token keys ({', '.join(TOKEN_ALIGNED_KEYS)}) only "
            "sharded; drop other keys before sharding or add them to one of those lists"
        )
    targets = batch.get("labels")
    targets = input_ids if targets is None else targets
    if targets.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(targets.shape)} != input_ids shape {tuple(input_ids.shape)}")
    shift_labels = torch.full_like(targets, ignore_index)  # [B, S]
    shift_labels[:, :-1] = targets[:, 1:]
    mask = batch.get("attention_mask")
    if mask is not None:
        if mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        check_right_padding(mask)
        real = mask.to(torch.bool)
        # A pad predicts nothing, and the last real token must not learn to predict the first pad.
        shift_labels[~real] = ignore_index
        shift_labels[:, :-1][~real[:, 1:]] = ignore_index
    if document_positions not in ("restart", "global"):
        raise ValueError(f"document_positions={document_positions!r} is not one of restart, global")
    docs = batch.get("document_ids")
    if docs is not None:
        if docs.shape != input_ids.shape:
            raise ValueError(f"document_ids shape {tuple(docs.shape)} != input_ids shape {tuple(input_ids.shape)}")
        documents = sp.documents(docs)  # checks the ids (non-decreasing); a per-batch layout comes from them
        sp = sp.for_documents(documents)
        ignore_cross_document_labels(shift_labels, docs, shifted=True, ignore_index=ignore_index)
    if docs is not None and document_positions == "restart":
        positions = sp.shard(document_position_ids(docs))
    else:
        positions = sp.positions(input_ids.shape[1], device=input_ids.device)
        positions = positions.unsqueeze(0).expand(input_ids.shape[0], -1)
    out: dict[str, Any] = {
        "input_ids": sp.shard(input_ids),
        "position_ids": positions,
        "shift_labels": sp.shard(shift_labels),
        "num_label_tokens": (shift_labels != ignore_index).sum(),
    }
    if docs is not None:
        out["documents"] = documents
    for key in LABEL_ALIGNED_KEYS:
        if key in batch:
            value = batch[key]
            if value.shape != input_ids.shape:
                raise ValueError(f"{key} shape {tuple(value.shape)} != input_ids shape {tuple(input_ids.shape)}")
            shifted = torch.full_like(value, NO_LABEL_VALUES.get(key, 0))  # the last position has no label
            shifted[:, :-1] = value[:, 1:]
            out[key] = sp.shard(shifted)
    for key in TOKEN_ALIGNED_KEYS:
        if key in batch:
            out[key] = sp.shard(batch[key])
    return out


def token_loss_sum(
    logits: torch.Tensor, shift_labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32) of local `logits` [B, S_local, V] against `shift_labels`.

    The reference form of the loss contract: divide by `num_label_tokens` (summed over data-parallel ranks) and
    backpropagate; each SP rank's gradients are then partial sums that the data/sequence-parallel gradient
    reduction adds up. A trainer with a large vocabulary computes the same sum in chunks of the hidden states.
    """
    return F.cross_entropy(
        logits.float().flatten(0, 1), shift_labels.flatten(), ignore_index=ignore_index, reduction="sum"
    )
