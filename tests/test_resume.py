"""Stop a real torchrun job (SIGTERM, then SIGKILL after a periodic checkpoint) and resume: the same losses, bitwise."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24
OVERRIDES = [
    f"train.max_steps={STEPS}", "train.seq_len=256", "train.micro_batch_size=2", "data.num_samples=256",
    "checkpoint.every_steps=4", "checkpoint.keep_last=2", "logging.progress_bar=false",
]


def _start(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ringtrain.cli", "train", str(ROOT / "configs/tiny_cpu.yaml"), f"train.output_dir={out}",
           *OVERRIDES, *extra]
    log = open(out.parent / f"{out.name}.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps repeated or out of order: {steps}"
    return {r["step"]: r["loss"] for r in records}


def _wait_for_step(out: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(_losses(out)) >= step:
            return
        assert proc.poll() is None, f"run ended early with {proc.returncode}; see {out}.log"
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def _checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*") if (p / "COMPLETE").exists())


def test_resume_after_sigterm_and_sigkill_is_exact(tmp_path):
    ref_dir = tmp_path / "ref"
    assert _finish(_start(ref_dir)) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    reference = _losses(ref_dir)
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert (ref_dir / "final_model" / "model.safetensors").exists()

    # SIGTERM: the job saves a checkpoint at the step boundary it agreed on, then exits.
    term_dir = tmp_path / "term"
    proc = _start(term_dir)
    _wait_for_step(term_dir, proc, 6)
    os.killpg(proc.pid, signal.SIGTERM)
    _finish(proc)
    stopped_at = max(_losses(term_dir))
    assert stopped_at < STEPS, "the run finished before the signal: make it longer"
    assert stopped_at in _checkpoints(term_dir), (stopped_at, _checkpoints(term_dir))
    assert not (term_dir / "final_model").exists()

    # SIGKILL: no chance to save; resume falls back to the last periodic checkpoint.
    kill_dir = tmp_path / "kill"
    proc = _start(kill_dir)
    _wait_for_step(kill_dir, proc, 10)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    last_ckpt = max(_checkpoints(kill_dir))
    assert 4 <= last_ckpt < STEPS

    for out in (term_dir, kill_dir):
        assert _finish(_start(out)) == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]
        resumed = _losses(out)
        # Every step exactly once, and each loss bitwise equal to the uninterrupted run's: the same samples,
        # in the same order, with the same weights, optimizer and RNG state.
        assert sorted(resumed) == list(range(1, STEPS + 1))
        assert resumed == reference
