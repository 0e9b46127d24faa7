"""Packing tokenized documents into fixed-length sequences with EOS separators and per-document ids.

Every token is kept: documents are concatenated, each followed by EOS (the EOS belongs to the document it
ends), and the stream is cut every `seq_len` tokens; only the tail of the last sequence is padded. With
`split_documents=False` documents are placed whole, best-fit decreasing (`best_fit_starts`), so sequences no
longer follow the input order and the tails of many sequences are padded. Padding is always on the right of a
sequence, gets its own document id and is masked out of labels and attention_mask.

Positions that restart per document (`document_position_ids`) are re-exported from the ring runtime, which owns
the rule because its balanced layout and block plan count work by it (the runtime never imports data).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from ringtrain.log import get_logger
from ringtrain.model.loss import IGNORE_INDEX
from ringtrain.ring.balance import document_position_ids as document_position_ids  # re-exported, see above

logger = get_logger(__name__)



class PackedDataset:
    """Fixed-length packed sequences held as numpy arrays; `batch(indices)` returns the trainer's tensors.

    `segments` numbers documents and padding runs globally and is non-decreasing along the stream: document k
    is 2k, padding that follows it is 2k + 1 (so odd = padding). A batch turns it into per-sequence ids 0, 1, ...
    """

    def __init__(
        self, input_ids: np.ndarray, segments: np.ndarray, *, document_mask: bool = True,
        answer_mask: np.ndarray | None = None, num_documents: int = 0, answer_loss_fraction: float = 0.0,
        loss_mask: np.ndarray | None = None, source_ids: np.ndarray | None = None,
        source_names: Sequence[str] = (), pairs: bool = False,
    ) -> None:
        self.input_ids = input_ids  # [N, S] int32
        self.segments = segments  # [N, S] int64, see the class docstring
        self.answer_mask = answer_mask  # [N, S] bool or None
        self.document_mask = document_mask
        self.num_documents = num_documents
        self.answer_loss_fraction = answer_loss_fraction
        self.loss_mask = loss_mask  # [N, S] bool or None: tokens whose labels carry loss (chat, instruction)
        self.source_ids = source_ids  # [N, S] int16 or None: each token's source in a mixture, -1 on padding
        self.source_names = list(source_names)
        self.pairs = pairs  # documents 2k and 2k + 1 are pair k's chosen and rejected responses (preference data)

    def source_tokens(self, indices: Sequence[int] | np.ndarray) -> dict[str, int]:
        """Tokens (padding excluded) of each source in these sequences; {} without a mixture."""
        if self.source_ids is None:
            return {}
        ids = self.source_ids[np.asarray(indices, dtype=np.int64)]
        counts = np.bincount(ids[ids >= 0].astype(np.int64), minlength=len(self.source_names))
        return {name: int(c) for name, c in zip(self.source_names, counts, strict=False)}

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens, EOS included."""
        return int((self.segments % 2 == 0).sum())

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch([i]).items()}

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """The batch dict for these sequence indices; every tensor is [B, S].

        input_ids, labels (input_ids with -100 on padding and, with document_mask, on each document's first
        token: predicting it from the previous document is not part of any document's loss), document_ids
        (0, 1, ... per sequence, non-decreasing; all 0 without document_mask), attention_mask (1 real, 0
        padding), all int64; answer_mask (bool, True on passkey answer tokens) when the source provides it;
        token_weights (float32) when answer_loss_fraction > 0, see `answer_token_weights`; response_ids (int64)
        with preference pairs, see `pair_response_ids`.
        """
        idx = np.asarray(indices, dtype=np.int64)
        input_ids = self.input_ids[idx].astype(np.int64)
        seg = self.segments[idx]
        padding = seg % 2 == 1
        starts = np.zeros_like(padding)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        labels = input_ids.copy()
        labels[padding] = IGNORE_INDEX
        if self.loss_mask is not None:
            labels[~self.loss_mask[idx]] = IGNORE_INDEX
        segment_ids = np.cumsum(starts, axis=1, dtype=np.int64)
        if self.document_mask:
            document_ids = segment_ids
            ignore_cross_document_labels(labels, document_ids, shifted=False)
        else:
            document_ids = np.zeros_like(input_ids)
        out = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "document_ids": torch.from_numpy(document_ids),
            "attention_mask": torch.from_numpy((~padding).astype(np.int64)),
        }
        if self.pairs:
            out["response_ids"] = torch.from_numpy(pair_response_ids(seg, labels != IGNORE_INDEX))
        if self.answer_mask is not None:
            answer = self.answer_mask[idx] & ~padding
            out["answer_mask"] = torch.from_numpy(answer)
            if self.answer_loss_fraction > 0:
                weights = answer_token_weights(labels != IGNORE_INDEX, answer, segment_ids, self.answer_loss_fraction)
                out["token_weights"] = torch.from_numpy(weights)
        return out


