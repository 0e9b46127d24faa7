# The block plan: which (q-slice, kv-slice) blocks a rank computes at each ring step: full, causal-diagonal,
# masked, or skipped; and how many ring steps any rank needs at all.
#
# The ring driver knows nothing about layouts or masks; it asks this module for the blocks of a step.
# Local tokens are a list of equal chunks with global chunk ids (layout.local_chunk_ids), each cut into
# `tiles_per_chunk` equal tiles; for q tile i against kv tile j a causal mask gives: j < i full, j == i causal
# diagonal, j > i skip. A sliding window (static: window, tile length) and documents (data: which tiles share a
# document, computed once per batch by `document_tile_pairs`) refine that: a pair no query of tile i may see any
# key of becomes SKIP (no kernel call), a pair only partly visible becomes MASKED (the driver builds the mask).
# Adjacent work is coalesced into as few kernel calls as possible, because on every backend the per-call overhead
# (launch, LSE merge, slicing) is paid per block. Tiles exist only to skip finer: without masks the plan is one
# tile per chunk and exactly the unmasked plan. Every rank can compute every other rank's plan (the benchmark
# uses that to count per-rank work), so all ranks agree, without communicating, on the last step any rank
# still has work in: the ring stops rotating there (issue 7).

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

import torch

from ringtrain.ring.layout import local_chunk_ids, num_chunks


class PairKind(Enum):
    SKIP = 0
    FULL = 1
    DIAGONAL = 2  # same global tile on both sides: top-left causal within it
    MASKED = 3  # partly visible: needs an explicit mask (window edge, document boundary)


@dataclass(frozen=True)
class Block:
    """One kernel call: local q tiles [q_start, q_stop) against the step's kv tiles [kv_start, kv_stop)."""

    q_start: int
    q_stop: int
    kv_start: int
    kv_stop: int
    causal: bool
    """Top-left causal mask. Only emitted when the q and kv tiles are the same global tiles, in the same
    order, so q and kv lengths are equal and top-left alignment equals the global causal mask."""
    masked: bool = False
    """The kernel needs the block's explicit mask (causality, window and documents all in it); `causal` is False."""

    def slices(self, tile_len: int) -> tuple[slice, slice]:
        """Token slices (q, kv) for tiles of `tile_len` tokens."""
        return (
            slice(self.q_start * tile_len, self.q_stop * tile_len),
            slice(self.kv_start * tile_len, self.kv_stop * tile_len),
        )

    def score_entries(self, tile_len: int) -> int:
        """Number of (query, key) pairs the kernel evaluates: the unit of attention work (a masked block
        evaluates its whole rectangle)."""
        nq = (self.q_stop - self.q_start) * tile_len
        nk = (self.kv_stop - self.kv_start) * tile_len
        return nq * (nq + 1) // 2 if self.causal else nq * nk


@dataclass(frozen=True)
class MaskSpec:
    """Everything the plan depends on besides (world, rank, layout): hashable, so static plans are cached."""

    causal: bool = True
    window: int | None = None
    """Causal sliding window: query at position i sees keys j with i - window < j <= i."""
    tiles_per_chunk: int = 1
    tile_len: int = 0
    """Tokens per tile; only the window classification needs it (0 without a window)."""
    documents: tuple[tuple[int, ...], ...] | None = None
    """Per global (q tile, kv tile): 0 no batch row has a document in both, 1 one document covers both tiles in
    every row, 2 otherwise (see `document_tile_pairs`). None: no document mask."""


@dataclass(frozen=True)
class RingPlan:
    """One rank's blocks for each of the `n_steps` ring steps every rank runs."""

    steps: tuple[tuple[Block, ...], ...]
    tiles_per_chunk: int

    @property
    def n_steps(self) -> int:
        return len(self.steps)


def step_source(world: int, rank: int, step: int) -> int:
    """The rank whose K/V this rank holds at ring step `step` (K/V moves to rank + 1 each step)."""
    return (rank - step) % world


def local_tile_ids(world: int, rank: int, layout: str, tiles_per_chunk: int) -> tuple[int, ...]:
    """Global tile ids of rank `rank`'s tokens, in local order (increasing, like its chunks)."""
    t = tiles_per_chunk
    return tuple(c * t + i for c in local_chunk_ids(world, rank, layout) for i in range(t))


