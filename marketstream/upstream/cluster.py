"""Redis Cluster and Sentinel topology, and the sharded pub/sub link.

Discovery::

    slot = key_slot("trade.SOL_USDC")                       # 0..16383, {hash tags} honoured
    primaries = await cluster_primaries([("10.0.0.1", 7000)])
    # {("10.0.0.1", 7000): [(0, 5460)], ("10.0.0.2", 7000): [(5461, 10922)], ...}
    host, port = await sentinel_primary([("10.0.0.1", 26379)], "prices")

The cluster pub/sub link, :class:`ShardedSubscriber`, keeps ONE pub/sub
connection per primary and subscribes every channel with ``SSUBSCRIBE`` on
the primary that owns its slot (one command per slot: a multi-channel
``SSUBSCRIBE`` must stay inside one slot)::

    def on_message(channel: bytes, payload: bytes): ...       # per-channel order kept
    def on_resubscribed(channels: list[str]): ...             # back after an interruption
    def on_health(node: str, state: str): ...                 # "up" / "down" / "removed"

    sub = ShardedSubscriber([("10.0.0.1", 7000)], on_message, on_resubscribed, on_health)
    await sub.start()                  # discovers the primaries and connects to them
    sub.subscribe(["trade.SOL_USDC", "depth.SOL_USDC"])
    await sub.wait_subscribed(["trade.SOL_USDC"])
    sub.healthy                        # False while a shard holding channels is unreachable
    sub.links                          # {"10.0.0.1:7000": True, ...}
    sub.unsubscribe(["depth.SOL_USDC"])
    await sub.stop()

Everything runs on the event loop that called :meth:`ShardedSubscriber.start`;
the callbacks are plain functions called from that loop and must not block.
``on_message`` is called from the link's reader for each message the moment
it is parsed, in the order the shard sent them, without yielding to the loop
between the messages the shard has already sent: the caller can batch (queue
now, flush with ``loop.call_soon``) exactly as it does with one Redis.

Topology changes are found four ways: a shard pushes an unprompted
``sunsubscribe`` when it loses a slot (migration, failover); an
``SSUBSCRIBE`` answered with ``-MOVED`` (followed at once) or another
cluster error; a lost link (closed, refused, or no PONG within
``ping_interval + ping_timeout``); and a periodic ``CLUSTER SHARDS``.  Each
leads to a topology refresh (asked of the live primaries first, then any
node seen, then the seeds) and to resubscribing the affected channels on
their new owner, after which ``on_resubscribed`` names them: messages
published in between may be lost, recover them from history or tell the
clients.  ``on_resubscribed`` is called before any message of those
channels arrives on the new link.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot as _key_slot
from redis.exceptions import MovedError, ResponseError

from marketstream.upstream.clients import REDIS_ERRORS
from marketstream.upstream.confirmations import Confirmations
from marketstream.upstream.urls import RedisURL, node_label, parse_redis_url

__all__ = [
    "SentinelWatcher",
    "ShardedSubscriber",
    "cluster_primaries",
    "cluster_topology",
    "key_slot",
    "sentinel_primary",
]

log = logging.getLogger(__name__)

Address = tuple[str, int]
Ranges = dict[Address, list[tuple[int, int]]]  # primary -> its slot ranges [(start, end)]
SLOTS = 16384


def key_slot(name: str | bytes) -> int:
    """The Redis Cluster slot of a key or sharded channel::

    >>> key_slot("trade.SOL_USDC") == key_slot("{trade.SOL_USDC}:seq")
    True
    """
    return _key_slot(name.encode() if isinstance(name, str) else name)


# --- connections ---------------------------------------------------------------

_DROP = (
    "max_connections",
    "health_check_interval",
    "protocol",
    "socket_timeout",
    "decode_responses",
    "db",
)


def _connection(
    addr: Address, conn_kwargs: dict[str, Any], timeout: float | None
) -> redis.asyncio.Connection:
    """A raw RESP2 connection (not yet connected) to ``addr``; no read
    timeout, no retries: the caller owns liveness and reconnects."""
    kwargs: dict[str, Any] = dict(socket_connect_timeout=timeout, socket_keepalive=True)
    kwargs.update((k, v) for k, v in conn_kwargs.items() if k not in _DROP)
    cls: type[redis.asyncio.Connection]
    cls = redis.asyncio.SSLConnection if kwargs.pop("ssl", False) else redis.asyncio.Connection
    return cls(
        host=addr[0],
        port=addr[1],
        socket_timeout=None,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        protocol=2,
        **kwargs,
    )


async def _ask(
    addr: Address, conn_kwargs: dict[str, Any], timeout: float, *commands: tuple[str, ...]
) -> list[Any]:
    """Send ``commands`` to ``addr`` on a fresh connection; the replies (an
    error reply comes back as its ResponseError)."""
    conn = _connection(addr, conn_kwargs, timeout)

    async def exchange() -> list[Any]:
        await conn.connect()
        await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        replies: list[Any] = []
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


def _parse_shards(reply: list[Any], asked: Address, tls: bool) -> tuple[Ranges, list[Address]]:
    """CLUSTER SHARDS (RESP2) -> ({primary: [(start, end)]}, [every node])."""
    primaries: Ranges = {}
    nodes: list[Address] = []
    for shard in reply:
        shard = dict(zip(map(_text, shard[::2]), shard[1::2]))
        slots = [int(x) for x in shard.get("slots", ())]
        for node in shard.get("nodes", ()):
            info = dict(zip(map(_text, node[::2]), node[1::2]))
            host = _text(info.get("endpoint") or b"") or _text(info.get("ip") or b"")
            if host in ("", "?"):
                host = asked[0]
            port = int(info["tls-port"]) if tls and info.get("tls-port") else int(info["port"])
            addr = (host, port)
            nodes.append(addr)
            if _text(info.get("role")) == "master" and slots:
                primaries.setdefault(addr, []).extend(zip(slots[::2], slots[1::2]))
    return primaries, nodes


def _parse_slots(reply: list[Any], asked: Address) -> tuple[Ranges, list[Address]]:
    """CLUSTER SLOTS (RESP2) -> ({primary: [(start, end)]}, [every node])."""
    primaries: Ranges = {}
    nodes: list[Address] = []
    for entry in reply:
        start, end = int(entry[0]), int(entry[1])
        for i, node in enumerate(entry[2:]):
            host = _text(node[0]) or asked[0]
            if host == "?":
                host = asked[0]
            addr = (host, int(node[1]))
            nodes.append(addr)
            if i == 0:
                primaries.setdefault(addr, []).append((start, end))
    return primaries, nodes


async def cluster_topology(
    addr: Address, *, timeout: float = 1.0, **conn_kwargs: Any
) -> tuple[Ranges, list[Address]]:
    """Ask one node: ``({primary: sorted [(start, end)]}, [every node seen])``.

    Uses CLUSTER SHARDS (Redis >= 7), else CLUSTER SLOTS.  Raises RedisError
    or OSError when the node cannot answer."""
    tls = bool(conn_kwargs.get("ssl"))
    (reply,) = await _ask(addr, conn_kwargs, timeout, ("CLUSTER", "SHARDS"))
    if isinstance(reply, ResponseError):
        if "unknown" not in str(reply).lower():
            raise reply
        (reply,) = await _ask(addr, conn_kwargs, timeout, ("CLUSTER", "SLOTS"))
        if isinstance(reply, ResponseError):
            raise reply
        primaries, nodes = _parse_slots(reply, addr)
    else:
        primaries, nodes = _parse_shards(reply, addr, tls)
    for ranges in primaries.values():
        ranges.sort()
    return primaries, list(dict.fromkeys(nodes))


async def cluster_primaries(
    seeds: Iterable[Address], *, timeout: float = 1.0, **conn_kwargs: Any
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
            primaries, _ = await cluster_topology(addr, timeout=timeout, **conn_kwargs)
            return primaries
        except REDIS_ERRORS as exc:
            errors.append("%s: %s" % (node_label(addr), exc or type(exc).__name__))
    raise redis.exceptions.ConnectionError("no cluster seed answered (%s)" % "; ".join(errors))


async def sentinel_primary(
    seeds: Iterable[Address],
    service: str,
    *,
    timeout: float = 1.0,
    verify: bool = True,
    sentinel_kwargs: dict[str, Any] | None = None,
    **conn_kwargs: Any,
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

    One pub/sub connection per sentinel, reconnected with backoff.
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
        on_switch: Callable[[Address], Any],
        *,
        sentinel_kwargs: dict[str, Any] | None = None,
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
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Start watching (returns at once; connections are made in the background)."""
        self._tasks = [asyncio.ensure_future(self._watch(addr)) for addr in self.seeds]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []

    async def _watch(self, addr: Address) -> None:
        label = node_label(addr)
        delay = self.backoff_min
        while True:
            conn = _connection(addr, self.sentinel_kwargs, self.connect_timeout)
            try:
                await asyncio.wait_for(conn.connect(), self.connect_timeout)
                await conn.send_command("SUBSCRIBE", "+switch-master", check_health=False)
                self.connected[label] = True
                delay = self.backoff_min
                while True:
                    response = await conn.read_response()
                    if type(response) is list and response[0] == b"message":
                        self._on_event(_text(response[2]))
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                if self.connected[label]:
                    log.warning("sentinel %s: watch lost (%s)", label, exc)
                self.connected[label] = False
            finally:
                await conn.disconnect(nowait=True)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(self.backoff_max, delay * 2)

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


