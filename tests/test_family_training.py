"""The shipped family configs train through `ringtrain train` under torchrun (2 ranks, SP=2, gloo, FSDP2): gpt-oss
(sinks, windows, MoE balancing loss), DeepSeek V3 (MLA, as Ulysses) and Gemma 2 (attention and final-logit
soft-capping) match the same config in one process step by step (loss, gradient norm, aux_loss), and so does gpt-oss
at DP=2; Gemma 3 and OLMo 3 (per-layer-type RoPE kept by rope.method=none) train two steps; Qwen3.5 (gated DeltaNet
beside softmax attention) trains and evaluates as in one process.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("gpt_oss", "deepseek_v3", "gemma2")
RTOL = 1e-5  # measured: <= 3.7e-7 over both steps
EXIT_RACE = "terminate called without an active exception"


def _torchrun(name: str, out: Path, *overrides: str, run: str | None = None) -> list[dict]:
    run_dir = out / (run or name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ringtrain.cli",
           "train", str(ROOT / "configs" / "families" / f"{name}_tiny.yaml"), f"train.output_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=480)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 and EXIT_RACE in log and "done: step 2/2" in log:
        # A rank aborted at interpreter exit after the run had finished: the gloo exit race that
        # parallel.distributed.teardown_distributed describes, seen here twice in about twenty runs under load. Not what
        # this test is about, so it runs once more (with a warning); any other failure fails it.
        warnings.warn(f"{name}: a rank aborted at exit after finishing ({EXIT_RACE!r}); running it once more",
                      stacklevel=2)
        shutil.rmtree(run_dir)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _metrics(run_dir)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


ONE_PROCESS = """
import sys
from ringtrain.train.trainer import train
from ringtrain.validate import load_validated_config

out, names, extra = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
for name in names:
    cfg = load_validated_config(f"configs/families/{name}_tiny.yaml", [f"train.output_dir={out}/{name}_one",
                                "parallel.sp_size=1", "parallel.ulysses_size=1", *extra], world_size=1)
    train(cfg)
"""


def _one_process(out: Path, names: tuple[str, ...], *overrides: str) -> None:
    # The references share one interpreter (one import of torch and transformers for all of them).
    proc = subprocess.run([sys.executable, "-c", ONE_PROCESS, str(out), ",".join(names), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_families_train_under_torchrun_as_in_one_process(tmp_path: Path):
    _one_process(tmp_path, COMPARED)
    for name in COMPARED:
        sp, one = _torchrun(name, tmp_path), _metrics(tmp_path / f"{name}_one")
        assert [r["step"] for r in sp] == [r["step"] for r in one] == [1, 2], name
        keys = ("loss", "grad_norm", "aux_loss") if name == "gpt_oss" else ("loss", "grad_norm")
        assert ("aux_loss" in sp[0]) == (name == "gpt_oss"), (name, sp[0])  # MoE with router_aux_loss_coef only
        for a, b in zip(sp, one, strict=True):
            for key in keys:
                assert math.isclose(a[key], b[key], rel_tol=RTOL), (name, a["step"], key, a[key], b[key])
        assert sp[1]["loss"] < sp[0]["loss"], name


def test_balancing_loss_over_data_parallel_ranks_equals_one_process(tmp_path: Path):
    """DP=2 (micro-batch 2 each) against one process with micro-batch 4: the balancing loss is over the whole global
    micro-batch, so its counts are summed over the data-parallel ranks too (aux_loss and grad norm equal)."""
    _one_process(tmp_path, ("gpt_oss",), "train.micro_batch_size=4")
    dp = _torchrun("gpt_oss", tmp_path, "parallel.sp_size=1", "train.micro_batch_size=2", run="gpt_oss_dp")
    for a, b in zip(dp, _metrics(tmp_path / "gpt_oss_one"), strict=True):
        for key in ("loss", "grad_norm", "aux_loss"):
            assert math.isclose(a[key], b[key], rel_tol=RTOL), (a["step"], key, a[key], b[key])


@pytest.mark.parametrize("name", ["gemma3", "olmo3"])
def test_per_layer_rope_families_train_under_torchrun(tmp_path: Path, name: str):
    records = _torchrun(name, tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in records)
    assert (tmp_path / name / "final_model" / "config.json").is_file()


def test_qwen3_5_trains_and_evaluates_under_torchrun_as_in_one_process(tmp_path: Path):
    """Gated DeltaNet head-parallel over SP=2 (packed passkey documents), the softmax layer as a ring; the in-training
    evaluation at step 2 (passkey retrieval and perplexity) on the same model."""
    _one_process(tmp_path, ("qwen3_5",))
    sp, one = _torchrun("qwen3_5", tmp_path), _metrics(tmp_path / "qwen3_5_one")
    assert [r["step"] for r in sp] == [r["step"] for r in one] == [1, 2]
    for a, b in zip(sp, one, strict=True):
        for key in ("loss", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=RTOL), (a["step"], key, a[key], b[key])
    assert math.isclose(sp[1]["eval/ppl@128"], one[1]["eval/ppl@128"], rel_tol=RTOL)
    assert sp[1]["eval/passkey/acc"] == one[1]["eval/passkey/acc"]
    results = json.loads((tmp_path / "qwen3_5" / "eval" / "step_00000002" / "results.json").read_text())
    assert results["step"] == 2 and math.isfinite(results["perplexity"][0]["ppl"])
