"""The ChannelManager: subscriptions and the bridge from Redis pub/sub.

One ChannelManager per process owns

* which connection listens to which stream (both directions),
* the process's single Redis pub/sub connection, kept subscribed to exactly
  the streams that have listeners, and
* the reader that turns Redis messages into writes to the listeners.

Connections are any objects with a ``write_frames(data)`` method taking the
bytes of one or more complete WebSocket frames (the WebSocket handler)::

    manager = ChannelManager("redis://127.0.0.1:6379/0")
    await manager.start()                       # connect before serving
    ChannelManager.install(manager)
    manager.register(conn)
    manager.subscribe(conn, ["trade.SOL_USDC"])  # first listener: SUBSCRIBE
    manager.remove(conn)                         # last one gone: UNSUBSCRIBE
    await manager.stop()

Delivery is batch-shaped: the reader parses everything Redis has already
sent without yielding to the event loop; each message is framed once and the
frame appended to each subscriber's pending list; when the reader has to wait
for the network again, one flush writes every connection's frames as a
single write.  Under light load a batch is one message; under heavy load
batches grow and the number of writes per message falls.
"""

import asyncio
import logging
import random
import time

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from marketstream import protocol

__all__ = ["ChannelManager", "Stats"]

log = logging.getLogger("marketstream.channels")

_UPSTREAM_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, EOFError)


class Stats:
    """Plain counters of the bridge, cheap to bump on the hot path; the
    metrics exporter reads them (and drains ``batch_sizes``) once a second."""

    COUNTERS = ("messages_in", "deliveries", "bytes_sent", "batches", "dropped_malformed",
                "dropped_no_listener", "reconnects")
    __slots__ = COUNTERS + ("batch_sizes",)

    def __init__(self):
        for name in self.COUNTERS:
            setattr(self, name, 0)
        self.batch_sizes = []  # messages per batch since the exporter last looked

    def as_dict(self):
        return {name: getattr(self, name) for name in self.COUNTERS}


