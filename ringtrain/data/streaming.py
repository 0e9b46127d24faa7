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

With data.sources each source is its own stream and the documents are drawn from them in blocks of
data.num_samples draws whose source shares are exact (the cached mixture's counts), in a seeded order; a source
whose stream ends is read again. A mixture has no epochs; its state holds every reader's position and the draw count.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ringtrain.config.data import RECORD_FORMATS, DataConfig, source_config, source_name
from ringtrain.data.mixture import mixture_counts
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


class SourceStream:
    """One source read as a stream: its documents (tokens with the EOS appended, loss mask or None) in order."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, seq_len: int, eos_id: int) -> None:
        from ringtrain.data.chat import EncodeRecords, chat_template_of

        self.cfg, self.tokenizer, self.seq_len, self.eos_id = cfg, tokenizer, seq_len, eos_id
        self.records = cfg.format in RECORD_FORMATS
        self.encoder = None
        if self.records:
            fields = (cfg.messages_field,) if cfg.format == "chat" else (cfg.prompt_field, cfg.completion_field)
            self.encoder = EncodeRecords(tokenizer, cfg.format, fields, cfg.loss_on, chat_template_of(cfg, tokenizer))
        self.dropped = 0
        self.start(None)

    def start(self, reader_state: dict | None) -> None:
        """Read from the beginning, or from a saved reader state."""
        self.stream = load_stream(self.cfg)
        if reader_state is not None:
            self.stream.load_state_dict(copy.deepcopy(reader_state))
        self.iterator = self._documents()

    def state(self) -> dict:
        """The reader's position after the documents read so far."""
        return copy.deepcopy(self.stream.state_dict())

    def next(self) -> tuple[dict, np.ndarray, np.ndarray | None] | None:
        """(reader state before it, tokens, loss mask or None) of the next document; None at the end."""
        return next(self.iterator, None)

    def _documents(self) -> Iterator[tuple[dict, np.ndarray, np.ndarray | None]]:
        state = self.state()
        for k, record in enumerate(self.stream):
            before, state = state, self.state()
            ids, loss = self._encode(record, k)
            if ids is not None:
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
                               f"has {out['problem'][0].removeprefix('have ')}: fix or remove it"], agreed=True)
        ids = np.append(out["input_ids"][0], self.eos_id).astype(np.int32)
        if len(ids) > self.seq_len:
            if self.cfg.overlong == "error":
                raise ConfigError([f"data.path={self.cfg.path!r}: record {k} of the stream has {len(ids) - 1} tokens, "
                                   f"longer than a sequence (train.seq_len={self.seq_len}, the EOS counted) "
                                   "(data.overlong=error): raise train.seq_len or leave it out"], agreed=True)
            self.dropped += 1
            return None, None
        return ids, np.append(out["loss_mask"][0], self.cfg.format == "instruction")

    def report_dropped(self, when: str) -> None:
        if self.dropped:
            logger.warning("data: %d records of %s were longer than train.seq_len=%d (the EOS counted) %s: dropped "
                           "(data.overlong=drop), never cut", self.dropped, self.cfg.path, self.seq_len, when)
            self.dropped = 0


