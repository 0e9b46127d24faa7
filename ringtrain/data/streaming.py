"""data.streaming: packed batches straight from a datasets IterableDataset, no tokenized cache on disk, exact resume.

Documents are read in stream order, encoded as the cached pipeline encodes them (text, chat, instruction), and packed
on the fly: text is cut every `seq_len` tokens (as cached with split_documents), records are placed whole in order (a
new sequence when the next one does not fit; the cached pipeline places them best-fit, so its sequences differ). Each
step takes `batch_size * dp_size` consecutive sequences, DP rank r the r-th slice; every rank reads the whole stream.
The sequences left over at the end of the stream (fewer than one global batch) are skipped and the next epoch reads
the stream again, as the cached loader does without shuffling: for text the two give the same batches.

The position is the reader's own state (datasets' `IterableDataset.state_dict`) before the document being packed,
plus how many of its tokens were already used: a resume continues from there without reading what was consumed
(where the format allows: parquet seeks to its row group, JSON re-parses up to the position inside its file).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ringtrain.config.data import RECORD_FORMATS, DataConfig
from ringtrain.data.packing import PackedDataset
from ringtrain.data.tokenizer import encode, pad_id_of
from ringtrain.errors import ConfigError
from ringtrain.log import get_logger

logger = get_logger(__name__)


def load_stream(cfg: DataConfig) -> Any:
    """The raw records of source 'files' or 'hub' as a datasets IterableDataset (nothing converted or cached)."""
    from datasets import load_dataset

    from ringtrain.data.checks import data_file_problems
    from ringtrain.data.files import non_empty_files, resolve_files

    if cfg.source == "files":
        problems = data_file_problems(cfg)
        if problems:
            raise ConfigError(problems)
        builder, files = resolve_files(cfg)
        kwargs: dict[str, Any] = {"sample_by": cfg.text_sample_by} if builder == "text" else {}
        return load_dataset(builder, data_files={cfg.split: non_empty_files(files, builder)}, split=cfg.split,
                            streaming=True, **kwargs)
    return load_dataset(cfg.path, cfg.subset, split=cfg.split, streaming=True)


class StreamingLoader:
    """An endless iterator of batches read from a stream; `state_dict()` is the same on every rank."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, seq_len: int, batch_size: int, *, dp_rank: int = 0,
                 dp_size: int = 1) -> None:
        from ringtrain.data.chat import EncodeRecords, chat_template_of

        self.cfg, self.tokenizer, self.seq_len = cfg, tokenizer, seq_len
        self.batch_size, self.dp_rank, self.dp_size = batch_size, dp_rank, dp_size
        self.records = cfg.format in RECORD_FORMATS
        self.encoder = None
        if self.records:
            fields = (cfg.messages_field,) if cfg.format == "chat" else (cfg.prompt_field, cfg.completion_field)
            self.encoder = EncodeRecords(tokenizer, cfg.format, fields, cfg.loss_on, chat_template_of(cfg, tokenizer))
        self.eos_id, self.pad_id = tokenizer.eos_token_id, pad_id_of(tokenizer)
        self.epoch, self.index = 0, 0  # sequences of this epoch consumed by all DP ranks together
        self.dropped = 0
        self._start_reader(None)
        self.dataset = self._head()  # the first sequences, for the data fingerprint

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.dp_size

    # -- documents --------------------------------------------------------------------------------------
    def _start_reader(self, reader_state: dict | None, offset: int = 0) -> None:
        self.stream = load_stream(self.cfg)
        if reader_state is not None:
            self.stream.load_state_dict(copy.deepcopy(reader_state))
        self.documents = self._documents()
        self.pending: tuple[dict, np.ndarray, np.ndarray | None, int] | None = None
        self._fetch(offset)

    def _documents(self) -> Iterator[tuple[dict, np.ndarray, np.ndarray | None]]:
        """(reader state before the document, tokens with the EOS appended, loss mask or None) in stream order."""
        state = self.stream.state_dict()
        for k, record in enumerate(self.stream):
            before, state = state, self.stream.state_dict()
            ids, loss = self._encode(record, k)
            if ids is None:
                continue
            yield before, ids, loss

    def _encode(self, record: dict, k: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        if not self.records:
            text = record.get(self.cfg.text_field if self.cfg.text_field in record else "text")
            if not text:
                return None, None
            return np.append(encode(self.tokenizer, text), self.eos_id).astype(np.int32), None
        out = self.encoder({key: [value] for key, value in record.items()})
        if out["problem"][0]:
            raise ConfigError([f"data.path={self.cfg.path!r}: record {k} of the stream (counting from 0) "
                               f"has {out['problem'][0].removeprefix('have ')}: fix or remove it"],
                              agreed=True)
        ids = np.append(out["input_ids"][0], self.eos_id).astype(np.int32)
        if len(ids) > self.seq_len:
            if self.cfg.overlong == "error":
                raise ConfigError([f"data.path={self.cfg.path!r}: record {k} of the stream has {len(ids) - 1} tokens, "
                                   f"longer than a sequence (train.seq_len={self.seq_len}, the EOS counted) "
                                   "(data.overlong=error): raise train.seq_len or leave it out"], agreed=True)
            self.dropped += 1
            return None, None
        return ids, np.append(out["loss_mask"][0], self.cfg.format == "instruction")

    def _fetch(self, offset: int = 0) -> None:
        doc = next(self.documents, None)
        self.pending = None if doc is None else (*doc, offset)

    # -- packing ---------------------------------------------------------------------------------------
    def _row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The next packed sequence (ids, segments, loss mask), or None at the end of the stream."""
        if self.pending is None:
            return None
        ids = np.full(self.seq_len, self.pad_id, dtype=np.int32)
        seg = np.zeros(self.seq_len, dtype=np.int64)
        loss = np.ones(self.seq_len, dtype=bool)
        pos, k = 0, 0
        while self.pending is not None and pos < self.seq_len:
            _, tokens, mask, offset = self.pending
            n = len(tokens) - offset
            if self.records and pos and n > self.seq_len - pos:
                break  # a record stays whole: it opens the next sequence
            take = min(n, self.seq_len - pos)
            ids[pos: pos + take] = tokens[offset: offset + take]
            seg[pos: pos + take] = 2 * k
            if mask is not None:
                loss[pos: pos + take] = mask[offset: offset + take]
            pos, k = pos + take, k + 1
            if take == n:
                self._fetch()
            else:
                self.pending = (*self.pending[:3], offset + take)
        seg[pos:] = 2 * k - 1 if k else 1  # padding: odd, after the last document
        return ids, seg, loss

    def _global_batch(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
        rows = []
        while len(rows) < self.global_batch:
            row = self._row()
            if row is None:
                return None
            rows.append(row)
        return rows

    def _as_dataset(self, rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> PackedDataset:
        ids, seg, loss = (np.stack(x) for x in zip(*rows, strict=True))
        return PackedDataset(ids, seg, document_mask=self.cfg.document_mask,
                             loss_mask=loss if self.records else None)

    def _head(self) -> PackedDataset:
        rows = []
        while len(rows) < 16 and (row := self._row()) is not None:
            rows.append(row)
        if not rows:
            raise ConfigError([f"data.path={self.cfg.path!r}: the stream holds no document (data.streaming=true)"])
        self._start_reader(None)
        return self._as_dataset(rows)

    # -- the loader protocol ---------------------------------------------------------------------------
    def __iter__(self) -> StreamingLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = self._global_batch()
        if rows is None:  # the end of the stream: the partial global batch is skipped, the stream read again
            if self.index == 0:
                raise ConfigError([f"data.path={self.cfg.path!r} streams fewer sequences than one global batch "
                                   f"(batch_size={self.batch_size} x dp_size={self.dp_size}): add data or lower "
                                   "the batch size or seq_len"], agreed=True)
            if self.dropped:
                logger.warning("data: %d records of %s were longer than train.seq_len=%d (the EOS counted) in epoch "
                               "%d: dropped (data.overlong=drop), never cut", self.dropped, self.cfg.path,
                               self.seq_len, self.epoch)
            self.epoch, self.index, self.dropped = self.epoch + 1, 0, 0
            logger.info("data epoch %d begins (stream read again)", self.epoch)
            self._start_reader(None)
            return next(self)
        self.index += self.global_batch
        part = self._as_dataset(rows)
        return part.batch(range(self.dp_rank * self.batch_size, (self.dp_rank + 1) * self.batch_size))

    def state_dict(self) -> dict[str, Any]:
        """The exact position: the reader's state before the document being packed and the tokens of it used."""
        reader, offset = (None, 0) if self.pending is None else (self.pending[0], self.pending[3])
        return {"streaming": True, "epoch": self.epoch, "index": self.index, "reader": copy.deepcopy(reader),
                "offset": offset, "global_batch": self.global_batch, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("streaming"):
            raise ValueError("the checkpoint's data position is of the cached pipeline, not data.streaming=true: "
                             "resume with the data.streaming it was written with")
        for key, mine in (("global_batch", self.global_batch), ("seq_len", self.seq_len)):
            if state[key] != mine:
                raise ValueError(f"cannot resume the data stream: {key}={state[key]} in the checkpoint but {mine} "
                                 "now (resume with the settings the checkpoint was written with)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        if state["reader"] is None:  # the stream was used up: the next step starts the next epoch
            self._start_reader(None)
            self.pending = None
        else:
            self._start_reader(state["reader"], int(state["offset"]))
