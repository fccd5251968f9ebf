"""The ChannelManager: the process's subscriptions and its Redis bridge.

One ChannelManager per process joins three pieces:

* a :class:`~marketstream.fanout.core.Core` (no I/O) that holds who listens to
  what, turns Redis messages into batches of frames, and keeps the
  resubscribe, gap and recovery bookkeeping;
* a link (:func:`~marketstream.upstream.links.make_link`), the Redis pub/sub connection(s)
  that stays subscribed to exactly the channels the core wants;
* the event-loop glue: one flush per batch, history reads for recovering
  clients (:class:`~marketstream.server.reads.HistoryReads`), and futures
  for acknowledgements.

Connections are any hashable objects with a ``write_frames(data)`` method
taking the bytes of one or more complete WebSocket frames (the WebSocket
handler)::

    manager = ChannelManager("redis://127.0.0.1:6379/0")
    await manager.start()                       # connect before serving
    ChannelManager.install(manager)
    manager.register(conn)
    manager.subscribe(conn, ["trade.SOL_USDC"])  # first listener: SUBSCRIBE
    manager.subscribe(conn, ["depth.SOL_USDC"], {"depth.SOL_USDC": Want(snapshot=True)})
    manager.remove(conn)                         # last one gone: UNSUBSCRIBE
    await manager.stop()

Delivery is batch-shaped: the link hands over everything Redis has already
sent without yielding to the event loop; the core frames each message once
and appends the frame to each listener's pending list; when the link has to
wait for the network again, one flush writes every connection's frames as a
single write.  Under light load a batch is one message; under heavy load
batches grow and the number of writes per message falls.

A channel whose last listener left stays subscribed for ``linger / 2`` to
``linger`` seconds, so that a client that unsubscribes and subscribes
again (or reconnects) costs Redis nothing; ``max_channels`` caps the
channels of the process.  History reads run at most :data:`MAX_READS` at a
time, and each reads no more than the connections it serves may be sent
(``replay_bytes`` per connection, see :mod:`marketstream.fanout.core`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from collections.abc import Iterable
from typing import Protocol

from marketstream.fanout.core import REPLAY_BYTES, Connection, Core, Want
from marketstream.fanout.counters import Counters
from marketstream.loglimit import LogLimiter
from marketstream.server.books import BookStreams
from marketstream.server.keepalive import Pingable
from marketstream.server.reads import MAX_READS, HistoryReads
from marketstream.upstream.confirmations import Confirmations
from marketstream.upstream.links import make_link
from marketstream.upstream.urls import redact_url
from marketstream.wire.books import DEFAULT_FIELDS, BookFields
from marketstream.wire.deflate import MIN_BYTES, Deflater
from marketstream.wire.derived import DerivedRules
from marketstream.wire.payloads import WRONG_STREAM, publish_time

__all__ = ["ChannelManager", "Handler", "Want", "MAX_READS"]

log = logging.getLogger(__name__)


class Handler(Connection, Pingable, Protocol):
    """A connection as the server registers them (its WebSocket handlers):
    frames are written to it, the keepalive pings it, shutdown closes it."""


class ChannelManager:
    """Subscriptions of one process and its Redis pub/sub bridge."""

    _instance: ChannelManager | None = None

    @classmethod
    def instance(cls) -> ChannelManager:
        """The process's manager (installed with :meth:`install`)."""
        if cls._instance is None:
            raise RuntimeError("no ChannelManager installed")
        return cls._instance

    @classmethod
    def install(cls, manager: ChannelManager) -> ChannelManager:
        cls._instance = manager
        return manager

    @classmethod
    def reset(cls) -> None:
        """Forget the installed manager (tests make one per event loop)."""
        cls._instance = None

    def __init__(
        self,
        redis_url: str,
        payload_format: str = "envelope",
        ping_interval: float = 1.0,
        ping_timeout: float = 2.0,
        backoff_min: float = 0.05,
        backoff_max: float = 1.0,
        min_flush_interval: float = 0.0,
        counters: Counters | None = None,
        max_replay: int = 1000,
        replay_bytes: int = REPLAY_BYTES,
        max_channels: int = 0,
        linger: float = 1.0,
        compression_min_bytes: int | None = MIN_BYTES,
        books: DerivedRules | None = None,
        book_fields: BookFields = DEFAULT_FIELDS,
    ) -> None:
        self.redis_url = redis_url
        self.min_flush_interval = min_flush_interval
        self.max_replay = max_replay
        self.linger = linger
        self.counters = counters if counters is not None else Counters()
        self._log_limit = LogLimiter(log)  # publishers' errors, at most a line a second each
        self.core = Core(
            self.counters,
            payload_format,
            max_replay,
            partial(_log_malformed, self._log_limit, self.counters),
            replay_bytes=replay_bytes,
            max_channels=max_channels,
            linger=linger > 0,
            # None: no compression (a Deflater compresses each message once).
            deflater=None if compression_min_bytes is None else Deflater(compression_min_bytes),
            # None: no server books, no derived streams.
            books=books,
            book_fields=book_fields,
        )

        self.link = make_link(
            redis_url,
            self,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            backoff_min=backoff_min,
            backoff_max=backoff_max,
        )
        self._confirmations = Confirmations()  # acknowledgements waiting for Redis
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._last_flush = 0.0
        self._batch_start: float | None = None  # when the batch's first frame was queued
        self._published: int | None = None  # the publisher's E of its first message (µs)
        self._linger_handle: asyncio.TimerHandle | None = None
        self.reads = HistoryReads(
            redis_url, self.core, max_replay, self._log_limit, self._read_done
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self.books = BookStreams(self.core, self.reads, self._queued)

    # --- what the rest of the process reads ---------------------------------

    @property
    def streams(self) -> dict[str, dict[Connection, None]]:
        """Stream name -> its live listeners."""
        return self.core.streams

    @property
    def connections(self) -> dict[Handler, dict[str, None]]:
        """Connection -> the streams it subscribed."""
        # The core keeps what register() was given: Handlers.
        return self.core.connections  # type: ignore[return-value]

    @property
    def healthy(self) -> bool:
        """True while the pub/sub connection answered a PING recently."""
        return self.link.healthy

    @property
    def upstream_channels(self) -> frozenset[str]:
        """Channels Redis confirmed subscribed on the live connection."""
        return frozenset(self.core.confirmed)

    def health(self) -> dict[str, object]:
        return {
            "redis": self.link.health(),
            "connections": len(self.core.connections),
            "streams": len(self.core.streams),
            "upstream_channels": len(self.core.confirmed),
            "stats": self.counters.as_dict(),
        }

    def redacted_url(self) -> str:
        """The Redis URL without its password."""
        return redact_url(self.redis_url)

    # --- life cycle ----------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:
        """Connect to Redis and start the reader; raise if Redis is unreachable."""
        self._loop = asyncio.get_running_loop()
        self.reads.bind(self._loop)
        self.books.bind(self._loop)
        await self.link.start(timeout)

    async def stop(self) -> None:
        """Stop the reader and close the Redis connections."""
        self.reads.cancel()
        self.books.stop()
        if self._linger_handle is not None:
            self._linger_handle.cancel()
            self._linger_handle = None
        await self.link.stop()
        await self.reads.close()
        self._confirmations.fail_all()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush()

    # --- subscriptions -------------------------------------------------------

    def register(self, conn: Handler, compressing: bool = False) -> None:
        """Track a new connection (before it subscribes to anything);
        ``compressing``: it negotiated permessage-deflate."""
        self.core.register(conn, compressing)

    def subscribe(
        self, conn: Connection, names: Iterable[str], wants: dict[str, Want] | None = None
    ) -> list[str]:
        """Add ``conn`` to each stream; returns the streams newly added.
        Streams with a :class:`~marketstream.fanout.core.Want` (``since``,
        ``snapshot``) are caught up from the history first."""
        added = self.core.subscribe(conn, list(names), wants)
        self.books.changed()
        self._sync()
        if wants:
            self.reads.start()
        return added

    def unsubscribe(self, conn: Connection, names: Iterable[str]) -> list[str]:
        """Remove ``conn`` from each stream; unknown names are ignored."""
        removed = self.core.unsubscribe(conn, list(names))
        self.books.changed()
        self._sync()
        return removed

    def remove(self, conn: Connection) -> None:
        """Forget a departed connection entirely."""
        self.core.remove(conn)
        self.books.changed()
        self._sync()

    def subscriptions(self, conn: Connection) -> list[str]:
        return self.core.subscriptions(conn)

    def over_channel_cap(self, names: list[str]) -> list[str]:
        """The streams of ``names`` (distinct, not yet subscribed by the
        asking connection) refused by ``max_channels``."""
        return self.core.over_channel_cap(names)

    def _sync(self) -> None:
        core = self.core
        if core.wanted_changed:
            core.wanted_changed = False
            self.link.changed()
        if core.lingering and self._linger_handle is None:
            loop = self._loop or asyncio.get_running_loop()
            self._linger_handle = loop.call_later(self.linger / 2, self._release_lingering)

    def _release_lingering(self) -> None:
        self._linger_handle = None
        self.core.release_lingering()
        self._sync()

    async def wait_subscribed(self, names: Iterable[str], timeout: float = 5.0) -> bool:
        """Wait until Redis confirmed the subscription of every stream in
        ``names`` that is still wanted; False on timeout or outage."""
        core = self.core
        confirmed = core.confirmed
        names = [core.derived.base_of(name) for name in names]  # a derived stream's channel
        return await self._confirmations.wait(
            names, lambda name: core.is_wanted(name) and name not in confirmed, timeout
        )

    # --- what the link reports (see marketstream.upstream.link.Listener) --------------

    def wanted(self) -> set[str]:
        return self.core.wanted()

    def take_changes(self) -> dict[str, bool]:
        return self.core.take_changes()

    def on_message(self, channel: bytes, payload: bytes) -> None:
        if self.core.on_message(channel, payload) and self._flush_handle is None:
            self._published = publish_time(payload)  # once per batch: its first message
            self._schedule_flush()

    def on_subscribed(self, name: str) -> None:
        self.core.upstream_confirmed(name)
        self._confirmations.resolve(name)
        if self.core.batch.pending and self._flush_handle is None:
            self._schedule_flush()  # a gap notice
        if self.core.reads_due:
            self.reads.start()

    def on_interrupted(self, names: list[str]) -> None:
        """A cluster link moved these channels to another shard."""
        self.counters.reconnects += 1
        self.core.channels_interrupted(names)
        if self.core.batch.pending and self._flush_handle is None:
            self._schedule_flush()  # gap notices
        if self.core.reads_due:
            self.reads.start()

    def on_unsubscribed(self, name: str) -> None:
        self.core.upstream_dropped(name)

    def on_lost(self) -> None:
        self.core.link_lost()
        self._confirmations.fail_all()
        log.warning("%d stream(s) with listeners wait for Redis", len(self.core.streams))

    def on_restored(self, channels: set[str]) -> None:
        self.counters.reconnects += 1
        self.core.link_restored(channels)

    def _read_done(self) -> None:
        """A history read queued frames: flush them."""
        if self._flush_handle is None:
            self._schedule_flush()

    # --- delivery ------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        # Flush as soon as the reader waits for Redis; but no sooner than
        # min_flush_interval after the previous flush, so that under load
        # batches grow and the writes per message fall.
        loop = self._loop or asyncio.get_running_loop()
        self._batch_start = time.monotonic()
        wait = self._last_flush + self.min_flush_interval - loop.time()
        if wait > 0:
            self._flush_handle = loop.call_later(wait, self._flush)
        else:
            self._flush_handle = loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write every connection's frames of this batch, one write each."""
        self._flush_handle = None
        if self._loop is not None:
            self._last_flush = self._loop.time()
        for conn, data in self.core.take_batch().items():
            try:
                conn.write_frames(data)
            except Exception:
                log.exception("delivery to %r failed", conn)
        self._measure()
        if self.core.books.pending:
            self.reads.start()  # a book lost its stream: read its snapshot again

    def _queued(self) -> None:
        """Frames were queued outside a message (a tick, a notice): flush."""
        if self._flush_handle is None:
            self._schedule_flush()

    def _measure(self) -> None:
        """The latencies of the batch just written, once per batch: since
        its first frame was queued, and since the publisher's timestamp of
        its first message if that had one (see the metrics' help texts)."""
        start, self._batch_start = self._batch_start, None
        published, self._published = self._published, None
        counters = self.counters
        if start is None or len(counters.batch_latencies) >= 100_000:
            return  # not a scheduled batch; or nobody drains the lists
        counters.batch_latencies.append(time.monotonic() - start)
        if published is not None:
            counters.publish_latencies.append(max(0.0, time.time() - published * 1e-6))


def _log_malformed(
    log_limit: LogLimiter, counters: Counters, channel: bytes, payload: bytes, problem: str
) -> None:
    """Log a payload the core dropped (what a broken publisher sends)."""
    # A broken publisher must not flood the log: a line a second per cause.
    if problem == WRONG_STREAM:
        log_limit.log(
            logging.WARNING,
            problem,
            'dropped a payload on %r whose "stream" is not the channel '
            "(missing, another or repeated; %d so far): %.80r",
            channel,
            counters.dropped_wrong_stream,
            payload,
        )
    else:
        log_limit.log(
            logging.WARNING,
            problem,
            "dropped a payload on %r that is not a JSON object (or not "
            "what the recovery script publishes; %d so far): %.80r",
            channel,
            counters.dropped_malformed,
            payload,
        )
