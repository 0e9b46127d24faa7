"""The per-document rules, each owned by one function, against plain-Python references on random packs.

Position within a document (`ring.balance.document_position_ids`): the restarting positions of packed batches, the
causal work of the balanced layout, the plan's visible work and the documents hybrid layers restart at
(`document_spans`) all build on it.
No loss across documents (`data.packing.ignore_cross_document_labels`): packing's unshifted labels and
`shard_batch`'s shifted ones ignore the same predictions.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ringtrain.data import document_position_ids as data_document_position_ids
from ringtrain.data.packing import IGNORE_INDEX, ignore_cross_document_labels
from ringtrain.ring.balance import document_position_ids, document_spans, token_work
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
    # document_spans (where recurrent and conv layers restart): runs of equal ids, found one token at a time.
    for row, spans in zip(ids.tolist(), document_spans(ids), strict=True):
        starts = [j for j, p in enumerate(_positions_reference(row)) if p == 0]
        assert spans == list(zip(starts, [*starts[1:], len(row)], strict=True))


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


def _labels_reference(labels: list[int], docs: list[int], shifted: bool) -> list[int]:
    """Label by label: is the token it names predicted from a position in another document?"""
    out = list(labels)
    for j in range(len(labels)):
        predicted_at, token = (j, j + 1) if shifted else (j - 1, j)
        if 0 <= predicted_at and token < len(docs) and docs[predicted_at] != docs[token]:
            out[j] = IGNORE_INDEX
    return out


@pytest.mark.parametrize("seed", range(5))
def test_cross_document_labels_match_a_label_by_label_reference(seed):
    rng = random.Random(seed)
    docs = _random_document_ids(rng, rows=4, seq=rng.randint(1, 60))
    targets = torch.randint(3, 1000, docs.shape, generator=torch.Generator().manual_seed(seed))
    shifted = torch.full_like(targets, IGNORE_INDEX)  # shifted[:, j] = targets[:, j + 1], as shard_batch builds it
    shifted[:, :-1] = targets[:, 1:]
    for labels, is_shifted in ((targets, False), (shifted, True)):
        expected = torch.tensor([_labels_reference(row, d, is_shifted)
                                 for row, d in zip(labels.tolist(), docs.tolist(), strict=True)])
        got = labels.clone()
        ignore_cross_document_labels(got, docs, shifted=is_shifted)
        assert torch.equal(got, expected)
        as_numpy = labels.numpy().copy()  # packing's arrays take the same function
        ignore_cross_document_labels(as_numpy, docs.numpy(), shifted=is_shifted)
        assert np.array_equal(as_numpy, expected.numpy())
    # The two frames agree: shifting the unshifted result gives the shifted result.
    unshifted, shifted_out = targets.clone(), shifted.clone()
    ignore_cross_document_labels(unshifted, docs, shifted=False)
    ignore_cross_document_labels(shifted_out, docs, shifted=True)
    assert torch.equal(shifted_out[:, :-1], unshifted[:, 1:])
    custom = shifted.clone()
    ignore_cross_document_labels(custom, docs, shifted=True, ignore_index=-1)
    assert torch.equal(torch.where(custom == -1, IGNORE_INDEX, custom), shifted_out)  # shard_batch's ignore_index
