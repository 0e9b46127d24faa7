"""DataConfig: where documents come from, how they are tokenized and packed, and the synthetic passkey task."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Any

from ringtrain.config.rules import one_of

SOURCES = ("passkey", "files", "hub")
FORMATS = ("auto", "json", "parquet", "text", "chat", "instruction", "preference")
# Record formats: each record is one conversation / one prompt-completion pair, read from json or parquet files (or
# the hub) and rendered into one document with a loss mask (data/chat.py); a preference record into two (prompt +
# chosen, prompt + rejected), packed together.
RECORD_FORMATS = ("chat", "instruction", "preference")
LOSS_ON = ("assistant", "all")
OVERLONG = ("drop", "error")
# Keys a data.sources entry may set: its own name and weight, and the per-source subset of DataConfig's keys.
SOURCE_KEYS = ("name", "weight", "source", "path", "subset", "split", "format", "text_field", "text_sample_by",
               "messages_field", "prompt_field", "completion_field", "long_tokens", "long_upsample")
TEXT_SAMPLE_BY = ("line", "paragraph", "document")
FILLERS = ("repeat", "random")
# The synthetic tasks: the one list of their names, here so that loading a config does not import the generators
# (data/synthetic.py keys its registry by these names; evaluation's tasks derive from them in config/eval.py).
PASSKEY_TASKS = ("passkey", "multikey", "multivalue", "variable_tracking")
DOCUMENT_POSITIONS = ("restart", "global")
# File extension -> datasets' packaged builder name; "auto" picks from this table.
EXTENSION_FORMATS = {
    ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text",
}


@dataclass
class DataConfig:
    """The data pipeline's settings; `seq_len` and the batch size belong to the trainer and are passed in."""

    source: str = "passkey"
    """'passkey' (synthetic needle-in-a-haystack documents, no files), 'files' (local files) or 'hub' (a hub name)."""
    path: str = ""
    """files: a file, a glob, a directory, or a comma-separated list of them; hub: the dataset name."""
    subset: str | None = None
    """hub: the dataset's configuration name (e.g. 'wikitext-103-raw-v1'); None for the default one."""
    split: str = "train"
    """Split to read; slicing works ('train[:1000]'). Local files are read as this split."""
    text_field: str = "text"
    """Column holding the document text (json / parquet / hub); text files always use 'text'."""
    format: str = "auto"
    """files: 'json' (.jsonl/.json), 'parquet', 'text' (.txt/.md), or 'auto' to pick from the extension; or a record
    format, read from json / parquet files by their extension (or the hub): 'chat' (a list of {role, content} messages
    per record, rendered with the tokenizer's chat template, loss per data.loss_on) or 'instruction' (prompt and
    completion fields, loss on the completion and the EOS after it). A record is one document. 'preference' (the
    format of train.objective dpo / simpo / orpo, which picks it from 'auto'): prompt, chosen and rejected fields,
    plain text or chat messages (the prompt a list of messages, each response a string or a list of assistant
    messages, rendered with the chat template); a record is two documents, prompt + chosen and prompt + rejected,
    packed whole into one sequence."""
    messages_field: str = "messages"
    """format='chat': the field holding the list of {role, content} messages (roles: system, user, assistant, tool)."""
    prompt_field: str = "prompt"
    """format='instruction': the field holding the prompt (no loss)."""
    completion_field: str = "completion"
    """format='instruction': the field holding the completion (loss)."""
    chosen_field: str = "chosen"
    """format='preference': the field holding the preferred response (a string, or a list of assistant messages)."""
    rejected_field: str = "rejected"
    """format='preference': the field holding the dispreferred response (a string, or a list of assistant
    messages)."""
    loss_on: str = "assistant"
    """format='chat': which tokens carry loss: 'assistant' (each assistant turn's rendered text, from the end of the
    template's generation prompt to the end of the turn, end-of-turn marker included) or 'all' (every token)."""
    chat_template: str = ""
    """format='chat': a Jinja chat template file to use instead of the tokenizer's own; '' keeps the tokenizer's
    (the byte tokenizer ships one)."""
    overlong: str = "drop"
    """format='chat' / 'instruction' / 'preference': a record longer than a sequence (train.seq_len - 1 tokens, the EOS
    after it counted; a preference record's two documents with an EOS each) is 'drop'ped and counted in one warning
    line, or is an 'error' (exit 2). Records are never cut."""
    text_sample_by: str = "paragraph"
    """Text files: what one document is: a 'line', a blank-line separated 'paragraph', or the whole 'document'."""
    tokenizer: str = "auto"
    """'auto' (the model's own tokenizer when model.path is set, else 'bytes'), 'bytes' (transformers' ByT5Tokenizer:
    1 byte = 1 token, 384 ids, needs no files, with a chat template) or a tokenizer folder / hub name."""
    num_proc: int = 1
    """Worker processes for tokenization (datasets' map); results are cached, so only the first run pays."""
    cache_dir: str | None = None
    """datasets' cache directory (converted files and tokenized shards); None: the HF default (~/.cache)."""
    document_mask: bool = True
    """Keep document boundaries: per-document ids (attention stays within a document) and no loss across them.
    False: one document per sequence as far as attention and labels are concerned (plain causal LM on a stream)."""
    document_positions: str = "restart"
    """With document_mask: 'restart' numbers each document's positions from 0 (RoPE sees each document as if
    alone), 'global' keeps the positions in the packed sequence."""
    split_documents: bool | None = None
    """Let a document continue into the next sequence (every slot holds a token). False keeps each document that
    fits a sequence whole, placed best-fit (sequence order is then not file order; longer documents are still
    split) and pads the rest of each sequence. None: False for
    source='passkey' (a fragment cut off from its needle cannot be answered), True otherwise."""
    shuffle: bool = True
    """Shuffle the packed sequences each epoch, deterministically from (seed, epoch); False keeps file order."""
    seed: int = 0
    """Seed of the sequence order and of the synthetic documents."""
    num_samples: int = 2048
    """source='passkey': how many documents to generate; with data.sources: how many documents to draw from them."""
    passkey_min_tokens: int = 0
    """source='passkey': shortest document in tokens (EOS excluded); 0 means seq_len - 1 (one document per sequence)."""
    passkey_max_tokens: int = 0
    """source='passkey': longest document in tokens (EOS excluded); 0 means seq_len - 1."""
    passkey_digits: int = 5
    """source='passkey': digits of the pass key (the first one is never 0)."""
    passkey_filler: str = "repeat"
    """source='passkey': haystack text: 'repeat' (the classic 'The grass is green. ...' loop) or 'random'
    (seeded random simple sentences, harder to memorise)."""
    passkey_tasks: list[str] = field(default_factory=lambda: ["passkey"])
    """source='passkey': the synthetic tasks, one drawn uniformly per document: passkey, multikey (several keys, one
    asked), multivalue (every value of one key), variable_tracking (a chain of assignments); see data/retrieval.py.
    A task whose shortest document is longer than passkey_min_tokens starts at its shortest."""
    passkey_edge_depths: float = 0.0
    """source='passkey': share of documents whose needle sits exactly at depth 0 or 1 (half each), the rest at
    uniform depths. Uniform depths almost never put the needle right before the question (the shortest
    needle-question distance), which is where a RoPE-scaled model has the most to relearn. 0: all uniform."""
    long_tokens: int = 0
    """Length-aware sampling (Fu et al., 2024: upsample long documents within each source, keep the source mix):
    documents of at least this many tokens enter each pass over their source long_upsample times. 0: off.
    The effect on the token mix is logged at start."""
    long_upsample: float = 1.0
    """With long_tokens: how many times a long document is drawn per pass over its source (a fraction is a seeded
    coin per document and pass: 2.5 = 2 or 3 times)."""
    streaming: bool = False
    """Read the files / hub dataset as a datasets IterableDataset and pack on the fly: no converted or tokenized
    copy on disk, and a resume continues from the reader's saved position. Sequences come in stream order (needs
    shuffle=false: shuffle the corpus on disk); records are placed whole in order rather than best-fit. With
    data.sources each source is a stream, drawn in blocks of num_samples documents with the weights' exact shares."""
    sources: list[dict[str, Any]] = field(default_factory=list)
    """A weighted mixture instead of data.source/path/format: a list of {name, weight, path, ...} mappings, each
    taking any of source, path, subset, split, format, text_field, text_sample_by, messages_field, prompt_field,
    completion_field, long_tokens, long_upsample (the rest of data.* is shared). name defaults to the path; weight (default 1) is the source's
    share of the data.num_samples documents drawn, in a seeded order. Empty: the single source data.source."""
    answer_loss_fraction: float = 0.0
    """source='passkey': share of each document's loss carried by its answer tokens, through per-token
    `token_weights` in the batch (plain weighting lets the filler dominate). 0: no token_weights."""

    def _validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        problems += one_of(self, "source", SOURCES)
        if self.source == "hub" and not self.path:
            problems.append(("path", "source='hub' needs data.path: a hub dataset name (or use source='files')"))
        if self.source == "files":
            if not self.path:
                problems.append(("path", "source='files' needs data.path: a file, glob or directory"))
            else:
                missing = [p for p in split_paths(self.path) if not glob.glob(os.path.expanduser(p))]
                if missing:
                    problems.append(("path", f"path={self.path!r}: nothing matches {', '.join(missing)}; "
                                             "give an existing file, glob or directory"))
        problems += one_of(self, "document_positions", DOCUMENT_POSITIONS)
        problems += one_of(self, "format", FORMATS)
        problems += one_of(self, "text_sample_by", TEXT_SAMPLE_BY)
        if not self.text_field:
            problems.append(("text_field", "text_field='' must name the column holding the text, e.g. 'text'"))
        if not self.tokenizer:
            problems.append(("tokenizer", "tokenizer='' must be 'auto', 'bytes' or a tokenizer folder / name"))
        if self.num_proc < 1:
            problems.append(("num_proc", f"num_proc={self.num_proc} must be >= 1 (1 = tokenize in this process)"))
        if self.num_samples < 1:
            problems.append(("num_samples", f"num_samples={self.num_samples} must be >= 1"))
        for name in ("passkey_min_tokens", "passkey_max_tokens"):
            if getattr(self, name) < 0:
                problems.append((name, f"{name}={getattr(self, name)} must be >= 0 (0 = seq_len - 1)"))
        if 0 < self.passkey_max_tokens < self.passkey_min_tokens:
            problems.append(("passkey_max_tokens", f"passkey_max_tokens={self.passkey_max_tokens} is below "
                                                   f"passkey_min_tokens={self.passkey_min_tokens}: raise it"))
        if not 1 <= self.passkey_digits <= 18:
            problems.append(("passkey_digits", f"passkey_digits={self.passkey_digits} must be in 1..18"))
        problems += one_of(self, "passkey_filler", FILLERS)
        if not self.passkey_tasks or any(t not in PASSKEY_TASKS for t in self.passkey_tasks):
            problems.append(("passkey_tasks", f"passkey_tasks={self.passkey_tasks} must be a non-empty list of "
                                              f"{', '.join(PASSKEY_TASKS)}"))
        if not 0.0 <= self.passkey_edge_depths <= 1.0:
            problems.append(("passkey_edge_depths", f"passkey_edge_depths={self.passkey_edge_depths} must be in "
                                                    "[0, 1]: e.g. 0.2 puts a fifth of the needles at depth 0 or 1"))
        if not 0.0 <= self.answer_loss_fraction < 1.0:
            problems.append(("answer_loss_fraction", f"answer_loss_fraction={self.answer_loss_fraction} must be in "
                                                     "[0, 1): e.g. 0.5 for half of the loss on the answer"))
        if self.long_tokens < 0:
            problems.append(("long_tokens", f"long_tokens={self.long_tokens} must be >= 0 (0 = no upsampling)"))
        if not self.long_upsample > 0:
            problems.append(("long_upsample", f"long_upsample={self.long_upsample} must be > 0 (e.g. 3 draws each long "
                                              "document three times per pass)"))
        problems += one_of(self, "loss_on", LOSS_ON) + one_of(self, "overlong", OVERLONG)
        if self.streaming:
            problems += _streaming_problems(self)
        if self.sources:
            problems += self._source_problems()
        elif self.format in RECORD_FORMATS:
            problems += _record_format_problems(self)
        return problems

    def _source_problems(self) -> list[tuple[str, str]]:
        import difflib

        problems: list[tuple[str, str]] = []
        weights = []
        for i, entry in enumerate(self.sources):
            where = f"sources[{i}]"
            if not isinstance(entry, dict):
                problems.append(("sources", f"{where}={entry!r} must be a mapping such as {{path: chat.jsonl, "
                                            "weight: 1}"))
                continue
            for key in entry:
                if key not in SOURCE_KEYS:
                    close = difflib.get_close_matches(str(key), SOURCE_KEYS, n=1, cutoff=0.6)
                    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(SOURCE_KEYS)}"
                    problems.append(("sources", f"{where}: unknown key {key!r}: {hint}"))
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
                problems.append(("sources", f"{where}.weight={weight!r} must be a number >= 0 (a share of "
                                            "data.num_samples, relative to the other weights)"))
            else:
                weights.append(float(weight))
            if any(k not in SOURCE_KEYS for k in entry):
                continue
            sub = source_config(self, entry)
            if sub.source == "passkey":
                problems.append(("sources", f"{where}.source='passkey': a mixture reads files or hub datasets; "
                                            "set its path (source defaults to files)"))
                continue
            problems += [("sources", f"{where}.{msg}") for _, msg in sub._validate()]
        names = [source_name(e) for e in self.sources if isinstance(e, dict)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            problems.append(("sources", f"sources name {', '.join(map(repr, twice))} more than once: give each "
                                        "entry its own name"))
        if weights and len(weights) == len(self.sources) and sum(weights) <= 0:
            problems.append(("sources", f"sources weights are all zero ({weights}): give at least one source a "
                                        "weight > 0"))
        return problems


def _streaming_problems(cfg: DataConfig) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if not cfg.sources and cfg.source == "passkey":
        problems.append(("streaming", "streaming=true reads files or a hub dataset; source='passkey' is generated"))
    if cfg.shuffle:
        problems.append(("shuffle", "shuffle=true cannot be streamed (the order of all sequences is drawn at once): "
                                    "set data.shuffle=false and shuffle the corpus on disk, or data.streaming=false"))
    if "[" in cfg.split:
        problems.append(("split", f"split={cfg.split!r}: a streamed split cannot be sliced; give the split name"))
    upsampled = [cfg] + [e for e in cfg.sources if isinstance(e, dict)]
    if any(_get(e, "long_tokens", 0) > 0 and _get(e, "long_upsample", 1.0) != 1.0 for e in upsampled):
        problems.append(("long_upsample", "long_upsample cannot be streamed (a pass over the source is drawn at "
                                          "once): set data.streaming=false, or long_tokens=0"))
    return problems


def _get(obj: Any, key: str, default: Any) -> Any:
    value = obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _record_format_problems(cfg: DataConfig) -> list[tuple[str, str]]:
    """format='chat' / 'instruction' reads one record per document from json, parquet or the hub."""
    problems: list[tuple[str, str]] = []
    if cfg.source == "passkey":
        problems.append(("format", f"format={cfg.format!r} reads records from files or the hub, not "
                                   "source='passkey': set data.source=files and data.path"))
    if cfg.split_documents:
        problems.append(("split_documents", f"split_documents=true with format={cfg.format!r} would cut "
                                            "conversations over sequences: leave it unset (records stay whole)"))
    fields = {"chat": ("messages_field",), "instruction": ("prompt_field", "completion_field"),
              "preference": ("prompt_field", "chosen_field", "rejected_field")}[cfg.format]
    for name in fields:
        if not getattr(cfg, name):
            problems.append((name, f"{name}='' must name the record's field"))
    return problems


def source_name(entry: dict[str, Any]) -> str:
    """A data.sources entry's name: its `name`, else its path."""
    return str(entry.get("name") or entry.get("path") or "")


def source_config(cfg: DataConfig, entry: dict[str, Any]) -> DataConfig:
    """The DataConfig of one data.sources entry: `cfg` with the entry's keys (source defaults to 'files')."""
    from dataclasses import replace

    keys = {k: v for k, v in entry.items() if k not in ("name", "weight")}
    keys.setdefault("source", "files")
    return replace(cfg, sources=[], streaming=False, **keys)  # streaming is the mixture's, checked on it


def split_paths(path: str) -> list[str]:
    """The comma-separated entries of `DataConfig.path`, stripped, empty ones dropped."""
    return [p.strip() for p in path.split(",") if p.strip()]


def check_data_config(cfg: DataConfig) -> None:
    """Raise one ValueError listing every problem of `cfg` (each names the field, the value and the fix)."""
    problems = cfg._validate()
    if problems:
        raise ValueError("invalid data config:\n" + "\n".join(f"  data.{k}: {msg}" for k, msg in problems))
