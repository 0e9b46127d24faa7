"""The paths a run uses, checked before anything slow starts: output folder, data files, the run folder's state.

A problem is reported like a config mistake (ConfigError: exit 2, one line naming the key, the value and the fix)
instead of surfacing as a traceback at the first write or the first batch. `ringtrain validate` runs the checks
that change nothing on disk (`path_problems`); `ringtrain train` runs all of them (`check_before_training`).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from ringtrain.errors import ConfigError

if TYPE_CHECKING:
    from ringtrain.config import TrainConfig
    from ringtrain.parallel.dims import ParallelDims


def output_dir_problems(output_dir: str, *, write: bool) -> list[str]:
    """Why the run could not write into `output_dir`. `write`: create it and write a probe file into it and its
    checkpoints/ folder (the only sure test: root passes os.access anywhere); otherwise judge by permissions."""
    key = f"train.output_dir={output_dir!r}"
    path = Path(output_dir).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is inside {existing}, which is a file"
        return [f"{key} {where}: choose a folder (the run writes config.yaml, checkpoints/ and final_model/ there)"]
    if not write:
        if not os.access(existing, os.W_OK | os.X_OK):
            return [f"{key} is not writable ({existing} is not): choose a folder you can write to"]
        return []
    try:
        path.mkdir(parents=True, exist_ok=True)
        for folder in (path, path / "checkpoints"):
            if folder.is_dir():
                probe = folder / f".ringtrain-write-test-{uuid.uuid4().hex[:8]}"
                probe.write_bytes(b"")
                probe.unlink()
    except OSError as err:
        return [f"{key} is not writable ({err.strerror or err}: {err.filename or path}): choose a folder you can "
                "write to"]
    return []


def path_problems(cfg: TrainConfig) -> list[str]:
    """What `ringtrain validate` checks beyond the config itself, changing nothing: output folder, local data."""
    from ringtrain.data.checks import data_file_problems

    return [*output_dir_problems(cfg.train.output_dir, write=False), *data_file_problems(cfg.data, cfg.model.path)]


def check_before_training(cfg: TrainConfig, dims: ParallelDims) -> str:
    """Every path problem of the run, before the model and data are built, and the run folder's lock (collective).

    Each rank writes into the output folder (on several nodes it must be a filesystem they share); rank 0 then
    takes the folder's lock (train/runlock.py: refused, one line naming the holder, while another run holds it),
    checks the data files and whether the run folder holds another run. Raises one ConfigError on every rank.
    Returns the run id the lock names (release it with `RunLock(output_dir, run_id).release()` on rank 0).
    """
    from ringtrain.data.checks import data_file_problems
    from ringtrain.parallel.agree import agree
    from ringtrain.train.checkpoint import CheckpointManager
    from ringtrain.train.runlock import acquire, new_run_id

    found: list[list[str] | None] = [None] * dims.world_size
    dist.all_gather_object(found, output_dir_problems(cfg.train.output_dir, write=True))

    def decide() -> str:
        problems = list(dict.fromkeys(p for rank_problems in found for p in rank_problems or []))
        if problems:
            raise ConfigError(problems)
        lock = acquire(cfg.train.output_dir, new_run_id())
        try:
            problems += [*data_file_problems(cfg.data, cfg.model.path),
                         *CheckpointManager(cfg.checkpoint, cfg.train.output_dir, dims).run_folder_problems()]
            if problems:
                raise ConfigError(problems)
        except BaseException:
            lock.release()
            raise
        return lock.run_id

    return agree(decide, what="checking the run's paths")
