"""Rank 0 decides, every rank agrees: one decision, its value or its error, the same on every rank.

Ranks that decide on their own can disagree (a shared filesystem seen at two moments, a random name) and then wait
in different collectives until the timeout; and an error raised on rank 0 alone leaves the others waiting in the
broadcast that was to carry its decision. `agree` runs the decision once and hands every rank its outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from ringtrain.errors import ConfigError, RunStopped
from ringtrain.log import describe_exception

T = TypeVar("T")


def agree(decide: Callable[[], T], group: dist.ProcessGroup | None = None, *, what: str = "deciding") -> T:
    """`decide()` on rank 0 of `group` (default: the world), and its outcome on every rank of it (collective).

    Every rank returns rank 0's value (it must be picklable), or raises: a ConfigError from `decide` as
    `ConfigError(problems, agreed=True)` on every rank; a RunStopped as the same RunStopped on every rank (each
    says one line, no traceback); any other exception as itself on rank 0 and as
    `RuntimeError("rank 0 failed while <what>: <Type: message>")` on the others. Without an initialised process
    group, or in a group of one, `decide()` simply runs here (a ConfigError is then agreed as well).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        try:
            return decide()
        except ConfigError as err:
            raise ConfigError(err.problems, agreed=True) from None
    outcome: list[Any] = [None, None, None, None]  # value, config problems, another error's description, stop
    error = None
    if dist.get_rank(group) == 0:
        try:
            outcome[0] = decide()
        except ConfigError as err:
            outcome[1] = err.problems
        except RunStopped as err:
            outcome[3] = str(err)
        except Exception as err:  # noqa: BLE001 - re-raised below; the other ranks must not wait for rank 0
            error, outcome[2] = err, describe_exception(err)
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast_object_list(outcome, src=src, group=group)
    if outcome[1] is not None:
        raise ConfigError(outcome[1], agreed=True)
    if outcome[3] is not None:
        raise RunStopped(outcome[3])
    if error is not None:
        raise error
    if outcome[2] is not None:
        raise RuntimeError(f"rank 0 failed while {what}: {outcome[2]}")
    return outcome[0]
