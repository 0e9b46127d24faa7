"""Atomic, resumable training checkpoints with torch.distributed.checkpoint (DCP), plus save-on-signal.

Layout, atomicity and resume rules are documented in docs/checkpoints.md.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from ringtrain.distributed import Mesh
from ringtrain.log import get_logger

logger = get_logger(__name__)

RESUME_MODES = ("auto", "none")
COMPLETE_MARKER = "COMPLETE"
META_FILE = "meta.json"
RNG_DIR = "rng"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_INFIX = ".tmp-"


@dataclass
class CheckpointConfig:
    """When to save, how many checkpoints to keep, and where to resume from."""

    every_steps: int = 0
    """Save every N optimizer steps; 0 saves only at the end of training and on SIGTERM/SIGUSR1."""
    keep_last: int = 3
    """How many complete checkpoints to keep; older ones are deleted after each successful save."""
    resume: str = "auto"
    """'auto' = newest complete checkpoint under <output_dir>/checkpoints if any, 'none', or a step_* folder."""
    save_on_signal: bool = True
    """On SIGTERM or SIGUSR1, save at the next step boundary and exit (SLURM preemption, torchrun shutdown)."""
    export_final: bool = True
    """Export the final weights as a Hugging Face safetensors folder (done by the trainer)."""

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.every_steps < 0:
            problems.append(
                ("every_steps", f"every_steps={self.every_steps} must be >= 1, or 0 to save only at the end / on signal")
            )
        if self.keep_last < 1:
            problems.append(("keep_last", f"keep_last={self.keep_last} must be >= 1 (the newest checkpoint is always kept)"))
        if not isinstance(self.resume, str) or not self.resume.strip():
            problems.append(
                ("resume", f"resume={self.resume!r} must be 'auto', 'none' or the path of a step_* checkpoint folder")
            )
        return problems


class _TrainState(Stateful):
    """Model (+ optimizer) as one DCP Stateful, so DCP reshards them when the world size changes.

    get_state_dict/set_state_dict turn FSDP2 DTensor shards or plain tensors into canonical-FQN state
    dicts; at load, get_state_dict also initialises a fresh optimizer's state so DCP can load into it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state_dict["model"])
        else:
            set_state_dict(
                self.model, self.optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"]
            )


