"""The Redis Cluster pub/sub link: one ``SSUBSCRIBE`` connection per primary.

:class:`ShardedSubscriber` keeps ONE pub/sub connection per primary (a
:class:`ShardLink`, built on :class:`~marketstream.upstream.link.PubSubConnection`
like every link: backoff, PING, 4 MB reads) and subscribes every channel
with ``SSUBSCRIBE`` on the primary that owns its slot; which channel goes
where is the :class:`~marketstream.upstream.placement.Placement`'s to say,
this module carries its commands out::

    link = ShardedSubscriber.from_url("redis+cluster://10.0.0.1:7000", manager)
    await link.start()      # reads the topology, connects to every primary
    link.changed()          # manager.take_changes() has news
    link.healthy            # False while a shard holding channels is unreachable
    link.links              # {"10.0.0.1:7000": True, ...}
    link.node_of("trade.SOL_USDC")   # "10.0.0.1:7000"
    await link.stop()

The listener (the ChannelManager; :class:`~marketstream.upstream.links.ClusterListener`)
hears ``on_message(channel, payload)`` from a shard's reader for each
message the moment it is parsed, in the order the shard sent them, without
yielding to the loop between the messages the shard has already sent;
``on_subscribed(name)`` when a shard confirms a channel;
``on_unsubscribed(name)`` when it is no longer wanted; and
``on_interrupted(names)`` for channels that were subscribed, were cut off
(slot moved, shard failed over or unreachable) and are subscribed again:
called before any message of those channels arrives on the new link;
messages published in between may be lost (recover them from history).

Topology changes are found four ways: a shard pushes an unprompted
``sunsubscribe`` when it loses a slot (migration, failover); an
``SSUBSCRIBE`` answered with ``-MOVED`` (followed at once) or another
cluster error; a lost link (closed, refused, or no PONG within
``ping_interval + ping_timeout``); and a periodic ``CLUSTER SHARDS``
(every ``refresh_interval``).  Each leads to a topology refresh (asked of
the live primaries first, then any node seen, then the seeds).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol, TypedDict, TypeVar

import redis.asyncio
import redis.asyncio.connection
import redis.exceptions
from redis.exceptions import ResponseError

from marketstream.upstream.clients import REDIS_ERRORS, Reply
from marketstream.upstream.cluster import first_topology, node_target
from marketstream.upstream.link import ConnectionClass, Listener, PubSubConnection
from marketstream.upstream.placement import (
    Close,
    Open,
    Output,
    Placement,
    Refresh,
    Resubscribed,
    Send,
    Shard,
    Subscribed,
)
from marketstream.upstream.slots import Address
from marketstream.upstream.urls import (
    ConnectionOptions,
    RedisURL,
    node_label,
    parse_redis_url,
    redact_url,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack is Python >= 3.11

__all__ = ["ClusterListener", "ShardLink", "ShardedSubscriber", "SubscriberOptions"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class ClusterListener(Listener, Protocol):
    """What a link reports to, with what only a cluster link reports."""

    def on_interrupted(self, names: list[str]) -> None: ...


class ShardLink(PubSubConnection):
    """The pub/sub connection to one primary; what it reads goes to its
    :class:`ShardedSubscriber` (messages straight to the listener)."""

    def __init__(self, owner: ShardedSubscriber, shard: Shard) -> None:
        super().__init__(
            owner.ping_interval,
            owner.ping_timeout,
            owner.backoff_min,
            owner.backoff_max,
            connect_timeout=owner.connect_timeout,
        )
        self.owner = owner
        self.addr = shard.addr
        self.label = self.node = node_label(shard.addr)
        self.bnames = shard.bnames  # the placement's filter: channels placed here
        self.state = "connecting"  # "up", "down"
        self.messages = 0  # messages delivered from this shard
        self.dropped = 0  # messages for channels no longer on this link
        self._seen = 0  # messages at the previous ping tick

    async def _target(self) -> tuple[ConnectionClass, ConnectionOptions]:
        return node_target(self.addr, self.owner.connection_kwargs)

    async def _read(self, conn: redis.asyncio.connection.AbstractConnection) -> None:
        read = conn.read_response
        on_message = self.owner.listener.on_message
        on_reply = self.owner.on_reply
        bnames = self.bnames
        while True:
            response = await read()
            # The hot path: one list test, one compare, one set lookup.
            if type(response) is list and response[0] == b"smessage":
                if response[1] in bnames:
                    self.messages += 1
                    try:
                        on_message(response[1], response[2])
                    except Exception:
                        log.exception("on_message failed")
                else:
                    self.dropped += 1
            else:
                on_reply(self, response)

    def _read_lately(self) -> bool:
        seen, self._seen = self._seen, self.messages
        return seen != self.messages or super()._read_lately()

    def pong(self) -> None:
        """A PONG was read."""
        self._last_pong = time.monotonic()

    def _on_error_reply(self, exc: ResponseError) -> bool:
        self.owner.execute(self.owner.placement.on_error(self.addr, exc))
        return True

    def _pinged(self) -> None:
        self.owner.placement.pinged(self.addr)

    def _on_restored(self, attempt: int) -> None:
        self.state = "up"
        log.info("pub/sub link to %s up", self.label)
        self.owner.link_up(self)

    def _on_lost(self, exc: BaseException | None) -> None:
        self.state = "down"
        log.warning(
            "pub/sub link to %s lost (%s); %d channel(s) to place again",
            self.label,
            exc or "no PING reply",
            len(self.bnames),
        )
        self.owner.link_lost(self)

    def _on_connect_failed(self, exc: BaseException, attempt: int, wait: float) -> None:
        if self.state != "down":
            self.state = "down"
            log.warning("cannot connect to %s: %s", self.label, exc or type(exc).__name__)
            self.log_state("down")
        self.owner.request_refresh()

    def log_state(self, state: str) -> None:
        """The node is ``"up"``, ``"down"`` or ``"removed"`` (no longer a primary)."""
        level = logging.WARNING if state != "up" else logging.INFO
        log.log(level, "Redis Cluster node %s is %s", self.label, state)

    async def send(self, commands: tuple[tuple[str, ...], ...]) -> None:
        """Send ``commands`` pipelined; a failure loses the connection."""
        conn = self._conn
        if conn is None:
            # Lost while an earlier send yielded: whoever handled the loss
            # handed its channels back for placing.
            return
        try:
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        except REDIS_ERRORS as exc:
            if conn is self._conn:
                await self._lost(exc)

    def health(self) -> dict[str, object]:
        state = self.state
        if state == "up" and not self.healthy:
            state = "down"
        return {
            "role": "primary",
            "state": state,
            "channels": len(self.bnames),
            "messages": self.messages,
            "last_pong_seconds_ago": self.last_pong_ago(),
        }


class SubscriberOptions(TypedDict, total=False):
    """The options of :class:`ShardedSubscriber` that
    :meth:`ShardedSubscriber.from_url` passes on."""

    connection_kwargs: ConnectionOptions | None
    ping_interval: float
    ping_timeout: float
    connect_timeout: float
    refresh_interval: float
    backoff_min: float
    backoff_max: float


class ShardedSubscriber:
    """Sharded pub/sub over a Redis Cluster: one connection per primary
    (see the module docstring).

    ``seeds``: ``[(host, port), ...]`` of cluster nodes; ``listener``: what
    the link reports to; ``connection_kwargs``: credentials and TLS for the
    nodes (see :meth:`marketstream.upstream.urls.RedisURL.connection_kwargs`).
    A link is down when a PONG is older than ``ping_interval + ping_timeout``.
    Reconnects and topology refreshes back off from ``backoff_min`` to
    ``backoff_max`` seconds; the topology is re-read every
    ``refresh_interval`` seconds regardless.
    """

    def __init__(
        self,
        seeds: Iterable[Address],
        listener: ClusterListener,
        *,
        url: str = "",
        connection_kwargs: ConnectionOptions | None = None,
        ping_interval: float = 1.0,
        ping_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        refresh_interval: float = 5.0,
        backoff_min: float = 0.05,
        backoff_max: float = 0.5,
    ) -> None:
        self.seeds = [(host, int(port)) for host, port in seeds]
        if not self.seeds:
            raise ValueError("ShardedSubscriber needs at least one seed node")
        self.listener = listener
        self.url = url or "redis+cluster://" + ",".join(map(node_label, self.seeds))
        self.connection_kwargs = dict(connection_kwargs or {})
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self.refresh_interval = refresh_interval
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.placement = Placement()
        self.links_by_addr: dict[Address, ShardLink] = {}
        self.refreshes = 0
        self.resubscribes = 0
        self._wanted: set[str] = set()
        self._refresh_wanted = False
        self._refresh_delay = backoff_min
        self._last_refresh = 0.0
        self._dirty = asyncio.Event()
        self._task: asyncio.Future[None] | None = None
        self._closing: set[asyncio.Future[None]] = set()  # links being stopped
        self._running = False

    @classmethod
    def from_url(
        cls,
        url: str | RedisURL,
        listener: ClusterListener,
        **kwargs: Unpack[SubscriberOptions],
    ) -> ShardedSubscriber:
        """A subscriber for a ``redis+cluster://`` URL (str or RedisURL)."""
        desc = url if isinstance(url, RedisURL) else parse_redis_url(url)
        if desc.mode != "cluster":
            raise ValueError(
                "ShardedSubscriber needs a redis+cluster:// URL, not %s" % desc.redact()
            )
        kwargs.setdefault("connection_kwargs", desc.connection_kwargs())
        return cls(desc.seeds, listener, url=desc.url, **kwargs)

    # --- life cycle --------------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:
        """Read the topology and connect to every primary.  Raises
        ``redis.exceptions.ConnectionError`` if no seed answers, or no
        primary can be reached, within ``timeout``."""
        loop = asyncio.get_running_loop()
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
        self._task = asyncio.ensure_future(self._sync_loop())
        self.changed()
        links = self.links_by_addr.values
        while not all(link.state == "up" for link in links()):
            if loop.time() > deadline:
                if not any(link.state == "up" for link in links()):
                    await self.stop()
                    raise redis.exceptions.ConnectionError("no Redis Cluster primary reachable")
                log.warning(
                    "starting with unreachable shard(s): %s",
                    ", ".join(link.label for link in links() if link.state != "up"),
                )
                break
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Close every link and stop the background task."""
        self._running = False
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in list(self._closing):  # links no longer primaries, closing
            await asyncio.gather(task, return_exceptions=True)
        for link in self.links_by_addr.values():
            await link.stop()
            link.state = "down"

    # --- what the ChannelManager reads --------------------------------------------

    @property
    def reconnects(self) -> int:
        """Channels subscribed again after an interruption, so far."""
        return self.resubscribes

    @property
    def connected(self) -> bool:
        return any(self.links.values())

    @property
    def healthy(self) -> bool:
        """False while a channel has no reachable owner, or a link that holds
        channels is down or silent."""
        if not self._running or self.placement.stranded:
            return False
        return all(link.healthy for link in self.links_by_addr.values() if link.bnames)

    @property
    def links(self) -> dict[str, bool]:
        """``{"host:port": healthy}`` for every primary."""
        return {link.label: link.healthy for link in self.links_by_addr.values()}

    @property
    def channels(self) -> frozenset[str]:
        """Channels a shard confirmed subscribed."""
        return frozenset(self.placement.confirmed)

    def node_of(self, name: str) -> str | None:
        """The node a channel is subscribed on (None while it is not)."""
        addr = self.placement.node_of(name)
        return node_label(addr) if addr is not None else None

    def health(self) -> dict[str, object]:
        """Per node: role, state (up/down/connecting), channels, messages,
        seconds since the last PONG."""
        nodes = {link.label: link.health() for link in self.links_by_addr.values()}
        return {"connected": self.connected, "mode": "cluster", "nodes": nodes}

    def redacted_url(self) -> str:
        return redact_url(self.url)

    # --- events in ----------------------------------------------------------------

    def changed(self) -> None:
        """The listener's wanted channels changed: place them soon."""
        held = self._wanted
        changes = self.listener.take_changes()
        add = [name for name, wanted in changes.items() if wanted and name not in held]
        drop = [name for name, wanted in changes.items() if not wanted and name in held]
        held.update(add)
        held.difference_update(drop)
        if drop:
            self.placement.unwant(drop)
            for name in drop:
                self.listener.on_unsubscribed(name)
        if add:
            self.placement.want(add)
        if add or drop:
            self._dirty.set()

    def on_reply(self, link: ShardLink, reply: Reply) -> None:
        """A reply that is not a message, read on ``link``."""
        if reply == b"PONG" or (type(reply) is list and reply[0] == b"pong"):
            link.pong()
        self.execute(self.placement.on_reply(link.addr, reply))

    def link_up(self, link: ShardLink) -> None:
        self.placement.link_up(link.addr)
        link.log_state("up")
        self._dirty.set()

    def link_lost(self, link: ShardLink) -> None:
        self.execute(self.placement.link_lost(link.addr))
        link.log_state("down")

    def request_refresh(self) -> None:
        self._refresh_wanted = True
        self._dirty.set()

    # --- commands out ---------------------------------------------------------------

    def execute(self, outputs: list[Output]) -> None:
        """Carry the placement's records out (events to the listener at once);
        only :meth:`Placement.place` asks to :class:`Send`, and the sync
        loop sends in order (see :meth:`_sync_loop`)."""
        for out in outputs:
            if isinstance(out, Subscribed):
                self._tell(self.listener.on_subscribed, out.name)
            elif isinstance(out, Resubscribed):
                self.resubscribes += len(out.names)
                log.info("resubscribed %d channel(s) on %s", len(out.names), node_label(out.node))
                self._tell(self.listener.on_interrupted, list(out.names))
            elif isinstance(out, Refresh):
                self.request_refresh()
            elif isinstance(out, Open):
                self._open(out.node)
            elif isinstance(out, Close):
                self._close(out.node)

    @staticmethod
    def _tell(event: Callable[[T], object], arg: T) -> None:
        """Call the listener from a reader: a failure is logged, the link reads on."""
        try:
            event(arg)
        except Exception:
            log.exception("the listener failed on %s", getattr(event, "__name__", event))

    def _open(self, addr: Address) -> None:
        shard = self.placement.shards[addr]
        link = self.links_by_addr[addr] = ShardLink(self, shard)
        link.launch()

    def _close(self, addr: Address) -> None:
        link = self.links_by_addr.pop(addr, None)
        if link is None:
            return
        log.warning("%s is no longer a primary; dropping its link", link.label)
        task = asyncio.ensure_future(link.stop())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        link.log_state("removed")

    # --- the background task ----------------------------------------------------------

    async def _sync_loop(self) -> None:
        """Refresh the topology when asked (and every ``refresh_interval``)
        and place every channel."""
        dirty = self._dirty
        while self._running:
            try:
                await asyncio.wait_for(dirty.wait(), self.refresh_interval)
            except asyncio.TimeoutError:
                pass
            dirty.clear()
            if time.monotonic() - self._last_refresh > self.refresh_interval:
                self._refresh_wanted = True
            if self._refresh_wanted:
                wait = self._last_refresh + self._refresh_delay - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._refresh_wanted = False
                if not await self._refresh():
                    self._last_refresh = time.monotonic()
                    self._refresh_delay = min(self.backoff_max, self._refresh_delay * 2)
                    self.request_refresh()
            try:
                await self._place()
            except Exception:  # never let the placer die
                log.exception("placing channels failed")

    async def _place(self) -> None:
        """Place every channel, send the commands in order."""
        outputs = self.placement.place()
        if Refresh() in outputs:
            # Owner unknown or unreachable: read the topology again, backing off.
            self._refresh_delay = min(self.backoff_max, self._refresh_delay * 2)
        else:
            self._refresh_delay = self.backoff_min
        self.execute(outputs)
        for out in outputs:
            # One send after the other, each written before the next (and
            # before the pinger's next PING): replies come back in the
            # order the placement recorded the commands.
            if isinstance(out, Send) and out.node in self.links_by_addr:
                await self.links_by_addr[out.node].send(out.commands)

    async def _refresh(self) -> bool:
        """Read the topology from the first node that answers (the live
        primaries first, then any node seen, then the seeds); apply it."""
        candidates = [link.addr for link in self.links_by_addr.values() if link.state == "up"]
        self.refreshes += 1
        table = await first_topology(
            candidates + self.placement.table.nodes + self.seeds,
            timeout=self.connect_timeout,
            **self.connection_kwargs,
        )
        if table is None:
            return False
        self.execute(self.placement.apply(table))
        self._last_refresh = time.monotonic()
        return True
