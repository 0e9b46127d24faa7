"""Read back what an offline W&B run wrote: its media files and the history rows of its transaction log.

Offline runs write no wandb-summary.json; what the dashboard will show after `wandb sync` is the run's
`run-<id>.wandb` log (a LevelDB-style log of wandb's protobuf `Record`s) plus the files under `files/media/`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_HEADER = 7  # ':W&B' + magic (2 bytes) + version (1)
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    files: Path
    """The run's files/ folder (media/images/..., media/table/...)."""
    history: list[dict[str, Any]]
    """One dict per history row: key -> decoded JSON value; media keys appear as '<key>/path', '<key>/_type', ..."""

    def row(self, step: int) -> dict[str, Any]:
        rows = [r for r in self.history if r.get("_step") == step]
        if len(rows) != 1:
            raise AssertionError(f"{len(rows)} history rows at step {step}: {[r.get('_step') for r in self.history]}")
        return rows[0]

    def media(self, row: dict[str, Any], key: str) -> Path:
        """The file a media entry of `row` points to."""
        return self.files / row[f"{key}/path"]

    def table(self, row: dict[str, Any], key: str) -> dict[str, Any]:
        return json.loads(self.media(row, key).read_text())


def _records(path: Path) -> list[bytes]:
    raw = path.read_bytes()
    if raw[:4] != b":W&B":
        raise AssertionError(f"{path} is not a W&B transaction log")
    out, pending, pos = [], b"", _HEADER
    while pos + 7 <= len(raw):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a record header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (_FULL, _LAST):
            out.append(pending)
            pending = b""
    return out


def read_offline_run(root: str | Path) -> OfflineRun:
    """The one offline run under `root` (the `dir` given to wandb.init, i.e. the folder holding wandb/)."""
    from wandb.proto import wandb_internal_pb2 as pb

    logs = sorted(Path(root).glob("wandb/offline-run-*/run-*.wandb"))
    if len(logs) != 1:
        raise AssertionError(f"expected one offline W&B run under {root}, found {[str(p) for p in logs]}")
    history = []
    for data in _records(logs[0]):
        rec = pb.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            history.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                            for item in rec.history.item})
    return OfflineRun(files=logs[0].parent / "files", history=history)
