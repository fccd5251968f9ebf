"""Keepalive: one timer per process pings every client and closes the silent.

A connection answers to two calls and keeps one number::

    conn.ping_sent        # loop time of its oldest unanswered ping, 0.0 if none
    conn.send_ping()      # send a ping frame
    conn.close_for(code, reason, reset=True)

The keepalive stamps ``ping_sent``; the connection's pong handler sets it
back to 0.0.  Then::

    keepalive = Keepalive(lambda: manager.connections, interval=20, timeout=20,
                          on_timeout=count_it)
    keepalive.start()
    ...
    keepalive.stop()

Every ``interval`` seconds the sweep pings each client that has no ping
outstanding, and ``timeout`` seconds after each sweep a check closes (1001
"ping timeout") every client whose oldest unanswered ping is at least
``timeout`` old.  The age is what decides, never the round a ping belongs to,
so a client that answers is never closed whatever the two durations are
(equal, a timeout longer than the interval, a very short interval), and a
client that stops answering is closed at most ``interval + timeout`` after
its last answer, plus one sweep.

This is cheaper than Tornado's per-connection ping task: one timer per
process and one float per connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

import tornado.ioloop

from marketstream.loglimit import LogLimiter
from marketstream.wire.frames import CLOSE_GOING_AWAY

__all__ = ["Keepalive", "Pingable"]

log = logging.getLogger(__name__)


class Pingable(Protocol):
    """What the keepalive needs of a connection."""

    ping_sent: float
    identity: str | None

    def send_ping(self) -> None: ...

    def close_for(self, code: int, reason: str, reset: bool = False) -> None: ...

    def __hash__(self) -> int: ...  # connections key the registries


class Keepalive:
    """Pings the connections that ``connections()`` returns and closes the
    ones that do not answer in time; ``on_timeout(conn)`` runs before each
    such close (counting, unregistering)."""

    def __init__(
        self,
        connections: Callable[[], Iterable[Pingable]],
        interval: float,
        timeout: float,
        on_timeout: Callable[[Pingable], None] | None = None,
    ) -> None:
        self.connections = connections
        self.interval = interval
        self.timeout = timeout
        self.on_timeout = on_timeout
        self._timer: tornado.ioloop.PeriodicCallback | None = None
        self._checks: set[object] = set()
        self._loop: tornado.ioloop.IOLoop | None = None
        self._log = LogLimiter(log)  # a line per second at most, however many go silent

    def start(self) -> None:
        """Start sweeping (nothing happens with ``interval`` 0)."""
        if self.interval > 0:
            self._loop = tornado.ioloop.IOLoop.current()
            self._timer = tornado.ioloop.PeriodicCallback(self.sweep, self.interval * 1000)
            self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        if self._loop is not None:
            for handle in self._checks:
                self._loop.remove_timeout(handle)
        self._checks.clear()

    def sweep(self) -> None:
        """Ping every connection without an outstanding ping; check the
        answers ``timeout`` seconds from now."""
        loop = self._loop or tornado.ioloop.IOLoop.current()
        now = loop.time()
        for conn in list(self.connections()):
            if not conn.ping_sent:
                conn.ping_sent = now
                conn.send_ping()
        handle: object = None

        def check() -> None:
            self._checks.discard(handle)
            self.expire()

        handle = loop.call_later(self.timeout, check)
        self._checks.add(handle)

    def expire(self) -> None:
        """Close every connection whose oldest unanswered ping is at least
        ``timeout`` seconds old."""
        loop = self._loop or tornado.ioloop.IOLoop.current()
        # Pings were stamped with loop.time(); the check was scheduled with
        # the same clock, so a ping that is due here is exactly timeout old.
        limit = loop.time() - self.timeout + 1e-3
        for conn in list(self.connections()):
            sent = conn.ping_sent
            if sent and sent <= limit:
                self._log.log(
                    logging.INFO,
                    "ping_timeout",
                    "closing %s: no pong within %.1fs",
                    conn.identity,
                    self.timeout,
                )
                if self.on_timeout is not None:
                    self.on_timeout(conn)
                # A silent peer will not read what is queued: reset, so
                # the kernel frees it (see StreamHandler.close_for).
                conn.close_for(CLOSE_GOING_AWAY, "ping timeout", reset=True)
