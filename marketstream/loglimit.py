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

For loggers whose calls are not ours (Tornado logs a line per malformed
request, per body that times out...), :class:`LimitFilter` does the same as
a :class:`logging.Filter`, a cause per logger and message format::

    LimitFilter.install("tornado.general", "tornado.application")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["LogLimiter", "LimitFilter"]


class LogLimiter:
    """At most one log line per cause per ``interval`` seconds."""

    __slots__ = ("logger", "interval", "clock", "_causes")

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
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

    def log(
        self,
        level: int,
        cause: str,
        msg: str,
        *args: object,
        exc_info: bool | BaseException = False,
    ) -> bool:
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


class LimitFilter(logging.Filter):
    """Lets a record through only if its logger has not passed one with the
    same message format within ``interval`` seconds; the next one it lets
    through says how many it held back.

    >>> clock = iter([0.0, 0.5, 2.0]).__next__
    >>> limit = LimitFilter(clock=clock)
    >>> def record(ip):
    ...     return logging.LogRecord("tornado.general", logging.INFO, __file__, 1,
    ...                              "Malformed HTTP message from %s", (ip,), None)
    >>> [limit.filter(record(ip)) for ip in ("10.0.0.1", "10.0.0.2")]
    [True, False]
    >>> held = record("10.0.0.3")
    >>> limit.filter(held), held.getMessage()
    (True, 'Malformed HTTP message from 10.0.0.3 (1 more since the last line)')
    """

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.limiter = LogLimiter(logging.getLogger(__name__), interval, clock)

    def filter(self, record: logging.LogRecord) -> bool:
        # The format string (not the message): a fixed set per logger.
        held = self.limiter.allow("%s %s" % (record.name, str(record.msg)[:100]))
        if held is None:
            return False
        if held:
            record.msg = "%s (%d more since the last line)" % (record.getMessage(), held)
            record.args = ()
        return True

    @classmethod
    def install(cls, *names: str) -> None:
        """Add one shared filter to each of the loggers ``names`` (once)."""
        shared = cls()
        for name in names:
            logger = logging.getLogger(name)
            if not any(isinstance(f, cls) for f in logger.filters):
                logger.addFilter(shared)
