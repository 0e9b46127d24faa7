"""Distributed bootstrap: process group from torchrun/SLURM, device, seed, and the one dp x sp mesh.

Every function takes the mesh (or a process group) explicitly; nothing here is a module-level
singleton, so two meshes can coexist in one process (tests build several).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ringtrain.config import ParallelConfig, resolve_parallel_sizes
from ringtrain.log import get_logger
from ringtrain.ring.layout import Layout
from ringtrain.ring.parallel import SequenceParallel

logger = get_logger(__name__)


@dataclass(frozen=True)
class Mesh:
    """The one named ('dp', 'sp') device mesh of a run, with the groups code needs."""

    device_mesh: DeviceMesh
    """2-D, dims ('dp', 'sp'); SP ranks are adjacent."""
    world_mesh: DeviceMesh
    """The same ranks as one 1-D 'world' dim: FSDP shards over all of them (dp x sp)."""
    device: torch.device
    hybrid_mesh: DeviceMesh | None = None
    """With parallel.ulysses_size > 1: the same ranks as ('dp', 'ring', 'ulysses'); Ulysses ranks are adjacent."""

    @property
    def dp_size(self) -> int:
        return self.device_mesh.size(0)

    @property
    def sp_size(self) -> int:
        return self.device_mesh.size(1)

    @property
    def sp_group(self) -> dist.ProcessGroup:
        return self.device_mesh.get_group("sp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.device_mesh.get_group("dp")

    @property
    def sp_rank(self) -> int:
        return self.device_mesh.get_local_rank("sp")

    @property
    def ulysses_size(self) -> int:
        return 1 if self.hybrid_mesh is None else self.hybrid_mesh.size(2)

    @property
    def ring_group(self) -> dist.ProcessGroup:
        return self.sp_group if self.hybrid_mesh is None else self.hybrid_mesh.get_group("ring")

    @property
    def ulysses_group(self) -> dist.ProcessGroup | None:
        return None if self.hybrid_mesh is None else self.hybrid_mesh.get_group("ulysses")

    def sequence_parallel(self, layout: str | Layout = "zigzag", parallel: ParallelConfig | None = None
                          ) -> SequenceParallel:
        """The SequenceParallel of this mesh's SP dimension (ring x Ulysses) with `layout` (and, from `parallel`,
        the attention kernel and tile size)."""
        extra = {} if parallel is None else {"kernel": parallel.attention_kernel,
                                             "tile_tokens": parallel.tile_tokens or None}
        return SequenceParallel(ring_group=self.ring_group, ulysses_group=self.ulysses_group, layout=layout, **extra)

    @property
    def dp_rank(self) -> int:
        return self.device_mesh.get_local_rank("dp")

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()


def build_mesh(parallel: ParallelConfig, device: torch.device | None = None) -> Mesh:
    """Build the ('dp', 'sp') mesh over the initialised default group; SP ranks are adjacent.

    SP groups take consecutive ranks so that, on a multi-GPU node, the ring runs over NVLink and
    only the (rarer) data-parallel reductions cross nodes.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs torch.distributed to be initialised: call init_distributed first")
    world = dist.get_world_size()
    dp, sp = resolve_parallel_sizes(parallel, world)
    device = device or default_device()
    device_mesh = init_device_mesh(device.type, (dp, sp), mesh_dim_names=("dp", "sp"))
    world_mesh = DeviceMesh(device.type, torch.arange(world), mesh_dim_names=("world",))
    hybrid = None
    u = parallel.ulysses_size
    if u > 1:
        # Ulysses ranks consecutive (the all-to-all stays inside a node), ring ranks strided by U (USP's choice).
        hybrid = DeviceMesh(device.type, torch.arange(world).view(dp, sp // u, u),
                            mesh_dim_names=("dp", "ring", "ulysses"))
    return Mesh(device_mesh=device_mesh, world_mesh=world_mesh, device=device, hybrid_mesh=hybrid)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


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


def init_distributed(parallel: ParallelConfig, seed: int | None = None) -> Mesh:
    """Initialise torch.distributed from the torchrun (or SLURM) environment and build the mesh.

    NCCL on CUDA, gloo on CPU, both with `parallel.timeout_s` so a dead peer turns into an error
    instead of a hang. A plain `python` start (no launcher) becomes a world of one.
    """
    _env_from_slurm()
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
    mesh = build_mesh(parallel, device)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    if parallel.ulysses_size > 1 and local % parallel.ulysses_size:
        # Correct either way, but the all-to-all is the bandwidth-hungry part: it belongs inside a node.
        logger.warning("parallel.ulysses_size=%d does not divide the %d ranks per node: Ulysses groups cross nodes "
                       "and their all-to-alls go over the network; choose a ulysses_size that divides the GPUs per "
                       "node (the ring, sp_size / ulysses_size, is the part that should span nodes)",
                       parallel.ulysses_size, local)
    logger.info(
        "initialised %s world=%d dp=%d sp=%d (ulysses %d) device=%s",
        dist.get_backend(), dist.get_world_size(), mesh.dp_size, mesh.sp_size, mesh.ulysses_size, device,
    )
    return mesh


def teardown_distributed() -> None:
    """Barrier, then destroy the process groups (idempotent). Only for ranks that all reached the same point.

    The barrier is not ceremony: gloo's worker thread frees a finished collective's tensors after the caller has
    returned, and freeing a tensor that Python created (broadcast_object_list's) takes the GIL. If the main thread
    runs on into interpreter exit without releasing the GIL, that worker dies in take_gil and the process aborts
    ("terminate called without an active exception", exit -6 instead of 0 or 2: seen in 9 of 25 refused resumes).
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
