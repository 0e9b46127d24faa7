"""ParallelDims: the one owner of a run's parallel state, built once by `init_distributed`.

One world DeviceMesh with dims ('dp', 'ring', 'ulysses') (Ulysses ranks consecutive so their all-to-all stays inside
a node, ring ranks strided by U, SP ranks adjacent so data-parallel reductions are the ones that cross nodes), its
flattened submeshes ('sp' = ring x ulysses, 'world' = every rank, the FSDP mesh), and the run's `SequenceParallel`
(concrete groups, communicators built once, the resolved layout). Trainer, evaluation, `shard_batch`, the HF binding
and the benchmarks all receive it; nothing here is a module-level singleton, so two can coexist in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ringtrain.config import ParallelConfig, resolve_layout, resolve_parallel_sizes
from ringtrain.log import get_logger
from ringtrain.ring import SequenceParallel

logger = get_logger(__name__)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@dataclass(frozen=True, eq=False)
class ParallelDims:
    """The run's mesh, its groups and its sequence parallelism. Build it with `ParallelDims.build`."""

    world_mesh: DeviceMesh
    """3-D, dims ('dp', 'ring', 'ulysses'); rank = (dp x R + ring) x U + ulysses."""
    sp_mesh: DeviceMesh
    """The SP ranks of this rank's sequence, flattened ('sp' = ring x ulysses)."""
    fsdp_mesh: DeviceMesh
    """Every rank, flattened ('world'): FSDP shards over dp x sp, since SP ranks' gradients are partial sums too."""
    sp: SequenceParallel
    """The sequence parallelism of every model of the run, with the run's layout, kernel and tile size."""
    device: torch.device

    @classmethod
    def build(cls, parallel: ParallelConfig, *, document_mask: bool = False,
              device: torch.device | None = None) -> ParallelDims:
        """The dims of `parallel` over the initialised default group. `document_mask` resolves layout 'auto'
        (balanced for packed documents, zigzag otherwise; logged)."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build needs torch.distributed initialised: call init_distributed")
        dp, sp = resolve_parallel_sizes(parallel, dist.get_world_size())
        u = parallel.ulysses_size
        device = device or default_device()
        world_mesh = init_device_mesh(device.type, (dp, sp // u, u), mesh_dim_names=("dp", "ring", "ulysses"))
        # Flattened submeshes are how torchtitan names a product of mesh dims (one group each, built once).
        sp_mesh = world_mesh["ring", "ulysses"]._flatten("sp")
        fsdp_mesh = world_mesh._flatten("world")
        layout = resolve_layout(parallel, document_mask)
        if parallel.layout == "auto":
            logger.info("parallel.layout=auto -> %s (data.document_mask=%s)", layout, document_mask)
        seq = SequenceParallel(
            ring_group=world_mesh.get_group("ring"), ulysses_group=world_mesh.get_group("ulysses") if u > 1 else None,
            layout=layout, kernel=parallel.attention_kernel, tile_tokens=parallel.tile_tokens or None,
        )
        return cls(world_mesh=world_mesh, sp_mesh=sp_mesh, fsdp_mesh=fsdp_mesh, sp=seq, device=device)

    # --- sizes and ranks ---------------------------------------------------------------------------------------
    @property
    def dp_size(self) -> int:
        return self.world_mesh.size(0)

    @property
    def sp_size(self) -> int:
        return self.sp_mesh.size()

    @property
    def ulysses_size(self) -> int:
        return self.world_mesh.size(2)

    @property
    def dp_rank(self) -> int:
        return self.world_mesh.get_local_rank("dp")

    @property
    def sp_rank(self) -> int:
        return self.sp_mesh.get_local_rank()

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    # --- groups ------------------------------------------------------------------------------------------------
    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.world_mesh.get_group("dp")

    @property
    def sp_group(self) -> dist.ProcessGroup:
        return self.sp_mesh.get_group()

    @property
    def ring_group(self) -> dist.ProcessGroup:
        return self.world_mesh.get_group("ring")

    @property
    def ulysses_group(self) -> dist.ProcessGroup | None:
        return self.sp.ulysses_group

    def describe(self) -> str:
        return (f"world={self.world_size} dp={self.dp_size} sp={self.sp_size} ({self.sp.describe()}) "
                f"device={self.device}")
