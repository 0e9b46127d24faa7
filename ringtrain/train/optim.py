"""AdamW and the learning-rate schedule (linear warmup, then cosine, linear or constant)."""

from __future__ import annotations

import math

import torch

from ringtrain.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on >= 2-D parameters only (the usual LM practice)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def apply_optim_settings(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Set cfg's hyperparameters on `build_optimizer`'s two groups (decay, no decay), e.g. over those a resumed
    checkpoint restored with the optimizer state; `initial_lr` (the schedule's peak) is cfg.lr."""
    for group, weight_decay in zip(optimizer.param_groups, (cfg.weight_decay, 0.0), strict=True):
        group.update(weight_decay=weight_decay, betas=tuple(cfg.betas), eps=cfg.eps, initial_lr=cfg.lr)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int, start_step: int = 0):
    """A LambdaLR (its state_dict is what checkpoints store) following `lr_factor`.

    `start_step` > 0 continues a resumed run: the groups' lr becomes that of step `start_step` (0-based) of this
    schedule, as if cfg and max_steps had held from step 0; the groups must hold `initial_lr` (see
    `apply_optim_settings`). LambdaLR computes base_lr x factor either way, so an unchanged schedule continues
    bitwise.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps),
                                             last_epoch=start_step - 1)