def pair_kind(q_tile: int, kv_tile: int, spec: MaskSpec) -> PairKind:
    """What q tile `q_tile` and kv tile `kv_tile` (global ids) need, under causality, window and documents."""
    i, j = q_tile, kv_tile
    if spec.causal and j > i:
        return PairKind.SKIP
    plain = True
    if spec.window is not None:
        t = spec.tile_len
        if j < i and (i - j - 1) * t + 1 >= spec.window:  # closest pair: last key of j, first query of i
            return PairKind.SKIP
        plain = (i - j + 1) * t - 1 < spec.window  # farthest pair still inside the window
    if spec.documents is not None:
        shared = spec.documents[i][j]
        if shared == 0:
            return PairKind.SKIP
        plain = plain and shared == 1
    if not plain:
        return PairKind.MASKED
    return PairKind.DIAGONAL if spec.causal and i == j else PairKind.FULL


def _blocks(kinds: list[list[PairKind]], same_tiles: bool, causal: bool) -> tuple[Block, ...]:
    """Coalesce one step's (local q tile x kv tile) kinds into kernel calls."""
    n = len(kinds)
    if not any(k is not PairKind.SKIP for row in kinds for k in row):
        return ()
    if causal and same_tiles and all(
        kinds[a][b] is (PairKind.FULL if b < a else PairKind.DIAGONAL if a == b else PairKind.SKIP)
        for a in range(n) for b in range(n)
    ):
        # Own K/V, nothing but causality: tile ids increase along the local sequence, so the whole local square
        # is one top-left causal call instead of diagonals plus full blocks.
        return (Block(0, n, 0, n, causal=True),)

    # Per q tile, maximal runs of one kind (FULL or MASKED; a DIAGONAL is its own run); identical runs on adjacent
    # q tiles merge into one rectangle (zigzag causal: src < rank -> all q x first kv half; src > rank -> second
    # q half x all kv).
    def runs(row: list[PairKind]) -> tuple[tuple[int, int, PairKind], ...]:
        out, start = [], 0
        for b in range(1, len(row) + 1):
            if b == len(row) or row[b] is not row[start] or row[b] is PairKind.DIAGONAL:
                if row[start] is not PairKind.SKIP:
                    out.append((start, b, row[start]))
                start = b
        return tuple(out)

    blocks: list[Block] = []
    a = 0
    while a < n:
        row_runs = runs(kinds[a])
        a_end = a + 1
        while a_end < n and runs(kinds[a_end]) == row_runs:
            a_end += 1
        for b0, b1, kind in row_runs:
            blocks.append(Block(a, a_end, b0, b1, causal=kind is PairKind.DIAGONAL, masked=kind is PairKind.MASKED))
        a = a_end
    return tuple(blocks)


def _all_rank_steps(world: int, layout: str, spec: MaskSpec) -> tuple[tuple[tuple[Block, ...], ...], ...]:
    """[rank][step] -> blocks, for every rank, truncated after the last step in which any rank computes."""
    t = spec.tiles_per_chunk
    tiles = [local_tile_ids(world, r, layout, t) for r in range(world)]
    per_rank = []
    for rank in range(world):
        steps = []
        for step in range(world):
            kv = tiles[step_source(world, rank, step)]
            kinds = [[pair_kind(i, j, spec) for j in kv] for i in tiles[rank]]
            steps.append(_blocks(kinds, step == 0, spec.causal))
        per_rank.append(steps)
    n_steps = 1 + max((s for steps in per_rank for s, blks in enumerate(steps) if blks), default=0)
    return tuple(tuple(steps[:n_steps]) for steps in per_rank)


_static_steps = lru_cache(maxsize=1024)(_all_rank_steps)
_document_steps = lru_cache(maxsize=4)(_all_rank_steps)  # per batch: a few, for the ranks of one process


