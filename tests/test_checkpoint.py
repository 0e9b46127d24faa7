"""Checkpoints: bitwise resume with FSDP2, atomicity under a killed rank, pruning, resume rules, signals."""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ringtrain.train.checkpoint.manager as ckpt_manager
from ringtrain.config import CheckpointConfig
from ringtrain.parallel.signals import SignalFlag
from ringtrain.testing import RankFailedError, run_distributed
from ringtrain.train.checkpoint import CheckpointManager, is_complete
from ringtrain.train.checkpoint.files import digest

EXTRA = {"step": 3, "data": {"epoch": 0, "position": 96}, "wandb_run_id": "abc123"}


def _build(init_seed: int, shard: bool):
    """Tiny MLP with dropout (so training consumes the torch RNG), AdamW and a LambdaLR schedule."""
    torch.manual_seed(init_seed)  # same on every rank: fully_shard keeps each rank's slice of the same init
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 4))
    if shard:
        fsdp_mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        fully_shard(model[0], mesh=fsdp_mesh)
        fully_shard(model[3], mesh=fsdp_mesh)
        fully_shard(model, mesh=fsdp_mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
    return model, opt, sched


def _train(model, opt, sched, steps: int) -> list[float]:
    """Steps whose data, dropout masks and loss scale all come from this rank's RNG streams."""
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 8)
        y = torch.randn(16, 4)
        scale = 1.0 + random.random()
        loss = ((model(x) - y) ** 2).mean() * scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _full_params(model) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _rng_draws() -> tuple[list[float], float]:
    return torch.rand(4).tolist(), random.random()


def _save_then_resume(mesh, out_dir: Path):
    rank = mesh.rank
    mgr = CheckpointManager(CheckpointConfig(keep_last=2), out_dir, mesh)
    model, opt, sched = _build(0, shard=True)
    torch.manual_seed(100 + rank)
    random.seed(200 + rank)
    _train(model, opt, sched, 3)
    path = mgr.save(3, model, opt, sched, extra=EXTRA)
    params_at_save = _full_params(model)
    draws_after_save = _rng_draws()
    losses_ref = _train(model, opt, sched, 3)
    params_ref = _full_params(model)
    lr_ref = sched.get_last_lr()

    # A fresh process state: other init, other RNG streams, no optimizer state.
    model2, opt2, sched2 = _build(1, shard=True)
    torch.manual_seed(999)
    random.seed(999)
    extra = mgr.load(mgr.resume_path(), model2, opt2, sched2)
    draws_after_load = _rng_draws()
    losses = _train(model2, opt2, sched2, 3)
    return {
        "path": str(path), "latest": str(mgr.latest()), "extra": extra,
        "draws": (draws_after_save, draws_after_load), "losses": (losses_ref, losses),
        "params": (params_ref, _full_params(model2)), "lr": (lr_ref, sched2.get_last_lr()),
        "params_at_save": params_at_save,
    }


def test_resume_is_bitwise_identical_with_fsdp2(tmp_path):
    out = run_distributed(_save_then_resume, 2, tmp_path, timeout=90)
    for r in out:
        assert r["path"] == r["latest"] == str(tmp_path / "checkpoints" / "step_00000003")
        assert r["extra"] == EXTRA
        assert r["draws"][0] == r["draws"][1]  # this rank's RNG streams continue exactly where they were
        assert r["losses"][0] == r["losses"][1]  # bitwise
        assert r["lr"][0] == r["lr"][1]
        ref, got = r["params"]
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert out[0]["draws"][0] != out[1]["draws"][0]  # RNG states really are per rank
    assert out[0]["losses"][0] != out[1]["losses"][0]
    ckpt_dir = tmp_path / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in (ckpt_dir / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]


def _load_on_other_world_size(mesh, out_dir: Path):
    mgr = CheckpointManager(CheckpointConfig(), out_dir, mesh)
    model, opt, sched = _build(1, shard=False)  # one rank, no FSDP: DCP reshards the 2-rank shards
    extra = mgr.load(mgr.latest(), model, opt, sched)
    step = {k: v["step"].item() for k, v in opt.state_dict()["state"].items()}
    return {"extra": extra, "params": {k: v.clone() for k, v in model.state_dict().items()}, "opt_steps": step}


