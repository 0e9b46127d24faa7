# The block plan: which (q-slice, kv-slice) blocks a rank computes at each ring step, full or causal-diagonal.
#
# The ring driver knows nothing about layouts or masks; it asks this module for the blocks of a step.
# Local tokens are a list of equal chunks with global chunk ids (layout.local_chunk_ids); for q chunk i
# against kv chunk j a causal mask gives: j < i full, j == i causal diagonal, j > i skip. Adjacent work
# is coalesced into as few kernel calls as possible, because on every backend the per-call overhead
# (launch, LSE merge, slicing) is paid per block. The plan depends only on (world, rank, step, layout,
# causal): it is static, needs no host sync, and every rank can compute every other rank's plan
# (the benchmark uses that to count per-rank work).
#
# Masks (documents, sliding windows; issue 7) plug in here: they refine the chunk-pair kind (a pair can
# become SKIP, or MASKED with a per-block mask handed to the kernel), so the one ring loop stays unchanged.

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

from ringtrain.ring.layout import local_chunk_ids


class PairKind(Enum):
    SKIP = 0
    FULL = 1
    DIAGONAL = 2  # same global chunk on both sides: top-left causal within it


@dataclass(frozen=True)
class Block:
    """One kernel call: local q chunks [q_start, q_stop) against the step's kv chunks [kv_start, kv_stop)."""

    q_start: int
    q_stop: int
    kv_start: int
    kv_stop: int
    causal: bool
    """Top-left causal mask. Only emitted when the q and kv chunks are the same global chunks, in the same
    order, so q and kv lengths are equal and top-left alignment equals the global causal mask."""

    def slices(self, chunk_len: int) -> tuple[slice, slice]:
        """Token slices (q, kv) for chunks of `chunk_len` tokens."""
        return (
            slice(self.q_start * chunk_len, self.q_stop * chunk_len),
            slice(self.kv_start * chunk_len, self.kv_stop * chunk_len),
        )

    def score_entries(self, chunk_len: int) -> int:
        """Number of (query, key) pairs the kernel evaluates: the unit of attention work."""
        nq = (self.q_stop - self.q_start) * chunk_len
        nk = (self.kv_stop - self.kv_start) * chunk_len
        return nq * (nq + 1) // 2 if self.causal else nq * nk


def step_source(world: int, rank: int, step: int) -> int:
    """The rank whose K/V this rank holds at ring step `step` (K/V moves to rank + 1 each step)."""
    return (rank - step) % world


def pair_kind(q_chunk: int, kv_chunk: int, causal: bool) -> PairKind:
    if not causal or kv_chunk < q_chunk:
        return PairKind.FULL
    return PairKind.DIAGONAL if kv_chunk == q_chunk else PairKind.SKIP


@lru_cache(maxsize=4096)
def plan_step(world: int, rank: int, step: int, layout: str, causal: bool) -> tuple[Block, ...]:
    """The coalesced blocks rank `rank` computes at ring step `step`."""
    q_ids = local_chunk_ids(world, rank, layout)
    kv_ids = local_chunk_ids(world, step_source(world, rank, step), layout)
    kinds = [[pair_kind(i, j, causal) for j in kv_ids] for i in q_ids]
    n = len(q_ids)

    if causal and q_ids == kv_ids:
        # Own K/V (step 0): chunk ids increase along the local sequence, so the whole local square is
        # one top-left causal call instead of n diagonals plus full blocks.
        return (Block(0, n, 0, n, causal=True),)

    # Per q chunk, maximal runs of consecutive FULL kv chunks; identical runs on adjacent q chunks merge
    # into one rectangle (zigzag: src < rank -> all q x first kv half; src > rank -> second q half x all kv).
    def full_runs(row: list[PairKind]) -> tuple[tuple[int, int], ...]:
        runs, start = [], None
        for b, kind in enumerate([*row, PairKind.SKIP]):
            if kind is PairKind.FULL and start is None:
                start = b
            elif kind is not PairKind.FULL and start is not None:
                runs.append((start, b))
                start = None
        return tuple(runs)

    blocks: list[Block] = []
    a = 0
    while a < n:
        runs = full_runs(kinds[a])
        a_end = a + 1
        while a_end < n and full_runs(kinds[a_end]) == runs:
            a_end += 1
        blocks.extend(Block(a, a_end, b0, b1, causal=False) for b0, b1 in runs)
        a = a_end
    for a in range(n):
        for b in range(len(kv_ids)):
            if kinds[a][b] is PairKind.DIAGONAL:
                # Reached only by a future layout that holds a chunk twice; q_ids != kv_ids otherwise
                # never share a chunk id.
                blocks.append(Block(a, a + 1, b, b + 1, causal=True))
    return tuple(blocks)


def rank_work(world: int, rank: int, layout: str, causal: bool, chunk_len: int) -> int:
    """Score entries rank `rank` evaluates over the whole ring (forward; backward is proportional)."""
    return sum(
        blk.score_entries(chunk_len)
        for step in range(world)
        for blk in plan_step(world, rank, step, layout, causal)
    )


def plan_kernel_calls(world: int, rank: int, layout: str, causal: bool) -> int:
    """Kernel calls per forward on rank `rank`: what coalescing minimises."""
    return sum(len(plan_step(world, rank, step, layout, causal)) for step in range(world))
