"""Training state: a run folder holds one run; damaged checkpoints are skipped; changed settings apply or are
refused; bad paths and failures end in one line. `ringtrain train` runs in this process as a world of one (imports
are paid once); tests/test_resume.py and tests/test_launch.py cover the same paths under torchrun with signals.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import CheckpointException

import ringtrain.train.checkpoint.manager as ckpt_manager
from ringtrain.cli import main
from ringtrain.config import OptimConfig
from ringtrain.parallel.distributed import free_port, teardown_distributed
from ringtrain.train.checkpoint import checkpoint_problem
from ringtrain.train.optim import lr_factor

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
BASE = ["parallel.sp_size=1", "train.seq_len=128", "train.micro_batch_size=2", "data.num_samples=64",
        "train.max_steps=10", "checkpoint.every_steps=5", "logging.progress_bar=false", "checkpoint.export_final=false"]
ENV = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


def _train(out: Path, *overrides: str) -> tuple[int | BaseException, str]:
    """`ringtrain train CONFIG BASE overrides` in this process: (exit code or what it raised, its stderr)."""
    logger = logging.getLogger("ringtrain")
    saved = logger.handlers[:], logger.level, logger.propagate, torch.get_num_threads()
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        for key, value in {**ENV, "MASTER_PORT": str(free_port())}.items():
            mp.setenv(key, value)
        try:
            code: int | BaseException = main(["train", str(CONFIG), *BASE, f"train.output_dir={out}", *overrides])
        except (Exception, CheckpointException) as e:
            code = e
        finally:
            teardown_distributed()
            # setup_logging pointed the ringtrain logger at `err` and train.threads set torch's: undo both.
            logger.handlers[:], logger.level, logger.propagate = saved[:3]
            torch.set_num_threads(saved[3])
    return code, err.getvalue()


def _metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _lines(err: str, pattern: str) -> list[str]:
    return [line for line in err.splitlines() if re.search(pattern, line)]


def _folders(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 10-step run with checkpoints at steps 5 and 10: each test works on a copy."""
    out = tmp_path_factory.mktemp("ref") / "run"
    code, err = _train(out)
    assert code == 0, err
    assert _folders(out) == ["step_00000005", "step_00000010"]
    return out


@pytest.fixture
def run(reference: Path, tmp_path: Path) -> Path:
    shutil.copytree(reference, tmp_path / "run")
    return tmp_path / "run"


def _losses(out: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in _metrics(out).items()}


