"""A real one-node SLURM cluster (munged, slurmctld, slurmd from Debian's packages) in a temporary folder.

`slurm_cluster` is a session fixture: tests that take it submit real jobs with `sbatch`. Everything
(config, munge key and socket, state, spool, logs) lives under one temp dir and on free ports, so two
test sessions on one machine do not collide, and nothing under /etc is touched. Only a missing
package (that `.ci/run` installs) skips the tests; a daemon that does not come up is an error.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ringtrain.parallel.distributed import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo")
APT_PACKAGES = "munge slurmctld slurmd slurm-client"


def _find(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def missing_programs() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS) if _find(name) is None]


@dataclass
class SlurmCluster:
    """A running cluster. `env` is what a client command needs (SLURM_CONF); jobs inherit it."""

    root: Path
    node: str
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *args: str, check: bool = True, timeout: float = 30,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster (`env` adds variables, which sbatch passes to
        the job); raise with its output if it fails and `check`."""
        proc = subprocess.run(list(args), env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        fields = {}
        for token in out.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_job(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        """Poll until the job's state is one of `states`; AssertionError with the logs after `timeout`."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {info}\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld", "slurmd"):
            path = self.root / f"{name}.log"
            if path.exists():
                parts.append(f"--- {name}.log (tail)\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(parts)


def _write_config(root: Path, node: str) -> Path:
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=ringtrain-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
# No cgroups in a container: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# Look at pending jobs every second (default 60 s): a requeued job starts as soon as it is eligible.
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
# Keep finished jobs in scontrol long enough for the tests to read their state.
MinJobAge=600
KillWait=30
SlurmdTimeout=60
InactiveLimit=0
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def start_cluster(root: Path, timeout: float = 60) -> SlurmCluster:
    """Start munged, slurmctld and slurmd under `root`; return once the node is idle."""
    node = socket.gethostname().split(".")[0]
    conf = _write_config(root, node)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = SlurmCluster(root=root, node=node, env=env)
    munge = root / "munge"
    # --force: munged refuses a socket under a world-writable /tmp ancestor without it.
    cluster.procs["munged"] = subprocess.Popen(
        [_find("munged"), "--foreground", "--force", f"--socket={munge}/munge.socket", f"--key-file={key}",
         f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"],
        stdout=subprocess.DEVNULL, stderr=open(root / "munged.err", "wb"))  # noqa: SIM115 - lives with the daemon
    _wait_for(lambda: (munge / "munge.socket").exists(), timeout, "munged socket", cluster)
    # -D: stay in the foreground so the fixture owns the process; -i: ignore stale state; -c: clear old jobs.
    cluster.procs["slurmctld"] = subprocess.Popen(
        [_find("slurmctld"), "-D", "-i", "-c", "-f", str(conf)], env=env,
        stdout=subprocess.DEVNULL, stderr=open(root / "slurmctld.err", "wb"))  # noqa: SIM115
    _wait_for(lambda: cluster.run("scontrol", "ping", check=False).returncode == 0, timeout, "slurmctld", cluster)
    cluster.procs["slurmd"] = subprocess.Popen(
        [_find("slurmd"), "-D", "-N", node, "-f", str(conf)], env=env,
        stdout=subprocess.DEVNULL, stderr=open(root / "slurmd.err", "wb"))  # noqa: SIM115

    def idle() -> bool:
        out = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
        return out == "idle"

    _wait_for(idle, timeout, "node idle", cluster)
    return cluster


def _wait_for(ready, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                err = (cluster.root / f"{name}.err").read_text(errors="replace")
                stop_cluster(cluster)
                raise RuntimeError(f"{name} exited {proc.returncode} while waiting for {what}: {err}\n{cluster.logs()}")
        if ready():
            return
        time.sleep(0.2)
    stop_cluster(cluster)
    raise RuntimeError(f"{what} not ready after {timeout}s\n{cluster.logs()}")


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel leftover jobs, then stop the daemons (slurmd first, munged last), SIGKILL after 15 s."""
    if cluster.procs.get("slurmctld") and cluster.procs["slurmctld"].poll() is None:
        cluster.run("scancel", "--user", "root", check=False)
    for name in reversed(DAEMONS):
        proc = cluster.procs.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running one-node cluster for the session; skipped only where the Debian packages are absent."""
    missing = missing_programs()
    if missing:
        pytest.skip(f"SLURM not installed (missing {', '.join(missing)}): apt-get install -y {APT_PACKAGES}")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmd as SlurmUser=root: run the SLURM tests as root")
    root = tmp_path_factory.mktemp("slurm")
    cluster = start_cluster(root)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
        shutil.rmtree(root, ignore_errors=True)