def test_model_and_optimizer_reshard_to_another_world_size(tmp_path):
    saved = run_distributed(_save_then_resume, 2, tmp_path, timeout=90)[0]
    (one,) = run_distributed(_load_on_other_world_size, 1, tmp_path, timeout=60)
    assert one["extra"] == EXTRA
    assert set(one["opt_steps"].values()) == {3.0}
    ref = saved["params_at_save"]
    assert one["params"].keys() == ref.keys()
    assert all(torch.equal(one["params"][k], ref[k]) for k in ref)


def _save_and_kill_rank_one(mesh, out_dir: Path):
    mgr = CheckpointManager(CheckpointConfig(keep_last=3), out_dir, mesh)
    model, opt, sched = _build(0, shard=True)
    torch.manual_seed(100 + mesh.rank)
    _train(model, opt, sched, 2)
    mgr.save(2, model, opt, sched, extra={"step": 2})
    _train(model, opt, sched, 2)
    if mesh.rank == 1:
        # Die like a SIGKILLed process after DCP wrote every shard and its metadata, before the commit.
        ckpt_manager._rng_state = lambda: os._exit(9)
    mgr.save(4, model, opt, sched, extra={"step": 4})


def _inspect_after_crash(mesh, out_dir: Path):
    root = out_dir / "checkpoints"
    results = {"dirs_before": sorted(p.name for p in root.iterdir())}
    mgr = CheckpointManager(CheckpointConfig(keep_last=3), out_dir, mesh)
    results["latest"] = mgr.latest().name
    results["auto"] = mgr.resume_path().name
    errors = {}
    for name in [d for d in results["dirs_before"] if ".tmp-" in d] + ["step_00000006", "nowhere"]:
        try:
            CheckpointManager(CheckpointConfig(resume=str(root / name)), out_dir, mesh).resume_path()
        except ValueError as err:
            errors[name.split(".")[0] if ".tmp-" in name else name] = str(err)
    results["errors"] = errors
    model, opt, sched = _build(1, shard=True)
    results["extra"] = mgr.load(results["auto"] and root / results["auto"], model, opt, sched)
    mgr.save(3, model, opt, sched, extra={"step": 3})  # the next successful save sweeps the debris
    results["dirs_after"] = sorted(p.name for p in root.iterdir())
    # A save at the step of a folder left without its marker replaces that folder instead of failing to rename.
    results["replaced"] = is_complete(mgr.save(6, model, opt, sched, extra={"step": 6}))
    return results


def test_interrupted_checkpoint_is_never_used(tmp_path):
    with pytest.raises(RankFailedError, match="rank 1 exited with code 9"):
        run_distributed(_save_and_kill_rank_one, 2, tmp_path, timeout=60)
    root = tmp_path / "checkpoints"
    (tmp,) = [p for p in root.iterdir() if ".tmp-" in p.name]
    assert tmp.name.startswith("step_00000004.tmp-")
    assert (tmp / ".metadata").exists() and not is_complete(tmp)  # DCP finished; the commit did not happen
    # A second kind of debris: a step folder that lost its completion marker.
    shutil.copytree(root / "step_00000002", root / "step_00000006")
    (root / "step_00000006" / "COMPLETE").unlink()

    out = run_distributed(_inspect_after_crash, 2, tmp_path, timeout=90)
    for r in out:
        assert r["latest"] == r["auto"] == "step_00000002"
        assert r["extra"] == {"step": 2}
        assert "never finished (interrupted while being written)" in r["errors"]["step_00000004"]
        assert "has no COMPLETE marker" in r["errors"]["step_00000006"]
        assert "does not exist" in r["errors"]["nowhere"]
        assert all("checkpoint.resume=" in e and "step_00000002" in e for e in r["errors"].values() if "nowhere" not in e)
        assert r["dirs_after"] == ["step_00000002", "step_00000003", "step_00000006"]
        assert r["replaced"]


