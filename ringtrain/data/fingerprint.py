"""What a run trains on, recorded in each checkpoint and compared on resume: the data's and the tokenizer's identity.

The loader's position only means the same sequences on the same data: a resume on other records (reordered, edited
with their lengths kept, another file) or through another tokenizer would continue silently on something else. The
data's fingerprint is its source, its files (names, sizes, modification times) and a digest of the first packed
sequences' tokens (which also covers generated data, and any change of packing); the tokenizer's is its name and a
digest of its vocabulary. docs/checkpoints.md ("Changed settings on resume") has the rules.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ringtrain.config.data import DataConfig
    from ringtrain.data.packing import PackedDataset

HEAD_SEQUENCES = 16  # the packed sequences whose tokens the data digest covers, in dataset order (not shuffled)


def data_fingerprint(cfg: DataConfig, dataset: PackedDataset) -> dict[str, Any]:
    """The identity of the data `dataset` was packed from (identical on every rank)."""
    head = np.ascontiguousarray(dataset.input_ids[:HEAD_SEQUENCES], dtype=np.int32)
    out: dict[str, Any] = {
        "source": cfg.source, "path": cfg.path or None, "num_sequences": len(dataset), "seq_len": dataset.seq_len,
        "head_digest": hashlib.sha256(f"{head.shape}".encode() + head.tobytes()).hexdigest(),
    }
    from ringtrain.config.data import source_config, source_name
    from ringtrain.data.files import resolve_files

    parts = [source_config(cfg, e) for e in cfg.sources] if cfg.sources else [cfg]
    if cfg.sources:
        out["sources"] = [[source_name(e), float(e.get("weight", 1.0))] for e in cfg.sources]
    files = [f for part in parts if part.source == "files" for f in resolve_files(part)[1]]
    if files:
        out["files"] = [[os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]
    return out


def tokenizer_fingerprint(name: str, tokenizer: Any) -> dict[str, Any]:
    """The identity of a tokenizer: its data.tokenizer name or path, its size and a digest of its vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items())
    return {"name": name, "size": len(tokenizer),
            "vocab_digest": hashlib.sha256(json.dumps(vocab).encode()).hexdigest()}


def data_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """How the data changed, in words (empty when it did not)."""
    out = []
    for key in ("source", "path"):
        if saved.get(key) != now.get(key):
            out.append(f"data.{key} {saved.get(key)!r} -> {now.get(key)!r}")
    if "files" in saved or "files" in now:
        before = {name: (size, mtime) for name, size, mtime in saved.get("files") or []}
        after = {name: (size, mtime) for name, size, mtime in now.get("files") or []}
        for name in sorted(before.keys() | after.keys()):
            if name not in after:
                out.append(f"file {name} is gone")
            elif name not in before:
                out.append(f"file {name} is new")
            elif before[name][0] != after[name][0]:
                out.append(f"file {name} has {after[name][0]} bytes instead of {before[name][0]}")
            elif before[name][1] != after[name][1]:
                out.append(f"file {name} was modified")
    if saved.get("num_sequences") != now.get("num_sequences") or saved.get("seq_len") != now.get("seq_len"):
        out.append(f"{now.get('num_sequences')} packed sequences of {now.get('seq_len')} tokens instead of "
                   f"{saved.get('num_sequences')} of {saved.get('seq_len')}")
    if saved.get("head_digest") != now.get("head_digest") and not out:
        out.append(f"the tokens of the first {HEAD_SEQUENCES} sequences differ (records edited, reordered or "
                   "shuffled)")
    return out


def tokenizer_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """How the tokenizer changed, in words (empty when it did not)."""
    if saved.get("vocab_digest") == now.get("vocab_digest") and saved.get("size") == now.get("size"):
        return []
    if saved.get("name") != now.get("name"):
        return [f"data.tokenizer {saved.get('name')!r} -> {now.get('name')!r}"]
    return [f"the vocabulary of data.tokenizer={now.get('name')!r} differs ({saved.get('size')} -> {now.get('size')} "
            "ids)"]
