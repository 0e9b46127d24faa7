"""The `checkpoint:` section: when to save, how many checkpoints to keep, and where to resume from."""

from __future__ import annotations

from dataclasses import dataclass

RESUME_MODES = ("auto", "none")


@dataclass
class CheckpointConfig:
    """When to save, how many checkpoints to keep, and where to resume from."""

    every_steps: int = 0
    """Save every N optimizer steps; 0 saves only at the end of training and on a stop signal."""
    keep_last: int = 3
    """How many complete checkpoints to keep; older ones are deleted after each successful save."""
    resume: str = "auto"
    """'auto' = newest usable checkpoint under <output_dir>/checkpoints if any, 'none', or a step_* folder."""
    save_on_signal: bool = True
    """On SIGINT (Ctrl-C), SIGTERM or SIGUSR1, save at the next step boundary and exit 75 (SLURM preemption,
    torchrun shutdown); a second signal stops at once, without saving."""
    export_final: bool = True
    """Export the final weights as a Hugging Face safetensors folder (done by the trainer); with peft.method=lora,
    a peft adapter folder (`PeftModel.from_pretrained(base, folder)` loads it)."""
    export_merged: bool = False
    """With peft.method=lora and export_final: also export the adapters merged into the base weights, as a plain
    transformers folder (<output_dir>/final_model_merged) that needs neither peft nor the base model."""
    checksums: bool = True
    """Write a sha256 of every checkpoint file (SHA256SUMS) when a save completes, and verify them before resuming: a
    damaged checkpoint is skipped for the previous one. Each rank hashes the files it wrote, and a share of them on
    resume, so this costs one more read of the checkpoint at each."""
    data_change_intended: bool = False
    """Resume although the data or the tokenizer differ from the checkpoint's (its fingerprints: files, the first
    sequences' tokens, the vocabulary): one line says what changed, and the data order restarts from its beginning.
    Without it such a resume is refused."""
    overwrite: bool = False
    """With resume='none' (or a checkpoint of another folder): delete the checkpoints an earlier run left in
    <output_dir>/checkpoints once the run starts. Without it such a start is refused: a run folder holds one run.
    Ignored when resume='auto' (a SLURM requeue adds it: the new run then continues)."""

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.every_steps < 0:
            problems.append(
                ("every_steps", f"every_steps={self.every_steps} must be >= 1, or 0 to save only at the end / on signal")
            )
        if self.keep_last < 1:
            problems.append(("keep_last", f"keep_last={self.keep_last} must be >= 1 (the newest checkpoint is always kept)"))
        if not isinstance(self.resume, str) or not self.resume.strip():
            problems.append(
                ("resume", f"resume={self.resume!r} must be 'auto', 'none' or the path of a step_* checkpoint folder")
            )
        return problems
