"""A run forked into a new folder from another run's checkpoint starts its own W&B run (unless
logging.wandb_continue_fork says to continue the old one); checkpoint.resume naming this run's own folder gets a
message that says so. `ringtrain train` runs in this process as a world of one (tests/test_training_state.py's
harness)."""

from __future__ import annotations

from pathlib import Path

from test_training_state import _lines, _train

BASE = ["train.max_steps=2", "checkpoint.every_steps=1", "logging.wandb_mode=offline"]


def _wandb_ids(out: Path) -> list[str]:
    return sorted(p.name.rsplit("-", 1)[1] for p in (out / "wandb").glob("offline-run-*"))


def test_a_fork_gets_a_new_wandb_run_unless_told_to_continue(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    code, err = _train(a, *BASE)
    assert code == 0, err
    (original,) = _wandb_ids(a)
    step1 = a / "checkpoints" / "step_00000001"

    code, err = _train(b, *BASE, f"checkpoint.resume={step1}")
    assert code == 0, err
    (forked,) = _wandb_ids(b)
    assert forked != original
    assert _lines(err, "a checkpoint of another run folder")[0].endswith(
        f"resumed from {step1}, a checkpoint of another run folder: this run starts a new W&B run "
        f"(logging.wandb_continue_fork=true would log into its run {original})"), err

    code, err = _train(c, *BASE, f"checkpoint.resume={step1}", "logging.wandb_continue_fork=true")
    assert code == 0, err
    assert _wandb_ids(c) == [original]


def test_resume_naming_this_runs_own_folder_says_so(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, err = _train(out, "train.max_steps=2", "checkpoint.every_steps=1", "checkpoint.export_final=false")
    assert code == 0, err
    for named, which in ((out / "checkpoints", "checkpoints folder"), (out, "folder")):
        code, err = _train(out, "train.max_steps=3", f"checkpoint.resume={named}")
        assert code == 2, err
        assert _lines(err, "^error: ") == [
            f"error: checkpoint.resume={str(named)!r} is this run's own {which}, not a checkpoint: set "
            "checkpoint.resume=auto to continue from its newest complete checkpoint "
            f"({out / 'checkpoints' / 'step_00000002'}), or name one of its step_* folders"], err
