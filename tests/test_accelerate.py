"""`accelerate launch` starts the same trainer as torchrun (it sets the same environment); bad sizes exit 2."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["train.max_steps=3", "train.seq_len=128", "data.num_samples=32", "logging.progress_bar=false"]


def test_accelerate_launch_runs_sp2(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "ringtrain.cli", "train", str(ROOT / "configs/tiny_cpu.yaml"), f"train.output_dir={tmp_path}", *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world=2 dp=1 sp=2" in proc.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_plain_python_with_sp2_exits_2_with_a_hint(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ringtrain.cli", "train", str(ROOT / "configs/tiny_cpu.yaml"),
         f"train.output_dir={tmp_path}", *SMALL],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: parallel.sp_size=2 does not divide world size 1: choose sp_size among 1, "
        "or start 2 x N processes (torchrun --nproc_per_node)")
    assert "Traceback" not in proc.stderr
