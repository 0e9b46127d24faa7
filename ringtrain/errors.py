"""Exceptions that mean "the user asked for something wrong": the CLI prints them and exits 2, no traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """One or more configuration problems; `problems` holds one self-contained line each.

    `agreed`: every rank raises this same error (rank 0 decided and broadcast it), so rank 0 alone prints it;
    otherwise each rank prints its own (a rank-specific problem must not go unreported).
    """

    def __init__(self, problems: list[str], *, agreed: bool = False):
        self.problems = list(problems)
        self.agreed = agreed
        super().__init__("\n".join(self.problems))


class DiskFull(RuntimeError):
    """A write failed because its filesystem is full: `ringtrain train` logs the one line (`rank N failed: DiskFull:
    no space left on device ...`, with the free bytes and what to do) and exits 1 without a traceback. torch's own
    error for it can be a zip writer's `unexpected pos 704 vs 598`, deep in a long traceback."""


class RunStopped(RuntimeError):
    """The run cannot go on, for a reason every rank reached together at the same point (a diverged run, parameters
    that are not finite): the CLI prints its one line (rank 0) and exits 1, without a traceback."""
