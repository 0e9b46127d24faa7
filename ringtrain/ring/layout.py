# How a sequence is split over the ranks of a sequence-parallel group: layout objects, and the shard / unshard /
# positions functions that every other module calls (the only place that turns a layout into positions).
#
# A layout assigns each rank of a ring of `world` ranks an equal share of the positions [0, S), as a few runs of
# consecutive positions held in increasing order. Increasing local order is what lets ring step 0 be one plain
# top-left causal kernel call in every layout: a causal mask on the local tokens equals the global causal mask
# restricted to them. Zigzag and contiguous are static instances; a data-dependent layout (a permutation chosen per
# batch) is a third kind with the same interface.
#
# Hybrid sequence parallelism (Ulysses x ring) uses USP's token layout: SP rank r = ring_index x U +
# ulysses_index; the sequence is sharded over the R ring ranks by the layout, then each ring shard is cut into U
# contiguous equal parts and the rank holds part ulysses_index. The all-to-all over heads then gives every rank of a
# Ulysses group its whole ring shard, in local order, for its share of the heads.

from __future__ import annotations

import torch
import torch.distributed as dist


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


def _optional_group_world_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """Like group_world_rank, but None means "no such dimension" (a world of one), not the default group."""
    return (1, 0) if group is None else group_world_rank(group)


Runs = tuple[tuple[int, int], ...]
"""(start, stop) runs of consecutive global positions, in increasing order."""