# --- the sharded pub/sub link ------------------------------------------------------

_SSUB, _SUNSUB, _PING = 0, 1, 2


class _Link:
    """One pub/sub connection to one primary."""

    __slots__ = (
        "addr",
        "label",
        "conn",
        "state",
        "assigned",
        "bnames",
        "pending",
        "last_pong",
        "task",
        "retired",
        "messages",
        "dropped",
        "connects",
        "seen",
    )

    def __init__(self, addr: Address) -> None:
        self.addr = addr
        self.label = node_label(addr)
        self.conn: redis.asyncio.Connection | None = None
        self.state = "connecting"  # "up", "down"
        self.assigned: dict[str, int] = {}  # channel -> slot, SSUBSCRIBE sent on this connection
        self.bnames: set[bytes] = set()  # the same channels as bytes (the reader's filter)
        # [kind, slot, names, replies left, resubscribed]
        self.pending: collections.deque[list[Any]] = collections.deque()
        self.last_pong = 0.0
        self.task: asyncio.Task[None] | None = None
        self.retired = False
        self.messages = 0  # messages delivered from this shard
        self.dropped = 0  # messages for channels no longer on this link
        self.connects = 0
        self.seen = 0  # messages at the previous PING tick


class ShardedSubscriber:
    """Sharded pub/sub over a Redis Cluster: one connection per primary.

    ``seeds``: ``[(host, port), ...]`` of cluster nodes.
    ``on_message(channel: bytes, payload: bytes)``: every message, in order
    per channel, called from the reader (must not block or raise).
    ``on_resubscribed(channels: list[str])``: channels that were subscribed,
    were interrupted (slot moved, shard failed over or unreachable) and are
    subscribed again; called before their first message on the new link.
    ``on_health(node: str, state: str)``: a link changed state; ``node`` is
    ``"host:port"``, ``state`` is ``"up"``, ``"down"`` (connection lost, no
    PONG, refused) or ``"removed"`` (no longer a primary).
    ``connection_kwargs``: credentials and TLS for the nodes (see
    :meth:`marketstream.upstream.urls.RedisURL.connection_kwargs`).
    A link is down when a PONG is older than ``ping_interval + ping_timeout``.
    Reconnects and topology refreshes back off from ``backoff_min`` to
    ``backoff_max`` seconds; the topology is re-read every
    ``refresh_interval`` seconds regardless.
    """

    def __init__(
        self,
        seeds: Iterable[Address],
        on_message: Callable[[bytes, bytes], Any],
        on_resubscribed: Callable[[list[str]], Any] | None = None,
        on_health: Callable[[str, str], Any] | None = None,
        *,
        connection_kwargs: dict[str, Any] | None = None,
        ping_interval: float = 1.0,
        ping_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        refresh_interval: float = 5.0,
        backoff_min: float = 0.05,
        backoff_max: float = 0.5,
    ):
        self.seeds = [(host, int(port)) for host, port in seeds]
        if not self.seeds:
            raise ValueError("ShardedSubscriber needs at least one seed node")
        self.on_message = on_message
        self.on_resubscribed = on_resubscribed
        self.on_health = on_health
        self.connection_kwargs = dict(connection_kwargs or {})
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self.refresh_interval = refresh_interval
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max

        self._wanted: dict[str, int] = {}  # channel -> slot
        self._assigned: dict[str, _Link] = {}  # channel -> link SSUBSCRIBE went to
        self._unassigned: dict[str, None] = {}  # wanted, not yet sent anywhere
        self._drops: dict[str, None] = {}  # unsubscribed, maybe still on a link
        self._confirmed: set[str] = set()
        self._interrupted: set[str] = set()  # confirmed once, lost since
        self._stranded: set[str] = set()  # wanted, owner unknown or unreachable
        self._confirmations = Confirmations()
        self._links: dict[Address, _Link] = {}
        self._owner: list[Address | None] = [None] * SLOTS
        self._nodes: list[Address] = []  # every node seen in the last topology
        self._moved: dict[int, int] = {}  # slot -> MOVED hops in a row
        self._rescan = False  # owners changed: check every assignment
        self._refresh_wanted = False
        self._refresh_delay = backoff_min
        self._last_refresh = 0.0
        self.refreshes = 0
        self.resubscribes = 0
        self._dirty: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_url(
        cls,
        url: str | RedisURL,
        on_message: Callable[[bytes, bytes], Any],
        on_resubscribed: Callable[[list[str]], Any] | None = None,
        on_health: Callable[[str, str], Any] | None = None,
        **kwargs: Any,
    ) -> ShardedSubscriber:
        """A subscriber for a ``redis+cluster://`` URL (str or RedisURL)."""
        desc = url if isinstance(url, RedisURL) else parse_redis_url(url)
        if desc.mode != "cluster":
            raise ValueError(
                "ShardedSubscriber needs a redis+cluster:// URL, not %s" % desc.redact()
            )
        kwargs.setdefault("connection_kwargs", desc.connection_kwargs())
        return cls(desc.seeds, on_message, on_resubscribed, on_health, **kwargs)

    # --- life cycle --------------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:
        """Read the topology and connect to every primary.  Raises
        ``redis.exceptions.ConnectionError`` if no seed answers, or no
        primary can be reached, within ``timeout``."""
        self._loop = loop = asyncio.get_running_loop()
        self._dirty = asyncio.Event()
        self._running = True
        deadline = loop.time() + timeout
        while not await self._refresh():
            if loop.time() > deadline:
                await self.stop()
                raise redis.exceptions.ConnectionError(
                    "no Redis Cluster node answered (seeds: %s)"
                    % ", ".join(map(node_label, self.seeds))
                )
            await asyncio.sleep(self.backoff_max)
        self._tasks = [
            asyncio.ensure_future(self._sync_loop()),
            asyncio.ensure_future(self._ping_loop()),
        ]
        while not all(link.state == "up" for link in self._links.values()):
            if loop.time() > deadline:
                if not any(link.state == "up" for link in self._links.values()):
                    await self.stop()
                    raise redis.exceptions.ConnectionError("no Redis Cluster primary reachable")
                log.warning(
                    "starting with unreachable shard(s): %s",
                    ", ".join(link.label for link in self._links.values() if link.state != "up"),
                )
                break
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Close every link and stop the background tasks."""
        self._running = False
        tasks = self._tasks + [link.task for link in self._links.values() if link.task]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []
        for link in self._links.values():
            if link.conn is not None:
                await link.conn.disconnect(nowait=True)
                link.conn = None
            link.state = "down"
        self._confirmed.clear()
        self._confirmations.fail_all()

    # --- state -------------------------------------------------------------------

    def _link_healthy(self, link: _Link, now: float) -> bool:
        return link.state == "up" and now - link.last_pong <= self.ping_interval + self.ping_timeout

    @property
    def healthy(self) -> bool:
        """False while a channel has no reachable owner, or a link that holds
        channels is down or silent."""
        if not self._running or self._stranded:
            return False
        now = time.monotonic()
        return all(self._link_healthy(link, now) for link in self._links.values() if link.assigned)

    @property
    def links(self) -> dict[str, bool]:
        """``{"host:port": healthy}`` for every primary."""
        now = time.monotonic()
        return {link.label: self._link_healthy(link, now) for link in self._links.values()}

    @property
    def channels(self) -> frozenset[str]:
        """Channels a shard confirmed subscribed."""
        return frozenset(self._confirmed)

    def node_of(self, name: str) -> str | None:
        """The node a channel is subscribed on (None while it is not)."""
        link = self._assigned.get(name)
        return link.label if link is not None else None

    def health(self) -> dict[str, dict[str, Any]]:
        """Per node: role, state (up/down/connecting), channels, messages,
        seconds since the last PONG."""
        now = time.monotonic()
        return {
            link.label: {
                "role": "primary",
                "state": ("up" if self._link_healthy(link, now) else "down")
                if link.state != "connecting"
                else "connecting",
                "channels": len(link.assigned),
                "messages": link.messages,
                "last_pong_seconds_ago": round(now - link.last_pong, 3) if link.last_pong else None,
            }
            for link in self._links.values()
        }

    # --- subscriptions -------------------------------------------------------------

    def subscribe(self, names: Iterable[str]) -> list[str]:
        """Want these channels; returns those newly added."""
        added = []
        for name in names:
            if name not in self._wanted:
                self._wanted[name] = key_slot(name)
                self._drops.pop(name, None)
                if name not in self._assigned:
                    self._unassigned[name] = None
                added.append(name)
        if added and self._dirty is not None:
            self._dirty.set()
        return added

    def unsubscribe(self, names: Iterable[str]) -> list[str]:
        """Stop wanting these channels; returns those removed."""
        removed = []
        for name in names:
            if self._wanted.pop(name, None) is not None:
                self._unassigned.pop(name, None)
                self._stranded.discard(name)
                self._interrupted.discard(name)
                if name in self._assigned:
                    self._drops[name] = None
                self._resolve(name, False)
                removed.append(name)
        if removed and self._dirty is not None:
            self._dirty.set()
        return removed

    async def wait_subscribed(self, names: Iterable[str], timeout: float = 5.0) -> bool:
        """Wait until every wanted channel in ``names`` is confirmed by its
        shard; False on timeout."""
        return await self._confirmations.wait(
            names, lambda name: name in self._wanted and name not in self._confirmed, timeout
        )

    def _resolve(self, name: str, ok: bool = True) -> None:
        self._confirmations.resolve(name, ok)

    # --- topology ------------------------------------------------------------------

    def _request_refresh(self) -> None:
        self._refresh_wanted = True
        if self._dirty is not None:
            self._dirty.set()

    async def _refresh(self) -> bool:
        """Read the topology from the first node that answers; apply it."""
        candidates = [link.addr for link in self._links.values() if link.state == "up"]
        candidates += self._nodes + self.seeds
        self.refreshes += 1
        for addr in dict.fromkeys(candidates):
            try:
                primaries, nodes = await cluster_topology(
                    addr, timeout=self.connect_timeout, **self.connection_kwargs
                )
            except REDIS_ERRORS as exc:
                log.debug("topology from %s failed: %s", node_label(addr), exc)
                continue
            if not primaries:
                continue
            self._apply(primaries, nodes)
            return True
        log.warning("no cluster node answered a topology request (tried %d)", len(candidates))
        return False

    def _apply(self, primaries: Ranges, nodes: list[Address]) -> None:
        owner: list[Address | None] = [None] * SLOTS
        for addr, ranges in primaries.items():
            for start, end in ranges:
                owner[start : end + 1] = [addr] * (end - start + 1)
        if owner != self._owner:
            self._owner = owner
            self._rescan = True
        self._nodes = nodes
        for addr in primaries:
            if addr not in self._links:
                self._add_link(addr)
        for addr in [a for a in self._links if a not in primaries]:
            self._retire(self._links.pop(addr))
        self._last_refresh = time.monotonic()

    def _add_link(self, addr: Address) -> _Link:
        link = _Link(addr)
        self._links[addr] = link
        link.task = asyncio.ensure_future(self._run_link(link))
        return link

    def _retire(self, link: _Link) -> None:
        log.warning("%s is no longer a primary; dropping its link", link.label)
        link.retired = True
        self._release(link)
        if link.task is not None:
            link.task.cancel()
        if link.conn is not None:
            conn, link.conn = link.conn, None
            asyncio.ensure_future(conn.disconnect(nowait=True))
        self._notify_health(link, "removed")

    def _release(self, link: _Link) -> None:
        """Every channel on ``link`` goes back to be placed again."""
        for name in link.assigned:
            if self._assigned.get(name) is link:
                del self._assigned[name]
                if name in self._confirmed:
                    self._confirmed.discard(name)
                    self._interrupted.add(name)
                if name in self._wanted:
                    self._unassigned[name] = None
                    self._stranded.add(name)
        link.assigned.clear()
        link.bnames.clear()
        link.pending.clear()

    def _notify_health(self, link: _Link, state: str) -> None:
        if self.on_health is not None:
            try:
                self.on_health(link.label, state)
            except Exception:
                log.exception("on_health callback failed")

    # --- the background tasks ----------------------------------------------------

    async def _sync_loop(self) -> None:
        """Refresh the topology when asked and place every channel."""
        dirty = self._dirty
        assert dirty is not None, "start() makes it"
        while self._running:
            await dirty.wait()
            dirty.clear()
            if self._refresh_wanted:
                wait = self._last_refresh + self._refresh_delay - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._refresh_wanted = False
                if not await self._refresh():
                    self._last_refresh = time.monotonic()
                    self._refresh_delay = min(self.backoff_max, self._refresh_delay * 2)
                    self._refresh_wanted = True
                    dirty.set()
            try:
                await self._place()
            except Exception:  # never let the placer die
                log.exception("placing channels failed")
            if self._stranded:
                # Owner unknown or unreachable: read the topology again, backing off.
                self._refresh_delay = min(self.backoff_max, self._refresh_delay * 2)
                self._request_refresh()
            else:
                self._refresh_delay = self.backoff_min

    async def _place(self) -> None:
        """Send SUNSUBSCRIBE/SSUBSCRIBE so that every wanted channel is on
        the link of its slot's owner, one command per slot."""
        unsub: dict[_Link, dict[int, list[str]]] = {}
        sub: dict[_Link, dict[int, list[str]]] = {}

        def drop(name: str, link: _Link) -> None:
            del self._assigned[name]
            slot = link.assigned.pop(name)
            link.bnames.discard(name.encode())
            if name in self._confirmed:
                self._confirmed.discard(name)
                if name in self._wanted:
                    self._interrupted.add(name)
            if link.state == "up":
                unsub.setdefault(link, {}).setdefault(slot, []).append(name)

        if self._drops:
            drops, self._drops = self._drops, {}
            for name in drops:
                link = self._assigned.get(name)
                if link is not None and name not in self._wanted:
                    drop(name, link)
        if self._rescan:
            self._rescan = False
            owner = self._owner
            for name, link in list(self._assigned.items()):
                if owner[link.assigned[name]] != link.addr:
                    drop(name, link)
                    self._unassigned[name] = None
        self._stranded = set()
        if self._unassigned:
            owner = self._owner
            waiting: dict[str, None] = {}
            for name in self._unassigned:
                slot = self._wanted[name]
                addr = owner[slot]
                link = self._links.get(addr) if addr is not None else None
                if link is None or link.state != "up":
                    waiting[name] = None
                    self._stranded.add(name)
                    continue
                self._assigned[name] = link
                link.assigned[name] = slot
                link.bnames.add(name.encode())
                sub.setdefault(link, {}).setdefault(slot, []).append(name)
            self._unassigned = waiting
        for link in set(unsub) | set(sub):
            if link.conn is None:
                # Lost while an earlier link's send yielded: whoever handled
                # the loss handed its channels back for placing; skip it.
                continue
            commands: list[tuple[str, ...]] = []
            for slot, names in unsub.get(link, {}).items():
                link.pending.append([_SUNSUB, slot, set(names), len(names), None])
                commands.append(("SUNSUBSCRIBE", *names))
            for slot, names in sub.get(link, {}).items():
                link.pending.append([_SSUB, slot, names, len(names), []])
                commands.append(("SSUBSCRIBE", *names))
            conn = link.conn
            try:
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            except REDIS_ERRORS as exc:
                await self._lost(link, conn, exc)

    async def _run_link(self, link: _Link) -> None:
        """Connect (with backoff), then read until the connection fails."""
        delay = self.backoff_min
        while self._running and not link.retired:
            conn = _connection(link.addr, self.connection_kwargs, self.connect_timeout)
            try:
                await asyncio.wait_for(conn.connect(), self.connect_timeout)
            except REDIS_ERRORS as exc:
                await conn.disconnect(nowait=True)
                if link.state != "down":
                    link.state = "down"
                    log.warning("cannot connect to %s: %s", link.label, exc or type(exc).__name__)
                    self._notify_health(link, "down")
                self._request_refresh()
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(self.backoff_max, delay * 2)
                continue
            delay = self.backoff_min
            link.conn = conn
            link.connects += 1
            link.last_pong = time.monotonic()
            link.pending.clear()
            link.state = "up"
            log.info("pub/sub link to %s up", link.label)
            self._notify_health(link, "up")
            assert self._dirty is not None, "start() makes it"
            self._dirty.set()
            try:
                await self._read(link, conn)
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                await self._lost(link, conn, exc)
            except Exception as exc:
                log.exception("unexpected error reading from %s", link.label)
                await self._lost(link, conn, exc)

    async def _lost(
        self, link: _Link, conn: redis.asyncio.Connection | None, reason: BaseException | str
    ) -> None:
        if link.conn is not conn or conn is None:
            return
        link.conn = None
        link.state = "down"
        log.warning(
            "pub/sub link to %s lost (%s); %d channel(s) to place again",
            link.label,
            reason or "no PING reply",
            len(link.assigned),
        )
        self._release(link)
        self._notify_health(link, "down")
        self._request_refresh()
        try:
            await conn.disconnect(nowait=True)
        except Exception:
            pass

    async def _read(self, link: _Link, conn: redis.asyncio.Connection) -> None:
        read = conn.read_response
        on_message = self.on_message
        bnames = link.bnames
        while True:
            try:
                response = await read()
            except ResponseError as exc:
                self._on_error(link, exc)
                continue
            # The hot path: one list test, one compare, one set lookup.
            if type(response) is list and response[0] == b"smessage":
                if response[1] in bnames:
                    link.messages += 1
                    try:
                        on_message(response[1], response[2])
                    except Exception:
                        log.exception("on_message callback failed")
                else:
                    link.dropped += 1
            else:
                self._on_reply(link, response)

    def _on_reply(self, link: _Link, response: Any) -> None:
        pending = link.pending
        head = pending[0] if pending else None
        if type(response) is not list:
            if response == b"PONG":
                link.last_pong = time.monotonic()
                if head is not None and head[0] == _PING:
                    pending.popleft()
            return
        kind = response[0]
        if kind == b"ssubscribe":
            name = response[1].decode()
            if head is None or head[0] != _SSUB:
                log.warning("%s: unexpected ssubscribe reply for %r", link.label, name)
                return
            head[3] -= 1
            if self._assigned.get(name) is link:
                self._confirmed.add(name)
                self._moved.pop(head[1], None)
                self._resolve(name)
                if name in self._interrupted:
                    self._interrupted.discard(name)
                    head[4].append(name)
            if head[3] == 0:
                pending.popleft()
                if head[4]:
                    self.resubscribes += len(head[4])
                    log.info("resubscribed %d channel(s) on %s", len(head[4]), link.label)
                    if self.on_resubscribed is not None:
                        try:
                            self.on_resubscribed(head[4])
                        except Exception:
                            log.exception("on_resubscribed callback failed")
        elif kind == b"sunsubscribe":
            name = response[1].decode()
            if head is not None and head[0] == _SUNSUB and name in head[2]:
                head[2].discard(name)
                head[3] -= 1
                if head[3] == 0:
                    pending.popleft()
                return
            # Unprompted: the shard lost this channel's slot.
            if self._assigned.get(name) is link:
                slot = link.assigned[name]
                log.info("%s gave up slot %d (sunsubscribe of %r)", link.label, slot, name)
                self._unplace(link, [name])
                if self._owner[slot] == link.addr:
                    self._owner[slot] = None
                self._request_refresh()
        elif kind == b"pong":
            link.last_pong = time.monotonic()
            if head is not None and head[0] == _PING:
                pending.popleft()

    def _unplace(self, link: _Link, names: Iterable[str]) -> None:
        for name in names:
            if self._assigned.get(name) is link:
                del self._assigned[name]
                link.assigned.pop(name, None)
                link.bnames.discard(name.encode())
                if name in self._confirmed:
                    self._confirmed.discard(name)
                    self._interrupted.add(name)
                if name in self._wanted:
                    self._unassigned[name] = None
                    self._stranded.add(name)

    def _on_error(self, link: _Link, exc: ResponseError) -> None:
        """An error reply: it answers the oldest command still pending."""
        if not link.pending:
            log.warning("%s: error reply with nothing pending: %s", link.label, exc)
            return
        entry = link.pending.popleft()
        kind, slot, names = entry[0], entry[1], entry[2]
        if kind != _SSUB:
            return  # SUNSUBSCRIBE of a slot it no longer has; PING while loading
        self._unplace(link, names)
        if isinstance(exc, MovedError):
            hops = self._moved.get(slot, 0) + 1
            self._moved[slot] = hops
            if hops <= 3:
                target = (exc.host or link.addr[0], exc.port)
                log.info("slot %d moved from %s to %s", slot, link.label, node_label(target))
                self._owner[slot] = target
                if target not in self._links:
                    self._add_link(target)
                self._stranded.update(n for n in names if n in self._wanted)
                self._request_refresh()  # learn the rest of the new layout too
                return
        log.warning(
            "%s refused SSUBSCRIBE for slot %d (%s); reading the topology again",
            link.label,
            slot,
            exc,
        )
        self._owner[slot] = None
        self._request_refresh()

    async def _ping_loop(self) -> None:
        """PING every link; a PONG older than ping_interval + ping_timeout
        marks it down.  Re-read the topology every refresh_interval."""
        while self._running:
            await asyncio.sleep(self.ping_interval)
            now = time.monotonic()
            for link in list(self._links.values()):
                conn = link.conn
                if conn is None or link.state != "up":
                    continue
                if link.messages != link.seen:
                    # Messages read since the last tick: alive, even if a
                    # PONG waits behind a backlog.
                    link.seen = link.messages
                    link.last_pong = max(link.last_pong, now - self.ping_interval)
                if now - link.last_pong > self.ping_interval + self.ping_timeout:
                    # A busy loop may not have read a PONG that did arrive:
                    # let the readers run before calling the link dead.
                    for _ in range(3):
                        await asyncio.sleep(0)
                    late = time.monotonic() - link.last_pong
                    if late > self.ping_interval + self.ping_timeout and link.conn is conn:
                        await self._lost(link, conn, "no PONG for %.1fs" % late)
                        continue
                link.pending.append([_PING, None, None, 1, None])
                try:
                    await conn.send_command("PING", check_health=False)
                except REDIS_ERRORS as exc:
                    await self._lost(link, conn, exc)
            if now - self._last_refresh > self.refresh_interval:
                self._request_refresh()
