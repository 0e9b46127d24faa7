"""Distributed bootstrap: the process group from torchrun or SLURM, the run's `ParallelDims`, seeds, teardown.

Nothing here is a module-level singleton: everything that needs parallel state receives the ParallelDims.
"""

from __future__ import annotations

import os
import random
from datetime import timedelta

import torch
import torch.distributed as dist

from ringtrain.config import ParallelConfig
from ringtrain.log import get_logger
from ringtrain.parallel.dims import ParallelDims, default_device

logger = get_logger(__name__)


def _env_from_slurm() -> None:
    """Fill torchrun's variables from SLURM's when a job step was started by `srun` without torchrun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise RuntimeError(
            "started by srun without torchrun: export MASTER_ADDR (the first node of the allocation) "
            "and MASTER_PORT in the job script, or launch through launch/slurm/train.sbatch"
        )


def exit_with_launcher(poll_s: float = 0.5) -> bool:
    """Under torchrun, end this rank when torchrun dies; returns whether a watch was started.

    A SIGKILLed torchrun cannot stop its ranks: they would train on, reparented, while the launcher reports the run
    as failed, and a relaunch would then share the folder with them. A daemon thread watches the parent pid (which
    changes when the parent dies, whichever of the launcher's threads started the rank, unlike PR_SET_PDEATHSIG)
    and ends the process at once. Only under torchrun (TORCHELASTIC_RUN_ID): a plain `python` start may outlive
    its shell on purpose (nohup).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        try:
            logger.error("rank %s: its launcher (pid %d) has exited: stopping at once, without saving",
                         os.environ.get("RANK", "?"), parent)
        finally:
            os._exit(1)

    threading.Thread(target=watch, name="ringtrain-launcher-watch", daemon=True).start()
    return True


def init_distributed(parallel: ParallelConfig, *, document_mask: bool = False, seed: int | None = None
                     ) -> ParallelDims:
    """Initialise torch.distributed from the torchrun (or SLURM) environment and build the run's `ParallelDims`
    (`document_mask` resolves parallel.layout=auto).

    NCCL on CUDA, gloo on CPU, both with `parallel.timeout_s` so a dead peer turns into an error
    instead of a hang. A plain `python` start (no launcher) becomes a world of one.
    """
    _env_from_slurm()
    exit_with_launcher()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is unset: launch with torchrun")
        os.environ["MASTER_PORT"] = str(free_port())
    device = default_device()
    timeout = timedelta(seconds=parallel.timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # Surface NCCL failures as exceptions (and tear the process down) instead of blocking forever.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    if seed is not None:
        seed_everything(seed)
    dims = ParallelDims.build(parallel, document_mask=document_mask, device=device)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    if parallel.ulysses_size > 1 and local % parallel.ulysses_size:
        # Correct either way, but the all-to-all is the bandwidth-hungry part: it belongs inside a node.
        logger.warning("parallel.ulysses_size=%d does not divide the %d ranks per node: Ulysses groups cross nodes "
                       "and their all-to-alls go over the network; choose a ulysses_size that divides the GPUs per "
                       "node (the ring, sp_size / ulysses_size, is the part that should span nodes)",
                       parallel.ulysses_size, local)
    logger.info("initialised %s %s", dist.get_backend(), dims.describe())
    return dims


def teardown_distributed() -> None:
    """Barrier, then destroy the process groups (idempotent). Only for ranks that all reached the same point.

    The barrier is not ceremony: gloo's worker thread frees a finished collective's tensors after the caller has
    returned, and freeing a tensor that Python created (broadcast_object_list's) takes the GIL. If the main thread
    runs on into interpreter exit without releasing the GIL, that worker dies in take_gil and the process aborts
    ("terminate called without an active exception", exit -6 instead of 0 or 2).
    Waiting in a barrier releases the GIL, so the worker finishes first.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python, torch CPU and CUDA RNGs with the same seed on every rank (identical model init)."""
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def free_port() -> int:
    """A TCP port that was free a moment ago, for a local rendezvous."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
