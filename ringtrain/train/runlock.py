"""A run holds its folder: an exclusive lock file in train.output_dir, taken before the run writes anything.

Two runs in one folder destroy each other (each resumes, prunes and exports over the other's files), so the second is
refused with one line naming the holder. The lock is a file created with O_EXCL (atomic on local and network
filesystems alike; flock is not reliable on NFS or Lustre) holding who took it: host, pid, the pid's start time
(so a reused pid is not mistaken for the holder), the SLURM job id and the run id. A holder that is gone is taken
over with one line: a dead pid on this host, or the same SLURM job (a requeued job's earlier life, which SLURM has
ended). A holder on another host cannot be checked from here: the message says which file to delete if it is gone.
Rank 0 takes and releases it; docs/checkpoints.md ("One run per folder").
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ringtrain.errors import ConfigError
from ringtrain.log import get_logger

logger = get_logger(__name__)

LOCK_FILE = ".ringtrain.lock"


def new_run_id() -> str:
    """A short random id naming this run's lock and temporary folders."""
    return uuid.uuid4().hex[:12]


def _pid_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (Linux), or None: with the pid, it names one process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _me(run_id: str) -> dict[str, Any]:
    return {
        "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def describe_holder(info: dict[str, Any]) -> str:
    """'the run started 2026-..., pid 123 on host a (SLURM job 42)' for messages."""
    job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"the run started {info.get('started_at', '?')} (pid {info.get('pid', '?')} on host {info.get('host', '?')}{job})"


def holder_gone(info: dict[str, Any]) -> str | None:
    """Why the holder described by `info` no longer holds the folder, or None if it may still be running."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and info.get("slurm_job_id") == job:
        return f"SLURM job {job} was requeued"
    if info.get("host") != socket.gethostname():
        return None
    pid = info.get("pid")
    if not isinstance(pid, int):
        return "its lock names no process"
    if pid == os.getpid():
        return None
    if not Path("/proc/self/stat").exists():  # no procfs: signal 0 tells whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"pid {pid} has exited"
        except PermissionError:
            pass
        return None
    start = _pid_start(pid)
    if start is None:
        return f"pid {pid} has exited"
    if info.get("pid_start") not in (None, start):
        return f"pid {pid} has exited (the pid now names another process)"
    return None


def read_lock(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The lock's content, or None if there is no lock; an unreadable lock reads as {} (a holder that is gone)."""
    return _read(Path(output_dir) / LOCK_FILE)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


@dataclass
class RunLock:
    """The lock this run holds on its folder (rank 0)."""

    output_dir: Path
    run_id: str

    @property
    def path(self) -> Path:
        return self.output_dir / LOCK_FILE

    def held(self) -> bool:
        """Whether the lock file still names this run."""
        info = read_lock(self.output_dir)
        return bool(info) and info.get("run_id") == self.run_id

    def release(self) -> None:
        """Remove the lock if it is still this run's (idempotent)."""
        if self.held():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def acquire(output_dir: str | os.PathLike, run_id: str) -> RunLock:
    """Take the lock on `output_dir` for run `run_id` (rank 0), taking over one whose holder is gone.

    Raises ConfigError naming the holder when another live run holds it.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out, run_id)
    body = json.dumps(_me(run_id), indent=2) + "\n"
    for _ in range(3):  # a takeover races at most once with another taker
        try:
            fd = os.open(lock.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = read_lock(out)
            if info is None:
                continue  # released between the two calls
            gone = holder_gone(info) if info else "its lock file is unreadable"
            if gone is None:
                raise ConfigError([
                    f"train.output_dir={str(out)!r} is in use by {describe_holder(info)}: wait for that run to end or "
                    f"stop it, or choose another train.output_dir (if that run is gone, delete {lock.path})"]) from None
            # Renaming aside is atomic: of two runs taking over at once, one rename fails and that run retries.
            aside = out / f"{LOCK_FILE}.stale-{run_id}"
            try:
                os.replace(lock.path, aside)
            except FileNotFoundError:
                continue
            moved = _read(aside) or {}
            if info and moved.get("run_id") != info.get("run_id"):  # another run took it over meanwhile: put it back
                try:
                    os.link(aside, lock.path)
                except FileExistsError:
                    pass
                aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            logger.warning("taking over the run folder %s from %s: %s", out, describe_holder(info) if info else
                           "an unreadable lock", gone)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return lock
    raise ConfigError([f"train.output_dir={str(out)!r}: could not take its lock {lock.path} (other runs keep "
                       "taking it): start one run per folder"])
