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
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from ringtrain.config import RESUME_MODES, CheckpointConfig
from ringtrain.errors import ConfigError
from ringtrain.log import describe_exception, get_logger
from ringtrain.parallel.distributed import Mesh

logger = get_logger(__name__)

COMPLETE_MARKER = "COMPLETE"
META_FILE = "meta.json"
RNG_DIR = "rng"
DCP_INDEX = ".metadata"
MODEL_PREFIX = "train.model."  # DCP key prefix of the model tensors (see _TrainState)
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_INFIX = ".tmp-"


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
        self._skipped: set[Path] = set()  # folders resume found unusable (reported when it skipped them)

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

    def step_folders(self) -> list[Path]:
        """Every step_* folder, complete or not (saves in progress, *.tmp-*, excluded), oldest step first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if _STEP_RE.match(p.name)), key=_step_of)

    def should_save(self, step: int) -> bool:
        """Whether the periodic schedule saves after optimizer step `step`."""
        return self.cfg.every_steps > 0 and step > 0 and step % self.cfg.every_steps == 0

    def run_folder_problems(self) -> list[str]:
        """Why this run may not start in its folder (filesystem only, any rank): a run folder holds one run.

        Starting fresh (resume=none), or from a checkpoint of another folder, where an earlier run left
        checkpoints would mix the two (resume=auto would later pick the old ones), unless `overwrite` clears them.
        """
        mode = self.cfg.resume
        foreign = mode not in RESUME_MODES and Path(mode).resolve().parent != self.root.resolve()
        old = self.step_folders()
        if self.cfg.overwrite or not old or not (mode == "none" or foreign):
            return []
        start = "checkpoint.resume=none" if mode == "none" else f"checkpoint.resume={mode!r} (another folder)"
        return [f"{start}, but {self.root} holds {len(old)} checkpoint(s) of an earlier run (newest {old[-1].name}): "
                "choose a new train.output_dir, resume that run with checkpoint.resume=auto, or set "
                "checkpoint.overwrite=true to delete them and start over"]

    def resume_path(self) -> Path | None:
        """The checkpoint `resume` would load first, identical on every rank (collective); None to start fresh.

        Rank 0 decides and broadcasts, so ranks with a slightly stale view of a shared filesystem still agree.
        A bad explicit path, a refused fresh start (`run_folder_problems`) or, with 'auto', step folders none of
        which is usable raise ConfigError on every rank. Unusable folders are skipped with a warning.
        """
        plan = self._decided_by_rank0(self._resume_plan)
        for name, problem in plan:
            if problem is None:
                logger.info("resume=%r -> %s", self.cfg.resume, name)
                return Path(name)
            self._warn_skipped(Path(name), problem)
        if plan:
            raise self._no_usable_checkpoint(plan)
        logger.info("resume=%r -> start from scratch", self.cfg.resume)
        return None

    def resume(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        check: Callable[[Path, dict[str, Any]], list[str]] | None = None,
    ) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
        """Load the checkpoint `resume` names (collective): (path, extra, meta.json), or None to start fresh.

        'auto' takes the newest usable checkpoint: folders that are incomplete, miss or truncate a file, or fail to
        load are skipped with one warning each, falling back to the next older one. `check(path, meta)` runs on
        rank 0 before loading; problems it returns (settings the checkpoint cannot follow) refuse the resume.
        Refusals and "nothing usable" raise ConfigError on every rank, before anything was changed on disk.
        """
        explicit = self.cfg.resume not in RESUME_MODES
        plan = self._decided_by_rank0(self._resume_plan)
        for name, problem in plan:
            path = Path(name)
            if problem is not None:
                self._warn_skipped(path, problem)
                continue
            meta = self._decided_by_rank0(lambda path=path: self._checked_meta(path, check))
            try:
                extra = self.load(path, model, optimizer, scheduler)
            except CheckpointUnreadable as err:
                if explicit:
                    raise ConfigError([self._resume_error(path, f"cannot be read ({err})")], agreed=True) from None
                self._warn_skipped(path, f"cannot be read ({err})")
                continue
            return path, extra, meta
        if plan:
            raise self._no_usable_checkpoint(plan)
        return None

    def begin(self, resumed: Path | None) -> None:
        """Make the run folder hold this run alone, once it is known to start (collective).

        Deletes the step folders after the resumed one (an abandoned continuation, or left over from a failed
        save: the resumed run replaces them), or with `overwrite` an earlier run's checkpoints.
        """
        if self.mesh.rank == 0:
            inside = resumed is not None and resumed.resolve().parent == self.root.resolve()
            if inside:
                doomed = [p for p in self.step_folders() if _step_of(p) > _step_of(resumed)]
                # Unusable ones were reported when resume skipped them; good ones are news.
                good = [p.name for p in doomed if p not in self._skipped]
                if good:
                    logger.warning("resuming from %s: deleting the newer checkpoint(s) %s, which this run replaces",
                                   resumed.name, ", ".join(good))
                if len(good) < len(doomed):
                    logger.info("deleting the unusable checkpoint folder(s) %s",
                                ", ".join(p.name for p in doomed if p.name not in good))
            else:
                doomed = self.step_folders() if self.cfg.overwrite else []
                if doomed:
                    logger.warning("checkpoint.overwrite=true: deleting the %d checkpoint(s) of the earlier run in %s",
                                   len(doomed), self.root)
            for path in doomed:
                _unpublish_and_delete(path)
        dist.barrier()

    def _resume_plan(self) -> list[tuple[str, str | None]]:
        """(folder, why it is unusable or None) in the order resume tries them; rank 0 only."""
        mode = self.cfg.resume
        if mode not in RESUME_MODES:
            problem = checkpoint_problem(mode)
            if problem is not None:
                raise ConfigError([self._resume_error(Path(mode), problem)])
        problems = self.run_folder_problems()
        if problems:
            raise ConfigError(problems)
        if mode == "none":
            return []
        if mode == "auto":
            return [(str(p), checkpoint_problem(p)) for p in reversed(self.step_folders())]
        return [(mode, None)]

    def _resume_error(self, path: Path, reason: str) -> str:
        hint = "set checkpoint.resume=auto (newest complete checkpoint), none, or a complete step_* folder"
        # Point at the newest usable checkpoint near the given path: the usual mistake is naming the
        # output or checkpoints folder, or an interrupted sibling.
        nearby = [c for d in (path, path / "checkpoints", path.parent) if d.is_dir() for c in d.iterdir()
                  if c != path and checkpoint_problem(c) is None]
        if nearby:
            hint += f", e.g. {max(nearby, key=_step_of)}"
        return f"checkpoint.resume={self.cfg.resume!r} {reason}: {hint}"

    def _checked_meta(self, path: Path, check: Callable[[Path, dict[str, Any]], list[str]] | None) -> dict[str, Any]:
        meta = json.loads((path / META_FILE).read_text())
        problems = check(path, meta) if check is not None else []
        if problems:
            raise ConfigError(problems)
        return meta

    def _warn_skipped(self, path: Path, problem: str) -> None:
        self._skipped.add(path)
        if self.mesh.rank == 0:  # every rank knows; one line for the job
            logger.warning("skipping checkpoint %s: it %s", path, problem)

    def _no_usable_checkpoint(self, plan: list[tuple[str, str | None]]) -> ConfigError:
        """'auto' found step folders but could use none: starting fresh instead would mix two runs."""
        return ConfigError([
            f"checkpoint.resume=auto: none of the {len(plan)} checkpoint(s) in {self.root} is usable (see the "
            "warnings above): resume from a good copy with checkpoint.resume=<step_* folder>, or start over with "
            "checkpoint.resume=none checkpoint.overwrite=true"], agreed=True)

    def _decided_by_rank0(self, decide: Callable[[], Any]) -> Any:
        """decide() on rank 0, broadcast; its ConfigError is raised on every rank (agreed), as is any other error."""
        outcome: list[Any] = [None, None, None]  # result, config problems, another error's description
        error = None
        if self.mesh.rank == 0:
            try:
                outcome[0] = decide()
            except ConfigError as err:
                outcome[1] = err.problems
            except Exception as err:  # noqa: BLE001 - re-raised below; the other ranks must not wait for rank 0
                error, outcome[2] = err, describe_exception(err)
        dist.broadcast_object_list(outcome, src=0)
        if outcome[1] is not None:
            raise ConfigError(outcome[1], agreed=True)
        if error is not None:
            raise error
        if outcome[2] is not None:
            raise RuntimeError(f"rank 0 failed while choosing the checkpoint: {outcome[2]}")
        return outcome[0]

    # ---- saving ----------------------------------------------------------------------------

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None = None,
        extra: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint `step` atomically and prune old ones (collective); returns its final path.

        `extra` is trainer state (step, data position, W&B run id, ...): picklable and identical on all
        ranks. `meta` adds JSON fields to meta.json (rank 0's copy), readable without loading the checkpoint,
        e.g. the run's config. Saving a step that already has a complete checkpoint is a no-op returning it;
        a step folder left over from a save that did not finish is replaced.
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
            self._finalize(tmp, final, step, meta or {})
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

    def _finalize(self, tmp: Path, final: Path, step: int, more: dict[str, Any]) -> None:
        meta = {
            **more,
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
        if final.exists():
            # Left over from a save that did not finish (no marker, or a file lost): never a checkpoint of
            # this run, which would have been complete. Renaming onto a non-empty folder fails, so move it aside.
            logger.warning("replacing %s, an unusable folder left over from an earlier save", final)
            _unpublish_and_delete(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        """Delete complete checkpoints beyond keep_last and stale temporary folders (rank 0 only)."""
        done = self.complete_checkpoints()
        # Ordered by step; the one just written is never pruned, even if newer steps sort after it.
        old = [p for p in done[: max(0, len(done) - self.cfg.keep_last)] if p != keep]
        stale = [p for p in self.root.iterdir() if _TMP_INFIX in p.name]
        for path in old:
            _unpublish_and_delete(path)
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
        `optimizer=None` loads the weights alone (evaluation, export). A checkpoint that fails to load on any
        rank (a corrupt file; torch's CheckpointException included) raises CheckpointUnreadable on every rank,
        so that all of them can go on to another one together.
        """
        path = Path(path)
        if not is_complete(path):
            raise ValueError(
                f"{path} is not a complete checkpoint (missing or without its {COMPLETE_MARKER} marker): "
                "pass a step_* folder from a finished save, or use CheckpointManager.latest()"
            )
        error = None
        try:
            extra = self._load(path, model, optimizer, scheduler, restore_rng)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - CheckpointException is a BaseException
            error = describe_exception(err)
        errors = [error]
        if dist.is_initialized() and dist.get_world_size() > 1:
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
        failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
        if failed:
            rank, first = failed[0]
            everywhere = len(failed) == len(errors) and all(e == first for _, e in failed)  # e.g. DCP's own error
            raise CheckpointUnreadable(first if everywhere else f"rank {rank}: {first}")
        return extra

    def _load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any | None,
              restore_rng: bool) -> dict[str, Any]:
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


