"""A full disk ends the run with one line that says so (free bytes, what to do), whatever torch's own error was; the
exported model is swapped in without a moment where none exists, and records its step. `ringtrain train` runs in this
process as a world of one (tests/test_training_state.py's harness)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from test_training_state import _lines, _train
from torch.distributed.checkpoint import CheckpointException

import ringtrain.train.checkpoint.manager as ckpt_manager

LINE = (r"rank 0 failed: DiskFull: no space left on device writing checkpoint step_00000002 in {root} \(\d+ bytes "
        r"free\): free space or move train\.output_dir, then resume \(checkpoint\.resume=auto continues from "
        r"step_00000001\)")
OVERRIDES = ["train.max_steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=1"]


def _check(out: Path, code: object, err: str) -> None:
    assert code == 1, err
    failed = _lines(err, "failed")
    assert len(failed) == 1 and re.search(LINE.format(root=re.escape(str(out / "checkpoints"))), failed[0]), err
    assert "Traceback" not in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]  # no half-written folder left
    assert not (out / ".ringtrain.lock").exists()


def test_an_injected_enospc_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the zip writer says on a short write ("unexpected pos"), over ENOSPC as DCP collects it from a rank."""
    real_save, calls = ckpt_manager.dcp.save, []

    def fills_up(state, checkpoint_id):
        calls.append(checkpoint_id)
        if len(calls) == 1:
            return real_save(state, checkpoint_id=checkpoint_id)
        Path(checkpoint_id).mkdir(parents=True, exist_ok=True)
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        inner = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        inner.__context__ = OSError(28, "No space left on device")
        raise CheckpointException("save failed", {0: (inner, None)})

    monkeypatch.setattr(ckpt_manager.dcp, "save", fills_up)
    out = tmp_path / "run"
    _check(out, *_train(out, *OVERRIDES))


def test_a_full_tmpfs_is_one_line(tmp_path: Path) -> None:
    """A real full filesystem: a tmpfs with room for one checkpoint of the tiny model, not two."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); test_an_injected_enospc_is_one_line covers the message")
    try:
        out = small / "run"
        _check(out, *_train(out, *OVERRIDES, "checkpoint.checksums=false"))
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_final_model_is_replaced_by_renaming_and_records_its_step(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, err = _train(out, "train.max_steps=2", "checkpoint.export_final=true")
    assert code == 0, err
    code, err = _train(out, "train.max_steps=3", "checkpoint.export_final=true")
    assert code == 0, err
    record = json.loads((out / "final_model" / "ringtrain_export.json").read_text())
    assert record["step"] == 3 and record["checkpoint"] == str(out / "checkpoints" / "step_00000003"), record
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("final_model")) == ["final_model"]


def test_a_kill_during_the_swap_leaves_a_complete_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """replace_folder renames the old folder aside before the new one moves in: dying between the two renames leaves
    the old export whole (as final_model.old), never nothing."""
    import os

    from ringtrain.model import weights

    old, new = tmp_path / "final_model", tmp_path / "final_model.tmp"
    for folder, text in ((old, "step 2"), (new, "step 3")):
        folder.mkdir()
        (folder / "model.safetensors").write_text(text)
    real_replace, calls = os.replace, []

    def dies_second(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(weights.os, "replace", dies_second)
    with pytest.raises(KeyboardInterrupt):
        weights.replace_folder(new, old)
    assert (tmp_path / "final_model.old" / "model.safetensors").read_text() == "step 2"
    monkeypatch.setattr(weights.os, "replace", real_replace)
    weights.replace_folder(new, old)
    assert (old / "model.safetensors").read_text() == "step 3" and not (tmp_path / "final_model.old").exists()
