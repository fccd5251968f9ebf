"""One Redis pub/sub connection, kept alive and subscribed.

A :class:`PubSubLink` owns one raw redis-py connection (RESP2, hiredis) and
three tasks: the reader, which hands every reply to its listener without
yielding between replies that have already arrived; the syncer, which keeps
the upstream subscriptions equal to what the listener wants; and the pinger,
which PINGs and declares the link dead when no PONG comes back.  A lost link
is reconnected with capped, jittered backoff, and every wanted channel is
subscribed again::

    link = PubSubLink("redis://127.0.0.1:6379/0", listener)
    await link.start()          # raises if Redis cannot be reached
    link.changed()              # listener.wanted() changed: sync soon
    link.healthy                # PONG seen recently
    await link.stop()

The listener (the :class:`~marketstream.server.channels.ChannelManager`) provides
``wanted()`` (a set of channel names), ``take_changes()`` (the channels
wanted or not since the last call, ``{name: bool}``: a sync costs what
changed, not what is wanted) and the callbacks ``on_message(channel,
payload)`` (bytes, bytes), ``on_subscribed(name)``, ``on_unsubscribed(name)``,
``on_lost()`` and ``on_restored(channels)``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from marketstream.upstream.clients import REDIS_ERRORS
from marketstream.upstream.urls import node_label, redact_url

__all__ = ["PubSubLink", "Listener"]

log = logging.getLogger(__name__)


class Listener(Protocol):
    """What a link reports to."""

    def wanted(self) -> set[str]: ...

    def take_changes(self) -> dict[str, bool]: ...

    def on_message(self, channel: bytes, payload: bytes) -> None: ...

    def on_subscribed(self, name: str) -> None: ...

    def on_unsubscribed(self, name: str) -> None: ...

    def on_lost(self) -> None: ...

    def on_restored(self, channels: set[str]) -> None: ...


#: Bytes of Redis replies read per event-loop iteration, at most.
READ_SIZE = 4 << 20


def widen_reads(conn: Any, size: int = READ_SIZE) -> bool:
    """Let one event-loop iteration read up to ``size`` bytes of ``conn``.

    A batch (one flush, one write per client) is what one iteration read.
    asyncio reads at most 256 KB per iteration, and redis-py's stream
    reader pauses the socket past 128 KB; under load a batch then ends while
    the kernel still holds messages, and every flush touches nearly every
    client: measured with 5000 clients on 1000 streams (50 per message),
    4 MB reads cut the server's CPU per delivery from 1.23 to 0.95 s per
    million at 750k deliveries/s.  Both limits are private
    attributes (of asyncio's selector transport and of redis-py's
    connection); without them, reads stay as they were (correct, slower).
    Returns whether both were widened.
    """
    try:
        transport = conn._writer.transport
        reader = conn._reader
    except AttributeError:
        return False
    widened = 0
    if isinstance(getattr(transport, "max_size", None), int):
        transport.max_size = size
        widened += 1
    if isinstance(getattr(reader, "_limit", None), int):
        reader._limit = size
        widened += 1
    return widened == 2


class PubSubLink:
    """One pub/sub connection to one Redis server (see the module docstring)."""

    def __init__(
        self,
        url: str,
        listener: Listener,
        ping_interval: float = 1.0,
        ping_timeout: float = 2.0,
        backoff_min: float = 0.05,
        backoff_max: float = 1.0,
        resolve: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self.url = url
        self.listener = listener
        self.resolve = resolve  # where to connect, asked at every (re)connect
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.reconnects = 0
        self.widened = False  # reads widened (see widen_reads)
        self.node = "?"  # host:port of the server connected to
        self._upstream: set[str] = set()  # channels SUBSCRIBE was sent for on this connection
        self._conn: Any = None
        self._connected = asyncio.Event()
        self._dirty = asyncio.Event()
        self._last_pong = 0.0
        self._active = False  # something was read since the last ping check
        self._tasks: list[asyncio.Future] = []
        self._running = False

    # --- life cycle --------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:
        """Connect and start reading; raise if Redis is unreachable."""
        self._running = True
        await asyncio.wait_for(self._connect(), timeout)
        self._tasks = [
            asyncio.ensure_future(self._read_loop()),
            asyncio.ensure_future(self._sync_loop()),
            asyncio.ensure_future(self._ping_loop()),
        ]

    async def stop(self) -> None:
        """Stop the tasks and close the connection."""
        self._running = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []
        if self._conn is not None:
            try:
                await self._conn.disconnect()
            except Exception:
                pass
            self._conn = None
        self._connected.clear()

    def changed(self) -> None:
        """The listener's wanted channels changed: sync them soon."""
        self._dirty.set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def healthy(self) -> bool:
        """True while the connection answered a PING recently."""
        return (
            self._connected.is_set()
            and time.monotonic() - self._last_pong < self.ping_interval + self.ping_timeout
        )

    def health(self) -> dict[str, Any]:
        return {
            "connected": self._connected.is_set(),
            "node": self.node,
            "last_pong_seconds_ago": round(time.monotonic() - self._last_pong, 3)
            if self._last_pong
            else None,
        }

    @property
    def links(self) -> dict[str, bool]:
        """``{node: healthy}`` (one node here)."""
        return {self.node: self.healthy}

    def reconnect(self) -> None:
        """Drop the connection now (a failover was announced): the reader
        reconnects, asking where to connect again."""
        conn = self._conn
        if conn is not None:
            asyncio.ensure_future(self._lost(ConnectionError("failover announced")))

    def redacted_url(self) -> str:
        return redact_url(self.url)

    # --- connecting --------------------------------------------------------

    async def _connect(self) -> None:
        """Open the connection and subscribe every wanted channel."""
        if self.resolve is not None:
            kwargs = await self.resolve()
            connection_class: Any = redis.asyncio.Connection
            if kwargs.pop("ssl", False):
                connection_class = redis.asyncio.SSLConnection
        else:
            pool = redis.asyncio.ConnectionPool.from_url(self.url)
            kwargs = dict(pool.connection_kwargs)
            connection_class = pool.connection_class
            await pool.disconnect()
        # The reader blocks on this connection indefinitely: no read timeout;
        # liveness is checked with PING by _ping_loop.  Reconnects are ours.
        kwargs.update(
            socket_timeout=None,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            protocol=2,
        )  # RESP2: messages come back from read_response
        kwargs.setdefault("socket_connect_timeout", 5)
        kwargs.pop("decode_responses", None)
        conn = connection_class(**kwargs)
        await conn.connect()
        self.widened = widen_reads(conn)
        self._conn = conn
        self.node = (
            "unix:" + kwargs["path"]
            if kwargs.get("path")
            else node_label((kwargs.get("host", "localhost"), int(kwargs.get("port", 6379))))
        )
        self._upstream = set(self.listener.wanted())
        if self._upstream:
            await conn.send_command("SUBSCRIBE", *self._upstream, check_health=False)
        self._last_pong = time.monotonic()
        self._connected.set()

    async def _reconnect(self) -> None:
        """Retry with capped exponential backoff and jitter until connected."""
        delay = self.backoff_min
        attempt = 0
        while self._running:
            attempt += 1
            try:
                await self._connect()
            except REDIS_ERRORS as exc:
                wait = min(self.backoff_max, delay) * random.uniform(0.5, 1.0)
                # The first failures, then one line in ten: an outage or a
                # failover must not flood the log.
                level = logging.WARNING if attempt <= 3 or attempt % 10 == 0 else logging.DEBUG
                log.log(
                    level,
                    "Redis pub/sub reconnect attempt %d failed (%s); retrying in %.2fs",
                    attempt,
                    exc,
                    wait,
                )
                await asyncio.sleep(wait)
                delay *= 2
                continue
            self.reconnects += 1
            self.listener.on_restored(set(self._upstream))
            log.warning(
                "Redis pub/sub reconnected to %s after %d attempt(s); resubscribed %d channel(s)",
                self.redacted_url(),
                attempt,
                len(self._upstream),
            )
            return

    async def _lost(self, exc: BaseException | None) -> None:
        if not self._connected.is_set():
            return
        self._connected.clear()
        log.warning(
            "Redis pub/sub connection to %s lost (%s)", self.redacted_url(), exc or "no PING reply"
        )
        conn, self._conn = self._conn, None
        self.listener.on_lost()
        if conn is not None:
            try:
                await conn.disconnect(nowait=True)
            except Exception:
                pass

    # --- the three tasks ---------------------------------------------------

    async def _read_loop(self) -> None:
        while self._running:
            conn = self._conn
            if conn is None:
                await self._reconnect()
                continue
            try:
                read = conn.read_response
                dispatch = self._on_response
                while True:
                    dispatch(await read())
                    self._active = True  # anything read proves the link alive
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                if conn is self._conn:
                    await self._lost(exc)
            except Exception:
                log.exception("unexpected error in the Redis reader; reconnecting")
                if conn is self._conn:
                    await self._lost(None)

    def _on_response(self, response: Any) -> None:
        if response == b"PONG":  # the reply to PING while subscribed to nothing
            self._last_pong = time.monotonic()
            return
        kind = response[0]
        if kind == b"message":
            self.listener.on_message(response[1], response[2])
        elif kind == b"subscribe":
            self.listener.on_subscribed(response[1].decode())
        elif kind == b"unsubscribe":
            self.listener.on_unsubscribed(response[1].decode())
        elif kind == b"pong":
            self._last_pong = time.monotonic()

    async def _sync_loop(self) -> None:
        """Keep the upstream subscriptions equal to the wanted channels."""
        while self._running:
            await self._dirty.wait()
            self._dirty.clear()
            await self._connected.wait()
            conn = self._conn
            upstream = self._upstream
            changes = self.listener.take_changes()
            add = [name for name, wanted in changes.items() if wanted and name not in upstream]
            drop = [name for name, wanted in changes.items() if not wanted and name in upstream]
            try:
                if add:
                    upstream.update(add)
                    await conn.send_command("SUBSCRIBE", *add, check_health=False)
                if drop:
                    upstream.difference_update(drop)
                    await conn.send_command("UNSUBSCRIBE", *drop, check_health=False)
            except REDIS_ERRORS as exc:
                if conn is self._conn:
                    await self._lost(exc)
                self._dirty.set()

    async def _ping_loop(self) -> None:
        """PING the connection; a missing PONG means it is dead."""
        while self._running:
            await asyncio.sleep(self.ping_interval)
            conn = self._conn
            if conn is None or not self._connected.is_set():
                continue
            try:
                await conn.send_command("PING", check_health=False)
            except REDIS_ERRORS as exc:
                if conn is self._conn:
                    await self._lost(exc)
                continue
            if self._active:
                # Under a backlog the PONG waits behind megabytes of
                # messages; a link that delivers is alive.
                self._active = False
                self._last_pong = time.monotonic()
            silent = time.monotonic() - self._last_pong > self.ping_interval + self.ping_timeout
            if silent and conn is self._conn:
                await self._lost(None)
