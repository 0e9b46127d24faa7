# The block plan: which (q-slice, kv-slice) blocks a rank computes at each ring step: full, causal-diagonal,
# masked, or skipped; and how many ring steps any rank needs at all.
#
# The ring driver knows nothing about layouts or masks; it asks this module for the blocks of a step. Each rank's
# tokens are cut into tiles, runs of consecutive global positions ([start, stop) intervals, in local order), so that
# two distinct tiles are disjoint intervals and every classification below is interval arithmetic:
#   causal: kv tile entirely before the q tile -> FULL, the same tile -> DIAGONAL (top-left causal), after -> SKIP;
#   window: the closest (query, key) pair out of the window -> SKIP, the farthest one out of it -> MASKED;
#   documents: per tile the first and last document id of each batch row (documents are contiguous runs):
#   no row with a document in both tiles -> SKIP, not one same document everywhere -> MASKED.
# All tile pairs of all ranks are classified at once, vectorised in torch (a new plan every batch must be
# cheap); each rank then coalesces its own steps' tiles into as few kernel calls as possible, because on every
# backend the per-call overhead (launch, LSE merge, slicing) is paid per block. Tiles exist only to skip finer:
# without masks a chunk layout has one tile per chunk and exactly the unmasked plan. Every rank computes the same
# classification, so all agree, without communicating, on the last step any rank still has work in: the ring stops
# rotating there.

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache

import torch

from ringtrain.ring.balance import document_position_ids
from ringtrain.ring.layout import ChunkLayout, Layout, get_layout


class PairKind(IntEnum):
    SKIP = 0
    FULL = 1
    DIAGONAL = 2  # same tile on both sides: top-left causal within it
    MASKED = 3  # partly visible: the kernel needs the block's mask (window edge, document boundary)


@dataclass(frozen=True)
class Block:
    """One kernel call: local q tokens [q_start, q_stop) against the step's kv tokens [kv_start, kv_stop)."""

    q_start: int
    q_stop: int
    kv_start: int
    kv_stop: int
    causal: bool
    """Top-left causal mask. Only emitted when the q and kv tiles are the same tiles, in the same order, so q and
    kv lengths are equal and top-left alignment equals the global causal mask."""
    masked: bool = False
    """The kernel needs the block's mask (causality, window and documents all in it); `causal` is False."""

    def slices(self) -> tuple[slice, slice]:
        """Token slices (q, kv) into the local q and the step's K/V."""
        return slice(self.q_start, self.q_stop), slice(self.kv_start, self.kv_stop)

    def score_entries(self) -> int:
        """Number of (query, key) pairs the kernel evaluates: the unit of attention work (a masked block
        evaluates its whole rectangle)."""
        nq, nk = self.q_stop - self.q_start, self.kv_stop - self.kv_start
        return nq * (nq + 1) // 2 if self.causal else nq * nk


