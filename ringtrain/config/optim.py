"""The `optim:` section: the optimizer and its learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass, field

from ringtrain.config.rules import one_of

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class OptimConfig:
    """Optimizer and schedule."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW) on matrices; biases and norms are not decayed."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam beta1, beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many optimizer steps."""
    schedule: str = "cosine"
    """After warmup: cosine, linear (decay to min_lr_ratio x lr at the last step) or constant."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine and linear)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (across the whole mesh) to this; 0 disables clipping."""

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.lr <= 0:
            problems.append(("lr", f"lr={self.lr} must be > 0 (e.g. 3e-4)"))
        if self.weight_decay < 0:
            problems.append(("weight_decay", f"weight_decay={self.weight_decay} must be >= 0"))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(("betas", f"betas={self.betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]"))
        if self.eps <= 0:
            problems.append(("eps", f"eps={self.eps} must be > 0"))
        if self.warmup_steps < 0:
            problems.append(("warmup_steps", f"warmup_steps={self.warmup_steps} must be >= 0"))
        problems += one_of(self, "schedule", SCHEDULES)
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(("min_lr_ratio", f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]"))
        if self.grad_clip < 0:
            problems.append(("grad_clip", f"grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)"))
        return problems
