"""data.sources: documents drawn by weight in a seeded order (shares within 2% over 10K samples), resumable, with each
source's tokens counted; bad weights refused one line each."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ringtrain.config import DataConfig
from ringtrain.data.files import SAMPLES

SOURCES = [
    {"name": "chat", "path": os.path.join(SAMPLES, "chat.jsonl"), "format": "chat", "weight": 5},
    {"name": "instruction", "path": os.path.join(SAMPLES, "instruction.jsonl"), "format": "instruction", "weight": 3},
    {"path": os.path.join(SAMPLES, "tiny.jsonl"), "weight": 2},  # text; named by its path
]


def _loader(tmp_path, seed=0, num_samples=10_000, batch_size=8):
    from ringtrain.data import build_dataloader

    cfg = DataConfig(sources=SOURCES, num_samples=num_samples, seed=seed, cache_dir=str(tmp_path / "cache"))
    return build_dataloader(cfg, seq_len=512, batch_size=batch_size)


def _documents_per_source(dataset, indices) -> np.ndarray:
    """Documents of each source in these sequences, counted by their EOS (the byte tokenizer's id 1)."""
    ids, src = dataset.input_ids[indices], dataset.source_ids[indices]
    return np.bincount(src[(ids == 1) & (src >= 0)].astype(np.int64), minlength=len(SOURCES))


def test_mixture_shares_seeded_order_and_resume(tmp_path):
    loader = _loader(tmp_path)
    dataset = loader.dataset
    assert dataset.source_names == ["chat", "instruction", SOURCES[2]["path"]]
    assert _documents_per_source(dataset, np.arange(len(dataset))).tolist() == [5000, 3000, 2000]  # drawn exactly
    # Observed in the stream one epoch of steps delivers (the sequences left over wait for the next epoch's shuffle).
    seen = np.zeros(len(SOURCES), dtype=np.int64)
    tokens: dict[str, int] = {}
    for _ in range(loader.steps_per_epoch):
        batch = next(loader)
        seen += _documents_per_source(dataset, loader.last_global_indices)
        for name, n in dataset.source_tokens(loader.last_global_indices).items():
            tokens[name] = tokens.get(name, 0) + n
        assert sum(dataset.source_tokens(loader.last_global_indices).values()) == int(batch["attention_mask"].sum())
    assert seen.sum() >= 9_500
    np.testing.assert_allclose(seen / seen.sum(), [0.5, 0.3, 0.2], atol=0.02)
    assert all(n > 0 for n in tokens.values())

    # The same seed builds the same sequences; another seed another order.
    again = _loader(tmp_path)
    np.testing.assert_array_equal(again.dataset.input_ids, dataset.input_ids)
    from ringtrain.data.pipeline import mixture_draws

    draws = [mixture_draws(np.array([500, 300, 200]), np.array([24, 24, 24]), seed) for seed in (0, 0, 1)]
    assert all(np.array_equal(a, b) for a, b in zip(draws[0], draws[1], strict=True))
    assert not np.array_equal(draws[0][0], draws[2][0])
    for s in range(3):  # a source's documents each once per pass over it
        picked = draws[0][1][draws[0][0] == s]
        assert sorted(picked[:24].tolist()) == list(range(24))

    # Resume: a loader rebuilt from the files and given the state continues with exactly the same batches.
    first = _loader(tmp_path, num_samples=400, batch_size=2)
    for _ in range(5):
        next(first)
    state = first.state_dict()
    expected = [next(first) for _ in range(first.steps_per_epoch + 3)]  # across an epoch boundary
    resumed = _loader(tmp_path, num_samples=400, batch_size=2)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            assert np.array_equal(got[key], want[key]), key


@pytest.mark.parametrize(("weights", "message"), [
    ([-1, 1], "data.sources[0].weight=-1 must be a number >= 0 (a share of data.num_samples, relative to "
              "the other weights)"),
    ([0, 0], "data.sources weights are all zero ([0.0, 0.0]): give at least one source a weight > 0"),
])
def test_bad_weights_are_one_line_exit_2(tmp_path, capsys, weights, message):
    from ringtrain.cli import main

    sources = "[" + ", ".join(f"{{path: {SOURCES[i]['path']}, format: {SOURCES[i]['format']}, weight: {w}}}"
                              for i, w in enumerate(weights)) + "]"
    rc = main(["validate", os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_chat.yaml"),
               f"data.sources={sources}", f"train.output_dir={tmp_path}"])
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]


