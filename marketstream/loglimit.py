"""Logging that a client (or a broken publisher) cannot flood.

A :class:`LogLimiter` writes at most one line per cause per interval (one
second by default) and says, on the next line it writes for that cause, how
many it held back in between::

    >>> import logging
    >>> clock = iter([0.0, 0.1, 0.2, 1.5]).__next__
    >>> limiter = LogLimiter(logging.getLogger("demo"), clock=clock)
    >>> limiter.allow("bad_close_reason")       # the first one is written
    0
    >>> limiter.allow("bad_close_reason") is None   # within the second: held back
    True
    >>> limiter.allow("bad_close_reason") is None
    True
    >>> limiter.allow("bad_close_reason")       # a second later: two were held back
    2

:meth:`LogLimiter.log` does both: it writes the line (with ``(N more
since the last line)`` appended when some were held back) or counts it.
Causes are names the code chooses (a fixed, small set), never text a
client sent, so the limiter's memory is bounded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["LogLimiter"]


class LogLimiter:
    """At most one log line per cause per ``interval`` seconds."""

    __slots__ = ("logger", "interval", "clock", "_causes")

    def __init__(self, logger: logging.Logger, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        # cause -> [time of the last line written, lines held back since]
        self._causes: dict[str, list[float]] = {}

    def allow(self, cause: str) -> int | None:
        """None if a line for ``cause`` was written less than ``interval``
        ago (this one is counted instead); else the number held back since
        that line (the caller writes this one)."""
        now = self.clock()
        state = self._causes.get(cause)
        if state is None:
            self._causes[cause] = [now, 0]
            return 0
        if now - state[0] < self.interval:
            state[1] += 1
            return None
        held = int(state[1])
        state[0], state[1] = now, 0
        return held

    def log(self, level: int, cause: str, msg: str, *args: object,
            exc_info: bool = False) -> bool:
        """Log ``msg % args`` at ``level`` unless ``cause`` was logged within
        the interval; True if the line was written."""
        if not self.logger.isEnabledFor(level):
            return False
        held = self.allow(cause)
        if held is None:
            return False
        if held:
            msg += " (%d more since the last line)"
            args += (held,)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True
