"""The per-document rules, each owned by one function, against plain-Python references on random packs.

Position within a document (`ring.balance.document_position_ids`): the restarting positions of packed batches, the
causal work of the balanced layout and the plan's visible work all build on it.
"""

from __future__ import annotations

import random

import pytest
import torch

from ringtrain.data import document_position_ids as data_document_position_ids
from ringtrain.ring.balance import document_position_ids, token_work
from ringtrain.ring.layout import rank_positions
from ringtrain.ring.plan import visible_work


def _random_document_ids(rng: random.Random, rows: int, seq: int) -> torch.Tensor:
    """[rows, seq] non-decreasing ids, each row packed with documents of random lengths (1 to seq), ids from 0."""
    out = []
    for _ in range(rows):
        row: list[int] = []
        doc = rng.randrange(3)
        while len(row) < seq:
            row += [doc] * min(rng.choice([1, 1, 2, rng.randint(1, seq)]), seq - len(row))
            doc += rng.randint(1, 3)
        out.append(row)
    return torch.tensor(out)


def _positions_reference(row: list[int]) -> list[int]:
    """Counting tokens since the last change of id, one token at a time."""
    out: list[int] = []
    for j, doc in enumerate(row):
        out.append(out[-1] + 1 if j and doc == row[j - 1] else 0)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_document_position_ids_match_a_token_by_token_count(seed):
    rng = random.Random(seed)
    ids = _random_document_ids(rng, rows=6, seq=rng.randint(1, 80))
    expected = torch.tensor([_positions_reference(row) for row in ids.tolist()])
    got = document_position_ids(ids)
    assert got.dtype == torch.int64 and torch.equal(got, expected)
    assert torch.equal(document_position_ids(ids[0]), expected[0])  # [S]
    assert torch.equal(document_position_ids(ids.view(2, 3, -1)), expected.view(2, 3, -1))  # [A, B, S]
    assert data_document_position_ids is document_position_ids  # the data pipeline's is the same function
    # token_work: the causal keys each position sees within its document, summed over rows.
    assert torch.equal(token_work(ids), (expected + 1).sum(0))


def _visible_reference(ids: torch.Tensor, world: int, layout: str, causal: bool, window: int | None) -> list[int]:
    """(query, key) pairs in one document (and causal, within the window) over each rank's queries, from the dense
    [B, S, S] mask."""
    s = ids.shape[1]
    q, k = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = ids[:, :, None] == ids[:, None, :]
    if causal:
        allowed &= k <= q
        if window is not None:
            allowed &= q - k < window
    per_query = allowed.sum((0, 2))
    return [int(per_query[rank_positions(s, layout, world, r)].sum()) for r in range(world)]


@pytest.mark.parametrize("causal,window", [(True, None), (True, 5), (False, None)])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [2, 4])
def test_visible_work_matches_the_dense_mask(world, layout, causal, window):
    rng = random.Random(world * 10 + len(layout) + causal)
    for _ in range(3):
        ids = _random_document_ids(rng, rows=3, seq=8 * world * rng.randint(1, 4))
        assert visible_work(ids, world, layout, causal=causal, window=window) == \
            _visible_reference(ids, world, layout, causal, window)
    one = torch.zeros(1, 16 * world, dtype=torch.long)  # no documents: one causal (or full) sequence
    assert visible_work(None, world, layout, seq_len=16 * world, causal=causal, window=window) == \
        _visible_reference(one, world, layout, causal, window)
