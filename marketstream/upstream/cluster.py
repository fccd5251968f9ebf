"""Redis Cluster and Sentinel topology: asking the nodes.

Discovery::

    slot = key_slot("trade.SOL_USDC")                       # 0..16383, {hash tags} honoured
    primaries = await cluster_primaries([("10.0.0.1", 7000)])
    # {("10.0.0.1", 7000): [(0, 5460)], ("10.0.0.2", 7000): [(5461, 10922)], ...}
    table = await cluster_topology(("10.0.0.1", 7000))     # a SlotTable (slots.py)
    host, port = await sentinel_primary([("10.0.0.1", 26379)], "prices")

and :class:`SentinelWatcher`, which follows ``+switch-master``.  The slot
table itself is :mod:`~marketstream.upstream.slots`; the Cluster pub/sub
link, one connection per primary, is :mod:`~marketstream.upstream.shards`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any
import redis.asyncio
import redis.asyncio.connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from marketstream.upstream.clients import REDIS_ERRORS, Reply
from marketstream.upstream.link import ConnectionClass, PubSubConnection
from marketstream.upstream.slots import Address, Ranges, SlotTable, key_slot
from marketstream.upstream.urls import ConnectionOptions, node_label

__all__ = [
    "CONNECTION_DROP",
    "node_target",
    "SentinelWatcher",
    "cluster_primaries",
    "cluster_topology",
    "first_topology",
    "key_slot",
    "sentinel_primary",
]

log = logging.getLogger(__name__)


# --- connections ---------------------------------------------------------------

#: Options of a URL that a raw connection to one node does not take.
CONNECTION_DROP = (
    "max_connections",
    "health_check_interval",
    "protocol",
    "socket_timeout",
    "decode_responses",
    "db",
)


def node_target(
    addr: Address, conn_kwargs: ConnectionOptions
) -> tuple[ConnectionClass, ConnectionOptions]:
    """The connection class and options of a raw connection to the node
    ``addr`` (``conn_kwargs``: the URL's)::

        cls, kwargs = node_target(("10.0.0.1", 7000), {"password": "pw", "ssl": True})
        # (SSLConnection, {"password": "pw", "host": "10.0.0.1", "port": 7000})
    """
    kwargs = {k: v for k, v in conn_kwargs.items() if k not in CONNECTION_DROP}
    cls: ConnectionClass = redis.asyncio.Connection
    if kwargs.pop("ssl", False):
        cls = redis.asyncio.SSLConnection
    kwargs.update(host=addr[0], port=addr[1])
    return cls, kwargs


def _connection(
    addr: Address, conn_kwargs: ConnectionOptions, timeout: float | None
) -> redis.asyncio.connection.AbstractConnection:
    """A raw RESP2 connection (not yet connected) to ``addr``; no read
    timeout, no retries: the caller owns liveness and reconnects."""
    cls, kwargs = node_target(addr, conn_kwargs)
    kwargs = {"socket_connect_timeout": timeout, "socket_keepalive": True, **kwargs}
    return cls(
        socket_timeout=None,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        protocol=2,
        **kwargs,
    )


async def _ask(
    addr: Address, conn_kwargs: ConnectionOptions, timeout: float, *commands: tuple[str, ...]
) -> list[Reply]:
    """Send ``commands`` to ``addr`` on a fresh connection; the replies (an
    error reply comes back as its ResponseError)."""
    conn = _connection(addr, conn_kwargs, timeout)

    async def exchange() -> list[Reply]:
        await conn.connect()
        await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        replies: list[Reply] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies

    try:
        return await asyncio.wait_for(exchange(), timeout)
    finally:
        await conn.disconnect(nowait=True)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def cluster_topology(
    addr: Address,
    *,
    timeout: float = 1.0,
    **conn_kwargs: Any,  # Any: redis-py's options (see ConnectionOptions)
) -> SlotTable:
    """Ask one node for the slot table (and every node it knows of).

    Uses CLUSTER SHARDS (Redis >= 7), else CLUSTER SLOTS.  Raises RedisError
    or OSError when the node cannot answer."""
    (reply,) = await _ask(addr, conn_kwargs, timeout, ("CLUSTER", "SHARDS"))
    if not isinstance(reply, ResponseError):
        return SlotTable.from_shards(reply, addr, tls=bool(conn_kwargs.get("ssl")))
    if "unknown" not in str(reply).lower():
        raise reply
    (reply,) = await _ask(addr, conn_kwargs, timeout, ("CLUSTER", "SLOTS"))
    if isinstance(reply, ResponseError):
        raise reply
    return SlotTable.from_slots(reply, addr)


async def first_topology(
    candidates: Iterable[Address],
    *,
    timeout: float = 1.0,
    **conn_kwargs: Any,  # Any: redis-py's options (see ConnectionOptions)
) -> SlotTable | None:
    """The slot table of the first of ``candidates`` that answers with one
    (``conn_kwargs``: connection options); None if none does."""
    tried = 0
    for addr in dict.fromkeys(candidates):
        tried += 1
        try:
            table = await cluster_topology(addr, timeout=timeout, **conn_kwargs)
        except REDIS_ERRORS as exc:
            log.debug("topology from %s failed: %s", node_label(addr), exc)
            continue
        if table.primaries:
            return table
    log.warning("no cluster node answered a topology request (tried %d)", tried)
    return None


async def cluster_primaries(
    seeds: Iterable[Address],
    *,
    timeout: float = 1.0,
    **conn_kwargs: Any,  # Any: redis-py's options (see ConnectionOptions)
) -> Ranges:
    """The primaries of a cluster and the slot ranges each owns, asked of
    the first seed that answers::

        primaries = await cluster_primaries([("127.0.0.1", 7000)], password="pw")
        # {("127.0.0.1", 7000): [(0, 5460)], ...}

    ``conn_kwargs`` are connection options (``password``, ``username``,
    ``ssl`` ...; see :meth:`marketstream.upstream.urls.RedisURL.connection_kwargs`).
    Raises ``redis.exceptions.ConnectionError`` when no seed answers."""
    errors: list[str] = []
    for addr in seeds:
        addr = (addr[0], int(addr[1]))
        try:
            table = await cluster_topology(addr, timeout=timeout, **conn_kwargs)
            return table.ranges()
        except REDIS_ERRORS as exc:
            errors.append("%s: %s" % (node_label(addr), exc or type(exc).__name__))
    raise redis.exceptions.ConnectionError("no cluster seed answered (%s)" % "; ".join(errors))


async def sentinel_primary(
    seeds: Iterable[Address],
    service: str,
    *,
    timeout: float = 1.0,
    verify: bool = True,
    sentinel_kwargs: ConnectionOptions | None = None,
    **conn_kwargs: Any,  # Any: redis-py's options (see ConnectionOptions)
) -> Address:
    """The primary's address of ``service`` as the sentinels name it::

        host, port = await sentinel_primary([("127.0.0.1", 26379)], "mymaster")

    Sentinels are asked in turn (``SENTINEL GET-MASTER-ADDR-BY-NAME``); with
    ``verify`` the named node must also answer ``ROLE`` with ``master``
    (``conn_kwargs`` are its connection options), else the next sentinel is
    asked.  Raises ``redis.exceptions.ConnectionError`` if none can tell."""
    errors: list[str] = []
    for addr in seeds:
        addr = (addr[0], int(addr[1]))
        try:
            (reply,) = await _ask(
                addr,
                sentinel_kwargs or {},
                timeout,
                ("SENTINEL", "GET-MASTER-ADDR-BY-NAME", service),
            )
            if isinstance(reply, ResponseError):
                raise reply
            if not reply:
                raise redis.exceptions.ResponseError("unknown service %r" % service)
            primary = (_text(reply[0]), int(reply[1]))
            if verify:
                (role,) = await _ask(primary, conn_kwargs, timeout, ("ROLE",))
                if isinstance(role, ResponseError):
                    raise role
                if _text(role[0]) != "master":
                    raise redis.exceptions.ConnectionError(
                        "%s named %s, which is a %s"
                        % (node_label(addr), node_label(primary), _text(role[0]))
                    )
            return primary
        except REDIS_ERRORS as exc:
            errors.append("%s: %s" % (node_label(addr), exc or type(exc).__name__))
    raise redis.exceptions.ConnectionError(
        "no sentinel could name the primary of %r (%s)" % (service, "; ".join(errors))
    )


class SentinelWatcher:
    """Follows ``+switch-master`` of one service on every sentinel::

        def on_switch(primary: tuple[str, int]): ...   # drop the link, reconnect there
        watcher = SentinelWatcher([("10.0.0.1", 26379), ...], "prices", on_switch)
        await watcher.start()
        ...
        await watcher.stop()

    One pub/sub connection per sentinel (a :class:`_SentinelWatch`, the
    package's one connection implementation: backoff, PING).
    ``on_switch`` is called once per new primary address (every sentinel
    announces the same switch), from the event loop, and must not block.
    After a forced failover (``SENTINEL FAILOVER``) the old primary keeps
    running as a primary until a sentinel reconfigures it, which can take
    10 s: a subscriber still connected there would hear nothing and notice
    nothing, so follow this event rather than waiting for the link to fail.
    """

    def __init__(
        self,
        seeds: Iterable[Address],
        service: str,
        on_switch: Callable[[Address], object],
        *,
        sentinel_kwargs: ConnectionOptions | None = None,
        connect_timeout: float = 1.0,
        backoff_min: float = 0.05,
        backoff_max: float = 1.0,
    ):
        self.seeds = [(host, int(port)) for host, port in seeds]
        self.service = service
        self.on_switch = on_switch
        self.sentinel_kwargs = dict(sentinel_kwargs or {})
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.primary: Address | None = None
        self.connected: dict[str, bool] = {node_label(a): False for a in self.seeds}
        self._watches: list[_SentinelWatch] = []

    async def start(self) -> None:
        """Start watching (returns at once; connections are made in the background)."""
        self._watches = [_SentinelWatch(self, addr) for addr in self.seeds]
        for watch in self._watches:
            watch.launch()

    async def stop(self) -> None:
        for watch in self._watches:
            await watch.stop()
        self._watches = []

    def _on_event(self, text: str) -> None:
        parts = text.split()
        if len(parts) != 5 or parts[0] != self.service:
            return
        primary = (parts[3], int(parts[4]))
        if primary == self.primary:
            return
        self.primary = primary
        log.warning("sentinel: %s switched to %s", self.service, node_label(primary))
        try:
            self.on_switch(primary)
        except Exception:
            log.exception("on_switch callback failed")


class _SentinelWatch(PubSubConnection):
    """The ``+switch-master`` subscription on one sentinel."""

    def __init__(self, watcher: SentinelWatcher, addr: Address) -> None:
        super().__init__(
            backoff_min=watcher.backoff_min,
            backoff_max=watcher.backoff_max,
            connect_timeout=watcher.connect_timeout,
        )
        self.watcher = watcher
        self.addr = addr
        self.node = node_label(addr)

    async def _target(self) -> tuple[ConnectionClass, ConnectionOptions]:
        return node_target(self.addr, self.watcher.sentinel_kwargs)

    async def _on_connected(self, conn: redis.asyncio.connection.AbstractConnection) -> None:
        await conn.send_command("SUBSCRIBE", "+switch-master", check_health=False)

    def _on_response(self, response: Reply) -> None:
        if type(response) is not list:
            if response == b"PONG":
                self._last_pong = time.monotonic()
        elif response[0] == b"message":
            self.watcher._on_event(_text(response[2]))
        elif response[0] == b"pong":
            self._last_pong = time.monotonic()

    def _on_restored(self, attempt: int) -> None:
        self.watcher.connected[self.node] = True

    def _on_lost(self, exc: BaseException | None) -> None:
        log.warning("sentinel %s: watch lost (%s)", self.node, exc or "no PING reply")
        self.watcher.connected[self.node] = False

    def _on_connect_failed(self, exc: BaseException, attempt: int, wait: float) -> None:
        log.debug("sentinel %s: cannot connect (%s)", self.node, exc)
