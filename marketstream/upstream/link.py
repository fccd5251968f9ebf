"""One Redis pub/sub connection, kept alive and subscribed.

:class:`PubSubConnection` is the one connection implementation of the
package: one raw redis-py connection (RESP2, hiredis, reads widened to
:data:`READ_SIZE`), connected with capped, jittered backoff, and two tasks:
the reader, which hands every reply on without yielding between replies
that have already arrived, and the pinger, which PINGs and declares the
connection dead when no PONG comes back.  Subclasses say where to connect,
what to do once connected and what a reply means: :class:`PubSubLink` here
(one server, and Sentinel's primary), the Cluster's shard links in
:mod:`~marketstream.upstream.shards`.

A :class:`PubSubLink` adds a third task, the syncer, which keeps the
upstream subscriptions equal to what the listener wants.  A lost link is
reconnected, and every wanted channel is subscribed again::

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
import redis.asyncio.connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from marketstream.upstream.clients import REDIS_ERRORS, Reply
from marketstream.upstream.urls import ConnectionOptions, node_label, redact_url

__all__ = ["Listener", "PubSubConnection", "PubSubLink", "READ_SIZE", "widen_reads"]

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


def widen_reads(conn: redis.asyncio.connection.AbstractConnection, size: int = READ_SIZE) -> bool:
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
    private: Any = conn  # Any: private attributes, undeclared in asyncio's and redis-py's types
    try:
        transport = private._writer.transport
        reader = private._reader
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


ConnectionClass = type[redis.asyncio.connection.AbstractConnection]


class PubSubConnection:
    """One raw pub/sub connection kept alive (see the module docstring).

    A subclass provides :meth:`_target` (where to connect), and may
    override :meth:`_on_connected` (send the subscriptions on a fresh
    connection), :meth:`_read` (the read loop: hand each reply on),
    :meth:`_on_error_reply`, :meth:`_on_lost`, :meth:`_on_restored`,
    :meth:`_on_connect_failed` and :meth:`_pinged`::

        class Echo(PubSubConnection):
            async def _target(self):
                return redis.asyncio.Connection, {"host": "127.0.0.1", "port": 6379}

            async def _on_connected(self, conn):
                await conn.send_command("SUBSCRIBE", "news", check_health=False)

        echo = Echo()
        await echo.start()      # raises if Redis cannot be reached; or launch()
        echo.healthy            # PONG seen recently
        await echo.stop()
    """

    def __init__(
        self,
        ping_interval: float = 1.0,
        ping_timeout: float = 2.0,
        backoff_min: float = 0.05,
        backoff_max: float = 1.0,
        connect_timeout: float | None = None,
    ) -> None:
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout  # None: the connection's own (5 s by default)
        self.reconnects = 0
        self.widened = False  # reads widened (see widen_reads)
        self.node = "?"  # host:port of the server connected to
        self._conn: redis.asyncio.connection.AbstractConnection | None = None
        self._connected = asyncio.Event()
        self._last_pong = 0.0
        self._active = False  # something was read since the last ping check
        self._tasks: list[asyncio.Future[None]] = []
        self._running = False

    # --- what a subclass says ----------------------------------------------

    async def _target(self) -> tuple[ConnectionClass, ConnectionOptions]:
        """The connection class and its keyword arguments."""
        raise NotImplementedError

    async def _on_connected(self, conn: redis.asyncio.connection.AbstractConnection) -> None:
        """A fresh connection, before anything is read: subscribe."""

    async def _read(self, conn: redis.asyncio.connection.AbstractConnection) -> None:
        """Read replies until the connection fails (raises)."""
        read = conn.read_response
        dispatch = self._on_response
        while True:
            dispatch(await read())
            self._active = True  # anything read proves the link alive

    def _on_response(self, response: Reply) -> None:
        """A reply read (the default :meth:`_read`'s)."""

    def _on_error_reply(self, exc: ResponseError) -> bool:
        """An error reply was read; False: the connection is given up."""
        return False

    def _read_lately(self) -> bool:
        """Whether anything was read since the last ping tick (and forget it)."""
        active, self._active = self._active, False
        return active

    def _pinged(self) -> None:
        """A PING is about to be sent."""

    def _on_lost(self, exc: BaseException | None) -> None:
        """The connection was lost (``exc``, or None: no PONG)."""

    def _on_restored(self, attempt: int) -> None:
        """Connected again after ``attempt`` attempts."""

    def _on_connect_failed(self, exc: BaseException, attempt: int, wait: float) -> None:
        """Attempt ``attempt`` failed; the next in ``wait`` seconds."""
        # The first failures, then one line in ten: an outage or a failover
        # must not flood the log.
        level = logging.WARNING if attempt <= 3 or attempt % 10 == 0 else logging.DEBUG
        log.log(
            level,
            "Redis pub/sub reconnect attempt %d to %s failed (%s); retrying in %.2fs",
            attempt,
            self.node,
            exc,
            wait,
        )

    # --- life cycle --------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:
        """Connect and start reading; raise if Redis is unreachable."""
        self._running = True
        await asyncio.wait_for(self._connect(), timeout)
        self._start_tasks()

    def launch(self) -> None:
        """Start reading now; the first connection is made in the background."""
        self._running = True
        self._start_tasks()

    def _start_tasks(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._read_loop()),
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
                await self._conn.disconnect(nowait=True)
            except Exception:
                pass
            self._conn = None
        self._connected.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def healthy(self) -> bool:
        """True while the connection answered a PING recently."""
        return self._connected.is_set() and not self._silent()

    def _silent(self) -> bool:
        return time.monotonic() - self._last_pong > self.ping_interval + self.ping_timeout

    def last_pong_ago(self) -> float | None:
        """Seconds since the last PONG (None: never)."""
        return round(time.monotonic() - self._last_pong, 3) if self._last_pong else None

    def reconnect(self) -> None:
        """Drop the connection now (a failover was announced): the reader
        reconnects, asking where to connect again."""
        if self._conn is not None:
            asyncio.ensure_future(self._lost(ConnectionError("failover announced")))

    # --- connecting --------------------------------------------------------

    async def _connect(self) -> None:
        """Open the connection and let the subclass subscribe."""
        connection_class, kwargs = await self._target()
        # The reader blocks on this connection indefinitely: no read timeout;
        # liveness is checked with PING by _ping_loop.  Reconnects are ours.
        kwargs.update(
            socket_timeout=None,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            protocol=2,
        )  # RESP2: messages come back from read_response
        kwargs.setdefault("socket_connect_timeout", self.connect_timeout or 5)
        kwargs.pop("decode_responses", None)
        conn = connection_class(**kwargs)
        self.node = (
            "unix:" + kwargs["path"]
            if kwargs.get("path")
            else node_label((kwargs.get("host", "localhost"), int(kwargs.get("port", 6379))))
        )
        try:
            if self.connect_timeout is None:
                await conn.connect()
            else:
                await asyncio.wait_for(conn.connect(), self.connect_timeout)
            self.widened = widen_reads(conn)
            await self._on_connected(conn)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        self._conn = conn
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
                self._on_connect_failed(exc, attempt, wait)
                await asyncio.sleep(wait)
                delay *= 2
                continue
            self.reconnects += 1
            self._on_restored(attempt)
            return

    async def _lost(self, exc: BaseException | None) -> None:
        if not self._connected.is_set():
            return
        self._connected.clear()
        conn, self._conn = self._conn, None
        self._on_lost(exc)
        if conn is not None:
            try:
                await conn.disconnect(nowait=True)
            except Exception:
                pass

    # --- the tasks ---------------------------------------------------------

    async def _read_loop(self) -> None:
        while self._running:
            conn = self._conn
            if conn is None:
                await self._reconnect()
                continue
            try:
                await self._read(conn)
            except asyncio.CancelledError:
                raise
            except ResponseError as exc:
                if not self._on_error_reply(exc) and conn is self._conn:
                    await self._lost(exc)
            except REDIS_ERRORS as exc:
                if conn is self._conn:
                    await self._lost(exc)
            except Exception:
                log.exception("unexpected error in the Redis reader of %s; reconnecting", self.node)
                if conn is self._conn:
                    await self._lost(None)

    async def _ping_loop(self) -> None:
        """PING the connection; a missing PONG means it is dead."""
        while self._running:
            await asyncio.sleep(self.ping_interval)
            conn = self._conn
            if conn is None or not self._connected.is_set():
                continue
            if self._read_lately():
                # Under a backlog the PONG waits behind megabytes of
                # messages; a link that delivers is alive.
                self._last_pong = max(self._last_pong, time.monotonic() - self.ping_interval)
            if self._silent():
                # A busy loop may not have read a PONG that did arrive: let
                # the reader run before calling the link dead.
                for _ in range(3):
                    await asyncio.sleep(0)
                if self._silent() and conn is self._conn:
                    await self._lost(None)
                    continue
            self._pinged()
            try:
                await conn.send_command("PING", check_health=False)
            except REDIS_ERRORS as exc:
                if conn is self._conn:
                    await self._lost(exc)


class PubSubLink(PubSubConnection):
    """One pub/sub connection to one Redis server (see the module docstring)."""

    def __init__(
        self,
        url: str,
        listener: Listener,
        ping_interval: float = 1.0,
        ping_timeout: float = 2.0,
        backoff_min: float = 0.05,
        backoff_max: float = 1.0,
        resolve: Callable[[], Awaitable[ConnectionOptions]] | None = None,
    ) -> None:
        super().__init__(ping_interval, ping_timeout, backoff_min, backoff_max)
        self.url = url
        self.listener = listener
        self.resolve = resolve  # where to connect, asked at every (re)connect
        self._upstream: set[str] = set()  # channels SUBSCRIBE was sent for on this connection
        self._dirty = asyncio.Event()

    def _start_tasks(self) -> None:
        super()._start_tasks()
        self._tasks.append(asyncio.ensure_future(self._sync_loop()))

    def changed(self) -> None:
        """The listener's wanted channels changed: sync them soon."""
        self._dirty.set()

    def health(self) -> dict[str, object]:
        return {
            "connected": self._connected.is_set(),
            "node": self.node,
            "last_pong_seconds_ago": self.last_pong_ago(),
        }

    @property
    def links(self) -> dict[str, bool]:
        """``{node: healthy}`` (one node here)."""
        return {self.node: self.healthy}

    def redacted_url(self) -> str:
        return redact_url(self.url)

    async def _target(self) -> tuple[ConnectionClass, ConnectionOptions]:
        connection_class: ConnectionClass
        if self.resolve is not None:
            kwargs = await self.resolve()
            connection_class = redis.asyncio.Connection
            if kwargs.pop("ssl", False):
                connection_class = redis.asyncio.SSLConnection
        else:
            pool = redis.asyncio.ConnectionPool.from_url(self.url)
            kwargs = dict(pool.connection_kwargs)
            connection_class = pool.connection_class
            await pool.disconnect()
        return connection_class, kwargs

    async def _on_connected(self, conn: redis.asyncio.connection.AbstractConnection) -> None:
        self._upstream = set(self.listener.wanted())
        if self._upstream:
            await conn.send_command("SUBSCRIBE", *self._upstream, check_health=False)

    def _on_restored(self, attempt: int) -> None:
        self.listener.on_restored(set(self._upstream))
        log.warning(
            "Redis pub/sub reconnected to %s after %d attempt(s); resubscribed %d channel(s)",
            self.redacted_url(),
            attempt,
            len(self._upstream),
        )

    def _on_lost(self, exc: BaseException | None) -> None:
        log.warning(
            "Redis pub/sub connection to %s lost (%s)", self.redacted_url(), exc or "no PING reply"
        )
        self.listener.on_lost()

    async def _read(self, conn: redis.asyncio.connection.AbstractConnection) -> None:
        read = conn.read_response
        on_message = self.listener.on_message
        on_reply = self._on_response
        while True:
            response = await read()
            if type(response) is list and response[0] == b"message":
                on_message(response[1], response[2])
            else:
                on_reply(response)
            self._active = True  # anything read proves the link alive

    def _on_response(self, response: Reply) -> None:
        if response == b"PONG":  # the reply to PING while subscribed to nothing
            self._last_pong = time.monotonic()
            return
        kind = response[0]
        if kind == b"subscribe":
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
            if conn is None:
                continue
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
