"""`ringtrain data`: the packed sequences rank 0 trains on, with the loss-bearing tokens marked, and each source's share.

A token "carries loss" when its (unshifted) label is a target: the model is trained to predict it. Text is decoded
token by token so that character offsets are exact: for the byte tokenizer the bytes are decoded as a whole (exact);
for other tokenizers the text is the concatenation of each token's own decoding, which can differ from decoding the
whole sequence where a character spans tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ringtrain.config import TrainConfig
from ringtrain.data.loader import PackedDataLoader
from ringtrain.data.packing import IGNORE_INDEX, PackedDataset
from ringtrain.data.tokenizer import BYTE_OFFSET, is_byte_tokenizer

LOSS_OPEN, LOSS_CLOSE = "\x1b[32m", "\x1b[0m"  # green on a terminal
PLAIN_OPEN, PLAIN_CLOSE = "[[", "]]"


def decode_with_offsets(tokenizer: Any, ids: list[int]) -> tuple[str, list[int]]:
    """(text, the character offset where each token starts, plus the end) of `ids`."""
    if is_byte_tokenizer(tokenizer):
        pieces = [bytes([i - BYTE_OFFSET]) if i >= BYTE_OFFSET else tokenizer.convert_ids_to_tokens(i).encode()
                  for i in ids]
        raw = b"".join(pieces)
        byte_starts = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).tolist()
        # A character's offset is the length of the text decoded before it (a split character counts once).
        return raw.decode("utf-8", "replace"), [len(raw[:b].decode("utf-8", "ignore")) for b in byte_starts]
    pieces = [tokenizer.decode([i]) for i in ids]
    return "".join(pieces), np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(int).tolist()


def loss_spans(valid: np.ndarray, starts: list[int]) -> list[list[int]]:
    """[start, end) character spans of the runs of loss-bearing tokens."""
    spans, i, n = [], 0, len(valid)
    while i < n:
        if valid[i]:
            j = i
            while j < n and valid[j]:
                j += 1
            spans.append([starts[i], starts[j]])
            i = j
        else:
            i += 1
    return spans


def mark(text: str, spans: list[list[int]], color: bool) -> str:
    """`text` with each loss span wrapped (green on a terminal, [[...]] otherwise)."""
    open_, close = (LOSS_OPEN, LOSS_CLOSE) if color else (PLAIN_OPEN, PLAIN_CLOSE)
    out, pos = [], 0
    for a, b in spans:
        out += [text[pos:a], open_, text[a:b], close]
        pos = b
    return "".join([*out, text[pos:]])


def source_counts(dataset: PackedDataset, indices: np.ndarray, default_name: str) -> dict[str, dict[str, int]]:
    """{source: {"samples": documents (each piece of a split document counts), "tokens": tokens}}, padding excluded."""
    seg = dataset.segments[indices]
    real = seg % 2 == 0
    if dataset.source_ids is None:
        src = np.where(real, 0, -1)
        names = [default_name]
    else:
        src, names = dataset.source_ids[indices].astype(np.int64), dataset.source_names
    starts = np.ones_like(real)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = starts & real
    out = {}
    for k, name in enumerate(names):
        out[name] = {"samples": int((first & (src == k)).sum()), "tokens": int(((src == k) & real).sum())}
    return out


def rank_zero_stream(cfg: TrainConfig, tokenizer: Any) -> Any:
    """The loader rank 0 of a run of this config reads (DP rank 0 of parallel.dp_size, 1 when automatic)."""
    from ringtrain.data.pipeline import build_dataloader

    return build_dataloader(cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.micro_batch_size,
                            tokenizer=tokenizer, dp_size=max(cfg.parallel.dp_size, 1))


def rank_zero_sequences(loader: Any, n: int) -> list[tuple[PackedDataset, int]]:
    """(packed data, row) of the first `n` sequences rank 0 takes from `loader`, cached or streamed."""
    out: list[tuple[PackedDataset, int]] = []
    while len(out) < n:
        next(loader)
        if isinstance(loader, PackedDataLoader):
            start = loader.index - loader.global_batch  # rank 0's slice of the step just taken
            out += [(loader.dataset, int(i)) for i in loader.order(loader.epoch)[start: start + loader.batch_size]]
        else:  # streamed: the step's global batch, whose first rows are rank 0's
            out += [(loader.last_part, i) for i in range(loader.batch_size)]
    return out[:n]


def data_view(cfg: TrainConfig, show: int, samples: int, *, color: bool = False) -> tuple[str, dict[str, Any]]:
    """(the printed view, the JSON report) of the first `show` sequences of rank 0's stream and the sources' counts
    over its first `samples` sequences."""
    from ringtrain.data.tokenizer import build_tokenizer, tokenizer_name

    tokenizer = build_tokenizer(tokenizer_name(cfg.data.tokenizer, cfg.model.path))
    sequences = rank_zero_sequences(rank_zero_stream(cfg, tokenizer), max(show, samples))
    lines, shown = [], []
    for k, (dataset, i) in enumerate(sequences[:show]):
        batch = dataset.batch([i])
        ids = batch["input_ids"][0].tolist()
        real = int(batch["attention_mask"][0].sum())
        valid = (batch["labels"][0] != IGNORE_INDEX).numpy()[:real]
        text, starts = decode_with_offsets(tokenizer, ids[:real])
        spans = loss_spans(valid, starts)
        docs = batch["document_ids"][0].tolist()
        shown.append({"text": text, "loss_spans": spans, "document_ids": docs[:real]})
        lines.append(f"--- sequence {k}: {real} tokens, {int(valid.sum())} with loss, "
                     f"{len(set(docs[:real]))} document(s), {len(ids) - real} padding")
        lines.append(mark(text, spans, color))
    default = cfg.data.path or cfg.data.source
    counts: dict[str, dict[str, int]] = {}
    for dataset, i in sequences[:samples]:
        for name, c in source_counts(dataset, np.asarray([i]), default).items():
            mine = counts.setdefault(name, {"samples": 0, "tokens": 0})
            mine["samples"] += c["samples"]
            mine["tokens"] += c["tokens"]
    total = max(sum(c["tokens"] for c in counts.values()), 1)
    lines.append(f"--- sources over the first {samples} sequences of rank 0's stream:")
    for name, c in counts.items():
        lines.append(f"{name}: {c['samples']} samples, {c['tokens']} tokens ({100 * c['tokens'] / total:.1f}%)")
    return "\n".join(lines) + "\n", {"samples": shown, "sources": counts}
