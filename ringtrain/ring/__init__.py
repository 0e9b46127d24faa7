# Sequence-parallel ring attention on plain tensors (no transformers import): the runtime the HF adapter wraps.

from ringtrain.ring.attention import (
    RingDocuments,
    gather_documents,
    ring_attention,
)
from ringtrain.ring.kernels import KERNELS, LocalKernel, mask_fallback, select_kernel
from ringtrain.ring.layout import (
    CONTIGUOUS,
    LAYOUTS,
    ZIGZAG,
    Layout,
    check_seq_len,
    get_layout,
    group_world_rank,
    local_chunk_ids,
    num_chunks,
    sequence_positions,
    shard_sequence,
    unshard_sequence,
)
from ringtrain.ring.merge import merge_partial
from ringtrain.ring.parallel import SequenceParallel, sequence_parallel_attention
from ringtrain.ring.plan import Block, RingClassification, build_plan, build_tiles, plan_step, rank_work
from ringtrain.ring.ulysses import ulysses_head_problems

__all__ = [
    "CONTIGUOUS",
    "KERNELS",
    "LAYOUTS",
    "ZIGZAG",
    "Block",
    "Layout",
    "LocalKernel",
    "RingClassification",
    "RingDocuments",
    "SequenceParallel",
    "build_plan",
    "build_tiles",
    "check_seq_len",
    "gather_documents",
    "get_layout",
    "group_world_rank",
    "local_chunk_ids",
    "mask_fallback",
    "merge_partial",
    "num_chunks",
    "plan_step",
    "rank_work",
    "ring_attention",
    "select_kernel",
    "sequence_parallel_attention",
    "sequence_positions",
    "shard_sequence",
    "ulysses_head_problems",
    "unshard_sequence",
]
