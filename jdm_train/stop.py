"""Ctrl-C and SIGTERM (a scheduler's pre-emption) during training: the first one asks the loop to
finish its step and checkpoint; a second one means now."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("jdm_train")


class StopSignals:
    """Within the block SIGINT/SIGTERM set `requested` instead of killing the process; the previous
    handlers are restored on leaving. Off the main thread signals cannot be caught: no graceful
    stop then, the run still works."""

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("signal %d: finishing the current step, then checkpointing", signum)
