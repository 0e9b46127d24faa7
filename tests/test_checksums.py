"""Checksums per checkpoint file: written when a save completes, verified on resume; a damaged checkpoint falls back
to the previous one with one line, and the resumed run continues with the losses of the uninterrupted one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train(out: Path, *extra: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ringtrain.cli",
         "train", str(ROOT / "configs/tiny_cpu.yaml"), f"train.output_dir={out}", "train.max_steps=8",
         "train.seq_len=256", "train.micro_batch_size=2", "data.num_samples=64", "checkpoint.every_steps=2",
         "checkpoint.keep_last=3", "logging.progress_bar=false", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    return log


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records}


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _train(out)
    reference = _losses(out)
    ckpts = out / "checkpoints"
    newest = ckpts / "step_00000008"
    # sha256sum's own format: an operator can check a copy by hand.
    check = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=newest, capture_output=True, text=True)
    assert check.returncode == 0, check
    names = [line.split("  ", 1)[1] for line in (newest / "SHA256SUMS").read_text().splitlines()]
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json", "rng/rank_0.pt", "rng/rank_1.pt"} <= set(names)

    # 64 bytes flipped in the middle of a data file, its size unchanged: nothing but the checksum can tell.
    data = newest / "__1_0.distcp"
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes(b ^ 0xFF for b in raw[middle:middle + 64])
    data.write_bytes(bytes(raw))

    log = _train(out)
    skipped = [line for line in log.splitlines() if "skipping checkpoint" in line]
    assert len(skipped) == 1 and skipped[0].endswith(
        f"skipping checkpoint {newest}: it has a file __1_0.distcp that does not match its checksum in SHA256SUMS "
        "(damaged since it was saved)"), log
    assert re.search(rf"resumed from {re.escape(str(ckpts / 'step_00000006'))} at step 6", log), log
    assert _losses(out) == reference  # steps 7 and 8 again, bitwise as the first time
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000004", "step_00000006", "step_00000008"]
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=newest).returncode == 0
