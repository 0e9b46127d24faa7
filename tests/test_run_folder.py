"""One run, one folder: the run lock, ranks that end with their launcher, a lock taken over from a dead run.

Real torchrun jobs (2 ranks, SP=2, gloo) of the tiny CPU config, shrunk.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "train.seq_len=256", "train.micro_batch_size=2", "data.num_samples=64", "checkpoint.every_steps=2",
    "logging.progress_bar=false",
]


def _start(out: Path, *extra: str, log_name: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=0",
           "-m", "ringtrain.cli", "train", str(ROOT / "configs/tiny_cpu.yaml"), f"train.output_dir={out}",
           *OVERRIDES, *extra]
    log = open(out.parent / f"{log_name or out.name}.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _log(out: Path, name: str | None = None) -> str:
    return (out.parent / f"{name or out.name}.log").read_text(errors="replace")


def _steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.strip()]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("error: ")]


def _checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*") if (p / "COMPLETE").exists())


def test_a_held_folder_is_refused_and_ranks_die_with_their_launcher(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _start(out, "train.max_steps=400")
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while len(_steps(out)) < 3:
            assert first.poll() is None and time.monotonic() < deadline, _log(out)
            time.sleep(0.1)
        ranks = _children(first.pid)
        assert len(ranks) == 2, ranks
        holder = json.loads((out / ".ringtrain.lock").read_text())
        assert holder["pid"] in ranks

        # The same command again: refused before it writes anything, one line naming the holder; the first runs on.
        second = _start(out, "train.max_steps=400", log_name="second")
        assert second.wait(timeout=180) != 0
        log = _log(out, "second")
        assert _errors(log) == [
            f"error: train.output_dir={str(out)!r} is in use by the run started {holder['started_at']} (pid "
            f"{holder['pid']} on host {holder['host']}): wait for that run to end or stop it, or choose another "
            f"train.output_dir (if that run is gone, delete {out / '.ringtrain.lock'})"], log
        assert "Traceback" not in log.split("error: ")[0], log  # the ranks raised nothing (torchrun's own follows)
        assert first.poll() is None
        steps = _steps(out)
        assert steps == sorted(set(steps)), steps  # nothing of the second run in the first one's metrics

        # SIGKILL to torchrun alone: its ranks notice and exit instead of training on, reparented.
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in ranks), _log(out)
        # The first to notice says so; its peer may instead fail on the closed connection: either way, both end.
        assert re.search(r"its launcher \(pid \d+\) has exited: stopping at once", _log(out)), _log(out)
    finally:
        for pid in [first.pid, *ranks]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    # A rank 0 that fails on its peer's closed connection releases the lock on its way out; one that is killed (the
    # watchdog's exit, SIGKILL, the OOM killer) leaves it, naming a dead pid on this host, as here. The next run
    # takes it over with one line and resumes.
    if not (out / ".ringtrain.lock").exists():
        (out / ".ringtrain.lock").write_text(json.dumps(holder))
    last = max(_checkpoints(out))
    third = _start(out, f"train.max_steps={last + 2}", log_name="third")
    assert third.wait(timeout=240) == 0, _log(out, "third")
    log = _log(out, "third")
    takeover = [line for line in log.splitlines() if "taking over the run folder" in line]
    assert len(takeover) == 1 and f"pid {holder['pid']} has exited" in takeover[0], log
    assert f"resumed from {out / 'checkpoints' / f'step_{last:08d}'} at step {last}" in log, log
    assert _steps(out) == list(range(1, last + 3))
    assert re.search(rf"done: step {last + 2}/{last + 2}, loss [\d.]+ -> [\d.]+, 0 step\(s\) skipped as non-finite;",
                     log), log
    assert not (out / ".ringtrain.lock").exists()  # released at the end


def test_cleanup_spares_a_live_holders_temporary_folders(tmp_path: Path) -> None:
    """Temporary folders carry their run's id: a run clears its own and dead runs' debris, never the holder's."""
    from ringtrain.config import CheckpointConfig
    from ringtrain.train.checkpoint import CheckpointManager
    from ringtrain.train.checkpoint.files import temporary_folder, temporary_owner
    from ringtrain.train.runlock import acquire

    root = tmp_path / "checkpoints"
    root.mkdir()
    lock = acquire(tmp_path, "live0")
    mine, live, dead = (temporary_folder(root / "step_00000004", "ab12", owner) for owner in ("me", "live0", "gone"))
    legacy = root / "step_00000002.tmp-1f2e3d4c"  # named before folders carried a run id
    for folder in (mine, live, dead, legacy):
        folder.mkdir()
    assert [temporary_owner(p) for p in (mine, live, dead, legacy)] == ["me", "live0", "gone", None]
    CheckpointManager(CheckpointConfig(), tmp_path, dims=None, run_id="me")._sweep()
    assert sorted(p.name for p in root.iterdir()) == [live.name]
    lock.release()
    CheckpointManager(CheckpointConfig(), tmp_path, dims=None, run_id="me")._sweep()  # nobody holds it now
    assert list(root.iterdir()) == []


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path: Path, monkeypatch) -> None:
    """The same SLURM job id is the job's earlier life (SLURM ended it before requeueing): its lock is taken over,
    whatever host or pid it names; another job's lock on another host is refused, naming that holder."""
    from ringtrain.errors import ConfigError
    from ringtrain.train.runlock import LOCK_FILE, acquire, holder_gone

    earlier = {"run_id": "old", "host": "node7", "pid": 4321, "slurm_job_id": "4242", "started_at": "yesterday"}
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert holder_gone(earlier) == "SLURM job 4242 was requeued"
    (tmp_path / LOCK_FILE).write_text(json.dumps(earlier))
    lock = acquire(tmp_path, "new")
    assert json.loads((tmp_path / LOCK_FILE).read_text())["run_id"] == "new"
    lock.release()

    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    (tmp_path / LOCK_FILE).write_text(json.dumps(earlier))
    try:
        acquire(tmp_path, "new")
        raise AssertionError("acquired a lock held on another host")
    except ConfigError as err:
        assert err.problems == [
            f"train.output_dir={str(tmp_path)!r} is in use by the run started yesterday (pid 4321 on host node7, SLURM "
            f"job 4242): wait for that run to end or stop it, or choose another train.output_dir (if that run is gone, "
            f"delete {tmp_path / LOCK_FILE})"]


