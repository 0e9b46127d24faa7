"""A checkpoint on disk: step folder names, the completeness marker, meta.json, temporary folders, digests.

Everything here reads or writes files on one rank and never communicates; which rank calls it is the manager's
business. The layout is documented in docs/checkpoints.md.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader

from ringtrain.log import describe_exception

COMPLETE_MARKER = "COMPLETE"
META_FILE = "meta.json"
CHECKSUMS = "SHA256SUMS"  # `sha256sum -c SHA256SUMS` checks a checkpoint by hand
RNG_DIR = "rng"
DCP_INDEX = ".metadata"
MODEL_PREFIX = "train.model."  # DCP key prefix of the model tensors (the manager saves them under "train")
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_INFIX = ".tmp-"


def step_folder(root: Path, step: int) -> Path:
    """Where the checkpoint of optimizer step `step` lives under `root`; names sort by step."""
    return root / f"step_{step:08d}"


def is_step_folder(path: Path) -> bool:
    """Whether `path` is named like a published checkpoint (step_NNNNNNNN), complete or not."""
    return _STEP_RE.match(path.name) is not None


def step_of(path: Path) -> int:
    """The step of a step_* folder; -1 for any other name."""
    match = _STEP_RE.match(path.name)
    return int(match.group(1)) if match else -1


def temporary_folder(final: Path, nonce: str, run_id: str | None = None) -> Path:
    """The folder a save writes into before publishing it as `final`: outside the step_* namespace, named after
    the run writing it (`step_N.tmp-<run id>-<nonce>`), so that a run's cleanup can tell its own from a live one's."""
    owner = f"{run_id}-" if run_id else ""
    return final.with_name(f"{final.name}{_TMP_INFIX}{owner}{nonce}")


def is_temporary(path: Path) -> bool:
    """A folder being written, or left by a save or delete that did not finish."""
    return _TMP_INFIX in path.name


def temporary_owner(path: Path) -> str | None:
    """The run id in a temporary folder's name; None for a folder being deleted or named without one."""
    tail = path.name.split(_TMP_INFIX, 1)[1] if is_temporary(path) else ""
    owner, sep, _ = tail.partition("-")
    return owner if sep and owner != "deleting" else None


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's meta.json: step, world and mesh sizes, and whatever the trainer added (its config)."""
    return json.loads((Path(path) / META_FILE).read_text())


def is_complete(path: str | os.PathLike) -> bool:
    """Whether `path` is a finished checkpoint: a step_* folder with its completion marker and DCP metadata."""
    path = Path(path)
    return is_step_folder(path) and (path / COMPLETE_MARKER).is_file() and (path / DCP_INDEX).is_file()


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be resumed from, judged from its files without reading a tensor; None if it looks usable.

    Catches what a crash, a full disk or a careless copy leaves: no completion marker, an unreadable index, and
    data files that are missing or shorter than the index says. The phrase completes "checkpoint X ...".
    """
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if path.name.startswith("step_") and is_temporary(path):
        return "is a checkpoint that was never finished (interrupted while being written)"
    if not is_step_folder(path) or not path.is_dir():
        return "is not a step_* checkpoint folder"
    if not (path / COMPLETE_MARKER).is_file():
        return f"has no {COMPLETE_MARKER} marker (interrupted while being written)"
    for name in (DCP_INDEX, META_FILE):
        if not (path / name).is_file():
            return f"has no {name} file"
    for name, read in ((META_FILE, lambda: read_meta(path)),
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


def model_mismatches(path: str | os.PathLike, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """How the model tensors in checkpoint `path` differ from `shapes` (canonical names -> global shapes)."""
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


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def written_by(folder: Path, rank: int) -> list[str]:
    """The files of a checkpoint being written that `rank` wrote (relative paths): DCP's `__<rank>_*.distcp`, its RNG
    file and, on rank 0, DCP's index. Whatever DCP may name otherwise is hashed by rank 0 (`unhashed`)."""
    names = [p.name for p in folder.glob(f"__{rank}_*.distcp")] + [f"{RNG_DIR}/rank_{rank}.pt"]
    return sorted(names + ([DCP_INDEX] if rank == 0 else []))