class CheckpointManager:
    """Saves, finds, prunes and loads the checkpoints of one run under `<output_dir>/checkpoints/`.

    Every method is collective (call it on all ranks in the same order) except `latest`,
    `complete_checkpoints` and `should_save`, which only read the filesystem or the config.
    """

    def __init__(self, cfg: CheckpointConfig, output_dir: str | os.PathLike, mesh: Mesh) -> None:
        problems = cfg._validate()
        if problems:
            raise ValueError("invalid checkpoint config: " + "; ".join(f"checkpoint.{m}" for _, m in problems))
        self.cfg = cfg
        self.root = Path(output_dir) / "checkpoints"
        self.mesh = mesh

    # ---- finding checkpoints -------------------------------------------------------------

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest step first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if is_complete(p)), key=_step_of)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None; folders still being written (or left half-written) never count."""
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def should_save(self, step: int) -> bool:
        """Whether the periodic schedule saves after optimizer step `step`."""
        return self.cfg.every_steps > 0 and step > 0 and step % self.cfg.every_steps == 0

    def resume_path(self) -> Path | None:
        """The checkpoint to resume from according to `cfg.resume`, identical on every rank (collective).

        Rank 0 decides and broadcasts, so ranks with a slightly stale view of a shared filesystem
        still load the same checkpoint; a bad explicit path raises ValueError on every rank.
        """
        decision: list[Any] = [None, None]  # [path or None, error message or None]
        if self.mesh.rank == 0:
            try:
                decision[0] = self._resolve_resume()
            except ValueError as err:
                decision[1] = str(err)
        dist.broadcast_object_list(decision, src=0)
        if decision[1] is not None:
            raise ValueError(decision[1])
        path = None if decision[0] is None else Path(decision[0])
        logger.info("resume=%r -> %s", self.cfg.resume, path or "start from scratch")
        return path

    def _resolve_resume(self) -> str | None:
        mode = self.cfg.resume
        if mode == "none":
            return None
        if mode == "auto":
            path = self.latest()
            return None if path is None else str(path)
        path = Path(mode)
        if is_complete(path):
            return str(path)
        if not path.exists():
            reason = "does not exist"
        elif path.name.startswith("step_") and _TMP_INFIX in path.name:
            reason = "is a checkpoint that was never finished (interrupted while being written)"
        elif path.is_dir() and not (path / COMPLETE_MARKER).exists() and not _STEP_RE.match(path.name):
            reason = "is not a step_* checkpoint folder"
        else:
            reason = f"has no {COMPLETE_MARKER} marker (interrupted while being written)"
        hint = "set checkpoint.resume=auto (newest complete checkpoint), none, or a complete step_* folder"
        # Point at the newest complete checkpoint near the given path: the usual mistake is naming the
        # output or checkpoints folder, or an interrupted sibling.
        nearby = [c for d in (path, path / "checkpoints", path.parent) if d.is_dir() for c in d.iterdir() if is_complete(c)]
        if nearby:
            hint += f", e.g. {max(nearby, key=_step_of)}"
        raise ValueError(f"checkpoint.resume={mode!r} {reason}: {hint}")

    # ---- saving ----------------------------------------------------------------------------

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint `step` atomically and prune old ones (collective); returns its final path.

        `extra` is trainer state (step, data position, W&B run id, ...): picklable and identical on all
        ranks. Saving a step that already has a complete checkpoint is a no-op returning it.
        """
        final = self.root / f"step_{step:08d}"
        # One agreed temporary name: ranks must write their shards into the same folder.
        plan: list[Any] = [uuid.uuid4().hex[:8], is_complete(final)]
        dist.broadcast_object_list(plan, src=0)
        nonce, exists = plan
        if exists:
            logger.info("checkpoint %s already exists; not saving it again", final)
            return final
        tmp = self.root / f"{final.name}{_TMP_INFIX}{nonce}"
        start = time.monotonic()
        extra = self._agree_on_extra(extra or {})

        state: dict[str, Any] = {"train": _TrainState(model, optimizer), "extra": _pickled(extra)}
        if scheduler is not None:
            state["scheduler"] = scheduler  # LR schedulers are Stateful; their small state is pickled by DCP
        dcp.save(state, checkpoint_id=tmp)
        # RNG state is per rank (dropout masks, sampling) and cannot be resharded, so each rank keeps its own file.
        (tmp / RNG_DIR).mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), tmp / RNG_DIR / f"rank_{self.mesh.rank}.pt")

        # Every rank's files are on disk before rank 0 declares the checkpoint complete.
        dist.barrier()
        if self.mesh.rank == 0:
            self._finalize(tmp, final, step)
        # Nobody returns (and possibly exits on a signal) before the checkpoint is visible and pruned.
        dist.barrier()
        logger.info("saved checkpoint %s in %.1fs", final, time.monotonic() - start)
        return final

    def _agree_on_extra(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Rank 0's `extra`, after checking that every rank passed the same one.

        DCP keeps one copy of a non-tensor entry saved by all ranks (from whichever rank it picks),
        so per-rank trainer state would silently come back as another rank's; fail loudly instead.
        """
        ref = [extra]
        dist.broadcast_object_list(ref, src=0)
        try:
            same = bool(ref[0] == extra)
        except Exception:  # noqa: BLE001 - e.g. tensors inside: cannot compare cheaply, rank 0's copy is saved
            same = True
        flags: list[Any] = [None] * self.mesh.world_size
        dist.all_gather_object(flags, same)
        differ = [r for r, ok in enumerate(flags) if not ok]
        if differ:
            raise ValueError(
                f"checkpoint extra differs between rank 0 and rank(s) {differ}: trainer state passed to "
                "CheckpointManager.save must be identical on all ranks (derive per-rank positions from it on load)"
            )
        return ref[0]

    def _finalize(self, tmp: Path, final: Path, step: int) -> None:
        meta = {
            "step": step,
            "world_size": self.mesh.world_size,
            "dp_size": self.mesh.dp_size,
            "sp_size": self.mesh.sp_size,
            "torch_version": torch.__version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_durably(tmp / META_FILE, json.dumps(meta, indent=2) + "\n")
        # The marker is written last inside the temporary folder and the rename publishes it, so a
        # step_* folder is complete even on filesystems where directory rename is not atomic.
        _write_durably(tmp / COMPLETE_MARKER, "")
        os.replace(tmp, final)
        _fsync_dir(self.root)
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        """Delete complete checkpoints beyond keep_last and stale temporary folders (rank 0 only)."""
        done = self.complete_checkpoints()
        # Ordered by step; the one just written is never pruned, even when newer steps exist (a resume
        # from an explicit older checkpoint), which would otherwise sort after it.
        old = [p for p in done[: max(0, len(done) - self.cfg.keep_last)] if p != keep]
        newer = done[done.index(keep) + 1 :]
        if newer:
            logger.warning(
                "checkpoints newer than %s exist (%s), from a run resumed at an earlier step; "
                "resume=auto would pick them: delete them if they belong to the abandoned run",
                keep.name, ", ".join(p.name for p in newer),
            )
        stale = [p for p in self.root.iterdir() if _TMP_INFIX in p.name]
        for path in old:
            # Unpublish first (rename), then delete: a crash mid-delete must not leave a "complete" husk.
            doomed = path.with_name(f"{path.name}{_TMP_INFIX}deleting-{uuid.uuid4().hex[:8]}")
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            logger.info("deleted old checkpoint %s (keep_last=%d)", path.name, self.cfg.keep_last)
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("deleted incomplete checkpoint folder %s", path.name)

    # ---- loading ---------------------------------------------------------------------------

    def load(
        self,
        path: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        restore_rng: bool = True,
    ) -> dict[str, Any]:
        """Restore model (and optimizer, scheduler, this rank's RNG) from `path` (collective); returns `extra`.

        Model and optimizer are resharded by DCP, so a different world size or mesh works; RNG
        states are per rank and are restored only when the world size matches (warning otherwise).
        `optimizer=None` loads the weights alone (evaluation, export).
        """
        path = Path(path)
        if not is_complete(path):
            raise ValueError(
                f"{path} is not a complete checkpoint (missing or without its {COMPLETE_MARKER} marker): "
                "pass a step_* folder from a finished save, or use CheckpointManager.latest()"
            )
        meta = json.loads((path / META_FILE).read_text())
        state: dict[str, Any] = {"train": _TrainState(model, optimizer), "extra": io.BytesIO()}
        if scheduler is not None:
            state["scheduler"] = scheduler
        dcp.load(state, checkpoint_id=path)
        extra = _unpickled(state["extra"])

        if restore_rng:
            rng_file = path / RNG_DIR / f"rank_{self.mesh.rank}.pt"
            if meta["world_size"] != self.mesh.world_size:
                logger.warning(
                    "checkpoint %s was saved with world size %d, resuming with %d: model and optimizer are "
                    "resharded, but per-rank RNG states are not restored (dropout/sampling will differ)",
                    path, meta["world_size"], self.mesh.world_size,
                )
            elif not rng_file.exists():
                logger.warning("checkpoint %s has no RNG state for rank %d", path, self.mesh.rank)
            else:
                # Restored last: get_state_dict's optimizer initialisation above must not consume the restored stream.
                _set_rng_state(torch.load(rng_file, weights_only=False))
        logger.info("loaded checkpoint %s (step %s)", path, meta["step"])
        return extra


def is_complete(path: str | os.PathLike) -> bool:
    """Whether `path` is a finished checkpoint: a step_* folder with its completion marker and DCP metadata."""
    path = Path(path)
    return (
        _STEP_RE.match(path.name) is not None
        and (path / COMPLETE_MARKER).is_file()
        and (path / ".metadata").is_file()
    )


def _step_of(path: Path) -> int:
    match = _STEP_RE.match(path.name)
    return int(match.group(1)) if match else -1


# ---- pickled trainer state and RNG --------------------------------------------------------------


def _pickled(obj: Any) -> io.BytesIO:
    """Trainer state as one opaque blob: DCP would otherwise flatten the dict and need its keys at load."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _unpickled(value: Any) -> Any:
    # DCP's default planner already torch.loads byte entries; accept a raw stream too in case that changes.
    if isinstance(value, io.BytesIO):
        value.seek(0)
        return torch.load(value, weights_only=False)
    return value


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's current device
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist a rename: without it a power loss can undo it on some local filesystems."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network filesystems refuse fsync on directories; the rename is still visible
    finally:
        os.close(fd)


# ---- save and exit on signal --------------------------------------------------------------------


class SignalFlag:
    """Turns SIGTERM / SIGUSR1 into a flag that the training loop polls at step boundaries.

    The handler only records the signal (no I/O, no collectives: it can interrupt anything);
    `agreed` makes all ranks decide together, because launchers often signal one node or one
    process first, and ranks that disagree on the step to stop at hang in the next collective.
    Use as a context manager (handlers are restored on exit), or call `install` and `restore`.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, enabled: bool = True, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.enabled = enabled
        self.signals = signals
        self.received = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> SignalFlag:
        """Install the handlers (main thread only), remembering the previous ones; a no-op when disabled."""
        if self.enabled:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were installed before `install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def agreed(self, mesh: Mesh) -> int:
        """The signal number if any rank received one, else 0; the same on every rank.

        Collective (one tiny all_reduce): call it on all ranks at every step boundary. Without
        `enabled` it returns 0 without communicating, which is consistent since every rank shares
        the config.
        """
        if not self.enabled:
            return 0
        flag = torch.tensor([self.received], dtype=torch.int64, device=mesh.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def should_save_and_exit(self, mesh: Mesh) -> bool:
        """Whether any rank received SIGTERM or SIGUSR1 (collective, like `agreed`)."""
        return self.agreed(mesh) != 0

    def __enter__(self) -> SignalFlag:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()
