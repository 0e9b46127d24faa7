"""Training feedback: metrics.jsonl, Weights & Biases, and a progress bar, all written by rank 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ringtrain.config import LoggingConfig
from ringtrain.log import get_logger
from ringtrain.model.flops import device_peak_tflops

logger = get_logger(__name__)


def peak_tflops(cfg: LoggingConfig, device_name: str | None) -> float | None:
    """The MFU denominator: the configured peak, else a known GPU's, else None (no MFU reported)."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops
    return device_peak_tflops(device_name)


class MetricsLogger:
    """Rank 0 writes; other ranks construct it with enabled=False and every call is a no-op.

    On resume, lines of metrics.jsonl past the resumed step (written after the last checkpoint by
    the interrupted run) are dropped, so the file reads as one uninterrupted run; `truncate=False` keeps every line
    (a folder of evaluations, whose earlier lines are history, not a run to continue).
    """

    def __init__(
        self,
        cfg: LoggingConfig,
        output_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        truncate: bool = True,
        run_config: dict[str, Any] | None = None,
        wandb_run_id: str | None = None,
    ):
        self.cfg = cfg
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.wandb_run_id = wandb_run_id
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate:
            self._truncate_after(start_step)
        if cfg.wandb_mode != "disabled":
            self._start_wandb(output_dir, run_config or {})
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self._t0 = time.monotonic()

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def _start_wandb(self, output_dir: str | Path, run_config: dict[str, Any]) -> None:
        import wandb

        # resume="allow" with the id stored in the checkpoint makes a requeued or resumed job continue
        # the same W&B run; a fresh run lets W&B pick the id, which the next checkpoint then stores.
        self._wandb = wandb.init(
            project=self.cfg.wandb_project,
            entity=self.cfg.wandb_entity,
            name=self.cfg.run_name,
            tags=self.cfg.tags or None,
            mode=self.cfg.wandb_mode,
            dir=str(output_dir),
            id=self.wandb_run_id,
            resume="allow",
            config=run_config,
        )
        self.wandb_run_id = self._wandb.id
        logger.info("W&B run %s (%s)", self.wandb_run_id, self.cfg.wandb_mode)

    @property
    def wandb_run(self) -> Any:
        """The W&B run this logger writes to, or None (W&B disabled, or not rank 0)."""
        return self._wandb

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record optimizer step `step` (1-based: the number of steps completed)."""
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None and step % self.cfg.log_every == 0:
            self._wandb.log(metrics, step=step)
        if self._bar is not None:
            postfix = {"loss": f"{metrics.get('loss', float('nan')):.4f}"}
            if "tokens_per_s" in metrics:
                postfix["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
            self._bar.set_postfix(postfix, refresh=False)  # shown by the update below
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def active_wandb_run() -> Any:
    """The W&B run this process has started (`wandb.run`), or None; never imports wandb to find out.

    For code that cannot reach the MetricsLogger that started it (the in-training evaluation hook).
    """
    import sys

    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None