class CheckpointUnreadable(RuntimeError):
    """A checkpoint that looked complete failed to load (raised on every rank); the message names the first error."""


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be resumed from, judged from its files without reading a tensor; None if it looks usable.

    Catches what a crash, a full disk or a careless copy leaves: no completion marker, an unreadable index, and
    data files that are missing or shorter than the index says. The phrase completes "checkpoint X ...".
    """
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if path.name.startswith("step_") and _TMP_INFIX in path.name:
        return "is a checkpoint that was never finished (interrupted while being written)"
    if not _STEP_RE.match(path.name) or not path.is_dir():
        return "is not a step_* checkpoint folder"
    if not (path / COMPLETE_MARKER).is_file():
        return f"has no {COMPLETE_MARKER} marker (interrupted while being written)"
    for name in (DCP_INDEX, META_FILE):
        if not (path / name).is_file():
            return f"has no {name} file"
    for name, read in ((META_FILE, lambda: json.loads((path / META_FILE).read_text())),
                       (DCP_INDEX, lambda: FileSystemReader(str(path)).read_metadata())):
        try:
            index = read()
        except Exception as err:  # noqa: BLE001 - whatever the damage, the checkpoint cannot be used
            return f"has an unreadable {name} ({describe_exception(err)})"
    needed: dict[str, int] = {}  # data file -> bytes the index says it holds
    for info in index.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"is missing its data file {name}"
        if file.stat().st_size < size:
            return f"has a truncated data file {name} ({file.stat().st_size} of {size} bytes)"
    return None


def model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The model's tensors as checkpoints store them (canonical names) with their global shapes (FSDP included)."""
    return {name: tuple(t.shape) for name, t in get_model_state_dict(model).items()}


