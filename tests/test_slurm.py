"""launch/slurm/train.sbatch on a real one-node SLURM cluster: a run, requeues that resume exactly, a killed rank.

Each job is the README demo (2 ranks, SP=2, gloo) shrunk to STEPS steps, submitted the way a user does
(`sbatch ... train.sbatch CONFIG key=value ...`) with the script's own log and run-folder defaults.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401 - the fixture

from ringtrain.parallel.distributed import free_port

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
STEPS = 40
TIMEOUT_S = 30  # parallel.timeout_s: the bound on how long survivors of a failed rank may wait
OVERRIDES = [
    f"train.max_steps={STEPS}", "train.seq_len=256", "train.micro_batch_size=2", "data.num_samples=256",
    "checkpoint.every_steps=20", "checkpoint.keep_last=2", "logging.progress_bar=false",
    f"parallel.timeout_s={TIMEOUT_S}",
]
JOB_TIMEOUT = 150


@dataclass
class Job:
    id: str
    name: str
    workdir: Path

    @property
    def log(self) -> Path:  # the script's default: logs/%x-%j.out in the submission folder
        return self.workdir / "logs" / f"{self.name}-{self.id}.out"

    @property
    def out(self) -> Path:  # the script's default: runs/<job name>-<job id>
        return self.workdir / "runs" / f"{self.name}-{self.id}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log yet)"


def _submit(cluster: SlurmCluster, workdir: Path, name: str, *overrides: str) -> Job:
    (workdir / "logs").mkdir(parents=True, exist_ok=True)  # SLURM opens the log before the script runs
    # A free rendezvous port: another test session's cluster on this machine numbers its jobs from 1 too,
    # so the script's default (29500 + job id % 1000) could collide.
    env = {"RINGTRAIN_NPROC_PER_NODE": "2", "RINGTRAIN_PYTHON": sys.executable, "RINGTRAIN_RDZV_PORT": str(free_port())}
    proc = cluster.run("sbatch", "--parsable", f"--job-name={name}", f"--chdir={workdir}", "--cpus-per-task=2",
                       str(SBATCH), str(CONFIG), *OVERRIDES, *overrides, env=env)
    return Job(id=proc.stdout.strip().split(";")[0], name=name, workdir=workdir)


def _losses(job: Job) -> dict[int, float]:
    path = job.out / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps repeated or out of order: {steps}"
    return {r["step"]: r["loss"] for r in records}


def _wait_for_step(cluster: SlurmCluster, job: Job, step: int, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(_losses(job)) >= step:
            return
        state = cluster.job(job.id).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job.id} is {state}:\n{job.log_text()}"
        time.sleep(0.1)
    raise AssertionError(f"job {job.id} did not reach step {step} in {timeout}s:\n{job.log_text()}")


def _finish(cluster: SlurmCluster, job: Job) -> dict[str, str]:
    info = cluster.wait_job(job.id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), JOB_TIMEOUT)
    return info


def _rank_pids(cluster: SlurmCluster, job_id: str) -> dict[int, int]:
    """rank -> pid of the job's training processes (torchrun's children), read from /proc."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = dict(v.split(b"=", 1) for v in (entry / "environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if not _of_job(environ, cluster, job_id) or b"RANK" not in environ:
            continue
        if b"ringtrain.cli" in cmdline and b"torch.distributed.run" not in cmdline:
            pids[int(environ[b"RANK"])] = int(entry.name)
    return pids