def _keep_last_and_resume_modes(mesh, out_dir: Path):
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mgr = CheckpointManager(CheckpointConfig(keep_last=2, resume="none"), out_dir, mesh)
    before = mgr.resume_path()
    nothing_yet = CheckpointManager(CheckpointConfig(resume="auto"), out_dir, mesh).resume_path()
    for step in range(1, 5):
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
        mgr.save(step, model, opt, extra={"step": step})
    again = mgr.save(4, model, opt, extra={"step": 4})
    bad = CheckpointManager(CheckpointConfig(resume=str(out_dir / "checkpoints")), out_dir, mesh)
    try:
        bad.resume_path()
        error = None
    except ValueError as err:
        error = str(err)
    try:
        mgr.save(5, model, opt, extra={"step": 5, "data": {"position": 10 * mesh.rank}})
        mismatch = None
    except ValueError as err:
        mismatch = str(err)
    return {
        "mismatch": mismatch, "none": before, "auto_empty": nothing_yet, "again": again.name, "error": error,
        "dirs": sorted(p.name for p in (out_dir / "checkpoints").iterdir()),
        "should_save": [mgr.should_save(s) for s in range(4)],
    }


def test_keep_last_and_resume_modes(tmp_path):
    out = run_distributed(_keep_last_and_resume_modes, 2, tmp_path, timeout=60)
    for r in out:
        assert r["none"] is None and r["auto_empty"] is None
        assert r["dirs"] == ["step_00000003", "step_00000004"]
        assert r["again"] == "step_00000004"
        assert r["error"] == (
            f"checkpoint.resume={str(tmp_path / 'checkpoints')!r} is this run's own checkpoints folder, not a "
            "checkpoint: set checkpoint.resume=auto to continue from its newest complete checkpoint "
            f"({tmp_path / 'checkpoints' / 'step_00000004'}), or name one of its step_* folders"
        )
        assert r["mismatch"] == (
            "checkpoint extra differs between rank 0 and rank(s) [1]: trainer state passed to "
            "CheckpointManager.save must be identical on all ranks (derive per-rank positions from it on load)"
        )
        assert r["should_save"] == [False, False, False, False]  # every_steps=0: end of run and signals only


def _save_extra(mesh, out_dir: Path, differ: bool):
    """Save trainer state holding tensors: per rank (`differ`), or equal with a NaN; (outcome, extra loaded back)."""
    mgr = CheckpointManager(CheckpointConfig(), out_dir, mesh)
    model, opt, sched = _build(0, shard=False)
    extra = {"step": 1, "ema": torch.tensor([1.0, 2.0 + mesh.rank]) if differ else torch.tensor([1.0, 2.0])}
    if not differ:
        extra.update(loss=float("nan"), seen={"b", "a", "c"})
    try:
        path = mgr.save(1, model, opt, sched, extra=extra)
    except ValueError as err:
        return str(err), None
    return "saved", mgr.load(path, model, opt, sched)


def test_extras_that_equality_cannot_settle_are_compared_by_digest(tmp_path):
    """`==` raises on tensors (and the ranks' differing states were saved as rank 0's) and calls NaN unequal to
    itself (and equal states were refused): digests settle both."""
    differ = run_distributed(_save_extra, 2, tmp_path / "differ", True, timeout=120)
    message = "checkpoint extra differs between rank 0 and rank(s) [1]: trainer state passed to CheckpointManager.save"
    assert [r[0][:len(message)] for r in differ] == [message, message]
    assert not (tmp_path / "differ" / "checkpoints").exists() or not any((tmp_path / "differ" / "checkpoints").iterdir())
    same = run_distributed(_save_extra, 2, tmp_path / "same", False, timeout=120)
    for outcome, extra in same:
        assert outcome == "saved"
        assert extra["step"] == 1 and math.isnan(extra["loss"]) and extra["seen"] == {"a", "b", "c"}
        assert torch.equal(extra["ema"], torch.tensor([1.0, 2.0]))


