"""data.streaming: the same batches as the cached pipeline for text (no shuffle), exact resume from the reader's own
position, chat records packed whole with the same loss masks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ringtrain.config import DataConfig
from ringtrain.data.files import SAMPLES
from ringtrain.model.loss import IGNORE_INDEX


def _loader(tmp_path, streaming, *, path="tiny.jsonl", fmt="auto", seq_len=64, batch_size=2, dp_rank=0, dp_size=1):
    from ringtrain.data.loader import PackedDataLoader
    from ringtrain.data.pipeline import build_dataloader, build_packed_dataset

    cfg = DataConfig(source="files", path=os.path.join(SAMPLES, path), format=fmt, shuffle=False,
                     streaming=streaming, cache_dir=str(tmp_path / "cache"))
    if streaming:
        from ringtrain.data import build_tokenizer
        from ringtrain.data.streaming import StreamingLoader

        return StreamingLoader(cfg, build_tokenizer("bytes"), seq_len, batch_size, dp_rank=dp_rank, dp_size=dp_size)
    if dp_size == 1:
        return build_dataloader(cfg, seq_len=seq_len, batch_size=batch_size)
    return PackedDataLoader(build_packed_dataset(cfg, seq_len), batch_size, dp_rank=dp_rank, dp_size=dp_size,
                            shuffle=False)


def _equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_streaming_gives_the_cached_batches_for_text(tmp_path, dp_rank):
    cached = _loader(tmp_path, False, dp_rank=dp_rank, dp_size=2)
    streamed = _loader(tmp_path, True, dp_rank=dp_rank, dp_size=2)
    for _ in range(cached.steps_per_epoch * 2 + 1):  # two epochs: the leftover skipped alike
        _equal(next(streamed), next(cached))
    assert streamed.epoch == cached.epoch == 2


def test_streaming_resume_is_exact_and_starts_at_the_saved_record(tmp_path):
    first = _loader(tmp_path, True, path="chat.jsonl", fmt="chat", seq_len=1024)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps survives JSON too
    assert state["readers"] is not None and "shard_example_idx" in json.dumps(state["readers"])
    expected = [next(first) for _ in range(12)]  # across the end of the stream
    assert first.epoch >= 1
    resumed = _loader(tmp_path, True, path="chat.jsonl", fmt="chat", seq_len=1024)
    resumed.load_state_dict(state)
    read = []
    source = resumed.sources[0]
    original = source._encode
    source._encode = lambda record, k: (read.append(record["id"]), original(record, k))[1]
    for want in expected:
        _equal(next(resumed), want)
    # The resumed reader starts at the saved document, not at the stream's beginning.
    assert read[0] > 0


def test_streamed_chat_carries_loss_on_assistant_turns_only(tmp_path):
    streamed = _loader(tmp_path, True, path="chat.jsonl", fmt="chat", seq_len=1024)
    expected = set()
    for line in open(os.path.join(SAMPLES, "chat.jsonl")):
        expected |= {m["content"] + "<|end|>\n" for m in json.loads(line)["messages"] if m["role"] == "assistant"}
    seen = 0
    for _ in range(5):
        batch = next(streamed)
        for row in range(batch["input_ids"].shape[0]):
            ids, valid = batch["input_ids"][row].tolist(), (batch["labels"][row] != IGNORE_INDEX).tolist()
            run = []
            for t, v in zip([*ids, 0], [*valid, False], strict=True):
                if v:
                    run.append(t - 3)
                elif run:
                    assert bytes(run).decode() in expected
                    run, seen = [], seen + 1
    assert seen > 10


def test_streamed_mixture_shares_and_resume(tmp_path):
    from ringtrain.data import build_tokenizer
    from ringtrain.data.streaming import StreamingLoader

    sources = [{"name": "chat", "path": os.path.join(SAMPLES, "chat.jsonl"), "format": "chat", "weight": 3},
               {"name": "instruction", "path": os.path.join(SAMPLES, "instruction.jsonl"), "format": "instruction",
                "weight": 1}]
    cfg = DataConfig(sources=sources, num_samples=40, shuffle=False, streaming=True)

    def loader():
        return StreamingLoader(cfg, build_tokenizer("bytes"), 1024, 2, dp_rank=1, dp_size=2)

    first = loader()
    documents, tokens = np.zeros(2, dtype=np.int64), {"chat": 0, "instruction": 0}
    while first.draws < 400:  # ten blocks of 40 draws, every source read several times over
        next(first)
        part = first.last_part
        ends = (part.input_ids == 1) & (part.source_ids >= 0)
        documents += np.bincount(part.source_ids[ends].astype(np.int64), minlength=2)
        for name, n in first.last_source_tokens().items():
            tokens[name] += n
    np.testing.assert_allclose(documents / documents.sum(), [0.75, 0.25], atol=0.02)
    assert tokens["chat"] > tokens["instruction"] > 0
    state = json.loads(json.dumps(first.state_dict()))
    expected = [next(first) for _ in range(6)]
    resumed = loader()
    resumed.load_state_dict(state)
    for want in expected:
        _equal(next(resumed), want)


def test_a_streamed_position_is_not_resumed_by_the_cached_loader_or_back(tmp_path):
    streamed, cached = _loader(tmp_path, True), _loader(tmp_path, False)
    next(streamed)
    next(cached)
    with pytest.raises(ValueError, match=r"a stream's \(data.streaming=true\): resume with the data.streaming"):
        cached.load_state_dict(streamed.state_dict())
    with pytest.raises(ValueError, match="of the cached pipeline, not data.streaming=true"):
        streamed.load_state_dict(cached.state_dict())
