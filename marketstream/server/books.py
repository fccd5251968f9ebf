"""The server books' and derived streams' shell: :class:`BookStreams`.

The core keeps the books and builds the derived streams' frames without
any I/O (:mod:`marketstream.fanout.bookkeeper`,
:mod:`marketstream.fanout.speeds`); this runs one timer per update
interval that has derived streams (100 ms for top-N books, and each speed
subscribed), starts the books' snapshot reads when one is due, and moves a
slow reader's book streams to snapshots::

    books = BookStreams(core, reads, queued)   # queued(): frames wait for a flush
    books.changed()                            # after each (un)subscribe: timers, reads
    books.park(conn)                           # a slow reader: its book streams stop
    books.unpark(conn)                         # caught up: gap notice, snapshot, live
    books.stop()
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from marketstream.fanout.core import Connection, Core
from marketstream.server.reads import HistoryReads

__all__ = ["BookStreams"]


class BookStreams:
    """The timers, reads and slow readers of one process's books (see the
    module docstring); ``queued()`` is called when frames were queued."""

    def __init__(self, core: Core, reads: HistoryReads, queued: Callable[[], None]) -> None:
        self.core = core
        self.reads = reads
        self.queued = queued
        self._ticks: dict[int, asyncio.TimerHandle] = {}  # interval (ms) -> its timer
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Schedule on ``loop`` (the manager's, once started)."""
        self._loop = loop

    def stop(self) -> None:
        for handle in self._ticks.values():
            handle.cancel()
        self._ticks.clear()

    def changed(self) -> None:
        """Subscriptions changed: start the timer of each interval that has
        derived streams now, and the books' start reads due (a timer
        without streams stops at its next tick)."""
        core = self.core
        if core.reads_due:
            self.reads.start()
        for interval in core.derived.by_interval:
            if interval not in self._ticks:
                loop = self._loop or asyncio.get_running_loop()
                deadline = loop.time() + interval / 1000
                self._ticks[interval] = loop.call_at(deadline, self._tick, interval, deadline)

    def _tick(self, interval: int, deadline: float) -> None:
        """One interval passed: its derived streams' frames, once for all
        their subscribers; the next tick keeps to the interval's grid."""
        core = self.core
        if interval not in core.derived.by_interval:
            del self._ticks[interval]
            return
        loop = self._loop or asyncio.get_running_loop()
        deadline = max(deadline + interval / 1000, loop.time())
        self._ticks[interval] = loop.call_at(deadline, self._tick, interval, deadline)
        if core.derived.tick(interval):
            self.queued()
        if core.books.pending:
            self.reads.start()

    def park(self, conn: Connection) -> int:
        """``conn`` reads too slowly: its book streams (and derived
        streams) stop until :meth:`unpark`; the number stopped (a
        fallback counted when any)."""
        parked = self.core.registry.park(conn)
        if parked:
            self.core.counters.slow_reader_fallbacks += 1
        return parked

    def parked(self, conn: Connection) -> bool:
        return conn in self.core.registry.parked

    def unpark(self, conn: Connection) -> None:
        """``conn`` caught up: the gap notice (``slow_reader``) of each
        stream it missed, then its snapshot, then live frames."""
        core = self.core
        names = core.registry.unpark(conn)
        for name in names:
            core.compressing.notice(name, {conn: None}, "slow_reader")
        if names:
            self.queued()
        if core.recovering:
            self.reads.start()

    def bookless(self, name: str) -> str | None:
        """The book stream ``name`` derives from if it is known to have no
        server book (no snapshots: ``name`` is refused), else None."""
        return self.core.derived.bookless(name)
