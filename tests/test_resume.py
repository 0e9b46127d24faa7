"""Stop a real torchrun job (Ctrl-C, then SIGKILL after a periodic checkpoint) and resume: the same losses, bitwise.

SIGTERM takes the same path as Ctrl-C's SIGINT (tests/test_slurm.py's requeue sends it); a resume that would change
the global batch is refused before any rank trains, and leaves the run folder as it was.
"""

import json
import os
import re
import signal
import subprocess
from pathlib import Path

from ringtrain.testing import finish, start_torchrun, wait_for_steps

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24
OVERRIDES = [
    f"train.max_steps={STEPS}", "train.seq_len=256", "train.micro_batch_size=2", "data.num_samples=256",
    "checkpoint.every_steps=4", "checkpoint.keep_last=2", "logging.progress_bar=false",
]


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return start_torchrun(ROOT / "configs/tiny_cpu.yaml", out, *OVERRIDES, *extra, cwd=ROOT)


def _losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps repeated or out of order: {steps}"
    return {r["step"]: r["loss"] for r in records}


def _wait_for_step(out: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    wait_for_steps(out, proc, step, timeout)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    return finish(proc, timeout)


def _checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*") if (p / "COMPLETE").exists())


def test_resume_after_ctrl_c_and_sigkill_is_exact(tmp_path):
    ref_dir = tmp_path / "ref"
    assert _finish(_start(ref_dir)) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    reference = _losses(ref_dir)
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert (ref_dir / "final_model" / "model.safetensors").exists()

    # Ctrl-C: SIGINT to torchrun's process group, as a terminal sends it (the ranks run in sessions of their own, so
    # only torchrun gets it and forwards it). The job saves a checkpoint at the step boundary it agreed on, then exits.
    term_dir = tmp_path / "term"
    proc = _start(term_dir)
    _wait_for_step(term_dir, proc, 6)
    os.killpg(proc.pid, signal.SIGINT)
    _finish(proc)
    log = (tmp_path / "term.log").read_text()
    stopped_at = max(_losses(term_dir))
    assert stopped_at < STEPS, "the run finished before the signal: make it longer"
    assert stopped_at in _checkpoints(term_dir), (stopped_at, _checkpoints(term_dir))
    assert log.count("received SIGINT: finishing this step, then saving a checkpoint and exiting (75)") == 1, log
    assert log.count(f"stopped at step {stopped_at} after a signal") == 2, log  # both ranks, at the same step
    assert "Traceback" not in log.split("Received 2 death signal")[0], log  # the ranks raised nothing
    assert not (term_dir / "final_model").exists()

    # Resuming with 2 data-parallel ranks instead of 1 would double the global batch: refused before any step,
    # one line, exit 2 on every rank, and the run folder as it was.
    config_before = (term_dir / "config.yaml").read_text()
    assert _finish(_start(term_dir, "parallel.sp_size=1")) != 0
    log = (tmp_path / "term.log").read_text()[len(log):]
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: the global batch would change from 2 sequences per step in checkpoint {term_dir}/checkpoints/"
        f"step_{stopped_at:08d} (train.micro_batch_size=2 x train.grad_accum_steps=1 x 1 data-parallel rank(s)) to "
        "4 (2 x 1 x 2): keep 2 (e.g. train.micro_batch_size=1), or start a new run in another train.output_dir"], log
    # Every rank exits 2, except that torchrun SIGTERMs (-15) the ranks still exiting once the first has: never an
    # abort (-6: gloo's worker dying at interpreter exit, see teardown_distributed) nor a traceback.
    codes = re.findall(r"exitcode\s*:\s*(-?\d+) \(pid", log)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, log
    assert "terminate called" not in log and "Traceback" not in log.split("error: ")[0], log
    assert (term_dir / "config.yaml").read_text() == config_before
    assert max(_losses(term_dir)) == stopped_at and max(_checkpoints(term_dir)) == stopped_at

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
