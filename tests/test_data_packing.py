"""Packing keeps every token, puts EOS between documents and numbers documents per sequence correctly."""

import numpy as np
import pytest
import torch

from ringtrain.data import IGNORE_INDEX, document_position_ids, pack_documents

EOS, PAD = 1, 0
DOCS = [np.array([10, 11, 12]), np.array([20]), np.array([30, 31, 32, 33, 34])]


def test_hand_computed_example_split_documents():
    ds = pack_documents(DOCS, seq_len=8, eos_id=EOS, pad_id=PAD)
    b = ds.batch([0, 1])
    assert b["input_ids"].tolist() == [[10, 11, 12, 1, 20, 1, 30, 31], [32, 33, 34, 1, 0, 0, 0, 0]]
    # EOS belongs to the document it ends; the tail of doc 2 continues as id 0; padding is its own id.
    assert b["document_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1, 1, 1]]
    # A document's first token is not predicted from the previous document; padding is ignored.
    assert b["labels"].tolist() == [[10, 11, 12, 1, -100, 1, -100, 31], [32, 33, 34, 1, -100, -100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]]
    assert "answer_mask" not in b
    assert all(v.dtype == torch.int64 and v.shape == (2, 8) for v in b.values())
    assert len(ds) == 2 and ds.num_tokens == 12 and ds.num_documents == 3


def test_hand_computed_example_whole_documents():
    # Best-fit decreasing: the longest document (6 tokens with EOS) opens sequence 0, the 4-token one does not
    # fit its room of 2 and opens sequence 1, the 2-token one fills sequence 0.
    ds = pack_documents(DOCS, seq_len=8, eos_id=EOS, pad_id=PAD, split_documents=False)
    b = ds.batch([0, 1])
    assert b["input_ids"].tolist() == [[30, 31, 32, 33, 34, 1, 20, 1], [10, 11, 12, 1, 0, 0, 0, 0]]
    assert b["document_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]]
    assert b["labels"].tolist() == [[30, 31, 32, 33, 34, 1, -100, 1], [10, 11, 12, 1, -100, -100, -100, -100]]


def test_without_document_mask_ids_are_zero_and_labels_cross_documents():
    b = pack_documents(DOCS, seq_len=8, eos_id=EOS, pad_id=PAD, document_mask=False).batch([0, 1])
    assert b["document_ids"].eq(0).all()
    assert b["labels"].tolist() == [[10, 11, 12, 1, 20, 1, 30, 31], [32, 33, 34, 1, -100, -100, -100, -100]]


def _unpack(ds):
    """The real-token stream and per-sequence document ids, for checks against the input."""
    b = ds.batch(np.arange(len(ds)))
    return b, b["input_ids"][b["attention_mask"].bool()].tolist()


@pytest.mark.parametrize("split_documents", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_documents_every_token_kept_and_ids_follow_eos(seed, split_documents):
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(4, 40))
    lengths = rng.integers(0, 3 * seq_len, size=int(rng.integers(1, 60)))
    lengths[0] = max(lengths[0], 1)
    docs = [rng.integers(3, 384, size=n) for n in lengths]
    ds = pack_documents(docs, seq_len, EOS, PAD, split_documents=split_documents)
    b, stream = _unpack(ds)
    expected = [t for d in docs if len(d) for t in [*d.tolist(), EOS]]  # empty documents are dropped
    if split_documents:
        assert stream == expected
    else:  # whole documents are placed best-fit: the same documents, in another order
        assert sorted(_documents(stream)) == sorted(_documents(expected))
    assert ds.num_tokens == len(expected)
    ids, inp, real = b["document_ids"], b["input_ids"], b["attention_mask"].bool()
    assert (ids[:, 1:] >= ids[:, :-1]).all() and (ids[:, 0] == 0).all()
    both_real = real[:, 1:] & real[:, :-1]
    new_doc = ids[:, 1:] != ids[:, :-1]
    assert torch.equal(new_doc[both_real], (inp[:, :-1] == EOS)[both_real])
    assert (new_doc | ~real[:, :-1] | real[:, 1:]).all()  # padding starts a new id
    assert (b["labels"][~real] == IGNORE_INDEX).all()
    first = torch.zeros_like(real)
    first[:, 1:] = new_doc
    assert (b["labels"][first] == IGNORE_INDEX).all()
    assert torch.equal(b["labels"][real & ~first], inp[real & ~first])
    # Padding only on the right of a sequence; without splitting, short documents never straddle sequences.
    assert (real[:, 1:] <= real[:, :-1]).all()
    if split_documents:
        assert (~real).sum() < seq_len
    else:
        seq_of_token = torch.arange(len(ds)).repeat_interleave(real.sum(1)).tolist()
        start = 0
        for d in _documents(stream):
            if len(d) + 1 <= seq_len:  # a document that fits a sequence is never split
                assert seq_of_token[start] == seq_of_token[start + len(d)]
            start += len(d) + 1
        # Documents longer than a sequence start one; the pieces follow each other in order.
        whole = sum(-(-(len(d) + 1) // seq_len) for d in docs if len(d) + 1 > seq_len)
        assert len(ds) >= whole


def _documents(stream: list[int]) -> list[tuple[int, ...]]:
    """The documents of an unpacked token stream (each ends with EOS; tokens are never EOS otherwise)."""
    out, cur = [], []
    for t in stream:
        if t == EOS:
            out.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    assert not cur
    return out


def test_whole_documents_best_fit_pads_little():
    """Uniform lengths of 10..100% of a sequence: in-order packing pads about a quarter, best fit a few percent."""
    rng = np.random.default_rng(0)
    seq_len = 1024
    docs = [rng.integers(3, 384, size=n) for n in rng.integers(100, seq_len, size=2000)]
    ds = pack_documents(docs, seq_len, EOS, PAD, split_documents=False)
    padding = 1 - ds.num_tokens / (len(ds) * seq_len)
    lower_bound = -(-sum(len(d) + 1 for d in docs) // seq_len)
    assert padding < 0.03 and len(ds) <= lower_bound * 1.03, (padding, len(ds), lower_bound)


def test_answer_masks_follow_their_tokens():
    masks = [np.array([0, 0, 1], bool), np.array([1], bool), np.array([0, 0, 0, 1, 1], bool)]
    b = pack_documents(DOCS, 8, EOS, PAD, answer_masks=masks).batch([0, 1])
    assert b["answer_mask"].dtype == torch.bool
    assert b["input_ids"][b["answer_mask"]].tolist() == [12, 20, 33, 34]


def test_document_position_ids_restart_per_document():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 2, 3, 3, 3, 3, 3]])
    assert document_position_ids(ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 0, 0, 1, 2, 3, 4]]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="seq_len=1"):
        pack_documents(DOCS, 1, EOS, PAD)
    with pytest.raises(ValueError, match="every document is empty"):
        pack_documents([np.array([], int)], 8, EOS, PAD)
    with pytest.raises(ValueError, match="lengths sum to 5"):
        pack_documents((np.arange(4), np.array([2, 3])), 8, EOS, PAD)
