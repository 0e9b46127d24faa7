"""From a DataConfig to batches: load documents with `datasets`, tokenize with its cache, pack, sample."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ringtrain.config.data import RECORD_FORMATS, DataConfig, check_data_config, source_config, source_name
from ringtrain.data.checks import data_file_problems
from ringtrain.data.files import non_empty_files, resolve_files
from ringtrain.data.loader import PackedDataLoader
from ringtrain.data.mixture import long_repeats, mixture_counts, mixture_draws
from ringtrain.data.packing import PackedDataset, pack_documents
from ringtrain.data.synthetic import generate_passkey_documents
from ringtrain.data.tokenizer import build_tokenizer, encode_bytes, is_byte_tokenizer, pad_id_of
from ringtrain.errors import ConfigError
from ringtrain.log import get_logger

if TYPE_CHECKING:
    from datasets import Dataset

    from ringtrain.parallel.dims import ParallelDims

logger = get_logger(__name__)

T = TypeVar("T")


def load_documents(cfg: DataConfig) -> Dataset:
    """The raw documents of source 'files' or 'hub' as a datasets.Dataset with a `cfg.text_field` column.

    Data that cannot be used (no file, only empty files, no text field, no record with text) raises ConfigError;
    empty files among others are skipped.
    """
    from datasets import load_dataset

    check_data_config(cfg)
    if cfg.source == "files":
        problems = data_file_problems(cfg)
        if problems:
            raise ConfigError(problems)
        builder, files = resolve_files(cfg)
        files = non_empty_files(files, builder)
        split_name = cfg.split.split("[")[0]  # 'train[:100]' reads the files as 'train', then slices
        kwargs: dict[str, Any] = {"sample_by": cfg.text_sample_by} if builder == "text" else {}
        ds = load_dataset(builder, data_files={split_name: files}, split=cfg.split, cache_dir=cfg.cache_dir,
                          **kwargs)
        logger.info("loaded %d documents from %d %s file(s)", len(ds), len(files), builder)
    elif cfg.source == "hub":
        ds = load_dataset(cfg.path, cfg.subset, split=cfg.split, cache_dir=cfg.cache_dir)
        logger.info("loaded %d documents from %s (%s)", len(ds), cfg.path, cfg.split)
    else:
        raise ValueError(f"load_documents reads files or hub datasets, not source={cfg.source!r}")
    if cfg.format in RECORD_FORMATS:
        return ds  # fields are checked record by record when the records are encoded (encode_records)
    text_field = text_column(ds, cfg)
    if text_field not in ds.column_names:
        raise ConfigError([f"data.text_field={cfg.text_field!r} is not a column of {cfg.path!r}: "
                           f"choose one of {', '.join(ds.column_names)}"])
    if records_without_text(ds, text_field) == len(ds):
        raise ConfigError([f"data.path={cfg.path!r}: none of its {len(ds)} records has text in "
                           f"data.text_field={cfg.text_field!r}: set data.text_field to the field holding the text"])
    return ds


def text_column(ds: Dataset, cfg: DataConfig) -> str:
    """The column holding the text: data.text_field, or 'text' when that is a file's only column (text files)."""
    return "text" if cfg.source == "files" and ds.column_names == ["text"] else cfg.text_field


def records_without_text(ds: Dataset, column: str) -> int:
    """Records whose text is missing (a JSON record without the field reads as null), null or empty.

    Counted by Arrow, without a pass in Python; packing skips them (an empty document adds no token).
    """
    import pyarrow.compute as pc

    text = ds.data.column(column)
    return text.null_count + int(pc.sum(pc.equal(text, "")).as_py() or 0)


class _Tokenize:
    """The map function: a class so datasets fingerprints its fields, and the cache key follows the tokenizer."""

    def __init__(self, tokenizer: Any, text_field: str) -> None:
        # The byte tokenizer is stateless: keep only its name, so the fingerprint is stable across processes.
        self.tokenizer = None if is_byte_tokenizer(tokenizer) else tokenizer
        self.text_field = text_field

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        texts = [t or "" for t in batch[self.text_field]]
        if self.tokenizer is None:
            return {"input_ids": [encode_bytes(t) for t in texts]}
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": [np.asarray(x, dtype=np.int32) for x in ids]}


