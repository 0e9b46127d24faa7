"""Parallel state: `ParallelDims` (the mesh, its groups and the run's SequenceParallel) and the distributed
bootstrap that builds it once per process."""

from ringtrain.parallel.dims import ParallelDims, default_device
from ringtrain.parallel.distributed import free_port, init_distributed, seed_everything, teardown_distributed

__all__ = ["ParallelDims", "default_device", "free_port", "init_distributed", "seed_everything",
           "teardown_distributed"]
