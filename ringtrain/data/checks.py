"""Cheap checks of local data files, before anything is loaded: empty files and a text field that is not there.

`datasets` reports these late and badly (an empty first .jsonl raises a bare StopIteration; a missing field is
found after the conversion of every file), so `ringtrain validate` and `ringtrain train` read a little of each
file first. Each problem is one line naming the key, the value and the fix.
"""

from __future__ import annotations

import json
from dataclasses import replace

from ringtrain.config.data import RECORD_FORMATS, DataConfig, source_config, source_name
from ringtrain.data.files import non_empty_files, resolve_files

SAMPLED_RECORDS = 100  # JSON lines read per file to look for the text field


def text_field_problem(path: str, builder: str, cfg: DataConfig) -> str | None:
    """The text field missing from a file's columns (parquet) or from all of its first records (JSON lines)."""
    if builder == "text":
        return None  # text files are read into a 'text' column
    if builder == "parquet":
        import pyarrow.parquet as pq

        fields = pq.read_schema(path).names
        where = "a column of"
    else:
        fields = _sampled_json_fields(path)
        if fields is None:
            return None  # not JSON lines (one JSON document): datasets checks it when loading
        where = f"in any of the first {SAMPLED_RECORDS} records of"
    choice = f"choose one of {', '.join(fields)}" if fields else "it has no fields"
    if cfg.format not in RECORD_FORMATS and fields == ["text"]:
        return None  # a file whose only field is 'text' is read as the text, whatever data.text_field says
    for key, name in record_fields(cfg):
        if name not in fields:
            return f"data.{key}={name!r} is not {where} {path}: {choice}, or leave the file out of data.path"
    return None


def record_fields(cfg: DataConfig) -> list[tuple[str, str]]:
    """(key, field name) of the fields a record must hold in cfg.format."""
    if cfg.format == "chat":
        return [("messages_field", cfg.messages_field)]
    if cfg.format == "instruction":
        return [("prompt_field", cfg.prompt_field), ("completion_field", cfg.completion_field)]
    if cfg.format == "preference":
        return [("prompt_field", cfg.prompt_field), ("chosen_field", cfg.chosen_field),
                ("rejected_field", cfg.rejected_field)]
    return [("text_field", cfg.text_field)]


def _sampled_json_fields(path: str) -> list[str] | None:
    """The fields of a JSON-lines file's first records, in order of appearance; None if it is not JSON lines."""
    fields: dict[str, None] = {}
    seen = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                return None
            if not isinstance(record, dict):
                return None
            fields.update(dict.fromkeys(record))
            seen += 1
            if seen == SAMPLED_RECORDS:
                break
    return list(fields)


def data_file_problems(cfg: DataConfig, model_path: str | None = None) -> list[str]:
    """What stops source='files' data from loading, found by reading the start of each file; [] otherwise.

    Empty files among others are fine (they are skipped); all of them empty is a problem, as is a json or parquet
    file without data.text_field, and chat data without a chat template (the tokenizer data.tokenizer names, resolved
    against `model_path`, is loaded to see: a problem found before any model is built).
    """
    return [*_file_problems(cfg), *chat_template_problems(cfg, model_path)]


def chat_template_problems(cfg: DataConfig, model_path: str | None) -> list[str]:
    """format='chat' (in data or a source) without data.chat_template needs a tokenizer with a template."""
    from ringtrain.config.data import source_config

    parts = [source_config(cfg, e) for e in cfg.sources if isinstance(e, dict)] if cfg.sources else [cfg]
    if cfg.chat_template or not any(p.format == "chat" for p in parts):
        return []
    from ringtrain.data.chat import chat_template_of
    from ringtrain.data.tokenizer import build_tokenizer, tokenizer_name
    from ringtrain.errors import ConfigError

    try:
        tokenizer = build_tokenizer(tokenizer_name(cfg.tokenizer, model_path))
    except Exception:  # noqa: BLE001 - a tokenizer that does not load is reported where it is built
        return []
    try:
        chat_template_of(replace(cfg, format="chat"), tokenizer)
    except ConfigError as err:
        return err.problems
    return []


def _file_problems(cfg: DataConfig) -> list[str]:
    if cfg.sources:
        return [f"data.sources[{i}] ({source_name(e)}): {p}" for i, e in enumerate(cfg.sources)
                for p in _file_problems(source_config(cfg, e))]
    if cfg.source != "files":
        return []
    try:
        builder, files = resolve_files(cfg)
    except ValueError as err:
        return [str(err)]
    try:
        full = non_empty_files(files, builder)
        problems = [text_field_problem(f, builder, cfg) for f in full]
    except Exception as err:  # noqa: BLE001 - an unreadable file (permissions, a broken parquet) is the problem
        return [f"data.path={cfg.path!r}: cannot read {getattr(err, 'filename', None) or 'a file'} "
                f"({type(err).__name__}: {err}): check the files"]
    if not full:
        what = f"{files[0]} holds" if len(files) == 1 else f"its {len(files)} files hold"
        return [f"data.path={cfg.path!r}: {what} no record (empty, or blank lines only): point data.path at files "
                "with data"]
    return [p for p in problems if p is not None]
