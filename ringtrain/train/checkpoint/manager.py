"""Atomic, resumable training checkpoints with torch.distributed.checkpoint (DCP): save, find, prune, load, resume.

Layout, atomicity and resume rules are documented in docs/checkpoints.md; the files themselves in files.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from ringtrain.config import RESUME_MODES, CheckpointConfig
from ringtrain.errors import ConfigError, DiskFull, RunStopped
from ringtrain.log import describe_exception, get_logger
from ringtrain.parallel.agree import agree
from ringtrain.train.checkpoint.files import (
    CHECKSUMS,
    COMPLETE_MARKER,
    META_FILE,
    RNG_DIR,
    checkpoint_files,
    checkpoint_problem,
    checksum_text,
    digest,
    disk_full,
    file_sha256,
    fsync_dir,
    is_complete,
    is_step_folder,
    is_temporary,
    read_checksums,
    read_meta,
    step_folder,
    step_of,
    temporary_folder,
    temporary_owner,
    unpublish_and_delete,
    write_durably,
    written_by,
)
from ringtrain.train.checkpoint.resume import TRAINED_STATE
from ringtrain.train.runlock import new_run_id, read_lock

if TYPE_CHECKING:
    from ringtrain.parallel.dims import ParallelDims

logger = get_logger(__name__)


class _TrainState(Stateful):
    """Model (+ optimizer) as one DCP Stateful, so DCP reshards them when the world size changes.

    get_state_dict/set_state_dict turn FSDP2 DTensor shards or plain tensors into canonical-FQN state
    dicts; at load, get_state_dict also initialises a fresh optimizer's state so DCP can load into it.
    Only what trains is saved (`TRAINED_STATE`): with LoRA the frozen base weights come from the base model.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model, options=TRAINED_STATE)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=TRAINED_STATE)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Not strict: the frozen weights are not in the dict. DCP has already filled every tensor it asked for.
        options = dataclasses.replace(TRAINED_STATE, strict=False)
        if self.optimizer is None:
            set_model_state_dict(self.model, state_dict["model"], options=options)
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                           optim_state_dict=state_dict["optim"], options=options)


