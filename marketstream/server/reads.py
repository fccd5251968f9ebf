"""History reads for the clients that catch up: :class:`HistoryReads`.

The :class:`~marketstream.fanout.core.Core` says what to read
(:meth:`~marketstream.fanout.core.Core.start_reads`: one read per stream,
whatever the number of connections waiting on it) and takes what was read
(``read_done``, ``read_failed``); this runs the reads against Redis, at
most :data:`MAX_READS` at a time, with a command client made on first use::

    reads = HistoryReads("redis://127.0.0.1:6379/0", core, 1000, limiter, on_done)
    reads.start()          # once the event loop has handled what it read
    reads.cancel()         # what runs, and what would start
    await reads.close()    # the command client
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis.asyncio
import redis.asyncio.cluster

from marketstream.fanout.core import Core, History, Read
from marketstream.loglimit import LogLimiter
from marketstream.upstream import history
from marketstream.upstream.clients import REDIS_ERRORS, async_client

__all__ = ["HistoryReads", "MAX_READS"]

#: History reads in flight at most (more would queue for redis-py's pool of
#: connections, 100 by default, and fail past it).
MAX_READS = 32


class HistoryReads:
    """The history reads of one process; ``on_done()`` runs after a read
    whose frames the core queued (a flush is due)."""

    def __init__(
        self,
        redis_url: str,
        core: Core,
        max_replay: int,
        log_limit: LogLimiter,
        on_done: Callable[[], None],
    ) -> None:
        self.redis_url = redis_url
        self.core = core
        self.max_replay = max_replay
        self._log_limit = log_limit
        self._on_done = on_done
        self._handle: asyncio.Handle | None = None
        self._tasks: set[asyncio.Future[bool]] = set()
        # A command client for history reads, made on first use.
        self._commands: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Schedule on ``loop`` (the manager's, once started)."""
        self._loop = loop

    def cancel(self) -> None:
        """Cancel the reads in flight, and those about to start."""
        for task in list(self._tasks):
            task.cancel()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    async def close(self) -> None:
        """Close the command client (after :meth:`cancel`)."""
        if self._commands is not None:
            try:
                await self._commands.aclose()
            except Exception:
                pass
            self._commands = None

    def start(self) -> None:
        """Start the history reads that can start, once the event loop has
        handled what it has already read: the confirmations Redis sent
        together (a resubscribe after an outage) all join before a
        connection's budget is shared among its streams."""
        if self._handle is None:
            loop = self._loop or asyncio.get_running_loop()
            self._handle = loop.call_soon(self._start_now)

    def _start_now(self) -> None:
        self._handle = None
        room = MAX_READS - len(self._tasks)
        if room <= 0:
            return  # a read that ends starts the next
        for read in self.core.start_reads(room):
            task = asyncio.ensure_future(self._read(read))
            self._tasks.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[bool]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is None and task.result():
            self.start()  # the next ones (a failed read retries after a pause)

    async def _read(self, read: Read) -> bool:
        """Read what ``read`` asks for, once for every connection waiting."""
        name = read.stream
        try:
            if self._commands is None:
                self._commands = async_client(self.redis_url)
            latest, snapshot, entries, skipped = await history.read_recent(
                self._commands, name, read.after, read.snapshot, self.max_replay, read.max_bytes
            )
            oldest = None
            after = read.after
            if (
                latest is not None
                and after is not None
                and after < latest
                and not (entries and entries[0][0] <= after + 1)
            ):
                # The entries do not reach back to it: the gap notice says
                # whether the history does (one command, only then).
                oldest = await history.oldest_position(self._commands, name)
        except asyncio.CancelledError:
            self.core.read_failed(name, read.token)
            raise
        except REDIS_ERRORS as exc:
            self._log_limit.log(
                logging.WARNING,
                "history_read",
                "reading the history of %s failed (%s); retrying",
                name,
                exc,
            )
            self.core.read_failed(name, read.token)
            if self.core.batch.pending:
                self._on_done()  # frames a book held back, released as they are
            asyncio.get_running_loop().call_later(0.2, self.start)
            return False
        if self.core.read_done(
            name, History(latest, snapshot, entries, oldest, skipped), read.token
        ):
            self._on_done()
        return True