def test_digest_is_canonical():
    base = {"step": 3, "data": {"epoch": 0, "position": 96}, "t": torch.arange(4.0), "s": {"x", "y"}}
    same = {"s": {"y", "x"}, "t": torch.arange(4.0), "data": {"position": 96, "epoch": 0}, "step": 3}
    assert digest(base) == digest(same)
    assert digest(float("nan")) == digest(float("nan"))
    assert len({digest(v) for v in (1, 1.0, True, "1", [1], (1,), torch.tensor(1), torch.tensor(1.0))}) == 8
    assert digest({**base, "t": torch.tensor([0.0, 1.0, 2.0, 4.0])}) != digest(base)
    assert digest(torch.zeros(2, 3)) != digest(torch.zeros(3, 2))
    assert digest(np.arange(3)) == digest(np.arange(3)) != digest(np.arange(3).astype(np.int32))
    # Sets of strings iterate in an order that depends on the process's hash seed: the digest must not.
    code = ("from ringtrain.train.checkpoint.files import digest; "
            "print(digest({'seen': {'alpha', 'beta', 'gamma', 'delta'}, 'f': frozenset('xyz')}))")
    outs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                           capture_output=True, text=True, check=True).stdout for seed in ("1", "2")}
    assert len(outs) == 1


def test_should_save_schedule():
    mgr = CheckpointManager(CheckpointConfig(every_steps=3), "unused", dims=None)
    assert [s for s in range(10) if mgr.should_save(s)] == [3, 6, 9]


def test_config_validation_names_value_and_fix():
    assert CheckpointConfig()._validate() == []
    problems = dict(CheckpointConfig(every_steps=-5, keep_last=0, resume=" ")._validate())
    assert problems == {
        "every_steps": "every_steps=-5 must be >= 1, or 0 to save only at the end / on signal",
        "keep_last": "keep_last=0 must be >= 1 (the newest checkpoint is always kept)",
        "resume": "resume=' ' must be 'auto', 'none' or the path of a step_* checkpoint folder",
    }
    with pytest.raises(ValueError, match=r"checkpoint\.every_steps=-5 .*; checkpoint\.keep_last=0 "):
        CheckpointManager(CheckpointConfig(every_steps=-5, keep_last=0), "unused", dims=None)


def _signal_on_one_rank(mesh, sig: int, sender: int):
    previous = signal.getsignal(sig)
    with SignalFlag() as flag:
        before = flag.should_save_and_exit(mesh)
        if mesh.rank == sender:
            os.kill(os.getpid(), sig)
        after = flag.should_save_and_exit(mesh)
        agreed = flag.agreed(mesh)
        local = flag.received
    with SignalFlag(enabled=False) as off:
        disabled = (off.agreed(mesh), signal.getsignal(sig) == previous)  # no handler, no collective
    return {
        "before": before, "after": after, "agreed": agreed, "local": local, "disabled": disabled,
        "restored": signal.getsignal(sig) == previous,
    }


@pytest.mark.parametrize("sig,sender", [(signal.SIGUSR1, 1), (signal.SIGTERM, 0)])
def test_signal_on_one_rank_stops_every_rank(sig, sender):
    out = run_distributed(_signal_on_one_rank, 2, sig, sender, timeout=60)
    assert [r["before"] for r in out] == [False, False]
    assert [r["after"] for r in out] == [True, True]
    assert [r["agreed"] for r in out] == [sig, sig]  # the signal number, so the trainer can log it
    assert [r["local"] for r in out] == [sig if r == sender else 0 for r in range(2)]
    assert [r["disabled"] for r in out] == [(0, True), (0, True)]
    assert all(r["restored"] for r in out)


def test_a_repeated_signal_is_one_request_and_another_stops_at_once(monkeypatch):
    """SLURM signals every process of a step while torchrun forwards the same signal: that signal again within
    REPEAT_WINDOW_S is the same request; a different one ends the process at once with 128 + its number."""
    exits = []

    class Exited(Exception):
        pass

    def exit_now(code: int) -> None:  # os._exit itself would end pytest
        exits.append(code)
        raise Exited

    monkeypatch.setattr(os, "_exit", exit_now)
    with SignalFlag() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert (flag.received, exits) == (signal.SIGTERM, [])
        with pytest.raises(Exited):
            os.kill(os.getpid(), signal.SIGINT)
    assert exits == [128 + signal.SIGINT]
