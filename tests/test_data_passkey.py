"""Passkey and RULER-style documents: exact token length, needles at the requested depth, answer span that decodes to
the answer the needles imply."""

import random
import re

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

from ringtrain.config import DataConfig
from ringtrain.config.data import PASSKEY_TASKS
from ringtrain.data import PasskeyGenerator, build_packed_dataset, make_passkey_document
from ringtrain.data.passkey import NEEDLE, QUESTION, REPEAT_FILLER
from ringtrain.data.retrieval import DEFAULT_NEEDLES, RETRIEVAL_TASKS, RetrievalGenerator
from ringtrain.data.synthetic import GENERATORS, build_generator, document_seed, generate_passkey_documents


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


# ---- RULER-style tasks (data/retrieval.py) ---------------------------------------------------------------------


def _needles(tok, doc):
    return [tok.decode(doc.input_ids[s:e]).strip() for s, e in doc.needle_token_spans]


@pytest.mark.parametrize("which", ["byt5", "bpe"])
@pytest.mark.parametrize("task", ["multikey", "multivalue", "variable_tracking"])
def test_retrieval_documents_length_depth_and_answer(which, task, request):
    """Exact length; the needle at the requested depth; the answer span decodes to the answer the needles imply."""
    tok = request.getfixturevalue(which)
    gen = RetrievalGenerator(tok, task)
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(gen.minimum_tokens(), 700))
        depth = float(rng.choice([0.0, 1.0, rng.random()]))
        doc = gen.document(n, depth, seed=int(rng.integers(1 << 30)))
        assert len(doc.input_ids) == n
        a, b = doc.answer_token_span
        answer = tok.decode(doc.input_ids[a:b]).strip()
        assert b == n and answer == doc.key and doc.text[slice(*doc.answer_char_span)] == doc.key
        needles = _needles(tok, doc)
        assert len(needles) == DEFAULT_NEEDLES[task] and doc.needle_token_span in doc.needle_token_spans
        starts = [s for s, _ in doc.needle_token_spans]
        assert starts == sorted(starts)
        question = tok.decode(doc.input_ids[doc.needle_token_spans[-1][1]:a])
        if task == "multikey":
            names = [re.fullmatch(r"Key ([A-Z]{3}) is (\d{5})\.", x).groups() for x in needles]
            q = re.search(r"Value of key ([A-Z]{3})\? Key \1 is $", question)
            asked = q.group(1)
            assert len({k for k, _ in names}) == len(names) and answer == dict(names)[asked]
            primary = needles.index(f"Key {asked} is {answer}.")
        elif task == "multivalue":
            pairs = [re.fullmatch(r"Key ([A-Z]{3}) is (\d{5})\.", x).groups() for x in needles]
            q = re.search(f"Values of key {pairs[0][0]}\\? Key {pairs[0][0]} is $", question)
            assert len({k for k, _ in pairs}) == 1 and q
            assert answer == ", ".join(v for _, v in pairs)  # every value, in document order
            primary = 0
        else:
            first = re.fullmatch(r"VAR ([A-Z]{3}) = (\d{5})\.", needles[0]).groups()
            chain = [first[0]]
            for x in needles[1:]:
                name, source = re.fullmatch(r"VAR ([A-Z]{3}) = ([A-Z]{3})\.", x).groups()
                assert source == chain[-1]  # each assignment copies the previous variable
                chain.append(name)
            q = re.search(f"Which VARs equal {first[1]}\\? They are $", question)
            assert q and answer == " ".join(chain)
            primary = 0
        assert doc.needle_token_span == doc.needle_token_spans[primary]
        if which == "byt5":
            n_filler = n - sum(e - s for s, e in doc.needle_token_spans) - (b - a) - len(q.group(0))  # one-token space: filler lengths are exact, so the needle sits at the rounded depth
            before = doc.needle_token_span[0] - sum(e - s for s, e in doc.needle_token_spans[:primary])
            assert before == max(round(depth * n_filler), 0) and doc.depth == pytest.approx(before / n_filler)
            if task != "multikey":  # the rest of a list / chain follows the first needle
                assert all(s >= doc.needle_token_span[1] for s, _ in doc.needle_token_spans[1:])


