"""The sequence-parallel forward of evaluation: shard a full-length batch, run the decoder, complete the results.

Every rank of an SP group feeds the same full-length batch through `shard_batch` and the ring, so a context that does
not fit one device still runs. Ranks only ever compute on their own shard: hidden states are turned into logits at
the few positions that are scored, never as a full [tokens, vocab] tensor. Per-item results are partial sums on each
SP rank and disjoint items across DP ranks, so one SUM all-reduce over the world completes them all. `dims=None` is
one process without torch.distributed (the reference the sharded evaluation is tested against).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ringtrain.ring import SequenceParallel

if TYPE_CHECKING:
    from ringtrain.parallel.dims import ParallelDims


def check_dims(dims: ParallelDims | None) -> None:
    if dims is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("dims=None means one process, but torch.distributed runs several ranks: pass the dims")


def sequence_parallel(dims: ParallelDims | None) -> SequenceParallel:
    """The run's sequence parallelism; a world of one without dims. No documents in evaluation: a per-batch layout
    (balanced) shards exactly as zigzag here."""
    return SequenceParallel() if dims is None else dims.sp


def padded_length(n: int, dims: ParallelDims | None) -> int:
    """`n` rounded up to what the layout can shard; the right padding is masked, so any length can be evaluated."""
    return sequence_parallel(dims).padded_length(n)


def world_sum(t: torch.Tensor, dims: ParallelDims | None, op: Any = None) -> torch.Tensor:
    """Complete per-item results: SP ranks hold partial sums, DP ranks disjoint items (zeros elsewhere)."""
    if dims is not None and dims.world_size > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def sp_max(t: torch.Tensor, dims: ParallelDims | None) -> torch.Tensor:
    """MAX over the SP group: what one rank of a sequence found, every rank of it gets."""
    return t if dims is None else dims.sp.all_reduce_max(t)


def my_items(n_items: int, dims: ParallelDims | None) -> range:
    """Batches this rank's DP group evaluates (round robin); SP ranks of a group take the same ones."""
    if dims is None:
        return range(n_items)
    return range(dims.dp_rank, n_items, dims.dp_size)


def device_of(lm: nn.Module, dims: ParallelDims | None) -> torch.device:
    return dims.device if dims is not None else next(lm.parameters()).device


def full_batch(rows: list[list[int]], padded: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [B, padded] input_ids and attention_mask for token lists."""
    ids = torch.full((len(rows), padded), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), padded), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[b, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def local_hidden(lm: nn.Module, batch: dict[str, torch.Tensor], dims: ParallelDims | None,
                 device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """This rank's shard of `batch` and the final hidden states of its tokens [B, S_local, d]."""
    from ringtrain.hf import shard_batch

    local = shard_batch(batch, sequence_parallel(dims))
    local = {k: v.to(device) for k, v in local.items()}
    # The decoder stack, not the LM head: logits are only formed where they are scored.
    hidden = lm.get_decoder()(input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False)[0]
    return local, hidden


@contextlib.contextmanager
def evaluation_mode(lm: nn.Module, fsdp_root: nn.Module | None = None) -> Iterator[None]:
    """no_grad + eval mode (restored after); with FSDP2, the root unit's parameters (embedding, final norm, LM
    head) are gathered for the duration, because evaluation calls the decoder and the head directly, bypassing
    the root module's forward whose hooks would otherwise gather them. Decoder layers gather themselves."""
    from torch.distributed.fsdp import FSDPModule

    was_training = lm.training
    gathered = isinstance(fsdp_root, FSDPModule)
    lm.eval()
    try:
        with torch.no_grad():
            if gathered:
                fsdp_root.unshard()
            try:
                yield
            finally:
                if gathered:
                    fsdp_root.reshard()
    finally:
        lm.train(was_training)
