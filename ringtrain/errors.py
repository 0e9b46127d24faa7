"""Exceptions that mean "the user asked for something wrong": the CLI prints them and exits 2, no traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """One or more configuration problems; `problems` holds one self-contained line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
