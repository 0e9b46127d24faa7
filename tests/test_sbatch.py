"""launch/slurm/train.sbatch's requeue rules, with stub srun / scontrol / scancel on PATH (no SLURM needed): requeue
only a clean stop on USR1 (the ranks' exit 75) that saved a new complete checkpoint, at most RINGTRAIN_MAX_REQUEUES
times, and exit with the step's real code. tests/test_slurm.py runs the script on a real cluster."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"

# The step: USR1 to the batch script (as --signal=B:USR1 sends it), then what the scenario says the ranks did.
SRUN = r"""#!/bin/bash
out="$STUB_OUT"
if [[ "$SCENARIO" != done ]]; then kill -USR1 "$PPID"; sleep 0.5; fi
case "$SCENARIO" in
  stop|stop-no-checkpoint)
    if [[ "$SCENARIO" == stop ]]; then
      mkdir -p "$out/checkpoints/step_00000010" && touch "$out/checkpoints/step_00000010/COMPLETE"
    fi
    echo '{"exit_code": 75}' > "$out/stopped.json"
    exit 1 ;;   # torchrun's code when its ranks exit 75
  crash) exit 1 ;;
  done) exit 0 ;;
esac
"""
SCONTROL = r"""#!/bin/bash
if [[ "$1 $2" == "show hostnames" ]]; then echo node1; exit 0; fi
echo "$*" >> "$STUB_OUT/scontrol.calls"
"""
SCANCEL = "#!/bin/bash\necho \"$*\" >> \"$STUB_OUT/scancel.calls\"\n"


def _sbatch(tmp_path: Path, scenario: str, restarts: int, max_requeues: int | None = 3) -> tuple[int, str, Path]:
    stubs, out = tmp_path / "bin", tmp_path / "run"
    stubs.mkdir(exist_ok=True)
    (out / "checkpoints" / "step_00000005").mkdir(parents=True, exist_ok=True)
    (out / "checkpoints" / "step_00000005" / "COMPLETE").touch()
    (out / "stopped.json").write_text('{"exit_code": 75}\n')  # an earlier life's: must not count
    for name, body in (("srun", SRUN), ("scontrol", SCONTROL), ("scancel", SCANCEL)):
        (stubs / name).write_text(body)
        (stubs / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RINGTRAIN_"))}
    env.update(PATH=f"{stubs}:{env['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node1", STUB_OUT=str(out),
               SLURM_RESTART_COUNT=str(restarts), SCENARIO=scenario)
    if max_requeues is not None:
        env["RINGTRAIN_MAX_REQUEUES"] = str(max_requeues)
    proc = subprocess.run(["bash", str(SBATCH), "configs/tiny_cpu.yaml", f"train.output_dir={out}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr, out


def _requeued(out: Path) -> bool:
    calls = out / "scontrol.calls"
    return calls.exists() and "requeue 4242" in calls.read_text()


def _decision(log: str) -> list[str]:
    said = [line.split("] ", 1)[1] for line in log.splitlines() if line.startswith("[train.sbatch")]
    return [line for line in said if line.startswith(("requeueing", "not requeueing", "requeue refused"))]


CASES = {
    # scenario, restarts, max: requeued?, exit code, the line
    "stopped-and-saved": ("stop", 0, 3, True, 75, "requeueing job 4242 (restart 1 of at most 3) to resume from "
                                                  "{out}/checkpoints/step_00000010"),
    "limit-reached": ("stop", 3, 3, False, 75, "not requeueing: the job was requeued 3 time(s), RINGTRAIN_MAX_REQUEUES=3;"
                                               " resubmit with train.output_dir={out} to continue from "
                                               "{out}/checkpoints/step_00000010"),
    "stopped-without-a-new-checkpoint": ("stop-no-checkpoint", 0, 3, False, 75,
                                         "not requeueing: the step stopped without a new complete checkpoint (newest: "
                                         "{out}/checkpoints/step_00000005)"),
    "crashed-after-usr1": ("crash", 0, 3, False, 1, "not requeueing: the step exited with 1, not 75 (a clean stop after "
                                                    "saving); see the log above"),
    "default-limit": ("stop", 19, None, True, 75, "requeueing job 4242 (restart 20 of at most 20) to resume from "
                                                  "{out}/checkpoints/step_00000010"),
}


@pytest.mark.parametrize("case", CASES)
def test_requeue_rules(tmp_path: Path, case: str) -> None:
    scenario, restarts, max_requeues, requeued, code, line = CASES[case]
    rc, log, out = _sbatch(tmp_path, scenario, restarts, max_requeues)
    assert rc == code, log
    assert _requeued(out) == requeued, log
    assert _decision(log) == [line.format(out=out)], log
    assert "--signal=USR1 4242" in (out / "scancel.calls").read_text()  # the ranks were asked to save


def test_a_finished_run_exits_0_without_requeue(tmp_path: Path) -> None:
    rc, log, out = _sbatch(tmp_path, "done", 0)
    assert rc == 0 and not _requeued(out) and _decision(log) == [], log
