"""Which local files data.path names, in which datasets format, and which of them hold any record.

Loading (`data/pipeline.py`) and the checks run before it (`data/checks.py`, for `ringtrain validate` and
`ringtrain train`) must agree on the file list, so both take it from here.
"""

from __future__ import annotations

import glob
import os

from ringtrain.config.data import EXTENSION_FORMATS, RECORD_FORMATS, DataConfig, split_paths

_CHUNK = 1 << 16
SAMPLES = os.path.join(os.path.dirname(__file__), "samples")
"""The shipped sample data (written for this project): tiny.jsonl (text), chat.jsonl, instruction.jsonl."""


def resolve_files(cfg: DataConfig) -> tuple[str, list[str]]:
    """(datasets builder name, sorted file list) for source='files'; directories expand to known extensions."""
    files: list[str] = []
    for entry in split_paths(cfg.path):
        for match in sorted(glob.glob(os.path.expanduser(entry))):
            if os.path.isdir(match):
                files += sorted(
                    os.path.join(root, f) for root, _, names in os.walk(match) for f in names
                    if os.path.splitext(f)[1].lower() in EXTENSION_FORMATS
                )
            else:
                files.append(match)
    if not files:
        raise ValueError(f"data.path={cfg.path!r} matches no data file: give a file, glob or directory "
                         f"holding {', '.join(EXTENSION_FORMATS)} files")
    if cfg.format not in ("auto", *RECORD_FORMATS):
        return cfg.format, files
    formats = {EXTENSION_FORMATS.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in formats:
        unknown = [f for f in files if os.path.splitext(f)[1].lower() not in EXTENSION_FORMATS][:3]
        raise ValueError(f"data.format='auto' cannot tell the format of {', '.join(unknown)}: set data.format "
                         "to json, parquet or text")
    if len(formats) > 1:
        raise ValueError(f"data.path={cfg.path!r} mixes formats {sorted(formats)}: point it at one kind of file "
                         "or set data.format")
    builder = formats.pop()
    if builder == "text" and cfg.format in RECORD_FORMATS:
        raise ValueError(f"data.format={cfg.format!r} reads records from .jsonl, .json or .parquet files, not "
                         f"{files[0]}: convert it, or use format=text for plain text")
    return builder, files


def holds_data(path: str, builder: str) -> bool:
    """Whether a data file holds at least one record: a parquet row, or any non-blank byte of json / text."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows > 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            if chunk.strip():
                return True
    return False


def non_empty_files(files: list[str], builder: str) -> list[str]:
    """`files` without those that hold no record (datasets cannot infer a schema from an empty first file)."""
    return [f for f in files if holds_data(f, builder)]