class CheckpointManager:
    """Saves, finds, prunes and loads the checkpoints of one run under `<output_dir>/checkpoints/`.

    Every method is collective (call it on all ranks in the same order) except `latest`,
    `complete_checkpoints` and `should_save`, which only read the filesystem or the config.
    """

    def __init__(self, cfg: CheckpointConfig, output_dir: str | os.PathLike, dims: ParallelDims,
                 run_id: str | None = None, run_meta: dict[str, Any] | None = None) -> None:
        """`run_id`: the run holding the folder's lock (train/runlock.py); a save then first checks that it still
        does. Temporary folders carry the run id (rank 0's: a random one without it), so cleanup can tell a live
        run's saves in progress from debris. `run_meta`: fields every checkpoint of the run records in meta.json
        (the trainer's data and tokenizer fingerprints)."""
        problems = cfg._validate()
        if problems:
            raise ValueError("invalid checkpoint config: " + "; ".join(f"checkpoint.{m}" for _, m in problems))
        self.cfg = cfg
        self.root = Path(output_dir) / "checkpoints"
        self.dims = dims
        self.locked = run_id is not None
        self.run_id = run_id or new_run_id()
        self.run_meta = dict(run_meta or {})
        self._skipped: set[Path] = set()  # folders resume found unusable (reported when it skipped them)

    # ---- finding checkpoints -------------------------------------------------------------

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest step first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if is_complete(p)), key=step_of)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None; folders still being written (or left half-written) never count."""
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def step_folders(self) -> list[Path]:
        """Every step_* folder, complete or not (saves in progress, *.tmp-*, excluded), oldest step first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if is_step_folder(p)), key=step_of)

    def should_save(self, step: int) -> bool:
        """Whether the periodic schedule saves after optimizer step `step`."""
        return self.cfg.every_steps > 0 and step > 0 and step % self.cfg.every_steps == 0

    def run_folder_problems(self) -> list[str]:
        """Why this run may not start in its folder (filesystem only, any rank): a run folder holds one run.

        Starting fresh (resume=none), or from a checkpoint of another folder, where an earlier run left
        checkpoints would mix the two (resume=auto would later pick the old ones), unless `overwrite` clears them.
        """
        mode = self.cfg.resume
        if self._own_folder(mode):
            return [self._resume_error(Path(mode), "")]
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
        path = next(self._resumable(), None)
        if path is None:
            logger.info("resume=%r -> start from scratch", self.cfg.resume)
        else:
            logger.info("resume=%r -> %s", self.cfg.resume, path)
        return path

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
        for path in self._resumable():
            damaged = self._checksum_problem(path)
            if damaged is not None:
                if explicit:
                    raise ConfigError([self._resume_error(path, damaged)], agreed=True)
                self._warn_skipped(path, damaged)
                continue
            meta = agree(lambda path=path: self._checked_meta(path, check), what="choosing the checkpoint")
            try:
                extra = self.load(path, model, optimizer, scheduler)
            except CheckpointUnreadable as err:
                if explicit:
                    raise ConfigError([self._resume_error(path, f"cannot be read ({err})")], agreed=True) from None
                self._warn_skipped(path, f"cannot be read ({err})")
                continue
            return path, extra, meta
        return None

    def _checksum_problem(self, path: Path) -> str | None:
        """Whether checkpoint `path`'s files still match their SHA256SUMS (collective: each rank hashes a share of
        them); the problem, completing "checkpoint X ...", or None. A checkpoint saved without sums passes."""
        if not self.cfg.checksums:
            return None
        sums = agree(lambda: read_checksums(path), what="reading the checkpoint's checksums")
        if sums is None:
            logger.info("checkpoint %s has no %s: its files cannot be verified", path, CHECKSUMS)
            return None
        mine = None
        for name in sorted(sums)[self.dims.rank::self.dims.world_size]:
            file = path / name
            if not file.is_file():
                mine = f"is missing its file {name}"
            elif file_sha256(file) != sums[name]:
                mine = f"has a file {name} that does not match its checksum in {CHECKSUMS} (damaged since it was saved)"
            if mine:
                break
        found: list[str | None] = [None] * self.dims.world_size
        dist.all_gather_object(found, mine)
        return next((p for p in found if p), None)

    def _resumable(self) -> Iterator[Path]:
        """The checkpoints a resume tries, in its order (collective: rank 0 plans, so every rank walks the same).

        Folders that cannot be used are skipped with a warning. Walking past the last one raises ConfigError
        (nothing usable, where starting fresh would mix two runs); with no step folder at all the walk is empty.
        """
        plan = agree(self._resume_plan, what="choosing the checkpoint")
        for name, problem in plan:
            if problem is None:
                yield Path(name)
            else:
                self._warn_skipped(Path(name), problem)
        if plan:
            raise self._no_usable_checkpoint(plan)

    def begin(self, resumed: Path | None) -> None:
        """Make the run folder hold this run alone, once it is known to start (collective).

        Deletes the step folders after the resumed one (an abandoned continuation, or left over from a failed
        save: the resumed run replaces them), or with `overwrite` an earlier run's checkpoints.
        """
        if self.dims.rank == 0:
            inside = resumed is not None and resumed.resolve().parent == self.root.resolve()
            if inside:
                doomed = [p for p in self.step_folders() if step_of(p) > step_of(resumed)]
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
                unpublish_and_delete(path)
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

    def _own_folder(self, mode: str) -> bool:
        """Whether checkpoint.resume names this run's own checkpoints folder or run folder rather than a checkpoint."""
        return mode not in RESUME_MODES and Path(mode).resolve() in (self.root.resolve(), self.root.parent.resolve())

    def _resume_error(self, path: Path, reason: str) -> str:
        if self._own_folder(str(path)):
            newest = self.latest()
            which = "checkpoints folder" if path.resolve() == self.root.resolve() else "folder"
            return (f"checkpoint.resume={self.cfg.resume!r} is this run's own {which}, not a checkpoint: set "
                    "checkpoint.resume=auto to continue from its newest complete "
                    f"checkpoint{f' ({newest})' if newest else ''}, or name one of its step_* folders")
        hint = "set checkpoint.resume=auto (newest complete checkpoint), none, or a complete step_* folder"
        # Point at the newest usable checkpoint near the given path: the usual mistake is naming the
        # output or checkpoints folder, or an interrupted sibling.
        nearby = [c for d in (path, path / "checkpoints", path.parent) if d.is_dir() for c in d.iterdir()
                  if c != path and checkpoint_problem(c) is None]
        if nearby:
            hint += f", e.g. {max(nearby, key=step_of)}"
        return f"checkpoint.resume={self.cfg.resume!r} {reason}: {hint}"

    def _checked_meta(self, path: Path, check: Callable[[Path, dict[str, Any]], list[str]] | None) -> dict[str, Any]:
        meta = read_meta(path)
        problems = check(path, meta) if check is not None else []
        if problems:
            raise ConfigError(problems)
        return meta

    def _warn_skipped(self, path: Path, problem: str) -> None:
        self._skipped.add(path)
        if self.dims.rank == 0:  # every rank knows; one line for the job
            logger.warning("skipping checkpoint %s: it %s", path, problem)

    def _no_usable_checkpoint(self, plan: list[tuple[str, str | None]]) -> ConfigError:
        """'auto' found step folders but could use none: starting fresh instead would mix two runs."""
        return ConfigError([
            f"checkpoint.resume=auto: none of the {len(plan)} checkpoint(s) in {self.root} is usable (see the "
            "warnings above): resume from a good copy with checkpoint.resume=<step_* folder>, or start over with "
            "checkpoint.resume=none checkpoint.overwrite=true"], agreed=True)

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
        final = step_folder(self.root, step)
        # One agreed temporary name: ranks must write their shards into the same folder.
        owner, nonce, exists = agree(lambda: self._before_save(final), what="naming the checkpoint")
        if exists:
            logger.info("checkpoint %s already exists; not saving it again", final)
            return final
        tmp = temporary_folder(final, nonce, owner)
        start = time.monotonic()
        extra = self._agree_on_extra(extra or {})
        try:
            self._write(tmp, final, step, model, optimizer, scheduler, extra, meta)
        except BaseException as err:  # noqa: BLE001 - torch's CheckpointException is a BaseException
            free = disk_full(err, self.root)
            if free is None:
                raise
            if self.dims.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the run stops here
            last = self.latest()
            raise DiskFull(
                f"no space left on device writing checkpoint {final.name} in {self.root} ({free} bytes free): free "
                "space or move train.output_dir, then resume (checkpoint.resume=auto continues from "
                f"{last.name if last else 'the start'})") from None
        logger.info("saved checkpoint %s in %.1fs", final, time.monotonic() - start)
        return final

    def _write(self, tmp: Path, final: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any | None, extra: dict[str, Any], meta: dict[str, Any] | None) -> None:
        """save's writes and commit (collective)."""
        state: dict[str, Any] = {"train": _TrainState(model, optimizer), "extra": _pickled(extra)}
        if scheduler is not None:
            state["scheduler"] = scheduler  # LR schedulers are Stateful; their small state is pickled by DCP
        dcp.save(state, checkpoint_id=tmp)
        # RNG state is per rank (dropout masks, sampling) and cannot be resharded, so each rank keeps its own file.
        (tmp / RNG_DIR).mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), tmp / RNG_DIR / f"rank_{self.dims.rank}.pt")
        # Each rank hashes what it wrote (a share of the reading, and from its own writes, not a copy seen later).
        mine = {name: file_sha256(tmp / name) for name in written_by(tmp, self.dims.rank) if (tmp / name).is_file()} \
            if self.cfg.checksums else {}

        # Every rank's files are on disk (and hashed) before rank 0 declares the checkpoint complete.
        sums: list[dict[str, str]] = [{}] * self.dims.world_size
        dist.all_gather_object(sums, mine)
        if self.dims.rank == 0:
            merged = {name: h for part in sums for name, h in part.items()} if self.cfg.checksums else None
            self._finalize(tmp, final, step, meta or {}, merged)
        # Nobody returns (and possibly exits on a signal) before the checkpoint is visible and pruned.
        dist.barrier()

    def _before_save(self, final: Path) -> tuple[str, str, bool]:
        """Rank 0, before a save: the folder is still this run's, debris of dead runs is cleared; the names to use."""
        if self.locked:
            holder = read_lock(self.root.parent)
            if not holder or holder.get("run_id") != self.run_id:
                raise RunStopped(
                    f"this run (id {self.run_id}) no longer holds {self.root.parent}: another run took it over; "
                    "stopping without saving, so as not to mix two runs' checkpoints")
        self._sweep()
        return self.run_id, uuid.uuid4().hex[:8], is_complete(final)

    def _sweep(self) -> None:
        """Delete temporary folders left by this run or by runs that are gone (rank 0); a live holder's stay."""
        if not self.root.is_dir():
            return
        holder = read_lock(self.root.parent) or {}
        live = holder.get("run_id") if holder.get("run_id") != self.run_id else None
        for path in self.root.iterdir():
            if is_temporary(path) and (live is None or temporary_owner(path) != live):
                shutil.rmtree(path, ignore_errors=True)
                logger.info("deleted incomplete checkpoint folder %s", path.name)

    def _agree_on_extra(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Rank 0's `extra`, after checking that every rank passed the same one.

        DCP keeps one copy of a non-tensor entry saved by all ranks (from whichever rank it picks),
        so per-rank trainer state would silently come back as another rank's; fail loudly instead. Ranks compare
        digests (`files.digest`): `==` raises on tensors and calls NaN unequal to itself, and state that cannot be
        compared must never pass as equal.
        """
        try:
            mine: tuple[str | None, str | None] = (digest(extra), None)
        except Exception as err:  # noqa: BLE001 - reported on every rank below
            mine = (None, describe_exception(err))
        digests: list[Any] = [None] * self.dims.world_size
        dist.all_gather_object(digests, mine)
        failed = [(r, error) for r, (_, error) in enumerate(digests) if error is not None]
        if failed:
            raise ValueError(
                f"checkpoint extra cannot be compared between ranks (rank {failed[0][0]}: {failed[0][1]}): trainer "
                "state passed to CheckpointManager.save must be made of dicts, lists, numbers, strings, tensors, "
                "arrays or other picklable values"
            )
        differ = [r for r, (d, _) in enumerate(digests) if d != digests[0][0]]
        if differ:
            raise ValueError(
                f"checkpoint extra differs between rank 0 and rank(s) {differ}: trainer state passed to "
                "CheckpointManager.save must be identical on all ranks (derive per-rank positions from it on load)"
            )
        ref = [extra]
        dist.broadcast_object_list(ref, src=0)  # rank 0's copy is the one every rank saves
        return ref[0]

    def _finalize(self, tmp: Path, final: Path, step: int, more: dict[str, Any],
                  sums: dict[str, str] | None) -> None:
        meta = {
            **self.run_meta,
            **more,
            "step": step,
            "run_id": self.run_id,
            "world_size": self.dims.world_size,
            "dp_size": self.dims.dp_size,
            "sp_size": self.dims.sp_size,
            "torch_version": torch.__version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_durably(tmp / META_FILE, json.dumps(meta, indent=2) + "\n")
        if sums is not None:  # the ranks' own files, then whatever else is there (meta.json)
            sums.update({name: file_sha256(tmp / name) for name in checkpoint_files(tmp) if name not in sums})
            write_durably(tmp / CHECKSUMS, checksum_text(sums))
        # The marker is written last inside the temporary folder and the rename publishes it, so a
        # step_* folder is complete even on filesystems where directory rename is not atomic.
        write_durably(tmp / COMPLETE_MARKER, "")
        if final.exists():
            # Left over from a save that did not finish (no marker, or a file lost): never a checkpoint of
            # this run, which would have been complete. Renaming onto a non-empty folder fails, so move it aside.
            logger.warning("replacing %s, an unusable folder left over from an earlier save", final)
            unpublish_and_delete(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        """Delete complete checkpoints beyond keep_last and stale temporary folders (rank 0 only)."""
        done = self.complete_checkpoints()
        # Ordered by step; the one just written is never pruned, even if newer steps sort after it.
        old = [p for p in done[: max(0, len(done) - self.cfg.keep_last)] if p != keep]
        for path in old:
            unpublish_and_delete(path)
            logger.info("deleted old checkpoint %s (keep_last=%d)", path.name, self.cfg.keep_last)
        self._sweep()

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
        meta = read_meta(path)
        state: dict[str, Any] = {"train": _TrainState(model, optimizer), "extra": io.BytesIO()}
        if scheduler is not None:
            state["scheduler"] = scheduler
        dcp.load(state, checkpoint_id=path)
        extra = _unpickled(state["extra"])

        if restore_rng:
            rng_file = path / RNG_DIR / f"rank_{self.dims.rank}.pt"
            if meta["world_size"] != self.dims.world_size:
                logger.warning(
                    "checkpoint %s was saved with world size %d, resuming with %d: model and optimizer are "
                    "resharded, but per-rank RNG states are not restored (dropout/sampling will differ)",
                    path, meta["world_size"], self.dims.world_size,
                )
            elif not rng_file.exists():
                logger.warning("checkpoint %s has no RNG state for rank %d", path, self.dims.rank)
            else:
                # Restored last: get_state_dict's optimizer initialisation above must not consume the restored stream.
                _set_rng_state(torch.load(rng_file, weights_only=False))
        logger.info("loaded checkpoint %s (step %s)", path, meta["step"])
        return extra


class CheckpointUnreadable(RuntimeError):
    """A checkpoint that looked complete failed to load (raised on every rank); the message names the first error."""



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
