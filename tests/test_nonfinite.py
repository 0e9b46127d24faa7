"""Non-finite steps: a diverged run gives up with one line and a non-zero exit, saving and exporting nothing; the
warnings say what was not finite; parameters that are not finite are never saved or exported."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ringtrain.config.train import TrainLoopConfig
from ringtrain.errors import RunStopped
from ringtrain.testing import run_distributed
from ringtrain.train.trainer import Trainer, describe_nonfinite, nonfinite_verdict

ROOT = Path(__file__).resolve().parents[1]


def test_a_diverged_run_gives_up_with_one_line(tmp_path: Path) -> None:
    """optim.lr=1e6: every step from the second on has a non-finite gradient norm. The run stops after
    train.max_nonfinite_steps of them, exit 1 on every rank, one error line, no checkpoint, no exported model."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ringtrain.cli",
         "train", str(ROOT / "configs/tiny_cpu.yaml"), f"train.output_dir={out}", "train.max_steps=20",
         "train.seq_len=256", "train.micro_batch_size=2", "data.num_samples=64", "checkpoint.every_steps=5",
         "logging.progress_bar=false", "optim.lr=1e6", "optim.warmup_steps=0", "train.max_nonfinite_steps=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log
    assert [line for line in log.splitlines() if line.startswith("error: ")] == [
        "error: steps 2-4 were all skipped for a non-finite loss or gradient norm (train.max_nonfinite_steps=3): the "
        "run has diverged; stopping without saving. Lower optim.lr (or raise optim.warmup_steps, set optim.grad_clip) "
        "and resume from the start"], log
    warnings = re.findall(r"\[rank 0\] WARNING ringtrain.train.trainer: (step \d+: .*)", log)
    assert len(warnings) == 3, log
    for n, line in enumerate(warnings, start=2):
        # The loss is finite here: the warning must not call it non-finite.
        assert re.fullmatch(rf"step {n}: non-finite gradient norm \(nan\); the loss [\d.]+ is finite: update skipped "
                            rf"\({n - 1} in a row, {n - 1} of {n} steps so far\)", line), line
    # Every rank exits 1, except that torchrun SIGTERMs (-15) a rank still exiting once the first has.
    codes = re.findall(r"exitcode\s*:\s*(-?\d+) \(pid", log)
    assert len(codes) == 2 and "1" in codes and set(codes) <= {"1", "-15"}, log
    assert "Traceback" not in log.split("error: ")[0], log
    assert not (out / "checkpoints").exists() and not (out / "final_model").exists()
    assert not (out / ".ringtrain.lock").exists()


def test_nonfinite_verdict_and_description() -> None:
    cfg = TrainLoopConfig(output_dir="x", max_nonfinite_steps=4, max_nonfinite_fraction=0.1)
    assert nonfinite_verdict(cfg, 10, 3, 3) is None
    assert nonfinite_verdict(cfg, 10, 4, 4) == ("steps 7-10 were all skipped for a non-finite loss or gradient norm "
                                                "(train.max_nonfinite_steps=4)")
    assert nonfinite_verdict(cfg, 19, 3, 1) is None  # the fraction is judged from step 20 on
    assert nonfinite_verdict(cfg, 20, 2, 1) is None  # 10% is not more than 10%
    assert nonfinite_verdict(cfg, 20, 3, 1) == ("3 of 20 steps were skipped for a non-finite loss or gradient norm, "
                                                "more than train.max_nonfinite_fraction=0.1")
    never = TrainLoopConfig(output_dir="x", max_nonfinite_steps=0, max_nonfinite_fraction=1.0)
    assert nonfinite_verdict(never, 100, 100, 100) is None
    assert describe_nonfinite(float("nan"), 2.0) == "non-finite loss (nan); the gradient norm 2 is finite"
    assert describe_nonfinite(5.95, float("inf")) == "non-finite gradient norm (inf); the loss 5.95 is finite"
    assert describe_nonfinite(float("nan"), float("nan")) == "non-finite loss (nan) and gradient norm (nan)"
    problems = TrainLoopConfig(output_dir="x", max_nonfinite_steps=-1, max_nonfinite_fraction=0)._validate()
    assert [k for k, _ in problems] == ["max_nonfinite_steps", "max_nonfinite_fraction"]


def _check_parameters(mesh) -> str:
    """A NaN in rank 1's parameters alone: every rank refuses to save, with the same line."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    if mesh.rank == 1:
        with torch.no_grad():
            model[1].weight[0, 0] = float("nan")
    trainer = SimpleNamespace(model=model, dims=mesh, step=7, checkpoints=SimpleNamespace(latest=lambda: "ckpt/step_5"))
    with pytest.raises(RunStopped) as err:
        Trainer.check_parameters_finite(trainer, "saving a checkpoint")
    return str(err.value)


def test_nonfinite_parameters_are_never_saved() -> None:
    messages = run_distributed(_check_parameters, 2, timeout=60)
    assert messages == ["the parameters are not finite at step 7 (1.weight first): not saving a checkpoint; resume "
                        "from the last checkpoint ckpt/step_5 with a lower optim.lr"] * 2