def pair_response_ids(segments: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[B, S] int64: which response each label belongs to, 2 p + r for the batch's pair p (numbered 0, 1, ... in
    sequence order over the batch) and r = 0 chosen / 1 rejected; -1 where the label carries no loss (the prompt,
    padding). `segments` as `PackedDataset` holds them (document k is 2k; pair k's documents are 2k and 2k + 1)."""
    document = segments // 2
    pair = np.unique(document[valid] // 2, return_inverse=True)[1]
    out = np.full(segments.shape, -1, dtype=np.int64)
    out[valid] = 2 * pair.reshape(-1) + document[valid] % 2
    return out


def ignore_cross_document_labels(
    labels: np.ndarray | torch.Tensor, document_ids: np.ndarray | torch.Tensor, *, shifted: bool,
    ignore_index: int = IGNORE_INDEX,
) -> None:
    """No loss across documents: set to `ignore_index`, in place, every label predicted at one document's last token
    for the next document's first (that prediction belongs to neither document).

    `labels` and `document_ids` are [..., S], both numpy or both torch. Unshifted labels (label j is token j,
    predicted at position j - 1): a document's first label is ignored, except a row's first. `shifted` labels (label
    j is token j + 1, predicted at position j): the label at a document's last position is ignored, except a row's
    last. Packing writes unshifted labels; `hf.batch.shard_batch` shifts them, and applies the rule again in case the
    batch did not come from packing.
    """
    boundary = document_ids[..., 1:] != document_ids[..., :-1]  # between positions j and j + 1
    predicted = labels[..., :-1] if shifted else labels[..., 1:]  # a view: assignments reach `labels`
    predicted[boundary] = ignore_index


def sequence_token_weights(
    labels: torch.Tensor, document_ids: torch.Tensor, token_weights: torch.Tensor | None = None,
    *, ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """[B, S] float32 per-label weights that make each document's loss its own mean (LongAlign's loss weighting).

    Computed on full-sequence, unshifted labels (after `ignore_cross_document_labels`; a row's first label, which
    shifting drops, counts for nothing), before sharding: a label's
    weight is its token weight (1 without `token_weights`) over the sum of those of its document's valid labels, so
    each document with a target sums to 1. The trainer divides the summed weighted loss by the global sum of the
    weights, the number of documents with a target in the whole step, on every rank alike: the loss is the mean of
    the documents' mean losses, and every rank's partial sums add up to it under any SP / DP split and accumulation.
    """
    b, s = labels.shape
    valid = labels != ignore_index
    valid[:, 0] = False  # no position predicts a row's first token: shifting drops its label
    base = valid.to(torch.float64) if token_weights is None else token_weights.to(torch.float64) * valid
    rows = torch.arange(b, device=labels.device)[:, None] * s
    group = (rows + (document_ids - document_ids[:, :1])).reshape(-1)  # one id per (sequence, document)
    totals = torch.zeros(b * s, dtype=torch.float64, device=labels.device).index_add_(0, group, base.reshape(-1))
    weights = base.reshape(-1) / totals[group].clamp(min=torch.finfo(torch.float64).tiny)
    return weights.reshape(b, s).to(torch.float32)


def answer_token_weights(
    valid: np.ndarray, answer: np.ndarray, segment_ids: np.ndarray, fraction: float
) -> np.ndarray:
    """[B, S] float32 loss weights giving each document's answer tokens `fraction` of its weighted loss.

    Other valid tokens weigh 1 and invalid ones 0; a document's n_answer answer tokens each weigh
    fraction / (1 - fraction) * n_other / n_answer. Per document, so the share does not shrink with length.
    """
    b, s = valid.shape
    group = np.arange(b)[:, None] * s + segment_ids  # one id per (sequence, document)
    answer = answer & valid
    n_answer = np.bincount(group[answer], minlength=b * s)
    n_other = np.bincount(group[valid & ~answer], minlength=b * s)
    per_answer = np.where(n_other > 0, fraction / (1.0 - fraction) * n_other / np.maximum(n_answer, 1), 1.0)
    weights = valid.astype(np.float32)
    weights[answer] = per_answer[group[answer]]
    return weights


def pack_documents(
    documents: Sequence[np.ndarray] | tuple[np.ndarray, np.ndarray],
    seq_len: int,
    eos_id: int,
    pad_id: int,
    *,
    split_documents: bool = True,
    document_mask: bool = True,
    answer_masks: Sequence[np.ndarray] | None = None,
    answer_loss_fraction: float = 0.0,
    loss_masks: Sequence[np.ndarray] | np.ndarray | None = None,
    eos_loss: bool | np.ndarray = True,
    document_sources: np.ndarray | None = None,
    pairs: bool = False,
) -> PackedDataset:
    """Pack token documents into `seq_len` sequences: each document then EOS, cut every `seq_len` tokens.

    `documents` is a list of 1-D token arrays, or (flat tokens, lengths) as read from an Arrow list column.
    Empty documents are dropped (they would be a lone EOS). With `split_documents=False` no document shorter
    than `seq_len` crosses a sequence boundary: documents are placed best-fit decreasing (longest first, each
    into the sequence with the least room that holds it), so the sequence order is not the input order; a
    document longer than `seq_len` is still split, over a run of sequences of its own. `answer_masks` (same shapes as the documents) marks tokens to weight;
    `answer_loss_fraction` > 0 then adds `token_weights` to each batch. `loss_masks` (per document, or one flat
    array over all tokens) marks the tokens whose labels carry loss (chat and instruction data); the EOS after a
    document carries loss when `eos_loss`. `document_sources` (one int per document) names each document's source in
    a mixture; batches then count each source's tokens (`PackedDataset.source_tokens`). `pairs`: documents 2k and
    2k + 1 are one preference pair (prompt + chosen, prompt + rejected), placed together in one sequence, best-fit
    (needs split_documents=False; batches then hold `response_ids`).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2")
    if isinstance(documents, tuple):
        flat, lengths = documents
        flat = np.asarray(flat, dtype=np.int32)
        lengths = np.asarray(lengths, dtype=np.int64)
    else:
        lengths = np.asarray([len(d) for d in documents], dtype=np.int64)
        flat = np.concatenate([np.asarray(d, dtype=np.int32) for d in documents]) if len(documents) else \
            np.zeros(0, np.int32)
    flat_answer = None
    if answer_masks is not None:
        flat_answer = np.concatenate([np.asarray(m, dtype=bool) for m in answer_masks]) if len(answer_masks) \
            else np.zeros(0, bool)
        if flat_answer.shape != flat.shape:
            raise ValueError(f"answer_masks hold {flat_answer.size} entries for {flat.size} tokens")
    flat_loss = None
    if loss_masks is not None:
        flat_loss = np.asarray(loss_masks, dtype=bool) if isinstance(loss_masks, np.ndarray) else (
            np.concatenate([np.asarray(m, dtype=bool) for m in loss_masks]) if len(loss_masks) else np.zeros(0, bool))
        if flat_loss.shape != flat.shape:
            raise ValueError(f"loss_masks hold {flat_loss.size} entries for {flat.size} tokens")
    if lengths.sum() != flat.size:
        raise ValueError(f"document lengths sum to {lengths.sum()} but {flat.size} tokens were given")
    if document_sources is not None:
        document_sources = np.asarray(document_sources, dtype=np.int64)[lengths > 0]
    eos_loss = np.broadcast_to(np.asarray(eos_loss, dtype=bool), lengths.shape)[lengths > 0]
    if pairs and (split_documents or lengths.size % 2 or not (lengths > 0).all()):
        raise ValueError("pairs=True packs non-empty documents two by two, whole: pass an even number of them and "
                         "split_documents=False")
    lengths = lengths[lengths > 0]  # empty documents contribute no tokens, so `flat` is unchanged
    if lengths.size == 0:
        raise ValueError("no tokens to pack: every document is empty (check data.text_field and the files)")

    with_eos = lengths + 1  # EOS closes (and belongs to) each document
    if not split_documents:
        # Place whole documents (or pairs) first, then lay the documents out in the order of their places.
        if pairs:
            pair_sizes = with_eos[0::2] + with_eos[1::2]
            if pair_sizes.max() > seq_len:
                raise ValueError(f"a pair of documents holds {pair_sizes.max()} tokens with its EOS: more than "
                                 f"seq_len={seq_len}")
            first = np.repeat(best_fit_starts(pair_sizes, seq_len), 2)
            dest_start = first + np.where(np.arange(with_eos.size) % 2 == 1, np.repeat(with_eos[0::2], 2), 0)
        else:
            dest_start = best_fit_starts(with_eos, seq_len)
        order = np.argsort(dest_start, kind="stable")
        token_order = _document_token_order(lengths, order)
        flat, lengths, dest_start = flat[token_order], lengths[order], dest_start[order]
        if flat_answer is not None:
            flat_answer = flat_answer[token_order]
        if flat_loss is not None:
            flat_loss = flat_loss[token_order]
        if document_sources is not None:
            document_sources = document_sources[order]
        eos_loss = eos_loss[order]
        with_eos = lengths + 1
    n_docs, total = lengths.size, int(with_eos.sum())
    stream_start = np.concatenate([[0], np.cumsum(with_eos)[:-1]])
    doc_of_token = np.repeat(np.arange(n_docs), with_eos)
    within = np.arange(total) - np.repeat(stream_start, with_eos)
    is_eos = within == np.repeat(lengths, with_eos)
    stream = np.empty(total, dtype=np.int32)
    stream[~is_eos] = flat
    stream[is_eos] = eos_id
    if split_documents:
        dest_start = stream_start
    dest = np.repeat(dest_start, with_eos) + within
    num_sequences = -(-int(dest[-1] + 1) // seq_len)

    input_ids = np.full(num_sequences * seq_len, pad_id, dtype=np.int32)
    input_ids[dest] = stream
    segments = np.full(num_sequences * seq_len, -1, dtype=np.int64)
    segments[dest] = 2 * doc_of_token
    padding = segments < 0
    # Padding inherits the id of the document before it, +1: odd, and still below the next document's 2k + 2.
    segments = np.maximum.accumulate(segments) + padding
    def to_sequences(on_tokens: np.ndarray, on_eos: bool | np.ndarray) -> np.ndarray:
        """A flag per document token and per EOS (`on_eos`: one value, or one per document) laid out like the packed
        sequences (False on padding)."""
        stream = np.zeros(total, dtype=bool)
        stream[is_eos] = on_eos
        stream[~is_eos] = on_tokens
        out = np.zeros(num_sequences * seq_len, dtype=bool)
        out[dest] = stream
        return out.reshape(num_sequences, seq_len)

    answer = None if flat_answer is None else to_sequences(flat_answer, False)
    loss_mask = None if flat_loss is None else to_sequences(flat_loss, eos_loss)
    source_ids = None
    if document_sources is not None:
        source_ids = np.full(num_sequences * seq_len, -1, dtype=np.int16)
        source_ids[dest] = document_sources[doc_of_token]
        source_ids = source_ids.reshape(num_sequences, seq_len)
    logger.info(
        "packed %d documents (%d tokens with EOS) into %d sequences of %d (%.1f%% padding)",
        n_docs, total, num_sequences, seq_len, 100.0 * padding.sum() / padding.size,
    )
    return PackedDataset(
        input_ids.reshape(num_sequences, seq_len), segments.reshape(num_sequences, seq_len),
        document_mask=document_mask, answer_mask=answer, num_documents=n_docs,
        answer_loss_fraction=answer_loss_fraction, loss_mask=loss_mask, source_ids=source_ids, pairs=pairs,
    )


def best_fit_starts(sizes: np.ndarray, seq_len: int) -> np.ndarray:
    """Start offsets in a stream of `seq_len` sequences for items of `sizes` tokens, packed best-fit decreasing.

    Largest first, each item goes to the open sequence with the least room that still holds it (or a new one).
    An item longer than `seq_len` takes a run of new sequences from a boundary; the room after its tail is open.
    Padding is then a few percent for typical length mixes, where keeping the original order (start a new
    sequence whenever the next item does not fit) wastes about a quarter for uniform lengths.
    """
    starts = np.empty(len(sizes), dtype=np.int64)
    rooms: list[int] = []  # the distinct room sizes of open sequences, sorted (at most seq_len of them)
    open_by_room: dict[int, list[int]] = {}  # room -> the sequences with exactly that room
    num_sequences = 0

    def open_sequence(room: int, seq: int) -> None:
        if room <= 0:
            return
        if room not in open_by_room:
            open_by_room[room] = []
            bisect.insort(rooms, room)
        open_by_room[room].append(seq)

    for item in np.argsort(-sizes, kind="stable").tolist():
        n = int(sizes[item])
        i = bisect.bisect_left(rooms, n)
        if n > seq_len or i == len(rooms):
            span = -(-n // seq_len)
            starts[item] = num_sequences * seq_len
            num_sequences += span
            open_sequence(span * seq_len - n, num_sequences - 1)
            continue
        room = rooms[i]
        seq = open_by_room[room].pop()
        if not open_by_room[room]:
            del open_by_room[room], rooms[i]
        starts[item] = seq * seq_len + seq_len - room
        open_sequence(room - n, seq)
    return starts


def _document_token_order(lengths: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Indices into the concatenated documents that concatenate them in `order` instead."""
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    new_lengths = lengths[order]
    new_offsets = np.concatenate([[0], np.cumsum(new_lengths)[:-1]])
    return np.arange(int(lengths.sum())) + np.repeat(offsets[order] - new_offsets, new_lengths)

