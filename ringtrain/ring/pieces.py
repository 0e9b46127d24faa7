# Masked blocks as pieces, not dense masks: a block cut by document boundaries or a window edge is a
# set of (query range, key range) pairs, each of one document, each one plain kernel call.
#
# A block's tokens are given by their global positions (increasing along each side) and, per batch row, their
# document ids. Each side is cut into segments, maximal runs of consecutive positions within one document; a query
# segment Q = [qa, qb) and a key segment K = [ka, kb) of the same document need, under a causal mask:
#   K entirely at or before the first query          -> FULL     (one unmasked call)
#   K entirely after the last query                  -> nothing
#   K == Q                                           -> CAUSAL   (top-left causal on a square: every kernel agrees)
#   overlapping otherwise (a query range inside a longer key range, or the reverse): FULL against the keys before Q,
#   CAUSAL on the overlap, FULL of the queries after the overlap against it; still no mask.
# Under a window (i - window < j <= i), pieces are first trimmed to what any of their pairs can see; a piece the
# window cuts is a BAND: the only kind that needs a mask (a small dense one, or a kernel's window arguments).
# The exact same decomposition runs on every device: on CPU each piece is a call of the CPU flash op, on CUDA the
# kernels swap the call (or pack pieces into one varlen call), so the decomposition is tested on CPU.

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch


class PieceKind(IntEnum):
    FULL = 1
    CAUSAL = 2
    BAND = 3


@dataclass(frozen=True)
class Piece:
    """One kernel call inside a masked block: rows [row_start, row_stop), queries q, keys k (block-local tokens)."""

    row_start: int
    row_stop: int
    q_start: int
    q_stop: int
    k_start: int
    k_stop: int
    kind: PieceKind
    offset: int = 0
    """BAND: query position - key position at (query 0, key 0) of the piece."""
    window: int = 0
    """BAND: the window; query i sees key j iff 0 <= offset + i - j < window."""

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_stop)

    @property
    def q(self) -> slice:
        return slice(self.q_start, self.q_stop)

    @property
    def k(self) -> slice:
        return slice(self.k_start, self.k_stop)

    def pairs(self) -> int:
        """(query, key) pairs the call evaluates (per row)."""
        nq, nk = self.q_stop - self.q_start, self.k_stop - self.k_start
        return nq * (nq + 1) // 2 if self.kind == PieceKind.CAUSAL else nq * nk

    def band_mask(self, device: torch.device | None = None) -> torch.Tensor:
        """BAND: the bool mask [1, S_q, S_k] (True = may attend) of this piece alone."""
        i = torch.arange(self.q_stop - self.q_start, device=device)[:, None]
        j = torch.arange(self.k_stop - self.k_start, device=device)[None, :]
        d = self.offset + i - j
        return ((d >= 0) & (d < self.window))[None]

    def flash_window(self) -> tuple[int, int]:
        """BAND: (window_size_left, window_size_right) of flash attention's bottom-right aligned windows: query i
        sees keys j in [i + S_k - S_q - left, i + S_k - S_q + right]. Both are >= 0 for a trimmed piece."""
        shift = (self.k_stop - self.k_start) - (self.q_stop - self.q_start)
        return shift - self.offset + self.window - 1, self.offset - shift


CAUSAL_SPLIT_MAX_BLOCKS = 8
"""`split_causal` leaves a piece longer than this many blocks whole: the kernel's gain from splitting shrinks with the
length (one thread, H=8, D=64: 18 -> 14 ns per visible pair at 1024 tokens, 15 -> 14 at 2048) while the driver's
merges and dK/dV accumulations over every earlier key grow with it (a 3000 + 5192-token pack took 25% longer split
into 128-token squares than whole; docs/benchmarks.md)."""


def split_causal(piece: Piece, block: int) -> list[Piece]:
    """A CAUSAL piece longer than `block` (and at most CAUSAL_SPLIT_MAX_BLOCKS blocks long) as causal squares of
    `block` tokens on the diagonal plus, for each, one FULL piece of its queries against every key before it: the
    same pairs, for kernels whose causal call computes masked work per row up to a fixed key block (the CPU flash op
    computes a short causal square whole)."""
    n = piece.q_stop - piece.q_start
    if piece.kind != PieceKind.CAUSAL or n <= block or n > CAUSAL_SPLIT_MAX_BLOCKS * block:
        return [piece]
    out = []
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        q0, k0 = piece.q_start + lo, piece.k_start + lo
        out.append(Piece(piece.row_start, piece.row_stop, q0, q0 + hi - lo, k0, k0 + hi - lo, PieceKind.CAUSAL))
        if lo:
            out.append(Piece(piece.row_start, piece.row_stop, q0, q0 + hi - lo, piece.k_start, k0, PieceKind.FULL))
    return out