def checkpoint_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder that its checksums cover (relative paths): all but the marker and the sums."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name not in (COMPLETE_MARKER, CHECKSUMS))


def read_checksums(path: Path) -> dict[str, str] | None:
    """relative path -> sha256 from a checkpoint's SHA256SUMS; None when it has none (saved without checksums)."""
    try:
        text = (path / CHECKSUMS).read_text()
    except FileNotFoundError:
        return None
    sums = {}
    for line in text.splitlines():
        digest_, _, name = line.partition("  ")
        if name:
            sums[name] = digest_
    return sums


def checksum_text(sums: dict[str, str]) -> str:
    """SHA256SUMS in sha256sum's format: '<hex>  <relative path>' per line, sorted."""
    return "".join(f"{sums[name]}  {name}\n" for name in sorted(sums))


FULL_BELOW_BYTES = 1 << 20  # a write error with less free space than this is taken for a full disk


def disk_full(err: BaseException, folder: Path) -> int | None:
    """The free bytes under `folder` if `err` is a full disk, else None.

    ENOSPC anywhere in the exception's chain (DCP's CheckpointException carries each rank's), or any failed write while
    less than FULL_BELOW_BYTES are free: torch's zip writer reports a short write as "unexpected pos", errno lost.
    """
    try:
        stat = os.statvfs(folder)
        free = stat.f_bavail * stat.f_frsize
    except OSError:
        free = None
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return free if free is not None else 0
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return free if free is not None and free < FULL_BELOW_BYTES else None


def unpublish_and_delete(path: Path) -> None:
    """Rename a checkpoint folder out of the step_* namespace, then delete it: a crash mid-delete must not leave
    a folder that looks complete with files missing (the renamed husk is swept as a temporary folder)."""
    doomed = temporary_folder(path, f"deleting-{uuid.uuid4().hex[:8]}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
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


# ---- digests -----------------------------------------------------------------------------------------------------


def digest(obj: Any) -> str:
    """sha256 of a canonical serialisation of `obj`: equal for equal state on any rank, process or device.

    `==` cannot settle whether two ranks hold the same trainer state: it raises on tensors inside a dict and
    calls NaN unequal to itself. Here dicts and sets are hashed in an order independent of insertion and of
    string hash seeds (which differ between processes), tensors and arrays by dtype, shape and bytes (on the
    CPU, so the device does not count), floats by their exact repr; any other object by its pickle. Types count:
    1, 1.0 and True differ.
    """
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    def chunk(tag: str, data: bytes) -> None:
        # Tagged and length-prefixed, so that no two structures serialise to the same bytes.
        h.update(f"{tag}:{len(data)}:".encode())
        h.update(data)

    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        chunk(type(obj).__name__, repr(obj).encode())
    elif isinstance(obj, (list, tuple)):
        chunk(type(obj).__name__, str(len(obj)).encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, dict):
        items = sorted((digest(k), digest(v)) for k, v in obj.items())
        chunk(type(obj).__name__, "".join(k + v for k, v in items).encode())
    elif isinstance(obj, (set, frozenset)):
        chunk(type(obj).__name__, "".join(sorted(digest(x) for x in obj)).encode())
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        chunk("tensor", f"{t.dtype}{tuple(obj.shape)}".encode())
        chunk("bytes", t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif type(obj).__module__ == "numpy" and getattr(obj, "dtype", None) is not None and obj.dtype.hasobject:
        _feed(h, obj.tolist())  # the bytes of an object array are pointers
    elif type(obj).__module__ == "numpy" and hasattr(obj, "tobytes"):  # arrays and numpy scalars
        chunk("numpy", f"{type(obj).__name__}{obj.dtype.str}{getattr(obj, 'shape', ())}".encode())
        chunk("bytes", obj.tobytes())
    else:
        chunk(f"{type(obj).__module__}.{type(obj).__qualname__}", pickle.dumps(obj, protocol=4))
