# How a sequence is split over the ranks of a sequence-parallel group (zigzag or contiguous chunks).

from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = ("zigzag", "contiguous")


def group_world_rank(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(world size, rank) of `group` (None = default group); a world of one when distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError(
                "group was given but torch.distributed is not initialised: "
                "call init_process_group first, or pass group=None for a world of one"
            )
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}: pass layout='zigzag' or 'contiguous'")


def num_chunks(world: int, layout: str) -> int:
    """How many equal chunks the global sequence is cut into."""
    check_layout(layout)
    return 2 * world if layout == "zigzag" else world


def local_chunk_ids(world: int, rank: int, layout: str) -> tuple[int, ...]:
    """Global ids of the chunks rank `rank` holds, in local order.

    Local order is always increasing global order (r < 2P-1-r), so a causal mask on the local
    sequence equals the global causal mask restricted to this rank's tokens: step 0 of the ring
    is one plain causal kernel call in every layout.
    """
    check_layout(layout)
    if layout == "zigzag":
        return (rank, 2 * world - 1 - rank)
    return (rank,)


def check_seq_len(seq_len: int, world: int, layout: str, *, what: str = "sequence length") -> None:
    multiple = num_chunks(world, layout)
    if seq_len % multiple:
        fix = ((seq_len + multiple - 1) // multiple) * multiple
        raise ValueError(
            f"{what} {seq_len} is not a multiple of {multiple} "
            f"({'2 x ' if layout == 'zigzag' else ''}world size {world}, layout={layout!r}): "
            f"pad the sequence to {fix} tokens"
        )


def shard_sequence(
    x: torch.Tensor, *, group: dist.ProcessGroup | None = None, dim: int = 1, layout: str = "zigzag"
) -> torch.Tensor:
    """This rank's part of the full sequence `x` (split along `dim`), as a new contiguous tensor."""
    world, rank = group_world_rank(group)
    check_seq_len(x.shape[dim], world, layout)
    chunks = x.chunk(num_chunks(world, layout), dim=dim)
    return torch.cat([chunks[c] for c in local_chunk_ids(world, rank, layout)], dim=dim)


def unshard_sequence(
    x_local: torch.Tensor, *, group: dist.ProcessGroup | None = None, dim: int = 1, layout: str = "zigzag"
) -> torch.Tensor:
    """The full sequence on every rank, from each rank's part (all_gather; a utility, not used by the ring)."""
    world, rank = group_world_rank(group)
    per_rank = len(local_chunk_ids(world, rank, layout))
    if x_local.shape[dim] % per_rank:
        raise ValueError(
            f"local length {x_local.shape[dim]} along dim {dim} is not a multiple of {per_rank} "
            f"(chunks per rank for layout={layout!r}): pass a tensor sharded with shard_sequence"
        )
    if world == 1:
        return x_local.clone()
    parts = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    chunks: list[torch.Tensor | None] = [None] * num_chunks(world, layout)
    for r, part in enumerate(parts):
        for c, piece in zip(local_chunk_ids(world, r, layout), part.chunk(per_rank, dim=dim), strict=True):
            chunks[c] = piece
    return torch.cat(chunks, dim=dim)  # type: ignore[arg-type]


def sequence_positions(
    seq_len: int,
    *,
    group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Global positions (LongTensor [seq_len // world]) of this rank's tokens, e.g. for RoPE position_ids."""
    world, rank = group_world_rank(group)
    check_seq_len(seq_len, world, layout)
    chunk = seq_len // num_chunks(world, layout)
    return torch.cat(
        [torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in local_chunk_ids(world, rank, layout)]
    )