def _segments(pos: torch.Tensor, docs: torch.Tensor | None) -> list[tuple[int, int, int, int]]:
    """(local start, local stop, first position, document) of each maximal run of consecutive positions in one
    document."""
    n = pos.numel()
    cut = torch.zeros(n, dtype=torch.bool)
    cut[0] = True
    cut[1:] = pos[1:] != pos[:-1] + 1
    if docs is not None:
        cut[1:] |= docs[1:] != docs[:-1]
    starts = cut.nonzero().flatten().tolist()
    stops = [*starts[1:], n]
    first = pos[starts].tolist()
    ids = docs[starts].tolist() if docs is not None else [0] * len(starts)
    return list(zip(starts, stops, first, ids, strict=True))


def _pair_pieces(qa: int, qb: int, ka: int, kb: int, causal: bool, window: int | None
                 ) -> list[tuple[int, int, int, int, PieceKind, int]]:
    """Pieces (position ranges: q start, q stop, k start, k stop, kind, offset) of query range [qa, qb) against key
    range [ka, kb) of one document."""
    if not causal:
        return [(qa, qb, ka, kb, PieceKind.FULL, 0)]
    if window is not None:
        ka, kb = max(ka, qa - window + 1), min(kb, qb)  # keys some query may see
        if ka >= kb:
            return []
        qa, qb = max(qa, ka), min(qb, kb - 1 + window)  # queries that see some key
        if qa >= qb:
            return []
        if (qb - 1) - ka < window:  # the window cuts nothing: causality alone
            return _pair_pieces(qa, qb, ka, kb, True, None)
        return [(qa, qb, ka, kb, PieceKind.BAND, qa - ka)]
    if kb - 1 <= qa:
        return [(qa, qb, ka, kb, PieceKind.FULL, 0)]
    if ka >= qb:
        return []
    out = []
    if ka < qa:
        out.append((qa, qb, ka, qa, PieceKind.FULL, 0))
    lo, hi = max(qa, ka), min(qb, kb)
    out.append((lo, hi, lo, hi, PieceKind.CAUSAL, 0))
    if qb > hi:
        out.append((hi, qb, lo, hi, PieceKind.FULL, 0))
    return out


def _row_groups(q_docs: torch.Tensor | None, k_docs: torch.Tensor | None, batch: int) -> list[tuple[int, int]]:
    """Runs of adjacent batch rows whose documents are identical in this block (one set of pieces serves them)."""
    if q_docs is None:
        return [(0, batch)]
    both = torch.cat([q_docs, k_docs], dim=1)
    same_as_prev = (both[1:] == both[:-1]).all(1).tolist()
    groups, start = [], 0
    for r, same in enumerate(same_as_prev, start=1):
        if not same:
            groups.append((start, r))
            start = r
    groups.append((start, batch))
    return groups


def block_pieces(
    q_pos: torch.Tensor, k_pos: torch.Tensor, q_docs: torch.Tensor | None, k_docs: torch.Tensor | None,
    causal: bool, window: int | None, batch: int,
) -> list[Piece]:
    """The pieces of a masked block: `q_pos` [S_q] and `k_pos` [S_k] global positions (increasing), `q_docs`
    [B, S_q] and `k_docs` [B, S_k] document ids or None (all on the host). Every visible (row, query, key) triple
    is covered by exactly one piece, and no piece covers an invisible one outside a BAND's mask."""
    q_pos, k_pos = q_pos.cpu(), k_pos.cpu()
    pieces: list[Piece] = []
    for r0, r1 in _row_groups(q_docs, k_docs, batch):
        q_segs = _segments(q_pos, None if q_docs is None else q_docs[r0].cpu())
        k_segs = _segments(k_pos, None if k_docs is None else k_docs[r0].cpu())
        by_doc: dict[int, list[tuple[int, int, int, int]]] = {}
        for seg in k_segs:
            by_doc.setdefault(seg[3], []).append(seg)
        for qs, qe, qp, doc in q_segs:
            for ks, ke, kp, _ in by_doc.get(doc, ()):
                for a, b, c, d, kind, offset in _pair_pieces(qp, qp + qe - qs, kp, kp + ke - ks, causal, window):
                    pieces.append(Piece(r0, r1, qs + a - qp, qs + b - qp, ks + c - kp, ks + d - kp, kind,
                                        offset, window if kind == PieceKind.BAND else 0))
    return pieces