class Layout:
    """Which global positions each rank of a ring holds. Subclasses define `runs`; the rest derives from it."""

    name: str = ""
    static: bool = True
    """Positions depend on (seq_len, world, rank) only: no per-batch data, so plans can be cached by value."""

    def multiple(self, world: int) -> int:
        """The sequence length must be a multiple of this."""
        raise NotImplementedError

    def runs(self, seq_len: int, world: int, rank: int) -> Runs:
        """Rank `rank`'s positions as runs in increasing order, seq_len // world positions in all."""
        raise NotImplementedError

    def multiple_reason(self, world: int) -> str:
        return f"world size {world}, layout={self.name!r}"

    def positions(self, seq_len: int, world: int, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Global positions (LongTensor [seq_len // world]) of rank `rank`'s tokens, in local order."""
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.runs(seq_len, world, rank)])

    per_batch: bool = False
    """The layout of a batch is chosen from its documents (`for_documents`): sharded document ids alone cannot be
    gathered back without it."""

    def for_documents(self, global_ids: torch.Tensor, world: int) -> Layout:
        """The layout of a batch with these document ids [B, S] over `world` ranks (static layouts: themselves)."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ChunkLayout(Layout):
    """The sequence cut into equal chunks; each rank holds a fixed set of chunks (static)."""

    def chunks_per_rank(self) -> int:
        raise NotImplementedError

    def chunk_ids(self, world: int, rank: int) -> tuple[int, ...]:
        """Global ids of the chunks rank `rank` holds, in (increasing) local order."""
        raise NotImplementedError

    def multiple(self, world: int) -> int:
        return self.chunks_per_rank() * world

    def runs(self, seq_len: int, world: int, rank: int) -> Runs:
        chunk = seq_len // self.multiple(world)
        return tuple((c * chunk, (c + 1) * chunk) for c in self.chunk_ids(world, rank))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))


class ZigzagLayout(ChunkLayout):
    """2P chunks; rank r holds chunks r and 2P-1-r: equal causal work on every rank (a late chunk sees more keys,
    its partner fewer)."""

    name = "zigzag"

    def chunks_per_rank(self) -> int:
        return 2

    def chunk_ids(self, world: int, rank: int) -> tuple[int, ...]:
        return (rank, 2 * world - 1 - rank)

    def multiple_reason(self, world: int) -> str:
        return f"2 x world size {world}, layout='zigzag'"


class ContiguousLayout(ChunkLayout):
    """P chunks; rank r holds chunk r (unbalanced for causal masks; the natural layout without one)."""

    name = "contiguous"

    def chunks_per_rank(self) -> int:
        return 1

    def chunk_ids(self, world: int, rank: int) -> tuple[int, ...]:
        return (rank,)


class PermutedLayout(Layout):
    """Explicit runs per rank for one sequence length and world: the layout of one batch."""

    static = False

    def __init__(self, name: str, seq_len: int, world: int, runs: tuple[Runs, ...]) -> None:
        self.name, self.seq_len, self.world, self._runs = name, seq_len, world, runs

    def multiple(self, world: int) -> int:
        return world

    def runs(self, seq_len: int, world: int, rank: int) -> Runs:
        if (seq_len, world) != (self.seq_len, self.world):
            raise ValueError(f"the {self.name} layout of this batch was made for {self.seq_len} tokens over "
                             f"{self.world} ranks, not {seq_len} over {world}: make one per batch")
        return self._runs[rank]

    def __repr__(self) -> str:
        return f"PermutedLayout({self.name!r}, {self.seq_len}, {self.world}, runs per rank: " \
               f"{[len(r) for r in self._runs]})"


class BalancedLayout(ZigzagLayout):
    """Per batch, a permutation that balances causal work over packed documents without padding
    (`ring.balance.balanced_runs`); without documents, exactly zigzag."""

    name = "balanced"
    per_batch = True

    def multiple_reason(self, world: int) -> str:
        return f"2 x world size {world}, layout='balanced' (zigzag when a batch has no documents)"

    def for_documents(self, global_ids: torch.Tensor, world: int) -> Layout:
        from ringtrain.ring.balance import balanced_runs

        return PermutedLayout(self.name, global_ids.shape[1], world, balanced_runs(global_ids, world))


ZIGZAG = ZigzagLayout()
CONTIGUOUS = ContiguousLayout()
BALANCED = BalancedLayout()
STATIC_LAYOUTS: dict[str, Layout] = {ZIGZAG.name: ZIGZAG, CONTIGUOUS.name: CONTIGUOUS}
LAYOUTS = tuple(STATIC_LAYOUTS)
"""The data-independent layouts (sharded ids of any batch can be gathered back with them)."""
NAMED_LAYOUTS: dict[str, Layout] = {**STATIC_LAYOUTS, BALANCED.name: BALANCED}
LAYOUT_NAMES = tuple(NAMED_LAYOUTS)
"""Names accepted wherever a layout is given as a string (balanced: chosen per batch from its documents)."""


def get_layout(layout: str | Layout) -> Layout:
    """The layout object for a name or an object (returned as is)."""
    if isinstance(layout, Layout):
        return layout
    if layout not in NAMED_LAYOUTS:
        raise ValueError(
            f"layout={layout!r} is not one of {', '.join(LAYOUT_NAMES)}: pass one of those names (or a Layout "
            "object)"
        )
    return NAMED_LAYOUTS[layout]


def check_layout(layout: str | Layout) -> None:
    get_layout(layout)


def layout_name(layout: str | Layout) -> str:
    return get_layout(layout).name


# --- the functions every module calls (the ring world alone, or ring x Ulysses) -------------------------------


def num_chunks(world: int, layout: str | Layout) -> int:
    """How many equal chunks a chunk layout cuts the global sequence into (its length multiple)."""
    return get_layout(layout).multiple(world)


def local_chunk_ids(world: int, rank: int, layout: str | Layout) -> tuple[int, ...]:
    """Global ids of the chunks rank `rank` holds under a chunk layout (zigzag, contiguous), in local order."""
    lay = get_layout(layout)
    if not isinstance(lay, ChunkLayout):
        raise ValueError(f"layout {lay.name!r} is not made of equal chunks: use its runs() instead")
    return lay.chunk_ids(world, rank)


def required_multiple(world: int, layout: str | Layout, ulysses: int = 1) -> int:
    """What the full sequence length must be a multiple of, for a ring of `world` ranks x `ulysses` ranks each."""
    return get_layout(layout).multiple(world) * ulysses


def padded_length(seq_len: int, world: int, layout: str | Layout, ulysses: int = 1) -> int:
    """`seq_len` rounded up to the next length the layout can shard."""
    multiple = required_multiple(world, layout, ulysses)
    return -(-seq_len // multiple) * multiple


def seq_len_problem(seq_len: int, world: int, layout: str | Layout, ulysses: int = 1,
                    fix: str = "pad the sequence to {} tokens") -> str | None:
    """None if a `seq_len`-token sequence can be sharded, else why not and the fix (completes a sentence that names
    the length). The one owner of this rule: the config check, the planner and the runtime all ask here. `fix` is
    formatted with the next length that works."""
    lay = get_layout(layout)
    multiple = required_multiple(world, lay, ulysses)
    if seq_len % multiple == 0:
        return None
    reason = lay.multiple_reason(world) + (f" x ulysses size {ulysses}" if ulysses > 1 else "")
    return f"is not a multiple of {multiple} ({reason}): {fix.format(padded_length(seq_len, world, lay, ulysses))}"


def check_seq_len(seq_len: int, world: int, layout: str | Layout, *, what: str = "sequence length",
                  ulysses: int = 1) -> None:
    problem = seq_len_problem(seq_len, world, layout, ulysses)
    if problem is not None:
        raise ValueError(f"{what} {seq_len} {problem}")


def rank_positions(
    seq_len: int, layout: str | Layout, ring_world: int, ring_rank: int, ulysses_world: int = 1,
    ulysses_rank: int = 0, device: torch.device | str | None = None,
) -> torch.Tensor:
    """Global positions [seq_len // (ring_world x ulysses_world)] of one rank's tokens (USP's hybrid layout)."""
    check_seq_len(seq_len, ring_world, layout, ulysses=ulysses_world)
    pos = get_layout(layout).positions(seq_len, ring_world, ring_rank, device=device)
    if ulysses_world > 1:
        part = pos.shape[0] // ulysses_world
        pos = pos[ulysses_rank * part:(ulysses_rank + 1) * part]
    return pos


def _runs_as_slices(pos: torch.Tensor) -> list[tuple[int, int]] | None:
    """(start, stop) runs of `pos` if it has few (cheap narrow+cat); None for a scattered permutation."""
    if pos.numel() == 0:
        return []
    breaks = (pos[1:] != pos[:-1] + 1).nonzero().flatten()
    if breaks.numel() > 64:
        return None
    starts = [0, *(int(b) + 1 for b in breaks)]
    stops = [*(int(b) + 1 for b in breaks), pos.numel()]
    return [(int(pos[a]), int(pos[a]) + (b - a)) for a, b in zip(starts, stops, strict=True)]


def _take(x: torch.Tensor, pos: torch.Tensor, dim: int) -> torch.Tensor:
    runs = _runs_as_slices(pos)
    if runs is None:
        return x.index_select(dim, pos.to(x.device))
    return torch.cat([x.narrow(dim, a, b - a) for a, b in runs], dim=dim)


def shard_sequence(
    x: torch.Tensor, *, group: dist.ProcessGroup | None = None, dim: int = 1, layout: str | Layout = "zigzag",
    ulysses_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """This rank's part of the full sequence `x` (split along `dim`), as a new contiguous tensor.

    `group` is the ring group (None = the default group, or a world of one); `ulysses_group`, when given, the
    Ulysses group of hybrid sequence parallelism (USP's layout, see the top of this file).
    """
    world, rank = group_world_rank(group)
    u_world, u_rank = _optional_group_world_rank(ulysses_group)
    dim = dim % x.dim()
    pos = rank_positions(x.shape[dim], layout, world, rank, u_world, u_rank)
    return _take(x, pos, dim).contiguous()


def unshard_sequence(
    x_local: torch.Tensor, *, group: dist.ProcessGroup | None = None, dim: int = 1, layout: str | Layout = "zigzag",
    ulysses_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The full sequence on every rank, from each rank's part (all_gather over Ulysses, then over the ring)."""
    world, rank = group_world_rank(group)
    u_world, _ = _optional_group_world_rank(ulysses_group)
    dim = dim % x_local.dim()
    ring_part = x_local.contiguous()
    if u_world > 1:
        parts = [torch.empty_like(ring_part) for _ in range(u_world)]
        dist.all_gather(parts, ring_part, group=ulysses_group)
        ring_part = torch.cat(parts, dim=dim)  # USP: the U parts of a ring shard are contiguous, in Ulysses order
    seq_len = ring_part.shape[dim] * world
    problem = seq_len_problem(seq_len, world, layout)
    if problem is not None:
        raise ValueError(
            f"local length {x_local.shape[dim]} along dim {dim} x world {world * u_world} = {seq_len} {problem}: "
            "pass a tensor sharded with shard_sequence"
        )
    if world == 1:
        return ring_part.clone() if ring_part is x_local else ring_part
    parts = [torch.empty_like(ring_part) for _ in range(world)]
    dist.all_gather(parts, ring_part, group=group)
    gathered = torch.cat(parts, dim=dim)
    pos = gathered_positions(seq_len, layout, world, device=x_local.device)
    return torch.empty_like(gathered).index_copy_(dim, pos, gathered)


def gathered_positions(seq_len: int, layout: str | Layout, world: int,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """The global position of each token of the ring shards laid end to end in ring-rank order (LongTensor [seq_len]):
    `full.index_copy_(dim, pos, gathered)` restores the natural order, `full.index_select(dim, pos)` undoes it."""
    return torch.cat([rank_positions(seq_len, layout, world, r, device=device) for r in range(world)])


def sequence_positions(
    seq_len: int,
    *,
    group: dist.ProcessGroup | None = None,
    layout: str | Layout = "zigzag",
    device: torch.device | str | None = None,
    ulysses_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Global positions (LongTensor [seq_len // world]) of this rank's tokens, e.g. for RoPE position_ids."""
    world, rank = group_world_rank(group)
    u_world, u_rank = _optional_group_world_rank(ulysses_group)
    return rank_positions(seq_len, layout, world, rank, u_world, u_rank, device=device)