def test_a_run_folder_holds_one_run(run: Path, reference: Path) -> None:
    root = run / "checkpoints"
    # Starting fresh over an earlier run's checkpoints would keep them for a later resume=auto: refused.
    code, err = _train(run, "checkpoint.resume=none")
    assert code == 2 and "Traceback" not in err, err
    assert _lines(err, "^error: ") == [
        f"error: checkpoint.resume=none, but {root} holds 2 checkpoint(s) of an earlier run (newest step_00000010): "
        "choose a new train.output_dir, resume that run with checkpoint.resume=auto, or set "
        "checkpoint.overwrite=true to delete them and start over"]
    assert _folders(run) == ["step_00000005", "step_00000010"]

    # Resuming from an older checkpoint (with another lr) replaces the newer one, saying so.
    code, err = _train(run, f"checkpoint.resume={root / 'step_00000005'}", "optim.lr=1e-3")
    assert code == 0, err
    assert [line.split("WARNING ")[1] for line in _lines(err, "WARNING")] == [
        "ringtrain.train.checkpoint.manager: resuming from step_00000005: deleting the newer checkpoint(s) step_00000010, which "
        "this run replaces"]
    assert _folders(run) == ["step_00000005", "step_00000010"]
    assert json.loads((root / "step_00000010" / "meta.json").read_text())["config"]["optim"]["lr"] == 1e-3
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 11))
    assert [losses[s] for s in range(1, 6)] == [_losses(reference)[s] for s in range(1, 6)]
    assert losses[7] != _losses(reference)[7]  # step 6 ran with the new lr

    # checkpoint.overwrite=true: the earlier run's checkpoints go, and the new run starts from step 0.
    code, err = _train(run, "checkpoint.resume=none", "checkpoint.overwrite=true", "train.max_steps=3")
    assert code == 0, err
    assert _lines(err, "WARNING")[0].endswith(
        f"checkpoint.overwrite=true: deleting the 2 checkpoint(s) of the earlier run in {root}")
    assert _folders(run) == ["step_00000003"]
    assert _losses(run) == {s: _losses(reference)[s] for s in (1, 2, 3)}  # the same seed: the same first steps


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(0, len(data), 997):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "no-marker": (lambda c: (c / "COMPLETE").unlink(), r"has no COMPLETE marker \(interrupted while being written\)"),
    "truncated-distcp": (lambda c: _truncate(c / "__0_0.distcp", 1000),
                         r"has a truncated data file __0_0\.distcp \(1000 of \d+ bytes\)"),
    "truncated-index": (lambda c: _truncate(c / ".metadata", 100),
                        r"has an unreadable \.metadata \(UnpicklingError: pickle data was truncated\)"),
    "garbled-distcp": (lambda c: _garble(c / "__0_0.distcp"),
                       r"has a file __0_0\.distcp that does not match its checksum in SHA256SUMS \(damaged since it was "
                       r"saved\)"),
    # Saved without checksums (an older checkpoint): the load itself fails, on every rank.
    "garbled-unverified": (lambda c: ((c / "SHA256SUMS").unlink(), _garble(c / "__0_0.distcp")),
                           r"cannot be read \(CheckpointException: rank 0: \w+"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_skipped_and_replaced(run: Path, reference: Path, damage: str) -> None:
    """The newest checkpoint lost its marker or a file, or is garbled: one warning naming what is wrong, resume from
    the previous one, and the steps after it are trained again to the same losses and saved over the damaged one."""
    root = run / "checkpoints"
    spoil, reason = DAMAGE[damage]
    spoil(root / "step_00000010")
    code, err = _train(run)
    assert code == 0, err
    warnings = _lines(err, "WARNING")
    assert len(warnings) == 1 and re.search(f"skipping checkpoint {root / 'step_00000010'}: it {reason}",
                                            warnings[0]), err
    assert _lines(err, "resumed from")[0].endswith(f"resumed from {root / 'step_00000005'} at step 5")
    assert _losses(run) == _losses(reference)  # steps 6-10 again, bitwise
    assert _folders(run) == ["step_00000005", "step_00000010"]
    assert checkpoint_problem(root / "step_00000010") is None


def test_no_usable_checkpoint_exits_2(run: Path) -> None:
    root = run / "checkpoints"
    (root / "step_00000010" / "COMPLETE").unlink()
    (root / "step_00000005" / "__0_0.distcp").unlink()
    code, err = _train(run)
    assert code == 2 and "Traceback" not in err, err
    assert [line.split(": ", 1)[1] for line in _lines(err, "WARNING")] == [
        f"skipping checkpoint {root / 'step_00000010'}: it has no COMPLETE marker (interrupted while being written)",
        f"skipping checkpoint {root / 'step_00000005'}: it is missing its data file __0_0.distcp"]
    assert _lines(err, "^error: ") == [
        f"error: checkpoint.resume=auto: none of the 2 checkpoint(s) in {root} is usable (see the warnings above): "
        "resume from a good copy with checkpoint.resume=<step_* folder>, or start over with checkpoint.resume=none "
        "checkpoint.overwrite=true"]


def test_changed_schedule_applies_from_the_resumed_step(run: Path, reference: Path) -> None:
    """Raising max_steps and changing lr: one line per key, the LR of each later step is the new schedule's."""
    code, err = _train(run, "train.max_steps=14", "optim.lr=1e-3")
    assert code == 0, err
    old, new = OptimConfig(lr=2e-3, warmup_steps=5), OptimConfig(lr=1e-3, warmup_steps=5)
    rules = "ringtrain.train.checkpoint.resume"
    assert [line.split(f"{rules}: ")[1] for line in _lines(err, rules)] == [
        "resume at step 10: optim.lr changed from 0.002 to 0.001, applied from step 11 on",
        "resume at step 10: train.max_steps changed from 10 to 14, applied from step 11 on",
        f"resume at step 10: learning rate {1e-3 * lr_factor(10, new, 14):.6g} at step 11 under optim.* and "
        f"train.max_steps as given now (the checkpoint's schedule: {2e-3 * lr_factor(10, old, 10):.6g})"]
    metrics = _metrics(run)
    assert {s: r["lr"] for s, r in metrics.items() if s > 10} == {s: 1e-3 * lr_factor(s - 1, new, 14)
                                                                  for s in range(11, 15)}
    assert {s: r["loss"] for s, r in metrics.items() if s <= 10} == _losses(reference)
    assert "lr: 0.001" in (run / "config.yaml").read_text()


REFUSED = [
    ("train.micro_batch_size=4", "the global batch would change from 2 sequences per step in checkpoint {ckpt} "
     "(train.micro_batch_size=2 x train.grad_accum_steps=1 x 1 data-parallel rank(s)) to 4 (4 x 1 x 1): keep 2 "
     "(e.g. train.micro_batch_size=2), or start a new run in another train.output_dir"),
    ("model.config.intermediate_size=256", "the model does not match checkpoint {ckpt}: "
     "lm.model.layers.0.mlp.gate_proj.weight is [384, 128] in the checkpoint and [256, 128] in the model (6 tensors "
     "differ); changed: model.config.intermediate_size 384 -> 256: resume with the model settings it was saved "
     "with, or start a new run in another train.output_dir"),
    ("train.max_steps=8", "train.max_steps=8 is below step 10 of checkpoint {ckpt}: raise train.max_steps, or resume "
     "from an earlier checkpoint with checkpoint.resume=<step_* folder>"),
    ("data.seed=1", "the data or tokenizer differ from checkpoint {ckpt}: the tokens of the first 16 sequences differ "
     "(records edited, reordered or shuffled) (changed: data.seed 0 -> 1): resume on the data and data.tokenizer it "
     "was trained on, or set checkpoint.data_change_intended=true to continue on these (the data order then restarts "
     "from its beginning)"),
]


@pytest.mark.parametrize("override,message", REFUSED, ids=[r[0].split("=")[0] for r in REFUSED])
def test_a_change_the_checkpoint_cannot_follow_is_refused(run: Path, override: str, message: str) -> None:
    """One line, exit 2, before any step, and the run folder as it was (config.yaml included)."""
    before = (run / "config.yaml").read_text(), (run / "metrics.jsonl").read_text()
    code, err = _train(run, override)
    assert code == 2 and "Traceback" not in err, err
    assert _lines(err, "^error: ") == ["error: " + message.format(ckpt=run / "checkpoints" / "step_00000010")]
    assert ((run / "config.yaml").read_text(), (run / "metrics.jsonl").read_text()) == before
    assert _folders(run) == ["step_00000005", "step_00000010"]


def test_an_exception_of_any_base_class_names_the_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's CheckpointException is a BaseException: the failure line is there all the same, on one line."""
    def failing_disk(*args, **kwargs):
        raise CheckpointException("save failed", {0: (OSError(5, "Input/output error"), None)})

    monkeypatch.setattr(ckpt_manager.dcp, "save", failing_disk)
    raised, err = _train(tmp_path / "run", "train.max_steps=5")
    assert isinstance(raised, CheckpointException)
    assert [line.split("ERROR ")[1] for line in _lines(err, "failed")] == [
        "ringtrain.train.trainer: rank 0 failed: CheckpointException: rank 0: OSError: [Errno 5] Input/output error"]


def test_a_signal_during_the_last_step_lets_the_run_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop signals are polled before each step: one that arrives during the last step does not skip the
    export; the run saves, exports and exits 0."""
    from ringtrain.train.trainer import Trainer

    step = Trainer.train_step

    def signalled_last_step(self):
        if self.step == self.cfg.train.max_steps - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", signalled_last_step)
    code, err = _train(tmp_path / "run", "train.max_steps=3", "checkpoint.export_final=true")
    assert code == 0, err
    assert len(_lines(err, "received SIGTERM: finishing this step")) == 1, err
    assert "stopped at step" not in err
    assert (tmp_path / "run" / "final_model" / "model.safetensors").exists()
    assert _folders(tmp_path / "run") == ["step_00000003"]


def _validate(*overrides: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["validate", str(CONFIG), *BASE, *overrides])
    return code, err.getvalue()


def _bad_paths(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (overrides, the one error line) for paths that used to fail at run time with a traceback."""
    (tmp / "empty.jsonl").write_text("")
    (tmp / "body.jsonl").write_text('{"body": "a document", "id": 1}\n' * 3)
    (tmp / "a_file").write_text("")
    files = ["data.source=files", "checkpoint.resume=none"]
    return {
        "empty-data": ([*files, f"data.path={tmp / 'empty.jsonl'}", f"train.output_dir={tmp / 'run'}"],
                       f"data.path={str(tmp / 'empty.jsonl')!r}: {tmp / 'empty.jsonl'} holds no record (empty, or "
                       "blank lines only): point data.path at files with data"),
        "no-text-field": ([*files, f"data.path={tmp / 'body.jsonl'}", f"train.output_dir={tmp / 'run'}"],
                          f"data.text_field='text' is not in any of the first 100 records of {tmp / 'body.jsonl'}: "
                          "choose one of body, id, or leave the file out of data.path"),
        "output-dir-is-a-file": ([f"train.output_dir={tmp / 'a_file'}"],
                                 f"train.output_dir={str(tmp / 'a_file')!r} is a file: choose a folder (the run "
                                 "writes config.yaml, checkpoints/ and final_model/ there)"),
    }


@pytest.mark.parametrize("case", ["empty-data", "no-text-field", "output-dir-is-a-file"])
def test_bad_paths_exit_2_in_validate_and_before_training(tmp_path: Path, case: str) -> None:
    overrides, message = _bad_paths(tmp_path)[case]
    assert _validate(*overrides) == (2, f"error: {message}\n")
    code, err = _train(tmp_path / "unused", *overrides)  # the last train.output_dir wins
    assert code == 2 and "Traceback" not in err, err
    assert _lines(err, "^error: ") == [f"error: {message}"]
    assert _lines(err, "ringtrain.model.causal_lm") == []  # refused before the model was built


def test_an_unwritable_output_dir_exits_2_before_training(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        out, where = Path("/sys/ringtrain-test/run"), "/sys/ringtrain-test"  # sysfs refuses root too
    else:
        (tmp_path / "locked").mkdir(mode=0o500)
        out, where = tmp_path / "locked" / "run", str(tmp_path / "locked" / "run")
    code, err = _train(out)
    assert code == 2 and "Traceback" not in err, err
    assert len(_lines(err, "^error: ")) == 1
    assert re.fullmatch(rf"error: train\.output_dir='{out}' is not writable \([^:]+: {where}\): choose a folder you "
                        "can write to", _lines(err, "^error: ")[0]), err