class ChannelManager:
    """Subscriptions of one process and its Redis pub/sub bridge."""

    _instance = None

    @classmethod
    def instance(cls):
        """The process's manager (installed with :meth:`install`)."""
        if cls._instance is None:
            raise RuntimeError("no ChannelManager installed")
        return cls._instance

    @classmethod
    def install(cls, manager):
        cls._instance = manager
        return manager

    @classmethod
    def reset(cls):
        """Forget the installed manager (tests make one per event loop)."""
        cls._instance = None

    def __init__(self, redis_url, payload_format="envelope", ping_interval=1.0,
                 ping_timeout=2.0, backoff_min=0.05, backoff_max=1.0, min_flush_interval=0.0):
        self.redis_url = redis_url
        self.payload_format = payload_format
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.min_flush_interval = min_flush_interval
        self.stats = Stats()

        self.streams = {}       # stream name -> {connection: None} (insertion-ordered set)
        self.connections = {}   # connection -> {stream name: None}

        self._upstream = set()  # channels SUBSCRIBE was sent for on the live connection
        self._confirmed = set()  # channels Redis confirmed on the live connection
        self._waiters = {}      # channel -> [futures] waiting for confirmation
        self._gap_pending = set()  # resubscribed channels that owe a gap notice

        self._pending = {}      # connection -> [frames] of the current batch
        self._batch_messages = 0
        self._flush_handle = None
        self._last_flush = 0.0
        self._malformed_logged = -60.0

        self._conn = None
        self._connected = asyncio.Event()
        self._dirty = asyncio.Event()
        self._last_pong = 0.0
        self._tasks = []
        self._running = False
        self._loop = None

    # --- life cycle ----------------------------------------------------------

    async def start(self, timeout=10.0):
        """Connect to Redis and start the reader; raise if Redis is unreachable."""
        self._loop = asyncio.get_running_loop()
        self._running = True
        await asyncio.wait_for(self._connect(), timeout)
        self._tasks = [
            asyncio.ensure_future(self._read_loop()),
            asyncio.ensure_future(self._sync_loop()),
            asyncio.ensure_future(self._ping_loop()),
        ]

    async def stop(self):
        """Stop the reader and close the Redis connection."""
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
        self._fail_waiters()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush()

    @property
    def healthy(self):
        """True while the pub/sub connection answered a PING recently."""
        return (self._connected.is_set()
                and time.monotonic() - self._last_pong < self.ping_interval + self.ping_timeout)

    @property
    def upstream_channels(self):
        """Channels Redis confirmed subscribed on the live connection."""
        return frozenset(self._confirmed)

    def health(self):
        return {
            "redis": {
                "connected": self._connected.is_set(),
                "last_pong_seconds_ago": round(time.monotonic() - self._last_pong, 3)
                if self._last_pong else None,
            },
            "connections": len(self.connections),
            "streams": len(self.streams),
            "upstream_channels": len(self._confirmed),
            "stats": self.stats.as_dict(),
        }

    # --- subscriptions -------------------------------------------------------

    def register(self, conn):
        """Track a new connection (before it subscribes to anything)."""
        self.connections.setdefault(conn, {})

    def subscribe(self, conn, names):
        """Add ``conn`` to each stream; returns the streams newly added."""
        mine = self.connections.setdefault(conn, {})
        added = []
        for name in names:
            if name in mine:
                continue
            mine[name] = None
            listeners = self.streams.get(name)
            if listeners is None:
                self.streams[name] = {conn: None}
                self._dirty.set()
            else:
                listeners[conn] = None
            added.append(name)
        return added

    def unsubscribe(self, conn, names):
        """Remove ``conn`` from each stream; unknown names are ignored."""
        mine = self.connections.get(conn)
        if not mine:
            return []
        removed = []
        for name in names:
            if mine.pop(name, 0) is None:
                self._drop_listener(name, conn)
                removed.append(name)
        return removed

    def remove(self, conn):
        """Forget a departed connection entirely."""
        mine = self.connections.pop(conn, None)
        self._pending.pop(conn, None)
        if mine:
            for name in mine:
                self._drop_listener(name, conn)

    def subscriptions(self, conn):
        return list(self.connections.get(conn, ()))

    def _drop_listener(self, name, conn):
        listeners = self.streams.get(name)
        if listeners is not None:
            listeners.pop(conn, None)
            if not listeners:
                del self.streams[name]
                self._dirty.set()

    async def wait_subscribed(self, names, timeout=5.0):
        """Wait until Redis confirmed the subscription of every stream in
        ``names`` that still has listeners; False on timeout or outage."""
        futures = []
        for name in names:
            if name in self.streams and name not in self._confirmed:
                future = self._loop.create_future()
                self._waiters.setdefault(name, []).append(future)
                futures.append(future)
        if not futures:
            return True
        try:
            await asyncio.wait_for(asyncio.gather(*futures), timeout)
            return all(f.result() for f in futures)
        except asyncio.TimeoutError:
            return False

    def _resolve_waiters(self, name, ok=True):
        for future in self._waiters.pop(name, ()):
            if not future.done():
                future.set_result(ok)

    def _fail_waiters(self):
        for name in list(self._waiters):
            self._resolve_waiters(name, False)

    # --- the Redis side ------------------------------------------------------

    async def _connect(self):
        """Open the pub/sub connection and subscribe every wanted channel."""
        pool = redis.asyncio.ConnectionPool.from_url(self.redis_url)
        kwargs = dict(pool.connection_kwargs)
        await pool.disconnect()
        # The reader blocks on this connection indefinitely: no read timeout;
        # liveness is checked with PING by _ping_loop.  Reconnects are ours.
        kwargs.update(socket_timeout=None, socket_keepalive=True,
                      retry=Retry(NoBackoff(), 0), health_check_interval=0,
                      protocol=2)  # RESP2: messages come back from read_response
        kwargs.setdefault("socket_connect_timeout", 5)
        kwargs.pop("decode_responses", None)
        conn = pool.connection_class(**kwargs)
        await conn.connect()
        self._conn = conn
        self._upstream = set(self.streams)
        self._confirmed = set()
        if self._upstream:
            await conn.send_command("SUBSCRIBE", *self._upstream, check_health=False)
        self._last_pong = time.monotonic()
        self._connected.set()

    async def _reconnect(self):
        """Retry with capped exponential backoff and jitter until connected."""
        delay = self.backoff_min
        attempt = 0
        while self._running:
            attempt += 1
            try:
                await self._connect()
            except (*_UPSTREAM_ERRORS, RedisError) as exc:
                wait = min(self.backoff_max, delay) * random.uniform(0.5, 1.0)
                log.warning("Redis pub/sub reconnect attempt %d failed (%s); retrying in %.2fs",
                            attempt, exc, wait)
                await asyncio.sleep(wait)
                delay *= 2
                continue
            self.stats.reconnects += 1
            self._gap_pending = set(self._upstream)
            log.warning("Redis pub/sub reconnected to %s after %d attempt(s); "
                        "resubscribed %d channel(s)", self.redacted_url(), attempt,
                        len(self._upstream))
            return

    def redacted_url(self):
        """The Redis URL without its password."""
        parts = self.redis_url.split("@", 1)
        return parts[0].split("//")[0] + "//***@" + parts[1] if len(parts) == 2 else self.redis_url

    async def _lost(self, exc):
        if not self._connected.is_set():
            return
        self._connected.clear()
        log.warning("Redis pub/sub connection lost (%s); %d stream(s) with listeners",
                    exc or "no PING reply", len(self.streams))
        conn, self._conn = self._conn, None
        self._confirmed = set()
        self._fail_waiters()
        if conn is not None:
            try:
                await conn.disconnect(nowait=True)
            except Exception:
                pass

    async def _read_loop(self):
        while self._running:
            conn = self._conn
            if conn is None:
                await self._reconnect()
                continue
            try:
                while True:
                    self._on_response(await conn.read_response())
            except asyncio.CancelledError:
                raise
            except (*_UPSTREAM_ERRORS, RedisError) as exc:
                if conn is self._conn:
                    await self._lost(exc)
            except Exception:
                log.exception("unexpected error in the Redis reader; reconnecting")
                if conn is self._conn:
                    await self._lost(None)

    def _on_response(self, response):
        if response == b"PONG":  # the reply to PING while subscribed to nothing
            self._last_pong = time.monotonic()
            return
        kind = response[0]
        if kind == b"message":
            self._on_message(response[1], response[2])
        elif kind == b"subscribe":
            name = response[1].decode()
            self._confirmed.add(name)
            self._resolve_waiters(name)
            if name in self._gap_pending:
                self._gap_pending.discard(name)
                listeners = self.streams.get(name)
                if listeners:
                    self._enqueue(listeners, protocol.text_frame(protocol.gap_notice(name)))
        elif kind == b"unsubscribe":
            self._confirmed.discard(response[1].decode())
        elif kind == b"pong":
            self._last_pong = time.monotonic()

    def _on_message(self, channel, payload):
        self.stats.messages_in += 1
        listeners = self.streams.get(channel.decode())
        if not listeners:
            self.stats.dropped_no_listener += 1
            return
        if not protocol.is_json_object(payload):
            self.stats.dropped_malformed += 1
            now = time.monotonic()
            if now - self._malformed_logged > 10.0:  # a broken publisher must not flood the log
                self._malformed_logged = now
                log.warning("dropped a payload on %r that is not a JSON object (%d so far): %.80r",
                            channel, self.stats.dropped_malformed, payload)
            return
        if self.payload_format == "data":
            payload = protocol.wrap_data(channel, payload)
        self._enqueue(listeners, protocol.text_frame(payload))

    def _enqueue(self, listeners, frame):
        pending = self._pending
        for conn in listeners:
            frames = pending.get(conn)
            if frames is None:
                pending[conn] = [frame]
            else:
                frames.append(frame)
        self.stats.deliveries += len(listeners)
        self._batch_messages += 1
        if self._flush_handle is None:
            # Flush as soon as the reader waits for Redis; but no sooner than
            # min_flush_interval after the previous flush, so that under load
            # batches grow and the writes per message fall.
            wait = self._last_flush + self.min_flush_interval - self._loop.time()
            if wait > 0:
                self._flush_handle = self._loop.call_later(wait, self._flush)
            else:
                self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self):
        """Write every connection's frames of this batch, one write each."""
        self._flush_handle = None
        self._last_flush = self._loop.time()
        pending, self._pending = self._pending, {}
        stats = self.stats
        stats.batches += 1
        if len(stats.batch_sizes) < 100_000:
            stats.batch_sizes.append(self._batch_messages)
        self._batch_messages = 0
        sent = 0
        for conn, frames in pending.items():
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            sent += len(data)
            try:
                conn.write_frames(data)
            except Exception:
                log.exception("delivery to %r failed", conn)
        stats.bytes_sent += sent

    async def _sync_loop(self):
        """Keep the upstream subscriptions equal to the streams with listeners."""
        while self._running:
            await self._dirty.wait()
            self._dirty.clear()
            await self._connected.wait()
            conn = self._conn
            wanted = set(self.streams)
            add = wanted - self._upstream
            drop = self._upstream - wanted
            try:
                if add:
                    self._upstream |= add
                    await conn.send_command("SUBSCRIBE", *add, check_health=False)
                if drop:
                    self._upstream -= drop
                    await conn.send_command("UNSUBSCRIBE", *drop, check_health=False)
            except (*_UPSTREAM_ERRORS, RedisError) as exc:
                if conn is self._conn:
                    await self._lost(exc)
                self._dirty.set()

    async def _ping_loop(self):
        """PING the pub/sub connection; a missing PONG means it is dead."""
        while self._running:
            await asyncio.sleep(self.ping_interval)
            conn = self._conn
            if conn is None or not self._connected.is_set():
                continue
            try:
                await conn.send_command("PING", check_health=False)
            except (*_UPSTREAM_ERRORS, RedisError) as exc:
                if conn is self._conn:
                    await self._lost(exc)
                continue
            if time.monotonic() - self._last_pong > self.ping_interval + self.ping_timeout:
                if conn is self._conn:
                    await self._lost(None)