@dataclass(frozen=True)
class RingTiles:
    """Every rank's tiles: runs of consecutive global positions, in each rank's local order."""

    seq_len: int
    world: int
    starts: tuple[tuple[int, ...], ...]
    """[rank][tile] global position of the tile's first token."""
    lengths: tuple[tuple[int, ...], ...]
    """[rank][tile] tokens in the tile."""

    def offsets(self, rank: int) -> tuple[int, ...]:
        """Local token offset of each tile boundary of rank `rank` (n_tiles + 1 values)."""
        out = [0]
        for n in self.lengths[rank]:
            out.append(out[-1] + n)
        return tuple(out)

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(starts, stops, owner rank) of every tile of every rank, rank-major: LongTensors [n_tiles_total]."""
        starts = torch.tensor([s for r in self.starts for s in r], dtype=torch.long)
        lengths = torch.tensor([n for r in self.lengths for n in r], dtype=torch.long)
        owner = torch.tensor([r for r, t in enumerate(self.starts) for _ in t], dtype=torch.long)
        return starts, starts + lengths, owner


def choose_tiles_per_chunk(chunk_len: int, tile_tokens: int, max_tiles: int = 16) -> int:
    """The most tiles (<= max_tiles) a chunk splits into evenly with tiles of at least `tile_tokens` tokens."""
    best = 1
    for t in range(1, max_tiles + 1):
        if chunk_len % t == 0 and chunk_len // t >= tile_tokens:
            best = t
    return best


def _cut_run(start: int, stop: int, tile_tokens: int, max_tiles: int = 16) -> list[tuple[int, int]]:
    """A run cut into n near-equal tiles of at least `tile_tokens` tokens (n <= max_tiles), for uneven runs."""
    n = max(1, min(max_tiles, (stop - start) // max(tile_tokens, 1)))
    edges = [start + (stop - start) * i // n for i in range(n + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


@lru_cache(maxsize=256)
def _static_tiles(seq_len: int, world: int, layout: Layout, tile_tokens: int | None) -> RingTiles:
    return _build_tiles(seq_len, world, layout, tile_tokens)


def _build_tiles(seq_len: int, world: int, layout: Layout, tile_tokens: int | None) -> RingTiles:
    starts, lengths = [], []
    per_chunk = None
    if isinstance(layout, ChunkLayout):
        chunk = seq_len // layout.multiple(world)
        per_chunk = 1 if tile_tokens is None else choose_tiles_per_chunk(chunk, tile_tokens)
    for rank in range(world):
        tiles: list[tuple[int, int]] = []
        for a, b in layout.runs(seq_len, world, rank):
            if per_chunk is not None:  # equal tiles: the plan of a chunk layout does not depend on the data
                t = (b - a) // per_chunk
                tiles += [(a + i * t, a + (i + 1) * t) for i in range(per_chunk)]
            elif tile_tokens is None:
                tiles.append((a, b))
            else:
                tiles += _cut_run(a, b, tile_tokens)
        starts.append(tuple(a for a, _ in tiles))
        lengths.append(tuple(b - a for a, b in tiles))
    return RingTiles(seq_len, world, tuple(starts), tuple(lengths))


def build_tiles(seq_len: int, world: int, layout: str | Layout, tile_tokens: int | None = None) -> RingTiles:
    """Every rank's tiles. `tile_tokens=None`: one tile per run (no masks: the runs are all a plan needs)."""
    lay = get_layout(layout)
    if lay.static:
        return _static_tiles(seq_len, world, lay, tile_tokens)
    return _build_tiles(seq_len, world, lay, tile_tokens)


def document_bounds(document_ids: torch.Tensor, tiles: RingTiles) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, last) document id of every tile (rank-major, as `RingTiles.flat`) per batch row: [B, n_tiles_total].

    Document ids are non-decreasing along each row, so a tile holds exactly the ids [first, last]: two tiles share
    a document iff those ranges overlap (no false "shared")."""
    starts, stops, _ = tiles.flat()
    ids = document_ids.cpu()
    return ids[:, starts], ids[:, stops - 1]


def classify_tiles(
    tiles: RingTiles, causal: bool, window: int | None,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """PairKind of every (q tile, kv tile) pair of the whole ring: int8 [n_tiles_total, n_tiles_total]."""
    starts, stops, _ = tiles.flat()
    qa, qb = starts[:, None], stops[:, None]
    ka, kb = starts[None, :], stops[None, :]
    same = torch.eye(len(starts), dtype=torch.bool)
    any_visible = torch.ones(len(starts), len(starts), dtype=torch.bool)
    all_visible = any_visible.clone()
    if causal:
        any_visible = ka <= qb - 1  # some key at or before the last query
        all_visible = kb - 1 <= qa  # every key at or before the first query (never on the diagonal)
    diagonal_plain = same.clone() if causal else torch.zeros_like(same)
    if window is not None:
        closest = (qa - (kb - 1)).clamp(min=0)  # 0 on the diagonal
        farthest = (qb - 1) - ka
        any_visible &= closest < window
        all_visible &= farthest < window
        diagonal_plain &= farthest < window
    if bounds is not None:
        first, last = bounds
        fi, li, fj, lj = first[:, :, None], last[:, :, None], first[:, None, :], last[:, None, :]
        shared = (torch.maximum(fi, fj) <= torch.minimum(li, lj)).any(0)
        one = ((fi == li) & (fj == lj) & (fi == fj)).all(0)
        any_visible &= shared
        all_visible &= one
        diagonal_plain &= one
    kinds = torch.full(same.shape, int(PairKind.MASKED), dtype=torch.int8)
    kinds[all_visible & ~same] = int(PairKind.FULL)
    kinds[diagonal_plain] = int(PairKind.DIAGONAL)
    if not causal:
        kinds[all_visible & same] = int(PairKind.FULL)
    kinds[~any_visible] = int(PairKind.SKIP)
    return kinds


@dataclass(frozen=True)
class RingPlan:
    """One rank's blocks for each of the `n_steps` ring steps every rank runs."""

    steps: tuple[tuple[Block, ...], ...]

    @property
    def n_steps(self) -> int:
        return len(self.steps)