def _train(out, *extra):
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..")
    cmd = [sys.executable, "-m", "ringtrain.cli", "train", os.path.join(root, "configs", "tiny_chat.yaml"),
           f"train.output_dir={out}", f"data.cache_dir={out}_cache", "parallel.sp_size=1", "train.max_steps=60",
           "train.seq_len=512", "data.num_samples=160", "model.config.hidden_size=32",
           "model.config.intermediate_size=64", "logging.progress_bar=false", "checkpoint.export_final=false",
           "checkpoint.every_steps=100", *extra]
    return subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _records(out):
    import json

    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_mixture_order_is_the_same_after_sigterm_and_resume(tmp_path):
    import signal
    import time

    reference = _train(tmp_path / "ref")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]
    proc = _train(tmp_path / "stop")
    deadline = time.monotonic() + 240
    while len(_records(tmp_path / "stop")) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75  # saved at the step boundary, resumable
    stopped = len(_records(tmp_path / "stop"))
    assert stopped < 60
    resumed = _train(tmp_path / "stop")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    keys = ("step", "loss", "tokens/chat", "tokens/instruction", "tokens_seen/chat", "tokens_seen/instruction")
    ref = [tuple(r[k] for k in keys) for r in _records(tmp_path / "ref")]
    got = [tuple(r[k] for k in keys) for r in _records(tmp_path / "stop")]
    assert len(ref) == 60 and got == ref  # the same sequences step by step (and so the same losses, bitwise)


def test_long_documents_upsampled_within_their_source(tmp_path, caplog):
    from ringtrain.data.pipeline import build_packed_dataset

    chat_lengths = []
    for line in open(SOURCES[0]["path"]):
        chat_lengths.append(len("".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n"
                                        for m in __import__("json").loads(line)["messages"]).encode()))
    threshold = int(np.median(chat_lengths))
    n_long = sum(n >= threshold for n in chat_lengths)
    sources = [{**SOURCES[0], "weight": 1, "long_tokens": threshold, "long_upsample": 3}, {**SOURCES[1], "weight": 1}]
    per_pass = 3 * n_long + (24 - n_long)  # documents in one pass over the chat source
    cfg = DataConfig(sources=sources, num_samples=2 * 4 * per_pass, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level("INFO"):
        packed = build_packed_dataset(cfg, 1024)
    # 4 whole passes over chat: each long conversation drawn exactly 12 times, each short one 4 times.
    ends = (packed.input_ids == 1) & (packed.source_ids == 0)
    rows, cols = np.nonzero(ends)
    lengths = []
    for r, c in zip(rows, cols, strict=True):
        start = c
        while start > 0 and packed.segments[r, start - 1] == packed.segments[r, c]:
            start -= 1
        lengths.append(c - start)
    lengths = np.asarray(lengths)
    assert len(lengths) == 4 * per_pass
    assert int((lengths >= threshold).sum()) == 12 * n_long
    lines = [m for m in caplog.messages if m.startswith("data upsampling: chat: documents of >=")]
    assert len(lines) == 1 and f"({n_long} of 24) upsampled x3" in lines[0]

    single = DataConfig(source="files", path=SOURCES[0]["path"], format="chat", long_tokens=threshold,
                        long_upsample=2, cache_dir=str(tmp_path / "cache"))
    assert build_packed_dataset(single, 1024).num_documents == 24 + n_long
