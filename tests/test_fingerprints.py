"""Data and tokenizer fingerprints: a resume on other records (edited with their lengths kept, shuffled) or through
another tokenizer is refused naming what changed, unless checkpoint.data_change_intended says so; then one line, and
the data order restarts. `ringtrain train` runs in this process as a world of one (tests/test_training_state.py's
harness)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from test_training_state import _lines, _train

FILES = ["data.source=files", "train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.export_final=false"]


def _records(n: int = 48) -> list[str]:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "ember"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(n)]


def _write(path: Path, records: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in records))


@pytest.mark.parametrize("change", ["reversed-uppercased", "shuffled"])
def test_changed_records_are_refused_unless_intended(tmp_path: Path, change: str) -> None:
    data, out = tmp_path / "data.jsonl", tmp_path / "run"
    records = _records()
    _write(data, records)
    code, err = _train(out, *FILES, f"data.path={data}")
    assert code == 0, err
    ckpt = out / "checkpoints" / "step_00000004"
    before = (out / "config.yaml").read_text(), (out / "metrics.jsonl").read_text()

    # The same number and lengths of records: the loader's position check alone let this through.
    changed = [r[::-1].upper() for r in records] if change == "reversed-uppercased" else \
        random.Random(1).sample(records, len(records))
    _write(data, changed)
    code, err = _train(out, *FILES, f"data.path={data}", "train.max_steps=6")
    assert code == 2 and "Traceback" not in err, err
    assert _lines(err, "^error: ") == [
        f"error: the data or tokenizer differ from checkpoint {ckpt}: file data.jsonl was modified: resume on the data "
        "and data.tokenizer it was trained on, or set checkpoint.data_change_intended=true to continue on these (the "
        "data order then restarts from its beginning)"], err
    assert ((out / "config.yaml").read_text(), (out / "metrics.jsonl").read_text()) == before

    code, err = _train(out, *FILES, f"data.path={data}", "train.max_steps=6", "checkpoint.data_change_intended=true")
    assert code == 0, err
    lines = _lines(err, "data order restarts")
    assert len(lines) == 1 and lines[0].endswith(
        f"resume at step 4: file data.jsonl was modified since checkpoint {ckpt}, as "
        "checkpoint.data_change_intended=true allows: the data order restarts from its beginning"), err


def test_another_tokenizer_is_refused_naming_the_key(tmp_path: Path) -> None:
    from transformers import ByT5Tokenizer

    other = tmp_path / "tok"
    ByT5Tokenizer(extra_ids=0).save_pretrained(other)  # the same bytes, 259 ids instead of 384
    out = tmp_path / "run"
    base = ["train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.export_final=false"]
    code, err = _train(out, *base)
    assert code == 0, err
    code, err = _train(out, *base, f"data.tokenizer={other}", "train.max_steps=6")
    assert code == 2, err
    assert _lines(err, "^error: ") == [
        f"error: the data or tokenizer differ from checkpoint {out / 'checkpoints' / 'step_00000004'}: data.tokenizer "
        f"'bytes' -> '{other}': resume on the data and data.tokenizer it was trained on, or set "
        "checkpoint.data_change_intended=true to continue on these (the data order then restarts from its "
        "beginning)"], err


def test_a_changed_seq_len_on_files_data_names_the_key(tmp_path: Path) -> None:
    data, out = tmp_path / "data.jsonl", tmp_path / "run"
    _write(data, _records())
    code, err = _train(out, *FILES, f"data.path={data}")
    assert code == 0, err
    code, err = _train(out, *FILES, f"data.path={data}", "train.max_steps=6", "train.seq_len=64")
    assert code == 2, err
    (line,) = _lines(err, "^error: ")
    assert "(changed: train.seq_len 128 -> 64)" in line and "checkpoint.data_change_intended=true" in line, line