def tokenize_documents(ds: Dataset, tokenizer: Any, cfg: DataConfig) -> Dataset:
    """Tokenize the text column into an int32 `input_ids` column (no special tokens), cached by datasets.

    The cache file lives next to the loaded data under cfg.cache_dir; a second run with the same files,
    tokenizer and text field loads it instead of tokenizing again.
    """
    return ds.map(
        _Tokenize(tokenizer, text_column(ds, cfg)), batched=True, batch_size=256,
        num_proc=cfg.num_proc if cfg.num_proc > 1 else None, remove_columns=ds.column_names, desc="tokenizing",
    )


def _documents_from_tokenized(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(flat tokens, lengths) straight from the Arrow list column: no per-document Python objects."""
    flat, lengths = _flat_column(ds, "input_ids")
    return flat.astype(np.int32, copy=False), lengths


def _flat_column(ds: Dataset, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, lengths) of an Arrow list column."""
    import pyarrow as pa

    column = ds.with_format("arrow")[:][name]
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    return arr.flatten().to_numpy(zero_copy_only=False), lengths


def encode_records(ds: Dataset, tokenizer: Any, cfg: DataConfig) -> Dataset:
    """format chat / instruction: each record -> input_ids, loss_mask, problem (data/chat.py), cached by datasets."""
    from ringtrain.data.chat import EncodeRecords, chat_template_of

    template = chat_template_of(cfg, tokenizer)
    fields = {"chat": (cfg.messages_field,), "instruction": (cfg.prompt_field, cfg.completion_field),
              "preference": (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)}[cfg.format]
    fn = EncodeRecords(tokenizer, cfg.format, fields, cfg.loss_on, template)
    return ds.map(fn, batched=True, batch_size=64, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                  remove_columns=ds.column_names, desc=f"rendering {cfg.format} records")


def record_documents(
    encoded: Dataset, cfg: DataConfig, seq_len: int, *, log: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(flat tokens, lengths, flat loss mask, which records are kept) of encoded records, after the record-level
    checks and data.overlong.

    Records that cannot be used (no messages, an unknown role, ...) are refused together, one line per fault with
    their count; records longer than a sequence are dropped and counted (data.overlong=drop) or refused. A
    preference record is its two documents (prompt + chosen, prompt + rejected) back to back, each closed by an EOS
    when packed: the pair must fit one sequence.
    """
    import pyarrow.compute as pc

    where = cfg.path or "the data"
    problem = encoded.data.column("problem")
    bad = pc.not_equal(problem, "")
    if pc.any(bad).as_py():
        counts = pc.value_counts(pc.filter(problem, bad)).to_pylist()
        first = {}
        for i, p in enumerate(problem.to_pylist()):
            if p and p not in first:
                first[p] = i
        raise ConfigError([f"data.path={where!r}: {c['counts']} of {len(encoded)} records {c['values']} (record "
                           f"{first[c['values']]} first, counting from 0): fix or remove them"
                           for c in sorted(counts, key=lambda c: first[c["values"]])], agreed=True)
    flat, lengths = _documents_from_tokenized(encoded)
    loss, _ = _flat_column(encoded, "loss_mask")
    loss = loss.astype(bool, copy=False)
    crossing = int(pc.sum(encoded.data.column("straddling")).as_py() or 0)
    if crossing and log:
        logger.warning("data: %d token(s) of %s cross an assistant turn's boundary in the tokenized text; each "
                       "carries loss when it starts inside the turn", crossing, where)
    eos = 2 if cfg.format == "preference" else 1  # the EOS after each of a record's documents shares its sequence
    long = lengths + eos > seq_len
    kept = ~long
    if long.any():
        if cfg.overlong == "error" or long.all():
            why = "all of them" if long.all() else "data.overlong=error"
            raise ConfigError([f"data.path={where!r}: {int(long.sum())} of {len(lengths)} records are longer than a "
                               f"sequence (train.seq_len={seq_len}, the EOS after each counted; the longest has "
                               f"{int(lengths.max())} tokens) ({why}): raise train.seq_len or leave them out"], agreed=True)
        keep = np.repeat(~long, lengths)
        if log:
            logger.warning("data: %d of %d records of %s are longer than train.seq_len=%d (the EOS counted): dropped "
                           "(data.overlong=drop), never cut", int(long.sum()), len(lengths), where, seq_len)
        flat, loss, lengths = flat[keep], loss[keep], lengths[~long]
    return flat, lengths, loss, kept


def rank_zero_first(load: Callable[[], T], dims: ParallelDims | None, *, what: str) -> T:
    """`load()` on every rank, rank 0 first: it fills the datasets cache while the others wait (and share its error,
    if any, through `parallel.agree`), then they read the cache. Returns this rank's own result."""
    if dims is None or dims.world_size == 1:
        return load()
    from ringtrain.parallel.agree import agree

    mine: list[T] = []
    agree(lambda: mine.append(load()), what=what)  # runs on rank 0 only
    return mine[0] if mine else load()


def build_packed_dataset(
    cfg: DataConfig, seq_len: int, tokenizer: Any | None = None, dims: ParallelDims | None = None
) -> PackedDataset:
    """Load (or generate), tokenize and pack the documents of `cfg` into `seq_len`-token sequences.

    `tokenizer` defaults to `build_tokenizer(cfg.tokenizer)`; pass the model's to keep one source of truth.
    With `dims` of several ranks, rank 0 fills the datasets cache first and the others then read it.
    """
    check_data_config(cfg)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg.tokenizer)
    if cfg.sources:
        return build_mixture(cfg, seq_len, tokenizer, dims)
    split_documents = cfg.split_documents if cfg.split_documents is not None else cfg.source != "passkey"
    eos_id, pad_id = tokenizer.eos_token_id, pad_id_of(tokenizer)
    if cfg.source == "passkey":
        lo = cfg.passkey_min_tokens or seq_len - 1
        hi = cfg.passkey_max_tokens or seq_len - 1
        if hi < lo:
            raise ConfigError([f"data.passkey_max_tokens resolves to {hi} < passkey_min_tokens={lo} "
                               f"(0 means seq_len - 1 = {seq_len - 1}): set both explicitly"])
        docs, masks = generate_passkey_documents(
            tokenizer, cfg.num_samples, lo, hi, cfg.seed, digits=cfg.passkey_digits, filler=cfg.passkey_filler,
            edge_depths=cfg.passkey_edge_depths, tasks=cfg.passkey_tasks,
        )
        return pack_documents(docs, seq_len, eos_id, pad_id, split_documents=split_documents,
                              document_mask=cfg.document_mask, answer_masks=masks,
                              answer_loss_fraction=cfg.answer_loss_fraction)
    docs = source_documents(cfg, seq_len, tokenizer, dims)
    flat, lengths, loss, eos_loss = docs.flat, docs.lengths, docs.loss, docs.eos_loss
    if cfg.long_tokens > 0 and cfg.long_upsample != 1.0:  # long documents repeated in place, file order kept
        index = np.repeat(np.arange(len(docs.lengths)), long_repeats(docs.lengths, cfg, [cfg.seed, 26, 0, 0]))
        flat, lengths, loss, eos_loss = gather_documents([docs], np.zeros_like(index), index)
        if dims is None or dims.rank == 0:
            logger.info("data upsampling: " + describe_upsampling(cfg.path, cfg, docs, index, 1.0)
                        .replace("; 100.0% -> %s of all tokens", ""))
    # Records (chat, instruction) stay whole (validated), placed best-fit; a preference record's two documents
    # share one sequence.
    return pack_documents((flat, lengths), seq_len, eos_id, pad_id,
                          split_documents=split_documents and cfg.format not in RECORD_FORMATS,
                          document_mask=cfg.document_mask, loss_masks=loss, eos_loss=eos_loss,
                          pairs=cfg.format == "preference")


class SourceDocuments:
    """One source's documents: flat tokens, lengths, the flat loss mask (None: every token) and whether the EOS
    after a document carries loss."""

    def __init__(self, flat: np.ndarray, lengths: np.ndarray, loss: np.ndarray | None, eos_loss: bool) -> None:
        self.flat, self.lengths, self.loss, self.eos_loss = flat, lengths, loss, eos_loss
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def source_documents(cfg: DataConfig, seq_len: int, tokenizer: Any, dims: ParallelDims | None) -> SourceDocuments:
    """The documents of one files / hub source, in file order (records checked, over-long ones per data.overlong)."""
    log = dims is None or dims.rank == 0
    if cfg.format in RECORD_FORMATS:
        encoded = rank_zero_first(lambda: encode_records(load_documents(cfg), tokenizer, cfg), dims,
                                  what=f"loading and encoding {cfg.path}")
        flat, lengths, loss, kept = record_documents(encoded, cfg, seq_len, log=log)
        if cfg.format == "preference":  # each record -> its two documents, prompt + chosen then prompt + rejected
            chosen = np.asarray(encoded.data.column("chosen_tokens").to_numpy(), dtype=np.int64)[kept]
            lengths = np.stack([chosen, lengths - chosen], axis=1).reshape(-1)
        return SourceDocuments(flat, lengths, loss, cfg.format in ("instruction", "preference"))

    def load_and_tokenize() -> tuple[Dataset, Dataset]:
        documents = load_documents(cfg)
        return documents, tokenize_documents(documents, tokenizer, cfg)

    documents, tokenized = rank_zero_first(load_and_tokenize, dims, what=f"loading and tokenizing {cfg.path}")
    skipped = records_without_text(documents, text_column(documents, cfg))
    if skipped and log:
        logger.warning("data: %d of %d records of %s have no text in data.text_field=%r (missing, null or empty): "
                       "they are skipped", skipped, len(documents), cfg.path, cfg.text_field)
    flat, lengths = _documents_from_tokenized(tokenized)
    return SourceDocuments(flat, lengths, None, True)


def gather_documents(docs: list[SourceDocuments], source: np.ndarray, index: np.ndarray,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """(flat tokens, lengths, flat loss mask or None, EOS loss per document) of the documents (source, index)."""
    pieces, losses, lengths, eos_loss = [], [], [], np.empty(len(source), dtype=bool)
    any_loss = any(d.loss is not None for d in docs)
    for k, (s, i) in enumerate(zip(source.tolist(), index.tolist(), strict=True)):
        d = docs[s]
        a, b = d.offsets[i], d.offsets[i + 1]
        pieces.append(d.flat[a:b])
        lengths.append(b - a)
        if any_loss:
            losses.append(d.loss[a:b] if d.loss is not None else np.ones(b - a, dtype=bool))
        eos_loss[k] = d.eos_loss
    flat = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)
    return flat, np.asarray(lengths, dtype=np.int64), np.concatenate(losses) if any_loss else None, eos_loss


def describe_upsampling(name: str, cfg: DataConfig, docs: SourceDocuments, index: np.ndarray, before: float) -> str:
    """One line: the share of a source's tokens in long documents, and the source's share of all tokens, without and
    with data.long_upsample (`before`: the source's expected share without it)."""
    long = docs.lengths >= cfg.long_tokens
    share = lambda idx: docs.lengths[idx][long[idx]].sum() / max(docs.lengths[idx].sum(), 1)  # noqa: E731
    return (f"{name}: documents of >= {cfg.long_tokens} tokens ({int(long.sum())} of {len(long)}) upsampled "
            f"x{cfg.long_upsample:g}: {100 * share(np.arange(len(long))):.1f}% -> {100 * share(index):.1f}% of its "
            f"tokens; {100 * before:.1f}% -> %s of all tokens")


def build_mixture(cfg: DataConfig, seq_len: int, tokenizer: Any, dims: ParallelDims | None) -> PackedDataset:
    """data.sources: data.num_samples documents drawn from the sources by weight (`mixture_draws`), then packed.

    Sources with records (chat, instruction) keep every document whole (the whole mixture is then placed best-fit);
    text sources follow data.split_documents. Batches of the packed dataset count each source's tokens.
    """
    if (cfg.path or cfg.format != "auto" or cfg.source != "passkey") and (dims is None or dims.rank == 0):
        logger.info("data.sources is set: data.source=%r, data.path=%r and data.format=%r are ignored (each source "
                    "names its own)", cfg.source, cfg.path, cfg.format)
    names = [source_name(e) for e in cfg.sources]
    weights = np.asarray([float(e.get("weight", 1.0)) for e in cfg.sources])
    subs = [source_config(cfg, e) for e in cfg.sources]
    docs = [source_documents(sub, seq_len, tokenizer, dims) for sub in subs]
    counts = mixture_counts(weights, cfg.num_samples)
    sizes = np.asarray([len(d.lengths) for d in docs], dtype=np.int64)
    empty = [n for n, c, z in zip(names, counts, sizes, strict=True) if c and not z]
    if empty:
        raise ConfigError([f"data.sources {n!r} has no document left (all dropped or empty): give it data, or "
                           "weight 0" for n in empty], agreed=True)
    source, index = mixture_draws(counts, sizes, cfg.seed, [d.lengths for d in docs], subs)
    flat, lengths, loss, eos_loss = gather_documents(docs, source, index)
    whole = any(sub.format in RECORD_FORMATS for sub in subs)
    split_documents = False if whole else (cfg.split_documents if cfg.split_documents is not None else True)
    packed = pack_documents((flat, lengths), seq_len, tokenizer.eos_token_id, pad_id_of(tokenizer),
                            split_documents=split_documents, document_mask=cfg.document_mask, loss_masks=loss,
                            eos_loss=eos_loss, document_sources=source)
    packed.source_names = names
    if dims is None or dims.rank == 0:
        tokens = packed.source_tokens(np.arange(len(packed)))
        total = max(sum(tokens.values()), 1)
        logger.info("data mixture of %d documents: %s", cfg.num_samples, "; ".join(
            f"{n}: weight {w:g}, {c} documents ({z} distinct), {tokens[n]} tokens ({100 * tokens[n] / total:.1f}%)"
            for n, w, c, z in zip(names, weights, counts, sizes, strict=True)))
        # What long-document upsampling did to the mix, against the tokens expected from uniform draws.
        expected = np.asarray([c * d.lengths.mean() for c, d in zip(counts, docs, strict=True)])
        for s, (n, sub) in enumerate(zip(names, subs, strict=True)):
            if sub.long_tokens > 0 and sub.long_upsample != 1.0:
                line = describe_upsampling(n, sub, docs[s], index[source == s], expected[s] / expected.sum())
                logger.info("data upsampling: " + line.replace("%s", f"{100 * tokens[n] / total:.1f}%"))
    return packed


def build_dataloader(
    cfg: DataConfig, *, seq_len: int, batch_size: int, dims: ParallelDims | None = None, tokenizer: Any | None = None,
    dataset: PackedDataset | None = None, dp_size: int | None = None,
) -> PackedDataLoader | Any:
    """The loader of this rank: `batch_size` sequences per step, DP slice from `dims` (dp_rank, dp_size; without
    them DP rank 0 of `dp_size`, default 1); with data.streaming a `StreamingLoader` (data/streaming.py)."""
    if cfg.streaming and dataset is None:
        from ringtrain.data.streaming import StreamingLoader

        check_data_config(cfg)
        dp_rank, dp_size = (dims.dp_rank, dims.dp_size) if dims is not None else (0, dp_size or 1)
        return StreamingLoader(cfg, tokenizer if tokenizer is not None else build_tokenizer(cfg.tokenizer), seq_len,
                               batch_size, dp_rank=dp_rank, dp_size=dp_size)
    dataset = dataset if dataset is not None else build_packed_dataset(cfg, seq_len, tokenizer, dims)
    dp_rank, dp_size = (dims.dp_rank, dims.dp_size) if dims is not None else (0, dp_size or 1)
    return PackedDataLoader(dataset, batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed,
                            shuffle=cfg.shuffle)
