"""pieces.split_causal: a causal piece cut for the CPU flash op covers exactly the pairs of the whole piece, and only
pieces of at most CAUSAL_SPLIT_MAX_BLOCKS blocks are cut (longer ones cost more in merges and accumulations than the
kernel saves)."""

from __future__ import annotations

import pytest
import torch

from ringtrain.ring.pieces import CAUSAL_SPLIT_MAX_BLOCKS, Piece, PieceKind, split_causal


def _pairs(pieces: list[Piece], n: int) -> torch.Tensor:
    """How many times each (query, key) pair of an n x n block is covered."""
    count = torch.zeros(n, n, dtype=torch.int64)
    for p in pieces:
        sub = torch.ones(p.q_stop - p.q_start, p.k_stop - p.k_start, dtype=torch.int64)
        if p.kind == PieceKind.CAUSAL:
            sub = sub.tril()
        count[p.q_start:p.q_stop, p.k_start:p.k_stop] += sub
    return count


@pytest.mark.parametrize("n", [1, 5, 8, 9, 23, 31, 32, 33, 40])
def test_split_covers_each_causal_pair_once(n: int):
    block = 4
    pieces = split_causal(Piece(0, 1, 0, n, 0, n, PieceKind.CAUSAL), block)
    assert torch.equal(_pairs(pieces, n), torch.ones(n, n, dtype=torch.int64).tril())
    cut = block < n <= CAUSAL_SPLIT_MAX_BLOCKS * block
    assert (len(pieces) > 1) == cut, (n, len(pieces))
    assert all(p.q_stop - p.q_start <= block for p in pieces) or not cut


def test_full_pieces_are_never_split():
    p = Piece(0, 1, 0, 20, 0, 20, PieceKind.FULL)
    assert split_causal(p, 4) == [p]
