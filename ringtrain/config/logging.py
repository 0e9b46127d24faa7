"""The `logging:` section: where metrics go: metrics.jsonl, Weights & Biases, the progress bar."""

from __future__ import annotations

from dataclasses import dataclass, field

from ringtrain.config.rules import one_of

WANDB_MODES = ("disabled", "offline", "online")


@dataclass
class LoggingConfig:
    """Where metrics go."""

    wandb_mode: str = "disabled"
    """Weights & Biases: disabled, offline (files under output_dir/wandb, `wandb sync` later) or online."""
    wandb_project: str = "ringtrain"
    """W&B project name."""
    wandb_entity: str | None = None
    """W&B entity (team or user); unset uses your default."""
    wandb_continue_fork: bool = False
    """When checkpoint.resume names a checkpoint of another run folder (a fork), log into the W&B run stored in it
    instead of starting a new one; without it two runs never log into one W&B run."""
    run_name: str | None = None
    """Display name of the run; unset lets W&B choose."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    log_every: int = 1
    """Write metrics every N optimizer steps (metrics.jsonl always gets every step)."""
    progress_bar: bool = True
    """Show a progress bar on rank 0 (step, loss, tokens/s, ETA)."""
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s of one device, for the MFU metric; 0 = known GPUs (H100/H200, A100), none on CPU."""

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        problems += one_of(self, "wandb_mode", WANDB_MODES)
        if self.log_every < 1:
            problems.append(("log_every", f"log_every={self.log_every} must be >= 1"))
        if self.peak_tflops < 0:
            problems.append(("peak_tflops", f"peak_tflops={self.peak_tflops} must be >= 0 (0 = detect)"))
        return problems