class StreamingLoader:
    """An endless iterator of batches read from a stream (or a mixture of streams); `state_dict()` is the same on every
    rank."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, seq_len: int, batch_size: int, *, dp_rank: int = 0,
                 dp_size: int = 1) -> None:
        self.cfg, self.tokenizer, self.seq_len = cfg, tokenizer, seq_len
        self.batch_size, self.dp_rank, self.dp_size = batch_size, dp_rank, dp_size
        self.eos_id, self.pad_id = tokenizer.eos_token_id, pad_id_of(tokenizer)
        parts = [source_config(cfg, e) for e in cfg.sources] if cfg.sources else [cfg]
        self.names = [source_name(e) for e in cfg.sources] if cfg.sources else [cfg.path]
        self.mixture = bool(cfg.sources)
        self.records = any(p.format in RECORD_FORMATS for p in parts)
        self.sources = [SourceStream(p, tokenizer, seq_len, self.eos_id) for p in parts]
        if self.mixture:
            weights = np.asarray([float(e.get("weight", 1.0)) for e in cfg.sources])
            self.block = np.repeat(np.arange(len(parts)), mixture_counts(weights, cfg.num_samples))
        self.epoch, self.index = 0, 0  # sequences of this epoch consumed by all DP ranks together
        self.draws = 0  # documents drawn from the mixture
        self._restart(None, 0)
        self.dataset = self._head()  # the first sequences, for the data fingerprint
        self.last_part: PackedDataset | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.dp_size

    # -- documents --------------------------------------------------------------------------------------
    def _source_of(self, draw: int) -> int:
        if not self.mixture:
            return 0
        b, i = divmod(draw, len(self.block))
        if getattr(self, "_block_cache", (None,))[0] != b:
            self._block_cache = (b, np.random.default_rng([self.cfg.seed, 26, b]).permutation(self.block))
        return int(self._block_cache[1][i])

    def _restart(self, readers: list[dict | None] | None, offset: int) -> None:
        for k, source in enumerate(self.sources):
            source.start(None if readers is None else readers[k])
        self.pending: tuple[int, dict, np.ndarray, np.ndarray | None, int] | None = None
        self._fetch(offset)

    def _fetch(self, offset: int = 0) -> None:
        """The next document into `pending` (None at the end of a single source's stream)."""
        s = self._source_of(self.draws)
        doc = self.sources[s].next()
        if doc is None and self.mixture:  # a source read to its end is read again
            self.sources[s].report_dropped("in a pass over it")
            self.sources[s].start(None)
            doc = self.sources[s].next()
            if doc is None:
                raise ConfigError([f"data.sources {self.names[s]!r} streams no document: give it data"], agreed=True)
        if doc is None:
            self.pending = None
            return
        self.draws += 1
        self.pending = (s, *doc, offset)

    # -- packing ---------------------------------------------------------------------------------------
    def _row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """The next packed sequence (ids, segments, loss mask, source ids), or None at the end of the stream."""
        if self.pending is None:
            return None
        ids = np.full(self.seq_len, self.pad_id, dtype=np.int32)
        seg = np.zeros(self.seq_len, dtype=np.int64)
        loss = np.ones(self.seq_len, dtype=bool)
        src = np.full(self.seq_len, -1, dtype=np.int16)
        pos, k = 0, 0
        while self.pending is not None and pos < self.seq_len:
            s, _, tokens, mask, offset = self.pending
            n = len(tokens) - offset
            if self.records and pos and n > self.seq_len - pos:
                break  # a record stays whole: it opens the next sequence
            take = min(n, self.seq_len - pos)
            ids[pos: pos + take] = tokens[offset: offset + take]
            seg[pos: pos + take] = 2 * k
            src[pos: pos + take] = s
            if mask is not None:
                loss[pos: pos + take] = mask[offset: offset + take]
            pos, k = pos + take, k + 1
            if take == n:
                self._fetch()
            else:
                self.pending = (*self.pending[:4], offset + take)
        seg[pos:] = 2 * k - 1 if k else 1  # padding: odd, after the last document
        return ids, seg, loss, src

    def _global_batch(self) -> list[tuple[np.ndarray, ...]] | None:
        rows = []
        while len(rows) < self.global_batch:
            row = self._row()
            if row is None:
                return None
            rows.append(row)
        return rows

    def _as_dataset(self, rows: list[tuple[np.ndarray, ...]]) -> PackedDataset:
        ids, seg, loss, src = (np.stack(x) for x in zip(*rows, strict=True))
        return PackedDataset(ids, seg, document_mask=self.cfg.document_mask, loss_mask=loss if self.records else None,
                             source_ids=src if self.mixture else None, source_names=self.names)

    def _head(self) -> PackedDataset:
        rows = []
        while len(rows) < 16 and (row := self._row()) is not None:
            rows.append(row)
        if not rows:
            raise ConfigError([f"data.path={self.cfg.path!r}: the stream holds no document (data.streaming=true)"])
        self.draws = 0
        self._restart(None, 0)
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
            self.sources[0].report_dropped(f"in epoch {self.epoch}")
            self.epoch, self.index = self.epoch + 1, 0
            logger.info("data epoch %d begins (stream read again)", self.epoch)
            self._restart(None, 0)
            return next(self)
        self.index += self.global_batch
        self.last_part = self._as_dataset(rows)
        return self.last_part.batch(range(self.dp_rank * self.batch_size, (self.dp_rank + 1) * self.batch_size))

    def last_source_tokens(self) -> dict[str, int]:
        """Each source's tokens in the last step's global batch; {} for one source."""
        if not self.mixture or self.last_part is None:
            return {}
        return self.last_part.source_tokens(np.arange(len(self.last_part)))

    def state_dict(self) -> dict[str, Any]:
        """The exact position: every reader's state (the pending document's source: before that document), the
        tokens of the pending document used, and the documents drawn before it."""
        readers = [source.state() for source in self.sources]
        offset, draws = 0, self.draws
        if self.pending is None:
            readers = None
        else:
            s, before, _, _, offset = self.pending
            readers[s] = copy.deepcopy(before)
            draws -= 1
        return {"streaming": True, "epoch": self.epoch, "index": self.index, "readers": readers, "offset": offset,
                "draws": draws, "global_batch": self.global_batch, "seq_len": self.seq_len,
                "sources": self.names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("streaming"):
            raise ValueError("the checkpoint's data position is of the cached pipeline, not data.streaming=true: "
                             "resume with the data.streaming it was written with")
        for key, mine in (("global_batch", self.global_batch), ("seq_len", self.seq_len), ("sources", self.names)):
            if state[key] != mine:
                raise ValueError(f"cannot resume the data stream: {key}={state[key]} in the checkpoint but {mine} "
                                 "now (resume with the settings the checkpoint was written with)")
        self.epoch, self.index, self.draws = int(state["epoch"]), int(state["index"]), int(state["draws"])
        if state["readers"] is None:  # the stream was used up: the next step starts the next epoch
            self._restart(None, 0)
            self.pending = None
        else:
            self._restart(state["readers"], int(state["offset"]))