def step_source(world: int, rank: int, step: int) -> int:
    """The rank whose K/V this rank holds at ring step `step` (K/V moves to rank + 1 each step)."""
    return (rank - step) % world


def _coalesce(kinds: list[list[int]], own: bool, causal: bool, q_off: Sequence[int],
              kv_off: Sequence[int], masked: str = "merge") -> tuple[Block, ...]:
    """One step's (local q tile x kv tile) kinds as kernel calls, in tokens.

    `masked`: how MASKED tiles become blocks (their pieces are cut from positions and documents, see pieces.py):
    "merge" into rectangles like the other kinds; "step", the whole step as one masked block when any tile is
    masked (documents: a document's tiles then run as one call, not one per tile); "tile", one block per masked
    tile pair (windows: a BAND piece then stays tile-sized, so its small mask is bounded)."""
    n = len(kinds)
    if not any(k for row in kinds for k in row):
        return ()
    full, diag, skip, mask = int(PairKind.FULL), int(PairKind.DIAGONAL), int(PairKind.SKIP), int(PairKind.MASKED)
    if masked == "step" and any(k == mask for row in kinds for k in row):
        return (Block(0, q_off[-1], 0, kv_off[-1], causal=False, masked=True),)
    if masked == "tile":
        singles = tuple(Block(q_off[a], q_off[a + 1], kv_off[b], kv_off[b + 1], causal=False, masked=True)
                        for a in range(n) for b in range(len(kinds[a])) if kinds[a][b] == mask)
        rest = [[skip if k == mask else k for k in row] for row in kinds]
        return _coalesce(rest, own, causal, q_off, kv_off) + singles
    if causal and own and all(
        kinds[a][b] == (full if b < a else diag if a == b else skip) for a in range(n) for b in range(n)
    ):
        # Own K/V, nothing but causality: positions increase along the local sequence, so the whole local square
        # is one top-left causal call instead of diagonals plus full blocks.
        return (Block(0, q_off[-1], 0, kv_off[-1], causal=True),)

    # Per q tile, maximal runs of one kind (FULL or MASKED; a DIAGONAL is its own run); identical runs on adjacent
    # q tiles merge into one rectangle (zigzag causal: src < rank -> all q x first kv half; src > rank -> second
    # q half x all kv).
    def runs(row: list[int]) -> tuple[tuple[int, int, int], ...]:
        out, start = [], 0
        for b in range(1, len(row) + 1):
            if b == len(row) or row[b] != row[start] or row[b] == diag:
                if row[start] != skip:
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
            blocks.append(Block(q_off[a], q_off[a_end], kv_off[b0], kv_off[b1], causal=kind == diag,
                                masked=kind == int(PairKind.MASKED)))
        a = a_end
    return tuple(blocks)


