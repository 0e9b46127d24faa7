"""Rank-aware logging: every record carries its rank; rank 0 speaks at INFO, the others at WARNING."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    """Stamps each record with the process rank, read once per record so it follows re-initialisation."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = os.environ.get("RANK", "0")
        return True


def get_logger(name: str) -> logging.Logger:
    """The module logger; configure output once with `setup_logging`."""
    return logging.getLogger(name)


def setup_logging(rank: int | None = None, level: str | int | None = None, all_ranks: bool = False) -> None:
    """Configure the `ringtrain` logger tree for this process.

    Rank 0 logs at `level` (INFO by default); other ranks log warnings and errors only, unless
    `all_ranks` is set. Safe to call more than once: the handler is replaced, not duplicated.
    """
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if level is None:
        level = os.environ.get("RINGTRAIN_LOG_LEVEL", "INFO")
    root = logging.getLogger("ringtrain")
    for handler in list(root.handlers):
        if getattr(handler, "_ringtrain", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._ringtrain = True  # type: ignore[attr-defined]
    handler.addFilter(_RankFilter())
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if (rank == 0 or all_ranks) else logging.WARNING)
    root.propagate = False


def describe_exception(err: BaseException) -> str:
    """`Type: message` on one line, for a log line that must stay one line whatever was raised.

    torch's CheckpointException (a BaseException) carries each failing rank's exception and renders
    their tracebacks in str(); name the first one instead.
    """
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (inner, *_) = next(iter(failures.items()))
        more = f" (and {len(failures) - 1} more rank(s))" if len(failures) > 1 else ""
        return f"{type(err).__name__}: rank {rank}: {describe_exception(inner)}{more}"
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__
