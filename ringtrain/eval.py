"""Long-context evaluation settings (passkey / needle grid, perplexity by context length)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    """What `ringtrain eval` and in-training evaluation measure."""

    every_steps: int = 0
    """Evaluate every N training steps; 0 evaluates only when `ringtrain eval` is run."""
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])
    """Context lengths (tokens) of the passkey / needle grid."""
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Needle depths as fractions of the context, 0 = start, 1 = end."""
    samples_per_cell: int = 8
    """Documents per (length, depth) cell."""

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.every_steps < 0:
            problems.append(("every_steps", f"every_steps={self.every_steps} must be >= 0 (0 = off)"))
        if not self.lengths or any(n < 1 for n in self.lengths):
            problems.append(("lengths", f"lengths={self.lengths} must be a non-empty list of positive token counts"))
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            problems.append(("depths", f"depths={self.depths} must lie in [0, 1]"))
        if self.samples_per_cell < 1:
            problems.append(("samples_per_cell", f"samples_per_cell={self.samples_per_cell} must be >= 1"))
        return problems