@dataclass(frozen=True)
class RingClassification:
    """Every tile pair's kind for one (tiles, causal, window, documents), and the ring length all ranks agree on."""

    tiles: RingTiles
    kinds: torch.Tensor
    """int8 [n_tiles_total, n_tiles_total], rank-major (RingTiles.flat order)."""
    causal: bool
    n_steps: int
    masked: str = "merge"
    """How masked tiles become blocks (see `_coalesce`): from the masks, "step" under documents alone, "tile" under
    a window."""

    @staticmethod
    def build(tiles: RingTiles, causal: bool, window: int | None,
              bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> RingClassification:
        kinds = classify_tiles(tiles, causal, window, bounds)
        _, _, owner = tiles.flat()
        world = tiles.world
        onehot = torch.nn.functional.one_hot(owner, world).to(torch.float32)  # [n_tiles, P]
        pair_work = onehot.T @ (kinds != 0).to(torch.float32) @ onehot  # [q rank, kv rank]: any work
        ranks = torch.arange(world)
        sources = (ranks[:, None] - ranks[None, :]) % world  # [rank, step] -> source rank
        active = pair_work[ranks[:, None], sources] > 0
        steps_used = active.any(0).nonzero().flatten()
        n_steps = 1 + int(steps_used.max()) if steps_used.numel() else 1
        masked = "tile" if window is not None else "step" if bounds is not None else "merge"
        return RingClassification(tiles, kinds, causal, n_steps, masked)

    def _tile_index(self, rank: int) -> slice:
        first = sum(len(t) for t in self.tiles.starts[:rank])
        return slice(first, first + len(self.tiles.starts[rank]))

    def plan(self, rank: int) -> RingPlan:
        """Rank `rank`'s coalesced blocks for each of the `n_steps` steps."""
        world = self.tiles.world
        q_idx = self._tile_index(rank)
        q_off = self.tiles.offsets(rank)
        steps = []
        for step in range(self.n_steps):
            src = step_source(world, rank, step)
            sub = self.kinds[q_idx, self._tile_index(src)].tolist()
            steps.append(_coalesce(sub, step == 0, self.causal, q_off, self.tiles.offsets(src), self.masked))
        return RingPlan(tuple(steps))

    def rank_work(self) -> list[int]:
        """Score entries each rank evaluates over the whole ring (forward; backward is proportional), from the
        kinds alone (coalescing changes the number of calls, not the work)."""
        starts, stops, owner = self.tiles.flat()
        n = (stops - starts).to(torch.float64)
        kinds = self.kinds.to(torch.int64)
        rect = n[:, None] * n[None, :]
        tri = (n * (n + 1) / 2).diag()
        entries = torch.where(kinds == int(PairKind.DIAGONAL), tri, rect) * (kinds != 0)
        per_q_tile = entries.sum(1)
        return [int(v) for v in torch.zeros(self.tiles.world, dtype=torch.float64).index_add_(0, owner, per_q_tile)]


@lru_cache(maxsize=1024)
def static_classification(seq_len: int, world: int, layout: Layout, causal: bool, window: int | None,
                          tile_tokens: int | None) -> RingClassification:
    """The classification without documents: data-independent, so cached by value."""
    tiles = build_tiles(seq_len, world, layout, tile_tokens if window is not None else None)
    return RingClassification.build(tiles, causal, window)


def build_plan(world: int, rank: int, layout: str | Layout, seq_len: int, *, causal: bool = True,
               window: int | None = None, tile_tokens: int | None = None) -> RingPlan:
    """Rank `rank`'s plan without documents (documents: `RingDocuments.classification`)."""
    lay = get_layout(layout)
    if not lay.static:
        return RingClassification.build(build_tiles(seq_len, world, lay, tile_tokens), causal, window).plan(rank)
    return static_classification(seq_len, world, lay, causal, window, tile_tokens).plan(rank)


def plan_step(world: int, rank: int, step: int, layout: str | Layout, causal: bool,
              seq_len: int | None = None) -> tuple[Block, ...]:
    """The coalesced blocks rank `rank` computes at ring step `step` without window or documents (in tokens of a
    `seq_len`-token sequence; default: one token per chunk, i.e. tile units)."""
    lay = get_layout(layout)
    seq_len = lay.multiple(world) if seq_len is None else seq_len
    return build_plan(world, rank, lay, seq_len, causal=causal).steps[step]


def rank_work(world: int, rank: int, layout: str | Layout, causal: bool, chunk_len: int) -> int:
    """Score entries rank `rank` evaluates over the whole ring without window or documents."""
    lay = get_layout(layout)
    seq_len = chunk_len * lay.multiple(world)
    return static_classification(seq_len, world, lay, causal, None, None).rank_work()[rank]


def plan_kernel_calls(world: int, rank: int, layout: str | Layout, causal: bool) -> int:
    """Kernel calls per forward on rank `rank` without masks: what coalescing minimises."""
    lay = get_layout(layout)
    return sum(len(blks) for blks in build_plan(world, rank, lay, lay.multiple(world), causal=causal).steps)


def visible_work(
    document_ids: torch.Tensor | None, world: int, layout: str | Layout, *, seq_len: int | None = None,
    causal: bool = True, window: int | None = None,
) -> list[int]:
    """(query, key) pairs each rank's queries may see under documents / window: the ideal work, against which
    the plan's work (masked rectangles whole) and its balance are judged."""
    from ringtrain.ring.layout import rank_positions

    if document_ids is None:
        document_ids = torch.zeros(1, seq_len, dtype=torch.long)
    s = document_ids.shape[1]
    before = document_position_ids(document_ids)  # tokens of its document before each token
    if causal:
        seen = before + 1
        seen = seen if window is None else seen.clamp(max=window)
    else:  # the whole document: the tokens before, itself, and those after (counted on the reversed rows)
        seen = before + 1 + document_position_ids(document_ids.flip(1)).flip(1)
    per_position = seen.sum(0)
    return [int(per_position[rank_positions(s, layout, world, r)].sum()) for r in range(world)]
