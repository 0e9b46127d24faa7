"""Stop requests by signal: SIGINT / SIGTERM / SIGUSR1 become a flag every rank agrees on at step boundaries.

How a stop request travels from the launcher to the ranks, and why one request may arrive twice, is in
docs/checkpoints.md and docs/launching.md.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ringtrain.log import get_logger

if TYPE_CHECKING:
    from ringtrain.parallel.dims import ParallelDims

logger = get_logger(__name__)


class SignalFlag:
    """Turns SIGINT / SIGTERM / SIGUSR1 into a flag that the training loop polls at step boundaries.

    The first signal is only recorded (no collectives: it can interrupt anything) and announced; `agreed`
    makes all ranks decide together, because launchers often signal one node or one process first, and ranks
    that disagree on the step to stop at hang in the next collective. A second signal ends the process at
    once, without saving (exit 128 + its number), except the same signal again within `REPEAT_WINDOW_S`:
    SLURM signals every process of a step while torchrun forwards the same signal to its ranks, so one
    request can arrive twice. (torchrun turns a second Ctrl-C into SIGTERM for its ranks.)
    Use as a context manager (handlers are restored on exit), or call `install` and `restore`.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    REPEAT_WINDOW_S = 2.0

    def __init__(self, enabled: bool = True, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.enabled = enabled
        self.signals = signals
        self.received = 0
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> SignalFlag:
        """Install the handlers (main thread only), remembering the previous ones; a no-op when disabled."""
        if self.enabled:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were installed before `install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if not self.received:
            self.received, self._received_at = signum, now
            _log_in_handler(logger.info, "received %s: finishing this step, then saving a checkpoint and exiting "
                                         "(75); a second signal stops at once, without saving", name)
            return
        if signum == self.received and now - self._received_at < self.REPEAT_WINDOW_S:
            return  # the same request delivered twice (see the class docstring)
        _log_in_handler(logger.warning, "%s after %s: stopping at once, without saving (exit %d)",
                        name, signal.Signals(self.received).name, 128 + signum)
        os._exit(128 + signum)

    def agreed(self, dims: ParallelDims) -> int:
        """The signal number if any rank received one, else 0; the same on every rank.

        Collective (one tiny all_reduce): call it on all ranks at every step boundary. Without
        `enabled` it returns 0 without communicating, which is consistent since every rank shares
        the config.
        """
        if not self.enabled:
            return 0
        flag = torch.tensor([self.received], dtype=torch.int64, device=dims.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def should_save_and_exit(self, dims: ParallelDims) -> bool:
        """Whether any rank received SIGINT, SIGTERM or SIGUSR1 (collective, like `agreed`)."""
        return self.agreed(dims) != 0

    def __enter__(self) -> SignalFlag:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _log_in_handler(log: Callable[..., None], message: str, *args: Any) -> None:
    """Log from a signal handler. It runs between two bytecodes of the main thread, which may be inside a write
    to the same stream: that write's "reentrant call" error must not escape into the interrupted code."""
    try:
        log(message, *args)
    except Exception:  # noqa: BLE001 - losing one log line is better than breaking the interrupted code
        pass
