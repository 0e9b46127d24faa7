"""What a resumed run may change: the config saved in the checkpoint against the one given now.

What the config says is what runs. Every setting applies from the resumed step, with one log line per changed
key; the optimizer's hyperparameters and the learning-rate schedule are rebuilt from optim.* and train.max_steps
as given now. Refused before any rank trains (ConfigError, exit 2): a changed global batch (the saved data
position would then mean other sequences), a model whose tensors differ from the checkpoint's, and
train.max_steps below the checkpoint's step. docs/checkpoints.md has the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ringtrain.log import get_logger
from ringtrain.train.checkpoint.files import model_mismatches

if TYPE_CHECKING:
    from ringtrain.config import TrainConfig

logger = get_logger(__name__)

# Keys that name where a run is, or how it was started, not what it trains: never reported as changes.
UNREPORTED = ("checkpoint.resume", "checkpoint.overwrite", "train.output_dir")
_UNSET = "(unset)"
# What a checkpoint holds of the model: the parameters that train (all of them in full fine-tuning; with LoRA the
# adapters and `peft.trainable_modules`) and buffers; frozen weights are the base model's, loaded from model.path.
TRAINED_STATE = StateDictOptions(ignore_frozen_params=True)


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}; mappings inside a section (model.config) are flattened too."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, value now) for every setting that differs, in config order."""
    before, after = flat_config(saved), flat_config(now)
    keys = [*after, *(k for k in before if k not in after)]
    return [(k, before.get(k, _UNSET), after.get(k, _UNSET)) for k in keys
            if k not in UNREPORTED and before.get(k, _UNSET) != after.get(k, _UNSET)]


def model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The model's tensors as checkpoints store them (canonical names) with their global shapes (FSDP included)."""
    return {name: tuple(t.shape) for name, t in get_model_state_dict(model, options=TRAINED_STATE).items()}


def resume_problems(path: Path, meta: dict[str, Any], cfg: TrainConfig, dp_size: int,
                    shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Why this config cannot continue checkpoint `path` (meta: its meta.json; shapes: the model's tensors)."""
    from ringtrain.config import config_to_dict

    if cfg.peft.enabled and meta.get("base_model"):
        from ringtrain.model.adapters import base_identity, identity_problem

        # An adapter checkpoint holds no frozen weight: on another base it would be another model. One line.
        problem = identity_problem(meta["base_model"], base_identity(cfg.model, cfg.train.seed), f"checkpoint {path}",
                                   "resume with the model.path it was trained on, or start a new run in another "
                                   "train.output_dir")
        if problem:
            return [problem]
    problems = []
    step, saved = meta["step"], meta.get("config")
    if cfg.train.max_steps < step:
        problems.append(f"train.max_steps={cfg.train.max_steps} is below step {step} of checkpoint {path}: raise "
                        "train.max_steps, or resume from an earlier checkpoint with checkpoint.resume=<step_* folder>")
    if saved is not None:
        t = cfg.train
        old_micro, old_accum, old_dp = saved["train"]["micro_batch_size"], saved["train"]["grad_accum_steps"], \
            meta["dp_size"]
        old, new = old_micro * old_accum * old_dp, t.micro_batch_size * t.grad_accum_steps * dp_size
        if old != new:
            per_micro = t.grad_accum_steps * dp_size
            fix = f"e.g. train.micro_batch_size={old // per_micro}" if old % per_micro == 0 else \
                "through train.micro_batch_size and train.grad_accum_steps"
            problems.append(
                f"the global batch would change from {old} sequences per step in checkpoint {path} "
                f"(train.micro_batch_size={old_micro} x train.grad_accum_steps={old_accum} x {old_dp} data-parallel "
                f"rank(s)) to {new} ({t.micro_batch_size} x {t.grad_accum_steps} x {dp_size}): keep {old} ({fix}), "
                "or start a new run in another train.output_dir")
    mismatched = model_mismatches(path, shapes)
    if mismatched:
        more = f" ({len(mismatched)} tensors differ)" if len(mismatched) > 1 else ""
        changed = [] if saved is None else [f"{k} {a} -> {b}" for k, a, b in changed_settings(saved, config_to_dict(cfg))
                                            if k.startswith("model.")]
        why = f"; changed: {', '.join(changed)}" if changed else ""
        problems.append(f"the model does not match checkpoint {path}: {mismatched[0]}{more}{why}: resume with the "
                        "model settings it was saved with, or start a new run in another train.output_dir")
    return problems


def apply_resumed_settings(meta: dict[str, Any], cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                           step: int) -> Any:
    """Make the run follow `cfg` from `step` on, over what the checkpoint restored; returns the new LR scheduler.

    Logs one line per changed key, and one with the learning rate of the next step when it differs from what the
    checkpoint's schedule would have used: the schedule is cfg's, as if it had held from step 0 (so raising
    train.max_steps stretches a cosine and moves the LR to where the longer run would be).
    """
    from ringtrain.config import config_to_dict
    from ringtrain.train.optim import apply_optim_settings, build_scheduler

    saved = meta.get("config")
    if saved is None:
        logger.info("the checkpoint of step %d holds no config (an older ringtrain): changed settings cannot be "
                    "listed; this config's apply", step)
    else:
        for key, old, new in changed_settings(saved, config_to_dict(cfg)):
            logger.info("resume at step %d: %s changed from %s to %s, applied from step %d on",
                        step, key, old, new, step + 1)
    restored_lr = optimizer.param_groups[0]["lr"]  # what the checkpoint's schedule gives step + 1
    apply_optim_settings(optimizer, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps, start_step=step)
    lr = optimizer.param_groups[0]["lr"]
    if lr != restored_lr:
        logger.info("resume at step %d: learning rate %.6g at step %d under optim.* and train.max_steps as given "
                    "now (the checkpoint's schedule: %.6g)", step, lr, step + 1, restored_lr)
    return scheduler
