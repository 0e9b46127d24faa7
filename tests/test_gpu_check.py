"""scripts/gpu_check.sh, the one GPU script, runs end to end on CPU (`--cpu-smoke`), so a GPU lease is never spent on
a broken script; it fails when a step fails, and refuses unknown arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cpu_smoke_runs_every_step_and_writes_the_summary(tmp_path):
    res = _run("--cpu-smoke", "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["tests", "attention_small", "attention_large", "trainer",
                                                     "max_context", "long_context"]
    assert all(s["status"] == "ok" for s in summary["steps"]) and summary["failed"] == []
    configs = [r["config"] for r in summary["attention_large"]["records"]]
    assert configs == ["causal", "packed documents (mean S/16)", "window S/8", "ulysses local (U=2)"]
    policies = {(r["kind"], r["recompute"]) for r in summary["trainer"]["records"]}
    assert policies == {("ringtrain", "none"), ("ringtrain", "full+tiled+offload"), ("ringtrain", "full"),
                        ("plain", "none")}
    # Every ringtrain row carries the planner's prediction for the same config (issue 16).
    assert all(r["predicted_peak_bytes"] > 0 for r in summary["trainer"]["records"] if r["kind"] == "ringtrain")
    assert summary["longest_context"] == 4096 and summary["long_context_trained"] == 2048
    assert all(summary[step]["complete"] for step in ("trainer", "max_context", "long_context"))
    md = (tmp_path / "summary.md").read_text()
    assert "| trainer | ok |" in md and "Longest context that trained one step (max_context): 4096" in md
    assert "| ringtrain | full+tiled+offload | 256 |" in md


def test_a_failed_step_fails_the_script(tmp_path):
    (tmp_path / "status.tsv").write_text("tests\t0\t3\nattention_small\t124\t60\ntrainer\tskipped\t0\n"
                                         "max_context\t124\t120\n")
    # A step stopped at its time limit keeps the contexts it measured (bench_gpu.py writes after each one).
    (tmp_path / "max_context.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.x", "complete": False,
        "max_context": True, "records": [{"kind": "ringtrain", "recompute": "full+tiled", "seq_len": 262144,
                                          "step_s": 61.5, "peak_bytes": 60 * 2**30}]}))
    res = subprocess.run([sys.executable, "scripts/gpu_summary.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 1
    assert "failed: attention_small, trainer, max_context" in res.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["ok", "rc=124", "skipped", "rc=124"]
    assert summary["longest_context"] == 262144
    md = (tmp_path / "summary.md").read_text()
    assert "## max_context (NVIDIA H200, torch 2.x: partial, the step stopped before its end)" in md
    assert "| ringtrain | full+tiled | 262,144 | 61.500 | 4,263 | 60.0 | - | - |" in md


def test_unknown_argument_is_refused(tmp_path):
    res = _run("--cpu-smok")
    assert res.returncode == 2 and "usage: bash scripts/gpu_check.sh" in res.stderr
    res = _run("--only", "tests,long_contxt")
    assert res.returncode == 2 and "unknown step long_contxt" in res.stderr