def test_a_dead_runs_temporary_folder_is_cleared_before_a_save(tmp_path: Path) -> None:
    from test_training_state import _lines, _train

    out = tmp_path / "run"
    debris = out / "checkpoints" / "step_00000001.tmp-deadbeef0000-1a2b3c4d"  # a save the dead run never finished
    (debris / "rng").mkdir(parents=True)
    (debris / "__0_0.distcp").write_bytes(b"partial")
    code, err = _train(out, "train.max_steps=1", "checkpoint.export_final=false")
    assert code == 0, err
    assert _lines(err, "deleted incomplete checkpoint folder")[0].endswith(debris.name), err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]


def test_a_run_whose_lock_was_taken_over_stops_before_saving(tmp_path: Path) -> None:
    """A run judged gone and taken over (a lock deleted by hand, a pid check fooled) must not write beside the new
    holder: its next save refuses, naming the folder."""
    import pytest

    from ringtrain.config import CheckpointConfig
    from ringtrain.train.checkpoint import CheckpointManager
    from ringtrain.train.runlock import acquire

    mine = acquire(tmp_path, "mine")
    manager = CheckpointManager(CheckpointConfig(), tmp_path, dims=None, run_id="mine")
    assert manager._before_save(tmp_path / "checkpoints" / "step_00000001")[0] == "mine"
    mine.release()
    acquire(tmp_path, "other")
    from ringtrain.errors import RunStopped

    with pytest.raises(RunStopped, match=f"this run \\(id mine\\) no longer holds {tmp_path}: another run took it over"):
        manager._before_save(tmp_path / "checkpoints" / "step_00000001")
