"""Run a function on N local CPU processes over gloo: the one spawn helper for tests and benchmarks.

Each worker gets an initialised default group and its ('dp', 'sp') mesh. An exception on any rank
fails the call and names the rank with its traceback; a rank that hangs or dies is killed at the
timeout, so a distributed bug fails a test instead of stalling CI.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ringtrain.config import ParallelConfig
from ringtrain.parallel.distributed import free_port
from ringtrain.ring.comm import RingComm


class RankFailedError(RuntimeError):
    """A worker rank raised, or exited without reporting."""


class RankTimeoutError(RuntimeError):
    """Some ranks had not finished when the timeout expired."""


def _worker(
    rank: int, world_size: int, port: int, sp_size: int, ulysses_size: int, threads: int,
    collective_timeout: float, fn: Callable, args: tuple, kwargs: dict, results: mp.Queue,
) -> None:
    import torch.distributed as dist

    from ringtrain.parallel import ParallelDims

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=collective_timeout)
        )
        mesh = ParallelDims.build(ParallelConfig(sp_size=sp_size, ulysses_size=ulysses_size), device=torch.device("cpu"))
        out = fn(mesh, *args, **kwargs)
        buf = io.BytesIO()
        torch.save(out, buf)  # bytes, not shared-memory tensors: safe after this process exits
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - everything must reach the parent, KeyboardInterrupt included
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a peer may already be gone
                pass


def _failure_message(procs: list, outputs: dict, rank: int, world_size: int, tb: str) -> str:
    """Name the root cause first: a rank that died silently makes its peers raise connection errors."""
    time.sleep(1.0)  # let a crashed peer's exit code become visible
    dead = [
        f"rank {r} exited with code {p.exitcode} without reporting a result"
        for r, p in enumerate(procs)
        if r != rank and r not in outputs and p.exitcode not in (None, 0)
    ]
    head = "; ".join(dead) + "; then " if dead else ""
    return f"{head}rank {rank} of {world_size} raised:\n{tb}"


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    sp_size: int | None = None,
    ulysses_size: int = 1,
    timeout: float = 120.0,
    threads: int = 1,
    **kwargs: Any,
) -> list[Any]:
    """Run `fn(mesh, *args, **kwargs)` on `world_size` gloo ranks; return each rank's result, by rank.

    `fn` must be importable (a module-level function). `sp_size` defaults to the whole world; `ulysses_size`
    splits it into ring x Ulysses (the dims' `sp`).
    Raises RankFailedError naming the first failing rank, or RankTimeoutError naming the ranks
    still running after `timeout` seconds; surviving processes are killed either way.
    """
    sp_size = world_size if sp_size is None else sp_size
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    port = free_port()
    # Collectives time out a little after the harness does, so the harness reports the hang first.
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, sp_size, ulysses_size, threads, timeout + 30, fn, args, kwargs, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.2)
            except queue.Empty:
                for rank, p in enumerate(procs):
                    if rank not in outputs and p.exitcode is not None:
                        # Give a report that is still in flight a moment to arrive before blaming the rank.
                        try:
                            r, status, payload = results.get(timeout=2.0)
                        except queue.Empty:
                            raise RankFailedError(
                                f"rank {rank} exited with code {p.exitcode} without reporting a result"
                            ) from None
                        rank = r
                        break
                else:
                    if time.monotonic() > deadline:
                        pending = [r for r in range(world_size) if r not in outputs]
                        raise RankTimeoutError(
                            f"ranks {pending} of {world_size} did not finish within {timeout:.0f}s (hang?)"
                        ) from None
                    continue
            if status == "error":
                raise RankFailedError(_failure_message(procs, outputs, rank, world_size, payload))
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        results.close()
    return [outputs[r] for r in range(world_size)]


def start_torchrun(config: str | os.PathLike, out: Path, *overrides: str, nproc: int = 2,
                   cwd: str | os.PathLike | None = None) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node=<nproc> -m ringtrain.cli train <config> train.output_dir=<out>
    <overrides>` in a session of its own (a signal to its process group reaches torchrun as a terminal's would), its
    output appended to <out>.log beside the run folder."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ringtrain.cli", "train", str(config), f"train.output_dir={out}", *overrides]
    log = open(out.parent / f"{out.name}.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    """The exit code of a `start_torchrun` job; past `timeout` seconds its process group is killed and the timeout
    raised."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def run_metrics(out: Path) -> dict[int, dict[str, Any]]:
    """The records of <out>/metrics.jsonl by step ({} before the first)."""
    path = out / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return {r["step"]: r for r in records}


def wait_for_steps(out: Path, proc: subprocess.Popen, steps: int, timeout: float = 240) -> None:
    """Return once <out>/metrics.jsonl holds `steps` steps; fail if the job ends first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while len(run_metrics(out)) < steps:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended with {proc.returncode} before step {steps}; see {out}.log")
        if time.monotonic() > deadline:
            raise AssertionError(f"step {steps} not reached in {timeout:.0f}s; see {out}.log")
        time.sleep(0.05)


class HostStagedComm(RingComm):
    """RingComm for device tensors over gloo, staged through host memory.

    NCCL refuses two ranks on one GPU, so a one-GPU machine cannot run a real NCCL ring; with this communicator
    several gloo ranks can share the GPU and the CUDA kernels, merge and autograd run under a real multi-rank ring
    (tests/test_ring_cuda.py). A test harness, not a transport: every hop costs two host copies and a device sync.
    """

    def post(self, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor], hops: int = 1) -> list:
        host_send = [t.cpu() for t in send]  # kept alive in the handle until the transfer completes
        host_recv = [torch.empty(t.shape, dtype=t.dtype) for t in recv]
        works = super().post(host_send, host_recv, hops)
        return [(works, host_send, list(zip(host_recv, recv, strict=True)))]

    @staticmethod
    def wait(works: list) -> None:
        for inner, _, pairs in works:
            RingComm.wait(inner)
            for host, device_buf in pairs:
                device_buf.copy_(host)
