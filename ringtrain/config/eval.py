"""Long-context evaluation settings (passkey / needle grid, perplexity by context length)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ringtrain.config.data import PASSKEY_TASKS
from ringtrain.config.rules import at_least, one_of

# The passkey sentence in a haystack of seeded random sentences instead of the repeated filler (eval/tasks.py).
NEEDLE_TASK = "needle"
# Retrieval tasks scored by exact match over a depth x length grid (documents: eval/tasks.py), then perplexity:
# every synthetic data task, with needle second. A task's index seeds its documents, so new tasks go at the end.
RETRIEVAL_EVAL_TASKS = (PASSKEY_TASKS[0], NEEDLE_TASK, *PASSKEY_TASKS[1:])
EVAL_TASKS = (*RETRIEVAL_EVAL_TASKS, "perplexity")
EVAL_MODES = ("teacher_forced", "greedy")
PPL_SOURCES = ("files", "hub")


@dataclass
class EvalConfig:
    """What `ringtrain eval` and in-training evaluation measure (docs/context_extension.md)."""

    every_steps: int = 0
    """Evaluate every N training steps; 0 evaluates only when `ringtrain eval` is run."""
    tasks: list[str] = field(default_factory=lambda: ["passkey"])
    """Any of passkey (the key hidden in the repeated 'The grass is green...' filler), needle (the same needle in
    seeded random sentences, harder to skim), the RULER-style multikey (several keys, one asked), multivalue (every
    value of one key) and variable_tracking (the variables of a chain of assignments), and perplexity (sliding
    windows over ppl_path)."""
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])
    """Context lengths (tokens) of the passkey / needle grid."""
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Needle depths as fractions of the context, 0 = start, 1 = end."""
    samples_per_cell: int = 8
    """Documents per (length, depth) cell."""
    digits: int = 0
    """Digits of the pass key; 0 uses data.passkey_digits (what the model was trained on)."""
    mode: str = "teacher_forced"
    """teacher_forced (one forward: argmax at every answer position equals the answer) or greedy (decode the answer
    token by token). Their exact-match scores agree by construction; greedy also records the decoded text."""
    batch_size: int = 4
    """Documents (or perplexity windows) per forward pass, per data-parallel rank."""
    seed: int = 1234
    """Seed of the evaluation documents, independent of data.seed (training never drew these)."""
    checkpoint: str | None = None
    """`ringtrain eval`: a step_* checkpoint folder to load, or 'latest' (the newest under
    train.output_dir/checkpoints). Unset: the weights of model.path (e.g. a run's final_model folder)."""
    output_dir: str | None = None
    """Where results.json and the heatmaps go; unset: <train.output_dir>/eval."""
    heatmap: bool = True
    """Write a depth x length heatmap PNG per task (needs matplotlib: pip install 'ringtrain[dev]')."""
    ppl_source: str = "files"
    """Perplexity text: 'files' (ppl_path is a file, glob or directory, read like data.path) or 'hub' (a name)."""
    ppl_path: str = ""
    """Perplexity text: local files or a hub dataset name; required when tasks includes perplexity."""
    ppl_subset: str | None = None
    """hub: the dataset's configuration name (e.g. 'wikitext-103-raw-v1')."""
    ppl_split: str = "train"
    """Split to read ('validation', 'test[:100]'; local files are read as this split)."""
    ppl_text_field: str = "text"
    """Column holding the text."""
    ppl_lengths: list[int] = field(default_factory=list)
    """Context lengths (window sizes) for perplexity; empty: the grid's `lengths`."""
    ppl_stride: int = 0
    """Tokens a window advances; only tokens no earlier window scored are scored. 0: half the window."""
    ppl_max_tokens: int = 65536
    """Score the first N tokens of the text stream (documents joined with EOS), the same tokens at every length."""

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.every_steps < 0:
            problems.append(("every_steps", f"every_steps={self.every_steps} must be >= 0 (0 = off)"))
        unknown = [t for t in self.tasks if t not in EVAL_TASKS]
        if not self.tasks or unknown:
            problems.append(("tasks", f"tasks={self.tasks} must be a non-empty list of {', '.join(EVAL_TASKS)}"))
        if not self.lengths or any(n < 1 for n in self.lengths):
            problems.append(("lengths", f"lengths={self.lengths} must be a non-empty list of positive token counts"))
        if not self.depths:
            problems.append(("depths", "depths=[] must list needle depths in [0, 1], e.g. [0.0, 0.5, 1.0]"))
        elif any(not 0.0 <= d <= 1.0 for d in self.depths):
            problems.append(("depths", f"depths={self.depths} must lie in [0, 1]"))
        if self.samples_per_cell < 1:
            problems.append(("samples_per_cell", f"samples_per_cell={self.samples_per_cell} must be >= 1"))
        if not 0 <= self.digits <= 18:
            problems.append(("digits", f"digits={self.digits} must be in 1..18, or 0 for data.passkey_digits"))
        problems += one_of(self, "mode", EVAL_MODES)
        if self.batch_size < 1:
            problems.append(("batch_size", f"batch_size={self.batch_size} must be >= 1"))
        if self.checkpoint is not None and not self.checkpoint.strip():
            problems.append(("checkpoint", "checkpoint='' must be a step_* folder, 'latest', or unset (null)"))
        problems += one_of(self, "ppl_source", PPL_SOURCES)
        if "perplexity" in self.tasks and not self.ppl_path:
            problems.append(("ppl_path", "ppl_path is empty but tasks includes perplexity: set eval.ppl_path to a "
                                         "text file, glob or directory (or a hub name with eval.ppl_source=hub)"))
        if any(n < 2 for n in self.ppl_lengths):
            problems.append(("ppl_lengths", f"ppl_lengths={self.ppl_lengths} must be window sizes >= 2 tokens "
                                            "(or empty for eval.lengths)"))
        problems += at_least(self, "ppl_stride", 0, ">= 1 token, or 0 for half the window")
        problems += at_least(self, "ppl_max_tokens", 2, ">= 2")
        return problems