def build_plan(world: int, rank: int, layout: str, spec: MaskSpec) -> RingPlan:
    """Rank `rank`'s plan (every rank's plan is computed together, so that all agree on the number of steps)."""
    steps = (_static_steps if spec.documents is None else _document_steps)(world, layout, spec)
    return RingPlan(steps[rank], spec.tiles_per_chunk)


def plan_step(world: int, rank: int, step: int, layout: str, causal: bool) -> tuple[Block, ...]:
    """The coalesced blocks rank `rank` computes at ring step `step` without window or documents."""
    return build_plan(world, rank, layout, MaskSpec(causal=causal)).steps[step]


def rank_work(
    world: int, rank: int, layout: str, causal: bool, chunk_len: int, spec: MaskSpec | None = None
) -> int:
    """Score entries rank `rank` evaluates over the whole ring (forward; backward is proportional).

    `spec` (window, documents, tiles) replaces `causal` when given."""
    spec = MaskSpec(causal=causal) if spec is None else spec
    tile_len = chunk_len // spec.tiles_per_chunk
    return sum(blk.score_entries(tile_len) for blks in build_plan(world, rank, layout, spec).steps for blk in blks)


def plan_kernel_calls(world: int, rank: int, layout: str, causal: bool, spec: MaskSpec | None = None) -> int:
    """Kernel calls per forward on rank `rank`: what coalescing minimises."""
    spec = MaskSpec(causal=causal) if spec is None else spec
    return sum(len(blks) for blks in build_plan(world, rank, layout, spec).steps)


def document_tile_pairs(document_ids: torch.Tensor, n_tiles: int) -> tuple[tuple[int, ...], ...]:
    """`MaskSpec.documents` from the full-sequence document ids [B, S] (non-decreasing along S), cut in `n_tiles`.

    A tile holds the ids [first, last]; since each document is one contiguous run, two tiles share a document iff
    their id ranges overlap, exactly (no false "shared"). One host sync (the caller does this once per batch).
    """
    b, s = document_ids.shape
    ids = document_ids.reshape(b, n_tiles, s // n_tiles)
    first, last = ids[:, :, 0], ids[:, :, -1]  # [B, T]
    fi, li, fj, lj = first[:, :, None], last[:, :, None], first[:, None, :], last[:, None, :]
    shared = torch.maximum(fi, fj) <= torch.minimum(li, lj)  # [B, T, T]
    one = (fi == li) & (fj == lj) & (fi == fj)
    code = torch.where(one.all(0), 1, torch.where(shared.any(0), 2, 0))
    return tuple(tuple(row) for row in code.tolist())


def visible_work(
    document_ids: torch.Tensor | None, world: int, layout: str, *, seq_len: int | None = None,
    causal: bool = True, window: int | None = None,
) -> list[int]:
    """(query, key) pairs each rank's queries may see under documents / window: the ideal work, against which
    `rank_work` (what the plan evaluates, masked rectangles whole) and its balance are judged."""
    if document_ids is None:
        document_ids = torch.zeros(1, seq_len, dtype=torch.long)
    b, s = document_ids.shape
    pos = torch.arange(s).expand(b, s)
    new = torch.ones_like(document_ids, dtype=torch.bool)
    new[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start = torch.where(new, pos, 0).cummax(1).values  # first position of each token's document
    if causal:
        seen = pos - start + 1
        seen = seen if window is None else seen.clamp(max=window)
    else:
        end = torch.where(torch.roll(new, -1, 1) | (pos == s - 1), pos, s).flip(1).cummin(1).values.flip(1)
        seen = end - start + 1
    chunks = seen.sum(0).view(num_chunks(world, layout), -1).sum(1)
    return [int(chunks[list(local_chunk_ids(world, r, layout))].sum()) for r in range(world)]


def choose_tiles_per_chunk(chunk_len: int, tile_tokens: int, max_tiles: int = 16) -> int:
    """The most tiles (<= max_tiles) a chunk splits into evenly with tiles of at least `tile_tokens` tokens."""
    best = 1
    for t in range(1, max_tiles + 1):
        if chunk_len % t == 0 and chunk_len // t >= tile_tokens:
            best = t
    return best


def global_tiles(world: int, layout: str, tiles_per_chunk: int) -> int:
    return num_chunks(world, layout) * tiles_per_chunk