def test_retrieval_documents_deterministic_and_too_short(byt5):
    gen = RetrievalGenerator(byt5, "variable_tracking")
    assert gen.document(300, 0.4, seed=9) == gen.document(300, 0.4, seed=9)
    assert gen.document(300, 0.4, seed=10).key != gen.document(300, 0.4, seed=9).key
    shortest = gen.document(gen.minimum_tokens(), 0.5, seed=1)
    assert len(shortest.input_ids) == gen.minimum_tokens() == 110
    with pytest.raises(ValueError, match="num_tokens=100 is too short for a variable_tracking document: needs at "
                                         "least 110 tokens"):
        gen.document(100, 0.5, 0)
    with pytest.raises(ValueError, match="task='ruler' is not one of multikey, multivalue, variable_tracking"):
        RetrievalGenerator(byt5, "ruler")


def test_task_mix_draws_every_task_and_keeps_passkey_only_data(byt5):
    """data.passkey_tasks: each task appears, each document answers its own question, lengths start at each task's
    shortest document; the default (passkey only) draws exactly what it drew before tasks existed."""
    tasks = ["passkey", "multikey", "multivalue", "variable_tracking"]
    tokens, masks = generate_passkey_documents(byt5, 200, 80, 127, seed=4, tasks=tasks)
    seen = {t: 0 for t in tasks}
    for ids, mask in zip(tokens, masks, strict=True):
        text, answer = byt5.decode(ids), byt5.decode(ids[mask])
        assert text.endswith(answer) and 80 <= len(ids) <= 127
        if "pass key" in text:
            task = "passkey"
        elif "VAR" in text:
            task = "variable_tracking"
        else:
            task = "multivalue" if "Values of key" in text else "multikey"
        seen[task] += 1
        assert len(ids) >= build_generator(byt5, task).minimum_tokens()
    assert all(25 < n < 75 for n in seen.values()), seen
    only, _ = generate_passkey_documents(byt5, 50, 80, 127, seed=4)
    default, _ = generate_passkey_documents(byt5, 50, 80, 127, seed=4, tasks=["passkey"])
    assert all(np.array_equal(a, b) for a, b in zip(only, default, strict=True))
    with pytest.raises(ValueError, match=r"passkey_max_tokens=100 is below the shortest document of multikey \(106 "
                                         r"tokens\), variable_tracking \(110 tokens\)"):
        generate_passkey_documents(byt5, 5, 106, 100, seed=0, tasks=["multikey", "variable_tracking"])
    with pytest.raises(ValueError, match=r"passkey_min_tokens=80 is below the shortest multikey document \(106 tokens"):
        generate_passkey_documents(byt5, 5, 80, 200, seed=0, tasks=["multikey", "variable_tracking"])
    problems = dict(DataConfig(passkey_tasks=["passkey", "ruler"])._validate())
    assert problems["passkey_tasks"] == ("passkey_tasks=['passkey', 'ruler'] must be a non-empty list of passkey, "
                                         "multikey, multivalue, variable_tracking")


def test_generator_registry_is_keyed_by_the_config_task_names(byt5):
    """The config validates data.passkey_tasks against PASSKEY_TASKS without importing the generators: each of those
    names has a generator (and each retrieval task its needle count), and no generator is unreachable."""
    assert tuple(GENERATORS) == PASSKEY_TASKS
    assert set(DEFAULT_NEEDLES) == set(RETRIEVAL_TASKS) == set(PASSKEY_TASKS) - {"passkey"}
    for task in PASSKEY_TASKS:
        gen = build_generator(byt5, task, digits=4, filler="random")
        assert (gen.digits, gen.filler, getattr(gen, "task", "passkey")) == (4, "random", task)
    with pytest.raises(ValueError, match="task='ruler' is not one of passkey, multikey, multivalue, variable_tracking"):
        build_generator(byt5, "ruler")
