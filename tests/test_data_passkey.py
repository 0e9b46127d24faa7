"""Passkey documents: exact token length, needle at the requested depth, answer span that decodes to the key."""

import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

from ringtrain.data import DataConfig, PasskeyGenerator, build_packed_dataset, make_passkey_document
from ringtrain.data.passkey import (
    NEEDLE,
    QUESTION,
    REPEAT_FILLER,
    document_seed,
    generate_passkey_documents,
)


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE tokenizer trained here (no download): the multi-byte-token case."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [REPEAT_FILLER * 3, NEEDLE.format(key="12345") * 3, QUESTION * 3, "0123456789 " * 5]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def byt5():
    return ByT5Tokenizer()


@pytest.mark.parametrize("which", ["byt5", "bpe"])
@pytest.mark.parametrize("filler", ["repeat", "random"])
def test_exact_length_depth_and_answer(which, filler, request):
    tok = request.getfixturevalue(which)
    gen = PasskeyGenerator(tok, digits=5, filler=filler)
    rng = np.random.default_rng(0)
    for _ in range(25):
        n = int(rng.integers(gen.minimum_tokens() + 5, 600))
        depth = float(rng.random())
        doc = gen.document(n, depth, seed=int(rng.integers(1 << 30)))
        assert len(doc.input_ids) == n
        a, b = doc.answer_token_span
        assert b == n and tok.decode(doc.input_ids[a:b]).strip() == doc.key
        assert doc.text[slice(*doc.answer_char_span)] == doc.key and len(doc.key) == 5 and doc.key[0] != "0"
        s, e = doc.needle_token_span
        assert tok.decode(doc.input_ids[s:e]).strip() == NEEDLE.format(key=doc.key).strip()
        n_filler = n - (e - s) - (b - a) - len(tok.encode(QUESTION, add_special_tokens=False))
        # Exactly at the requested depth (rounded to a token) when the tokenizer has a one-token space.
        assert s == round(depth * n_filler)
        assert doc.prompt_ids == doc.input_ids[:a]
        if which == "byt5":
            assert tok.decode(doc.input_ids) == doc.text


def test_depth_extremes_and_determinism(byt5):
    first = make_passkey_document(byt5, 200, 0.0, seed=5)
    last = make_passkey_document(byt5, 200, 1.0, seed=5)
    assert first.needle_token_span[0] == 0 and first.depth == 0.0
    assert last.text.endswith(NEEDLE.format(key=last.key) + QUESTION + last.key) and last.depth == 1.0
    assert make_passkey_document(byt5, 200, 0.3, seed=5) == make_passkey_document(byt5, 200, 0.3, seed=5)
    assert make_passkey_document(byt5, 200, 0.3, seed=6).key != first.key


def test_bad_arguments_raise(byt5):
    gen = PasskeyGenerator(byt5)
    with pytest.raises(ValueError, match=f"num_tokens=50 is too short.*{gen.minimum_tokens()} tokens"):
        gen.document(50, 0.5, 0)
    with pytest.raises(ValueError, match="depth=1.5"):
        gen.document(200, 1.5, 0)
    with pytest.raises(ValueError, match="filler='lorem'"):
        PasskeyGenerator(byt5, filler="lorem")


def test_passkey_source_one_document_per_sequence(byt5):
    ds = build_packed_dataset(DataConfig(num_samples=40, seed=2), seq_len=128, tokenizer=byt5)
    assert len(ds) == 40 and ds.num_documents == 40
    b = ds.batch(np.arange(40))
    assert b["attention_mask"].all() and b["document_ids"].eq(0).all() and b["input_ids"][:, -1].eq(1).all()
    for ids, mask in zip(b["input_ids"], b["answer_mask"], strict=True):
        text = byt5.decode(ids[:-1])
        key = byt5.decode(ids[mask])
        assert text.endswith(QUESTION + key) and NEEDLE.format(key=key) in text
    again = build_packed_dataset(DataConfig(num_samples=40, seed=2), seq_len=128, tokenizer=byt5)
    assert np.array_equal(again.input_ids, ds.input_ids)


def test_passkey_source_length_range_never_cuts_a_document(byt5):
    cfg = DataConfig(num_samples=60, passkey_min_tokens=80, passkey_max_tokens=250, seed=1)
    ds = build_packed_dataset(cfg, seq_len=256, tokenizer=byt5)
    b = ds.batch(np.arange(len(ds)))
    lengths = [int((ids == 1).sum()) for ids in b["input_ids"]]
    assert sum(lengths) == 60 and b["answer_mask"].sum() == 60 * 5
    # Every sequence starts a document and its real tokens end with EOS: nothing is split from its needle.
    real_len = b["attention_mask"].sum(1)
    assert all(b["input_ids"][i, real_len[i] - 1] == 1 for i in range(len(ds)))
    with pytest.raises(ValueError, match="passkey_min_tokens=10 is below the shortest passkey document"):
        build_packed_dataset(DataConfig(passkey_min_tokens=10, passkey_max_tokens=20), 128, byt5)


def test_edge_depths_put_that_share_of_needles_at_the_edges(byt5):
    """passkey_edge_depths: about that share of needles at depth exactly 0 or 1, both edges used; 0 keeps the
    documents of a dataset generated before the option existed (same draws)."""
    gen = PasskeyGenerator(byt5)

    def depths(edge: float) -> np.ndarray:
        tokens, _ = generate_passkey_documents(byt5, 400, 120, 300, seed=3, edge_depths=edge)
        out = []
        for ids in tokens:
            text = byt5.decode(ids)
            key = text[-5:]
            start = text.index(NEEDLE.format(key=key))
            after = len(text) - len(key) - len(QUESTION) - start - len(NEEDLE.format(key=key))
            out.append(0.0 if start == 0 else 1.0 if after == 0 else 0.5)
        return np.array(out)

    uniform, edges = depths(0.0), depths(0.4)
    assert (uniform != 0.5).mean() < 0.03  # uniform depths land exactly on an edge only by rounding
    share = (edges != 0.5).mean()
    assert 0.32 < share < 0.48 and (edges == 0.0).sum() > 50 and (edges == 1.0).sum() > 50, share
    same, _ = generate_passkey_documents(byt5, 400, 120, 300, seed=3)
    legacy = []  # the draws the generator made before edge_depths existed
    for i in range(400):
        rng = random.Random(document_seed(3, i))
        length = rng.randint(120, 300)
        legacy.append(gen.document(length, rng.random(), rng.getrandbits(63)).input_ids)
    assert all(np.array_equal(a, b) for a, b in zip(same, legacy, strict=True))


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_answer_loss_fraction_gives_each_document_that_share(byt5, fraction):
    cfg = DataConfig(num_samples=30, passkey_min_tokens=80, passkey_max_tokens=200, answer_loss_fraction=fraction)
    ds = build_packed_dataset(cfg, seq_len=256, tokenizer=byt5)
    b = ds.batch(np.arange(len(ds)))
    w, answer, valid = b["token_weights"], b["answer_mask"], b["labels"] != -100
    assert w.dtype == torch.float32 and (w[~valid] == 0).all() and (w[valid & ~answer] == 1).all()
    for row in range(len(ds)):
        for doc in b["document_ids"][row].unique():
            in_doc = b["document_ids"][row] == doc
            if (answer[row] & in_doc).any():
                share = w[row][answer[row] & in_doc].sum() / w[row][in_doc].sum()
                assert share.item() == pytest.approx(fraction, rel=1e-5)
    assert "token_weights" not in build_packed_dataset(DataConfig(num_samples=4), 128, byt5).batch([0])