def model_mismatches(path: str | os.PathLike, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """How the model tensors in checkpoint `path` differ from `shapes` (see `model_shapes`), one phrase each."""
    index = FileSystemReader(str(path)).read_metadata()
    saved = {key[len(MODEL_PREFIX):]: tuple(item.size) for key, item in index.state_dict_metadata.items()
             if key.startswith(MODEL_PREFIX) and hasattr(item, "size")}
    out = []
    for name, shape in shapes.items():
        if name not in saved:
            out.append(f"{name} is not in the checkpoint")
        elif saved[name] != shape:
            out.append(f"{name} is {list(saved[name])} in the checkpoint and {list(shape)} in the model")
    out += [f"{name} is in the checkpoint, not in the model" for name in saved if name not in shapes]
    return out


def is_complete(path: str | os.PathLike) -> bool:
    """Whether `path` is a finished checkpoint: a step_* folder with its completion marker and DCP metadata."""
    path = Path(path)
    return (
        _STEP_RE.match(path.name) is not None
        and (path / COMPLETE_MARKER).is_file()
        and (path / ".metadata").is_file()
    )


def _unpublish_and_delete(path: Path) -> None:
    """Rename a checkpoint folder out of the step_* namespace, then delete it: a crash mid-delete must not leave
    a folder that looks complete with files missing (the renamed husk is swept as a *.tmp-* folder)."""
    doomed = path.with_name(f"{path.name}{_TMP_INFIX}deleting-{uuid.uuid4().hex[:8]}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


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
    """Turns SIGINT / SIGTERM / SIGUSR1 into a flag that the training loop polls at step boundaries.

    The first signal is only recorded (no collectives: it can interrupt anything) and announced; `agreed`
    makes all ranks decide together, because launchers often signal one node or one process first, and ranks
    that disagree on the step to stop at hang in the next collective. A second signal ends the process at
    once, without saving (exit 128 + its number), except the same signal again within `REPEAT_WINDOW_S`:
    SLURM signals every process of a step while torchrun forwards the same signal to its ranks, so one
    request can arrive twice. (torchrun turns a second Ctrl-C into SIGTERM for its ranks.)
    Use as a context manager (handlers are restored on exit), or call `install` and `restore`.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    REPEAT_WINDOW_S = 2.0

    def __init__(self, enabled: bool = True, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.enabled = enabled
        self.signals = signals
        self.received = 0
        self._received_at = 0.0
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
        now = time.monotonic()
        name = signal.Signals(signum).name
        if not self.received:
            self.received, self._received_at = signum, now
            _log_in_handler(logger.info, "received %s: finishing this step, then saving a checkpoint and exiting "
                                         "(75); a second signal stops at once, without saving", name)
            return
        if signum == self.received and now - self._received_at < self.REPEAT_WINDOW_S:
            return  # the same request delivered twice (see the class docstring)
        _log_in_handler(logger.warning, "%s after %s: stopping at once, without saving (exit %d)",
                        name, signal.Signals(self.received).name, 128 + signum)
        os._exit(128 + signum)

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
        """Whether any rank received SIGINT, SIGTERM or SIGUSR1 (collective, like `agreed`)."""
        return self.agreed(mesh) != 0

    def __enter__(self) -> SignalFlag:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _log_in_handler(log: Callable[..., None], message: str, *args: Any) -> None:
    """Log from a signal handler. It runs between two bytecodes of the main thread, which may be inside a write
    to the same stream: that write's "reentrant call" error must not escape into the interrupted code."""
    try:
        log(message, *args)
    except Exception:  # noqa: BLE001 - losing one log line is better than breaking the interrupted code
        pass