def _job_processes(cluster: SlurmCluster, job_id: str) -> list[int]:
    """Every live process of the job that runs Python (torchrun and the ranks)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = dict(v.split(b"=", 1) for v in (entry / "environ").read_bytes().split(b"\0") if b"=" in v)
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if state != "Z" and _of_job(environ, cluster, job_id) and b"python" in cmdline:
            alive.append(int(entry.name))
    return alive


def _of_job(environ: dict[bytes, bytes], cluster: SlurmCluster, job_id: str) -> bool:
    """Whether a process environment belongs to this job of this cluster (job ids repeat across clusters)."""
    return (environ.get(b"SLURM_JOB_ID") == job_id.encode()
            and environ.get(b"SLURM_CONF") == cluster.env["SLURM_CONF"].encode())


@pytest.fixture(scope="module")
def reference(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Job:  # noqa: F811
    """One uninterrupted job: what the interrupted ones must reproduce."""
    job = _submit(slurm_cluster, tmp_path_factory.mktemp("ref"), "ref")
    info = _finish(slurm_cluster, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{job.log_text()}"
    return job


def test_sbatch_trains_to_the_end(reference: Job) -> None:
    assert sorted(_losses(reference)) == list(range(1, STEPS + 1))
    assert (reference.out / "final_model" / "model.safetensors").exists()
    assert (reference.out / "final_model" / "config.json").exists()
    log = reference.log_text()
    assert f"job {reference.id} restart 0: 1 node(s) x 2 rank(s)" in log
    assert "training step exited with 0" in log


def _assert_resumed_exactly(job: Job, reference: Job, stopped_at: int) -> None:
    log = job.log_text()
    assert f"job {job.id} restart 1:" in log and "checkpoint.resume=auto" in log, log
    # The second life resumed from the checkpoint the first one saved on the signal, not a periodic one.
    run_dir = job.out.relative_to(job.workdir)  # the script's default output_dir is relative to the job's cwd
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d} at step {stopped_at}" in log, log
    resumed = _losses(job)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # every step once: the log and metrics line up
    assert resumed == _losses(reference)  # bitwise, step by step, the final loss included
    assert (job.out / "final_model" / "model.safetensors").exists()


def _stop_step(job: Job) -> int:
    found = set(re.findall(r"stopped at step (\d+) after a signal", job.log_text()))
    assert len(found) == 1, f"expected one agreed stop step, got {found}:\n{job.log_text()}"
    step = int(found.pop())
    assert 5 <= step < STEPS, f"the run stopped at {step}: make it longer"
    return step


def test_usr1_saves_requeues_and_resumes_exactly(slurm_cluster: SlurmCluster, reference: Job,  # noqa: F811
                                                 tmp_path: Path) -> None:
    """The time-limit path: USR1 to the batch script (what --signal=B:USR1@T sends) -> save -> requeue."""
    job = _submit(slurm_cluster, tmp_path, "usr1", "logging.wandb_mode=offline")
    _wait_for_step(slurm_cluster, job, 5)
    t0 = time.monotonic()
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job.id)
    info = _finish(slurm_cluster, job)
    round_trip = time.monotonic() - t0
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{job.log_text()}"
    log = job.log_text()
    assert "USR1: forwarding to the training step" in log and f"requeueing job {job.id}" in log, log
    assert "exitcode  : 75" in log, log  # the ranks said "stopped, resumable" (cli EXIT_STOPPED)
    _assert_resumed_exactly(job, reference, _stop_step(job))
    # Both lives logged into one W&B run: the id came back from the checkpoint.
    run_ids = re.findall(r"W&B run (\w+) \(offline\)", log)
    assert len(run_ids) == 2 and run_ids[0] == run_ids[1], run_ids
    assert round_trip < JOB_TIMEOUT


def test_scontrol_requeue_of_a_running_job_resumes_exactly(slurm_cluster: SlurmCluster,  # noqa: F811
                                                           reference: Job, tmp_path: Path) -> None:
    """The scheduler's path (preemption with PreemptMode=REQUEUE, or an admin): SIGTERM to everything, requeue."""
    job = _submit(slurm_cluster, tmp_path, "requeue")
    _wait_for_step(slurm_cluster, job, 5)
    slurm_cluster.run("scontrol", "requeue", job.id)
    info = _finish(slurm_cluster, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{job.log_text()}"
    _assert_resumed_exactly(job, reference, _stop_step(job))


def test_killed_rank_fails_the_job_fast_and_is_named(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:  # noqa: F811
    job = _submit(slurm_cluster, tmp_path, "kill")
    _wait_for_step(slurm_cluster, job, 5)
    pids = _rank_pids(slurm_cluster, job.id)
    assert sorted(pids) == [0, 1], pids
    t0 = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)  # mid-step: steps follow each other back to back
    while _job_processes(slurm_cluster, job.id) and time.monotonic() - t0 < TIMEOUT_S + 30:
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    assert not _job_processes(slurm_cluster, job.id), f"processes left {elapsed:.0f}s after the kill:\n{job.log_text()}"
    assert elapsed < TIMEOUT_S, f"survivors took {elapsed:.1f}s > parallel.timeout_s={TIMEOUT_S}"
    info = _finish(slurm_cluster, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    assert info["Restarts"] == "0"  # a failure is not a preemption: no requeue
    log = job.log_text()
    # torchrun's summary names the rank that died first; the survivor names itself and the collective error.
    assert re.search(r"Root Cause.*?rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", log, re.S), log
    assert re.search(r"\[rank 0\] ERROR ringtrain\.train\.trainer: rank 0 failed: \w+Error: .*gloo", log), log
    assert not (job.out / "final_model").exists()
