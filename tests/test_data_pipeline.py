"""Loading local jsonl / parquet / text through datasets, the tokenization cache, and config validation."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from transformers import ByT5Tokenizer

from ringtrain.config import DataConfig, check_data_config
from ringtrain.data import build_dataloader, build_packed_dataset
from ringtrain.data.pipeline import load_documents, tokenize_documents
from ringtrain.data.tokenizer import build_tokenizer, encode
from ringtrain.errors import ConfigError

SAMPLE = Path(__file__).resolve().parents[1] / "ringtrain" / "data" / "samples" / "tiny.jsonl"


def _texts(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "ünï", "code", "river", "x"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(n)]


def _decoded_documents(ds) -> list[str]:
    """Split the packed real-token stream at EOS and decode each document (byte tokenizer)."""
    b = ds.batch(np.arange(len(ds)))
    stream = b["input_ids"][b["attention_mask"].bool()].tolist()
    docs, cur = [], []
    for t in stream:
        if t == 1:
            docs.append(bytes(x - 3 for x in cur).decode())
            cur = []
        else:
            cur.append(t)
    assert not cur  # the stream ends with EOS
    return docs


def test_jsonl_round_trip(tmp_path):
    texts = _texts(0, 30)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    cfg = DataConfig(source="files", path=str(path), cache_dir=str(tmp_path / "cache"))
    assert _decoded_documents(build_packed_dataset(cfg, seq_len=32)) == texts


def test_parquet_with_custom_text_field_and_glob(tmp_path):
    texts = _texts(1, 40)
    Dataset.from_dict({"body": texts[:25], "id": list(range(25))}).to_parquet(str(tmp_path / "a.parquet"))
    Dataset.from_dict({"body": texts[25:], "id": list(range(25, 40))}).to_parquet(str(tmp_path / "b.parquet"))
    cfg = DataConfig(source="files", path=str(tmp_path / "*.parquet"), text_field="body",
                     cache_dir=str(tmp_path / "cache"))
    assert _decoded_documents(build_packed_dataset(cfg, seq_len=50)) == texts
    with pytest.raises(ValueError, match="text_field='text' is not a column .* choose one of body, id"):
        load_documents(DataConfig(source="files", path=str(tmp_path / "a.parquet"), cache_dir=str(tmp_path)))


def test_text_files_by_paragraph_and_line_from_a_directory(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "one.txt").write_text("first para\nstill first\n\nsecond para\n")
    (tmp_path / "corpus" / "ignored.bin").write_bytes(b"\x00")
    cache = str(tmp_path / "cache")
    by_para = DataConfig(source="files", path=str(tmp_path / "corpus"), cache_dir=cache)
    assert [d.strip() for d in _decoded_documents(build_packed_dataset(by_para, 16))] == \
        ["first para\nstill first", "second para"]
    by_line = DataConfig(source="files", path=str(tmp_path / "corpus"), text_sample_by="line", cache_dir=cache)
    assert _decoded_documents(build_packed_dataset(by_line, 16)) == ["first para", "still first", "second para"]


def test_shipped_sample_and_the_loader_end_to_end(tmp_path):
    cfg = DataConfig(source="files", path=str(SAMPLE), cache_dir=str(tmp_path))
    loader = build_dataloader(cfg, seq_len=64, batch_size=4)
    batch = next(loader)
    assert set(batch) == {"input_ids", "labels", "document_ids", "attention_mask"}
    assert all(v.shape == (4, 64) for v in batch.values())
    assert len(loader.dataset) * 64 >= loader.dataset.num_tokens > 4000


def test_tokenization_is_cached_between_runs(tmp_path):
    cfg = DataConfig(source="files", path=str(SAMPLE), cache_dir=str(tmp_path))
    tok = build_tokenizer("bytes")
    first = tokenize_documents(load_documents(cfg), tok, cfg)
    files = [f["filename"] for f in first.cache_files]
    mtimes = [os.stat(f).st_mtime_ns for f in files]
    second = tokenize_documents(load_documents(cfg), tok, cfg)
    assert [f["filename"] for f in second.cache_files] == files  # the same cache file, reused...
    assert [os.stat(f).st_mtime_ns for f in files] == mtimes  # ...and not rewritten
    assert second["input_ids"] == first["input_ids"]


def test_parallel_tokenization_and_byte_fast_path_match_byt5(tmp_path):
    texts = _texts(2, 64) + ["", "naïve café — 東京"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = ByT5Tokenizer()
    one = DataConfig(source="files", path=str(path), cache_dir=str(tmp_path / "c1"))
    two = DataConfig(source="files", path=str(path), cache_dir=str(tmp_path / "c2"), num_proc=2)
    ids1 = tokenize_documents(load_documents(one), tok, one)["input_ids"]
    ids2 = tokenize_documents(load_documents(two), tok, two)["input_ids"]
    assert ids1 == ids2 == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert encode(tok, texts[-1]).tolist() == ids1[-1]


def test_config_problems_name_field_value_and_fix(tmp_path):
    cfg = DataConfig(source="web", format="xml", num_proc=0, passkey_min_tokens=90, passkey_max_tokens=80,
                     passkey_filler="lorem", answer_loss_fraction=1.0)
    fields = [f for f, _ in cfg._validate()]
    assert fields == ["source", "format", "num_proc", "passkey_max_tokens", "passkey_filler", "answer_loss_fraction"]
    with pytest.raises(ValueError) as err:
        check_data_config(cfg)
    msg = str(err.value)
    assert "data.source: source='web' is not one of passkey, files, hub" in msg
    assert "data.num_proc: num_proc=0 must be >= 1" in msg and "passkey_max_tokens=80 is below" in msg
    assert DataConfig(source="hub")._validate() == [
        ("path", "source='hub' needs data.path: a hub dataset name (or use source='files')")]
    missing = DataConfig(source="files", path=str(tmp_path / "nope*.jsonl"))._validate()
    assert missing[0][0] == "path" and "nothing matches" in missing[0][1]
    assert DataConfig()._validate() == [] and DataConfig(source="files", path=str(SAMPLE))._validate() == []
    with pytest.raises(ValueError, match="data.source: source='web'"):
        build_packed_dataset(DataConfig(source="web"), 64)


def test_records_without_text_are_counted_and_reported(tmp_path, caplog):
    """A record without data.text_field (or with null or "") adds no document: it is counted and reported, and
    data where no record has text is refused."""
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "one"}\n{"body": "x"}\n{"text": null}\n{"text": ""}\n{"text": "two"}\n')
    cfg = DataConfig(source="files", path=str(path), cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="ringtrain"):
        ds = build_packed_dataset(cfg, seq_len=16)
    assert _decoded_documents(ds) == ["one", "two"]
    assert [r.getMessage() for r in caplog.records] == [
        f"data: 3 of 5 records of {path} have no text in data.text_field='text' (missing, null or empty): they are "
        "skipped"]
    path.write_text('{"text": null}\n{"text": "", "body": "x"}\n')
    with pytest.raises(ConfigError, match=r"none of its 2 records has text in data\.text_field='text'"):
        load_documents(cfg)


def test_unknown_or_mixed_formats_raise(tmp_path):
    (tmp_path / "a.csv").write_text("text\nhello\n")
    (tmp_path / "b.txt").write_text("hello\n")
    (tmp_path / "c.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(ValueError, match="cannot tell the format of .*a.csv: set data.format"):
        load_documents(DataConfig(source="files", path=str(tmp_path / "a.csv")))
    with pytest.raises(ValueError, match=r"mixes formats \['json', 'text'\]"):
        load_documents(DataConfig(source="files", path=f"{tmp_path / 'b.txt'},{tmp_path / 'c.jsonl'}"))


def test_tokenizer_from_a_local_folder(tmp_path):
    """A BPE tokenizer trained here and saved like a model folder: loaded, used for tokenizing, cached."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([SAMPLE.read_text()], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>").save_pretrained(tmp_path / "tok")
    cfg = DataConfig(source="files", path=str(SAMPLE), cache_dir=str(tmp_path / "cache"),
                     tokenizer=str(tmp_path / "tok"))
    tok = build_tokenizer(cfg.tokenizer)
    ids = tokenize_documents(load_documents(cfg), tok, cfg)["input_ids"]
    texts = [json.loads(line)["text"] for line in SAMPLE.read_text().splitlines()]
    assert ids == [tok.encode(t, add_special_tokens=False) for t in texts]
    ds = build_packed_dataset(cfg, seq_len=64)
    assert ds.num_tokens == sum(len(x) + 1 for x in ids) and ds.input_ids.max() < len(tok)
