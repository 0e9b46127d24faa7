"""launch/torchrun.sh on one machine: usage, a stop signal that torchrun survives, a hung rank that times out.

Real torchrun jobs (2 ranks, SP=2, gloo) of the README demo, shrunk; see tests/test_slurm.py for SLURM.
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
TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
OVERRIDES = [
    "train.max_steps=400", "train.seq_len=256", "train.micro_batch_size=2", "data.num_samples=256",
    "checkpoint.every_steps=0", "logging.progress_bar=false",
]


def _start(out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        ["bash", str(TORCHRUN_SH), "--nproc", "2", str(ROOT / "configs/tiny_cpu.yaml"), f"train.output_dir={out}",
         *OVERRIDES, *extra],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "RINGTRAIN_PYTHON": sys.executable, **(env or {})},
    )


def _log(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text(errors="replace")


def _rank_pids(torchrun_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's children (the ranks), from /proc."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = dict(v.split(b"=", 1) for v in (entry / "environ").read_bytes().split(b"\0") if b"=" in v)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == torchrun_pid and b"RANK" in environ:
            pids[int(environ[b"RANK"])] = int(entry.name)
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for_steps(out: Path, proc: subprocess.Popen, steps: int, timeout: float = 180) -> dict[int, int]:
    """Once `steps` steps are logged, the rank pids."""
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            pids = _rank_pids(proc.pid)
            assert sorted(pids) == [0, 1], pids
            return pids
        assert proc.poll() is None, f"run ended early with {proc.returncode}:\n{_log(out)}"
        time.sleep(0.05)
    raise AssertionError(f"step {steps} not reached in {timeout}s:\n{_log(out)}")


def _kill_all(proc: subprocess.Popen, pids: dict[int, int]) -> None:
    """Clean up after a failed assertion: the ranks run in their own sessions, so kill them one by one."""
    for pid in [proc.pid, *pids.values()]:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def test_scripts_parse_and_usage_errors_exit_2(tmp_path: Path) -> None:
    for script in (TORCHRUN_SH, SBATCH):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
    usage = subprocess.run(["bash", str(TORCHRUN_SH)], capture_output=True, text=True)
    assert usage.returncode == 2 and "CONFIG" in usage.stderr, usage
    outside = subprocess.run(["bash", str(SBATCH), "configs/tiny_cpu.yaml"], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    assert outside.returncode == 2 and "must run under SLURM" in outside.stderr, outside


def test_usr1_stops_ranks_with_exit_75_and_torchrun_survives_it(tmp_path: Path) -> None:
    """What SLURM does on a step signal: USR1 to torchrun *and* every rank. torchrun must not die of it
    (that would orphan the ranks); the ranks save at an agreed step and exit 75 (stopped, resumable)."""
    out = tmp_path / "run"
    proc = _start(out)
    pids: dict[int, int] = {}
    try:
        pids = _wait_for_steps(out, proc, 3)
        for pid in (proc.pid, *pids.values()):
            os.kill(pid, signal.SIGUSR1)
        rc = proc.wait(timeout=120)
    finally:
        _kill_all(proc, pids)
    log = _log(out)
    assert rc != 0, log
    stops = set(re.findall(r"stopped at step (\d+) after a signal", log))
    assert len(stops) == 1, log  # both ranks stopped at the same step
    step = int(stops.pop())
    assert (out / "checkpoints" / f"step_{step:08d}" / "COMPLETE").exists(), log
    assert re.search(r"exitcode\s*:\s*75", log), log
    # torchrun reports the ranks' 75 as 1: the record rank 0 leaves is what train.sbatch reads instead.
    assert json.loads((out / "stopped.json").read_text()) == {
        "exit_code": 75, "step": step, "signal": signal.SIGUSR1.value,
        "checkpoint": str(out / "checkpoints" / f"step_{step:08d}")}
    assert not (out / "final_model").exists()
    assert not any(_alive(pid) for pid in pids.values())


def test_a_second_ctrl_c_stops_the_ranks_at_once_without_saving(tmp_path: Path) -> None:
    """Ctrl-C twice, as a terminal sends it (SIGINT to torchrun's process group; the ranks have sessions of their
    own): torchrun forwards the first as SIGINT, which the ranks announce, and the second as SIGTERM, which ends them
    at once, in the middle of their step, without a checkpoint, instead of after torchrun's shutdown timeout."""
    out = tmp_path / "run"
    # Steps of about a second here, so the second signal lands while the first one's step is still running.
    proc = _start(out, "train.seq_len=4096", "train.micro_batch_size=1", "data.num_samples=16",
                  "model.config.max_position_embeddings=4096")
    pids: dict[int, int] = {}
    try:
        pids = _wait_for_steps(out, proc, 2)
        done = len((out / "metrics.jsonl").read_text().splitlines())
        while len((out / "metrics.jsonl").read_text().splitlines()) == done:  # a step has just begun
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        while "received SIGINT" not in _log(out):
            assert proc.poll() is None, _log(out)
            time.sleep(0.02)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        elapsed = time.monotonic() - t0
        assert not any(_alive(pid) for pid in pids.values())
    finally:
        _kill_all(proc, pids)
    log = _log(out)
    assert log.count("SIGTERM after SIGINT: stopping at once, without saving (exit 143)") == 2, log  # both ranks
    assert elapsed < 15, (elapsed, log)  # not torchrun's 120 s shutdown timeout
    assert "saved checkpoint" not in log and "stopped at step" not in log, log
    assert not (out / "checkpoints").exists() and not (out / "final_model").exists()


def test_hung_rank_makes_the_other_fail_after_the_collective_timeout(tmp_path: Path) -> None:
    """A rank that stops answering (SIGSTOP: no crash, sockets stay open) -> the other's collective times
    out after parallel.timeout_s, it exits naming itself, and torchrun SIGKILLs the hung one: no hang."""
    timeout_s = 5
    out = tmp_path / "run"
    proc = _start(out, f"parallel.timeout_s={timeout_s}")
    pids: dict[int, int] = {}
    try:
        pids = _wait_for_steps(out, proc, 3)
        t0 = time.monotonic()
        os.kill(pids[1], signal.SIGSTOP)
        while _alive(pids[0]) and time.monotonic() - t0 < timeout_s + 60:
            time.sleep(0.05)
        survivor_exit = time.monotonic() - t0
        # torchrun gives the remaining rank 30 s after SIGTERM (ignored while stopped), then SIGKILL.
        rc = proc.wait(timeout=60)
        total = time.monotonic() - t0
    finally:
        _kill_all(proc, pids)
    log = _log(out)
    assert rc != 0, log
    assert timeout_s <= survivor_exit < timeout_s + 15, (survivor_exit, log)
    assert total < timeout_s + 45, (total, log)
    assert re.search(r"\[rank 0\] ERROR ringtrain\.train\.trainer: rank 0 failed: \w+Error: .*Timed out", log), log
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", log), log  # the hung one, killed
    assert not any(_alive(pid) for pid in pids.values())
