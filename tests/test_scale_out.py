"""Past one Redis, end to end: a marketstream server on a Redis Cluster
(sharded pub/sub) and on Sentinel, real WebSocket clients, publishers in
threads, and the topology broken under load (slot migration, a primary
killed, a shard gone silent, a Sentinel failover).

What a client must see, per stream:

* recoverable (published through :class:`~marketstream.publisher.Publisher`):
  every acknowledged message, in order, positions rising by exactly 1 - or,
  only where Redis itself lost acknowledged writes with a primary, the gap
  notice; never a silent hole;
* plain (an envelope sent with SPUBLISH / PUBLISH, as any engine does): in
  order, and the gap notice when its channel was interrupted.

The Redis topologies come from ``tests/redis_topology.py`` (Redis >= 7).
"""

import asyncio
import collections
import contextlib
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import tornado.httpclient
import tornado.websocket
import ujson

from marketstream.publisher import Publisher
from marketstream.upstream.clients import sync_client
from marketstream.upstream.cluster import key_slot
from marketstream.testing import async_wait_until, wait_until
from tests.helpers import ROOT, ServerProcess
from tests.redis_topology import cluster, redis_cluster, redis_sentinel, sentinel  # noqa: F401

# Short timers: a pub/sub link PINGs every 0.2 s and reconnects within 0.1 s.
FAST = {"redis__health_interval": "0.2", "redis__reconnect_max_delay": "0.1"}
RESUME_WITHIN = 2.0  # seconds after the topology settled / the promotion


def in_thread(func, *args):
    """Run a blocking call (topology changes) without stalling the server."""
    return asyncio.get_running_loop().run_in_executor(None, func, *args)


def token():
    """A fresh market prefix, so streams (and their histories) of one test
    never meet those of another on the shared topology."""
    return "T" + os.urandom(3).hex().upper()


@pytest.fixture
def start_server(server_on):
    """``await start_server(url)``: an in-process marketstream server on
    ``url``, with the FAST settings (stopped after the test)."""
    return lambda url, **overrides: server_on(url, **{**FAST, **overrides})


# --- clients ---------------------------------------------------------------------


class Client:
    """A WebSocket client that reads every frame in the background::

    client = await Client.connect(server, names)
    client.items(name)    # [(i, seq or None)] of the data frames, in arrival order
    client.gaps(name)     # the gap notices
    """

    def __init__(self, ws):
        self.ws = ws
        self.frames = collections.defaultdict(list)  # stream -> [(arrival, text, message)]
        self.closed = False
        self.task = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, server, names):
        ws = await tornado.websocket.websocket_connect(
            "ws://127.0.0.1:%d/ws" % server.settings.port
        )
        client = cls(ws)
        await ws.write_message(ujson.dumps({"method": "SUBSCRIBE", "params": list(names), "id": 1}))
        return client

    async def _read(self):
        while True:
            text = await self.ws.read_message()
            if text is None:
                self.closed = True
                return
            message = ujson.loads(text)
            if "stream" in message:
                self.frames[message["stream"]].append((time.monotonic(), text, message))

    def items(self, name):
        return [
            (m["data"]["i"], m.get("seq"))
            for _, _, m in self.frames[name]
            if m["data"].get("e") != "gap"
        ]

    def gaps(self, name):
        return [(when, m) for when, _, m in self.frames[name] if m["data"].get("e") == "gap"]

    def texts(self, name):
        return [text for _, text, m in self.frames[name] if m["data"].get("e") != "gap"]


async def subscribed(server, clients, names):
    """Wait until ``server`` has every client on every stream and Redis
    confirmed each channel."""
    names = set(names)
    await async_wait_until(
        lambda: (
            all(len(server.manager.streams.get(n, ())) == len(clients) for n in names)
            and names <= server.manager.upstream_channels
        ),
        message="%d stream(s) subscribed upstream" % len(names),
    )


async def http(server, path):
    """``(status, body text)`` of a GET on the server."""
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        "http://127.0.0.1:%d%s" % (server.settings.port, path), raise_error=False
    )
    return response.code, response.body.decode()


async def poll(fetch, check, timeout, message, interval=0.02):
    """Await ``fetch()`` until ``check(result)``; returns the result."""
    end = time.monotonic() + timeout
    while True:
        result = await fetch()
        if check(result):
            return result
        assert time.monotonic() < end, "timed out waiting for %s (last: %r)" % (message, result)
        await asyncio.sleep(interval)


async def health(server):
    code, body = await http(server, "/health")
    return code, ujson.loads(body)


async def link_up(server):
    """``{node: value}`` of ``marketstream_redis_link_up`` in /metrics."""
    _, text = await http(server, "/metrics")
    return {
        node: float(value)
        for node, value in re.findall(
            r'^marketstream_redis_link_up\{node="([^"]+)"\} (\S+)$', text, re.M
        )
    }


# --- publishers --------------------------------------------------------------------


def plain_envelope(stream, i):
    return ujson.dumps({"stream": stream, "data": {"e": "trade", "i": i}})


class Feeder(threading.Thread):
    """Publishes ``{"e": "trade", "i": n}`` (n = 0, 1, ...) on one stream
    from a thread until stopped, through failovers: a failed attempt is
    recorded and the next one gets the next ``n``.

    ``recoverable``: through :class:`Publisher` on ``url`` (positions and
    history); else an envelope with plain SPUBLISH (``sharded``) or PUBLISH.
    ``acked``: ``[(n, position or None, monotonic time)]`` of the publishes
    Redis acknowledged; ``failed``: ``[n]`` of those that raised (which may or
    may not have been published).  :meth:`pause` closes the client;
    publishing goes on with a new one after :meth:`resume`."""

    def __init__(self, url, stream, recoverable, sharded=True, interval=0.005):
        super().__init__(daemon=True)
        self.url = url
        self.stream = stream
        self.recoverable = recoverable
        self.sharded = sharded
        self.interval = interval
        self.acked = []
        self.failed = []
        self.errors = collections.Counter()
        self.halt = threading.Event()
        self.hold = threading.Event()  # pause asked
        self.idle = threading.Event()  # paused, client closed
        self.go = threading.Event()  # resume asked

    def _sender(self):
        if self.recoverable:
            publisher = Publisher(self.url, history=100_000, ttl=600)
            return publisher, lambda i: publisher.publish(self.stream, {"e": "trade", "i": i})
        client = sync_client(self.url, socket_timeout=1, socket_connect_timeout=0.5)
        command = client.spublish if self.sharded else client.publish
        return client, lambda i: command(self.stream, plain_envelope(self.stream, i)) and None

    def run(self):
        i = 0
        while not self.halt.is_set():
            closing, send = self._sender()
            with contextlib.closing(closing):
                while not self.halt.is_set() and not self.hold.is_set():
                    try:
                        seq = send(i)
                    except Exception as exc:
                        self.failed.append(i)
                        self.errors[type(exc).__name__] += 1
                        self.halt.wait(0.02)
                    else:
                        self.acked.append((i, seq, time.monotonic()))
                    i += 1
                    self.halt.wait(self.interval)
            if self.hold.is_set():
                self.idle.set()
                while not self.go.wait(0.05) and not self.halt.is_set():
                    pass
                self.hold.clear()
                self.go.clear()
                self.idle.clear()

    def pause(self):
        self.hold.set()
        assert self.idle.wait(10), "%s: publisher did not pause" % self.stream

    def resume(self):
        self.go.set()

    def acked_after(self, when):
        """The first acknowledged ``n`` published after ``when``."""
        for i, _, acked in self.acked:
            if acked >= when:
                return i
        return None

    def stop(self):
        self.halt.set()
        self.join(10)


async def flowing(client, feeder, count=10, timeout=5.0):
    """Wait until ``client`` received ``count`` messages of ``feeder``."""
    await async_wait_until(
        lambda: len(client.items(feeder.stream)) >= count,
        timeout=timeout,
        message="%s flowing" % feeder.stream,
    )


async def resumed(client, feeder, since, within=RESUME_WITHIN, grace=3.0):
    """Wait until ``client`` received a message of ``feeder`` that Redis
    acknowledged after ``since`` (on a plain stream the first ones may be
    lost before the resubscribe); returns the seconds it took from
    ``since`` (asserted below ``within``)."""
    end = since + within + grace  # fail with the measured time, not a timeout
    while True:
        first = feeder.acked_after(since)
        if first is not None:
            arrivals = [
                when
                for when, _, m in client.frames[feeder.stream]
                if m["data"].get("e") != "gap" and m["data"]["i"] >= first
            ]
            if arrivals:
                took = arrivals[0] - since
                assert took < within, "%s resumed %.2fs after the topology settled" % (
                    feeder.stream,
                    took,
                )
                return took
        assert time.monotonic() < end, (
            "%s never resumed (errors: %r; first acked after: %r, last acked: %r; "
            "last received: %r)"
            % (
                feeder.stream,
                feeder.errors,
                first,
                feeder.acked[-1:],
                client.frames[feeder.stream][-3:],
            )
        )
        await asyncio.sleep(0.01)


async def drained(client, feeders, timeout=5.0):
    """After the feeders stopped: wait until the last acknowledged message
    of each reached ``client``."""
    for feeder in feeders:
        last = feeder.acked[-1][0]
        await async_wait_until(
            lambda f=feeder, n=last: any(i == n for i, _ in client.items(f.stream)),
            timeout=timeout,
            message="the last message of %s" % feeder.stream,
        )


def logged(url, stream):
    """The ``n`` of the messages in a recoverable stream's Redis history."""
    with contextlib.closing(sync_client(url, socket_timeout=2)) as client:
        entries = client.xrange("{%s}:log" % stream)
    out = []
    for _, fields in entries:
        payload = fields[b"p"]
        out.append(ujson.loads(payload[payload.index(b" ") + 1 :])["data"]["i"])
    return out


def assert_recoverable(client, feeder, url=None):
    """Every acknowledged message, in order, positions +1 each, seq the
    frame's last key - or, where Redis lost acknowledged writes with a
    primary (checked in its history at ``url``), the gap notice; never a
    silent hole, never a position twice.

    A message may come twice at two positions when its history at ``url``
    holds it twice: redis-py's RedisCluster runs a call again when its
    connection dies with a primary, and the first run may have been
    replicated and published before the kill (the publisher's retry, not a
    delivery repeated)."""
    name = feeder.stream
    got = client.items(name)
    numbers = [i for i, _ in got]
    repeated = sorted({i for i in numbers if numbers.count(i) > 1})
    for i in repeated:
        positions = [seq for n, seq in got if n == i]
        assert len(set(positions)) == len(positions), "%s: %d delivered twice at %r" % (
            name,
            i,
            positions,
        )
        assert url is not None and logged(url, name).count(i) > 1, (
            "%s: %d repeated, published once: %r" % (name, i, numbers)
        )
    assert numbers == sorted(numbers), "%s out of order: %r" % (name, numbers)
    assert all(seq is not None for _, seq in got), "%s: a recoverable frame without seq" % name
    for text, (_, seq) in zip(client.texts(name), got):
        assert text.endswith(',"seq":%d}' % seq), text
    acked = [i for i, _, _ in feeder.acked if i >= numbers[0]]
    missing = sorted(set(acked) - set(numbers))
    extra = set(numbers) - set(acked) - set(feeder.failed)
    assert not extra, "%s: messages nobody published: %r" % (name, extra)
    gaps = client.gaps(name)
    if not gaps:
        assert not missing, "%s: acknowledged messages lost without a gap notice: %r" % (
            name,
            missing,
        )
        seqs = [seq for _, seq in got]
        holes = [(a, b) for a, b in zip(seqs, seqs[1:]) if b != a + 1]
        assert not holes, "%s: positions do not rise by 1: %r" % (name, holes)
    else:
        # Allowed only where Redis lost acknowledged writes (the replica
        # promoted had not received them).
        assert url is not None, "%s: a gap notice on a recoverable stream: %r" % (name, gaps)
        lost = set(acked) - set(logged(url, name))
        assert lost, "%s: gap notice %r though its history holds every message" % (name, gaps)


def assert_plain(client, feeder, gap_expected, reason="shard_interrupted"):
    name = feeder.stream
    numbers = [i for i, _ in client.items(name)]
    assert numbers == sorted(set(numbers)), "%s out of order or repeated: %r" % (name, numbers)
    assert all(seq is None for _, seq in client.items(name)), "%s: a plain frame with seq" % name
    gaps = client.gaps(name)
    if gap_expected:
        assert gaps, "%s: interrupted but no gap notice" % name
        for _, gap in gaps:
            assert gap["data"]["s"] == name.split(".")[1] and "seq" not in gap
            assert gap["data"]["reason"] == reason, gap
    else:
        assert not gaps, "%s: gap notice though its shard was not touched: %r" % (name, gaps)
        acked = [i for i, _, _ in feeder.acked if i >= numbers[0]]
        assert set(acked) <= set(numbers), "%s lost messages" % name


# --- cluster helpers --------------------------------------------------------------------


def owner_of(slot, primaries):
    for node, ranges in primaries.items():
        if any(start <= slot <= end for start, end in ranges):
            return node
    raise KeyError(slot)


def name_on(cluster, node, prefix, kind):
    """A stream name whose slot ``node`` (a primary) owns."""
    primaries = cluster.primaries()
    n = 0
    while True:
        name = "%s.%s%d_USDT" % (kind, prefix, n)
        if owner_of(key_slot(name), primaries) is node:
            return name
        n += 1


def name_in_slot(slot, prefix, kind="trade"):
    """A stream name whose channel hashes to ``slot``."""
    n = 0
    while True:
        name = "%s.%sX%d_USDT" % (kind, prefix, n)
        if key_slot(name) == slot:
            return name
        n += 1


def our_pubsub_connections(node):
    """CLIENT LIST entries (dicts) of pub/sub connections this test process
    has open to ``node``."""
    import psutil

    ports = {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == node.port
    }
    out = []
    for line in node.call("CLIENT", "LIST", "TYPE", "pubsub").splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if int(fields["addr"].rsplit(":", 1)[1]) in ports:
            out.append(fields)
    return out


# --- Redis Cluster ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_cluster_delivery_in_order_one_link_per_primary(cluster, start_server):
    """1002 streams over the 3 shards, half published through Publisher,
    half with plain SPUBLISH: every client (each subscribed to streams on
    every shard) gets every message once, in order, over one SSUBSCRIBE
    connection per primary; /health and the metrics show each node."""
    server = await start_server(cluster.url)
    prefix = token()
    primaries = cluster.primaries()
    per_shard = 334
    by_shard = {node: [] for node in primaries}  # 334 streams on each primary
    n = 0
    while any(len(names) < per_shard for names in by_shard.values()):
        name = "trade.%s%d_USDT" % (prefix, n)
        names = by_shard[owner_of(key_slot(name), primaries)]
        if len(names) < per_shard:
            names.append(name)
        n += 1
    names = [name for shard in by_shard.values() for name in shard]
    recoverable = set(names[::2])  # half of each shard through Publisher, half plain SPUBLISH
    clients = [await Client.connect(server, names) for _ in range(2)]
    await subscribed(server, clients, names)

    rounds = 3

    def publish():
        with (
            contextlib.closing(Publisher(cluster.url, history=100, ttl=600)) as publisher,
            contextlib.closing(sync_client(cluster.url)) as plain,
        ):
            assert publisher.sharded
            for i in range(rounds):
                for name in names:
                    if name in recoverable:
                        publisher.publish(name, {"e": "trade", "i": i})
                    else:
                        assert plain.spublish(name, plain_envelope(name, i)) == 1

    await in_thread(publish)

    await async_wait_until(
        lambda: all(len(c.items(name)) == rounds for c in clients for name in names),
        timeout=20,
        message="every message delivered to every client",
    )
    for client in clients:
        for name in names:
            items = client.items(name)
            assert [i for i, _ in items] == list(range(rounds)), name
            assert not client.gaps(name)
            if name in recoverable:
                seqs = [seq for _, seq in items]
                assert seqs == list(range(seqs[0], seqs[0] + rounds)), (name, seqs)
                assert client.texts(name)[0].endswith(',"seq":%d}' % seqs[0])
            else:
                assert all(seq is None for _, seq in items), name

    # Exactly one pub/sub connection per primary holds that shard's
    # channels (SSUBSCRIBE: ssub=, never sub=), over several slots.
    for node, shard in by_shard.items():
        assert len({key_slot(name) for name in shard}) > 1
        links = our_pubsub_connections(node)
        assert len(links) == 1, (node, links)
        assert links[0]["ssub"] == str(len(shard)) and links[0]["sub"] == "0", links[0]

    code, body = await health(server)
    assert code == 200 and body["redis"]["mode"] == "cluster", body
    nodes = body["redis"]["nodes"]
    assert set(nodes) == {node.label for node in by_shard}
    for node, shard in by_shard.items():
        assert nodes[node.label]["role"] == "primary"
        assert nodes[node.label]["state"] == "up"
        assert nodes[node.label]["channels"] == len(shard)
    assert await link_up(server) == {node.label: 1.0 for node in by_shard}
    assert all(not c.closed for c in clients)


@pytest.mark.gen_test(timeout=60)
async def test_cluster_slot_migration_while_publishing(cluster, start_server):
    """The slot of a busy recoverable stream moves to another primary while
    publishing: nothing is lost on it, the plain stream of that slot gets
    the gap notice, a stream on another shard is untouched, delivery is
    back within 2 s of the cluster settling."""
    server = await start_server(cluster.url)
    prefix = token()
    busy = "trade.%sR_USDT" % prefix  # recoverable, in the slot that moves
    slot = key_slot(busy)
    plain = name_in_slot(slot, prefix)  # plain, same slot
    source = cluster.owner(slot)
    others = [node for node in cluster.primaries() if node is not source]
    target = others[0]
    control = name_on(cluster, others[1], prefix, "depth")  # on an untouched shard
    feeders = [
        Feeder(cluster.url, busy, True),
        Feeder(cluster.url, plain, False),
        Feeder(cluster.url, control, True),
    ]
    names = [f.stream for f in feeders]
    clients = [await Client.connect(server, names) for _ in range(2)]
    await subscribed(server, clients, names)
    for feeder in feeders:
        feeder.start()
    try:
        for client in clients:
            for feeder in feeders:
                await flowing(client, feeder)

        await in_thread(cluster.migrate_slot, slot, target)
        await in_thread(cluster.wait_settled)
        settled = time.monotonic()
        assert cluster.owner(slot) is target
        for client in clients:
            await resumed(client, feeders[0], settled)
            await async_wait_until(
                lambda c=client: c.gaps(plain),
                timeout=RESUME_WITHIN,
                message="the gap notice on the plain stream",
            )
            await resumed(client, feeders[1], settled)
    finally:
        for feeder in feeders:
            feeder.stop()
    for client in clients:
        await drained(client, feeders)
        assert not client.closed
        assert_recoverable(client, feeders[0])  # no gap notice allowed: nothing was lost
        assert_plain(client, feeders[1], gap_expected=True)
        assert_recoverable(client, feeders[2])
    assert server.manager.link.node_of(busy) == target.label
    assert len(our_pubsub_connections(target)) == 1


@pytest.mark.gen_test(timeout=60)
async def test_cluster_primary_killed_replica_promoted(cluster, start_server):
    """kill -9 of a primary while publishing: /health 503 with the node down
    and its link_up metric 0; the replica is promoted, the server follows
    within 2 s, recoverable streams end complete (or with the gap notice
    where Redis lost the writes), plain ones get the gap notice, other
    shards are untouched."""
    server = await start_server(cluster.url)
    prefix = token()
    primaries = list(cluster.primaries())
    victim, spare = primaries[0], primaries[1]

    feeders = [
        Feeder(cluster.url, name_on(cluster, victim, prefix, "trade"), True),
        Feeder(cluster.url, name_on(cluster, victim, prefix, "depth"), False),
        Feeder(cluster.url, name_on(cluster, spare, prefix, "trade"), True),
        Feeder(cluster.url, name_on(cluster, spare, prefix, "depth"), False),
    ]
    names = [f.stream for f in feeders]
    clients = [await Client.connect(server, names) for _ in range(2)]
    await subscribed(server, clients, names)
    for feeder in feeders:
        feeder.start()
    try:
        for client in clients:
            for feeder in feeders:
                await flowing(client, feeder)

        victim.kill()
        # The dead shard is down in /health (503) and in the metrics.
        code, body = await poll(
            lambda: health(server), lambda r: r[0] == 503, timeout=2, message="/health 503"
        )
        assert body["redis"]["nodes"][victim.label]["state"] == "down", body
        assert body["redis"]["nodes"][spare.label]["state"] == "up", body
        links = await link_up(server)
        assert links[victim.label] == 0.0 and links[spare.label] == 1.0, links

        await in_thread(cluster.wait_settled)
        settled = time.monotonic()
        promoted = cluster.owner(key_slot(names[0]))
        assert promoted is not victim
        for client in clients:
            await resumed(client, feeders[0], settled)
            await async_wait_until(
                lambda c=client: c.gaps(names[1]),
                timeout=RESUME_WITHIN,
                message="the gap notice on the plain stream",
            )
            await resumed(client, feeders[1], settled)
        code, body = await poll(
            lambda: health(server),
            lambda r: r[0] == 200,
            timeout=RESUME_WITHIN,
            message="/health 200",
        )
        nodes = body["redis"]["nodes"]
        assert victim.label not in nodes and nodes[promoted.label]["state"] == "up", nodes
        links = await link_up(server)
        assert victim.label not in links and links[promoted.label] == 1.0, links
    finally:
        for feeder in feeders:
            feeder.stop()
    for client in clients:
        await drained(client, feeders)
        assert not client.closed
        assert_recoverable(client, feeders[0], url=cluster.url)
        assert_plain(client, feeders[1], gap_expected=True)
        assert_recoverable(client, feeders[2])
        assert_plain(client, feeders[3], gap_expected=False)


@pytest.mark.gen_test(timeout=60)
async def test_cluster_silent_shard_counts_as_down(cluster, start_server):
    """A primary that stops answering (SIGSTOP, no replica to take over) is
    down in /health and the metrics, and stays down while silent; when it
    answers again the clients, still connected, get what follows."""
    server = await start_server(cluster.url)
    prefix = token()
    primaries = list(cluster.primaries())
    victim = primaries[0]
    replicas = cluster.replicas_of(victim)
    recoverable = name_on(cluster, victim, prefix, "trade")
    plain = name_on(cluster, victim, prefix, "depth")
    client = await Client.connect(server, [recoverable, plain])
    await subscribed(server, [client], [recoverable, plain])
    with (
        contextlib.closing(Publisher(cluster.url, history=100, ttl=600)) as publisher,
        contextlib.closing(sync_client(cluster.url)) as plain_client,
    ):
        for i in range(3):
            await in_thread(publisher.publish, recoverable, {"e": "trade", "i": i})
            await in_thread(plain_client.spublish, plain, plain_envelope(plain, i))
        await async_wait_until(lambda: len(client.items(recoverable)) == 3, message="flowing")

        # No replica may take over: the shard stays silent (SIGSTOP keeps its
        # sockets open; nothing answers).
        for replica in replicas:
            replica.pause()
        victim.pause()
        paused = time.monotonic()
        try:
            code, body = await poll(
                lambda: health(server), lambda r: r[0] == 503, timeout=4, message="/health 503"
            )
            detected = time.monotonic() - paused
            assert body["redis"]["nodes"][victim.label]["state"] == "down", body
            assert (await link_up(server))[victim.label] == 0.0
            # It stays down while the shard is silent (no flapping back to 200).
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                code, body = await health(server)
                assert code == 503, "healthy again while %s is silent: %r" % (victim.label, body)
                await asyncio.sleep(0.05)
            assert not client.closed
        finally:
            victim.resume()
            for replica in replicas:
                replica.resume()
        await in_thread(cluster.wait_settled)
        await poll(
            lambda: health(server),
            lambda r: r[0] == 200,
            timeout=5,
            message="/health 200 after the shard is back",
        )
        for i in range(3, 6):
            await in_thread(publisher.publish, recoverable, {"e": "trade", "i": i})
            await in_thread(plain_client.spublish, plain, plain_envelope(plain, i))
    await async_wait_until(lambda: len(client.items(recoverable)) == 6, message="delivered again")
    await async_wait_until(
        lambda: any(i == 5 for i, _ in client.items(plain)), message="plain delivered again"
    )
    assert [i for i, _ in client.items(recoverable)] == list(range(6))
    assert not client.gaps(recoverable)
    assert client.gaps(plain), "the plain stream of the silent shard got no gap notice"
    assert {gap["data"]["reason"] for _, gap in client.gaps(plain)} == {"shard_interrupted"}
    # PING every 0.2 s, a link without PONG for 0.2 + 2 s (the server's
    # ping timeout) is down: noticed within one more tick.
    assert detected < 0.2 + 2.0 + 1.0, detected


@pytest.mark.gen_test(timeout=60)
async def test_feed_on_cluster(cluster, start_server):
    """``marketstream-feed --redis-url redis+cluster://...`` publishes with
    SPUBLISH and positions: a client gets its three streams with seq."""
    server = await start_server(cluster.url)
    market = token() + "_USDT"
    names = ["trade." + market, "depth." + market, "ticker." + market]
    client = await Client.connect(server, names)
    await subscribed(server, [client], names)
    feed = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "marketstream.demo.feed",
            "--redis-url",
            cluster.url,
            "--markets",
            market,
            "--rate",
            "50",
            "--duration",
            "20",
            "--seed",
            "1",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        await async_wait_until(
            lambda: (
                len(client.frames[names[0]]) >= 5
                and len(client.frames[names[1]]) >= 5
                and client.frames[names[2]]
                or feed.poll() is not None
            ),
            timeout=10,
            message="frames from marketstream-feed",
        )
        assert feed.poll() is None, feed.communicate()[0]
    finally:
        feed.terminate()
        output = feed.communicate(timeout=10)[0]
    assert feed.returncode == 0, output
    for name in names:
        seqs = [m["seq"] for _, _, m in client.frames[name]]
        assert seqs and all(isinstance(s, int) for s in seqs), (name, client.frames[name][:2])
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (name, seqs)
        assert all(m["stream"] == name for _, _, m in client.frames[name])
    assert not client.closed


# --- Sentinel --------------------------------------------------------------------------------


def replicated(sentinel):
    """Wait until the primary's replica holds every write (so a failover
    loses nothing)."""
    primary = sentinel.primary()

    def caught_up():
        offset = primary.client().info("replication")["master_repl_offset"]
        return all(
            node.client().info("replication").get("slave_repl_offset", -1) >= offset
            for node in sentinel.data
            if node is not primary and node.running
        )

    wait_until(caught_up, timeout=5, message="the replica caught up")


async def _sentinel_failover(sentinel, start_server, break_it, pause_publishers=False, grace=3.0):
    """Clients on a server on ``redis+sentinel://`` while a recoverable and
    a plain stream are published, then ``break_it()`` (a failover): the
    server resubscribes on the new primary within 2 s of the promotion,
    the clients stay connected and the publisher's messages keep reaching
    them (``pause_publishers``: none are sent during the failover, and new
    publishers are made after it)."""
    server = await start_server(sentinel.url)
    prefix = token()
    feeders = [
        Feeder(sentinel.url, "trade.%sR_USDT" % prefix, True, sharded=False),
        Feeder(sentinel.url, "depth.%sP_USDT" % prefix, False, sharded=False),
    ]
    names = [f.stream for f in feeders]
    clients = [await Client.connect(server, names) for _ in range(2)]
    await subscribed(server, clients, names)
    old = sentinel.primary()
    assert server.manager.link.node == old.label
    for feeder in feeders:
        feeder.start()
    try:
        for client in clients:
            for feeder in feeders:
                await flowing(client, feeder)
        if pause_publishers:
            for feeder in feeders:
                await in_thread(feeder.pause)
            await in_thread(replicated, sentinel)
        _, new = await in_thread(break_it)
        promoted = time.monotonic()
        for feeder in feeders:
            feeder.resume()
        await async_wait_until(
            lambda: (
                server.manager.link.node == new.label
                and set(names) <= server.manager.upstream_channels
            ),
            timeout=RESUME_WITHIN,
            message="the server resubscribed on the new primary %s" % new.label,
        )
        took = time.monotonic() - promoted
        code, body = await poll(
            lambda: health(server),
            lambda r: r[0] == 200,
            timeout=RESUME_WITHIN,
            message="/health 200",
        )
        assert body["redis"]["node"] == new.label, body
        assert await link_up(server) == {new.label: 1.0}
        # What the publisher sends after the promotion reaches the clients.
        for client in clients:
            await resumed(client, feeders[0], promoted, within=RESUME_WITHIN, grace=grace)
            # The plain publisher too: it asks the sentinels every 0.5 s, so
            # its first publishes after the promotion may still go to the old
            # primary (lost, and the clients get the gap notice); once one
            # arrives, so does everything after it.
            await resumed(client, feeders[1], promoted, within=RESUME_WITHIN + 1.0, grace=grace)
    finally:
        for feeder in feeders:
            feeder.stop()
    for client in clients:
        await drained(client, feeders)
        assert not client.closed
        assert_recoverable(client, feeders[0], url=sentinel.url)
        assert_plain(client, feeders[1], gap_expected=True, reason="link_outage")
    return took


@pytest.mark.gen_test(timeout=60)
async def test_sentinel_forced_failover(sentinel, start_server):
    """SENTINEL FAILOVER: the server moves to the new primary within 2 s; a
    publisher made after the promotion reaches the clients."""
    took = await _sentinel_failover(
        sentinel, start_server, sentinel.failover, pause_publishers=True
    )
    assert took < RESUME_WITHIN


@pytest.mark.gen_test(timeout=60)
async def test_sentinel_forced_failover_publisher_follows(sentinel, start_server):
    """SENTINEL FAILOVER while a Publisher runs: its messages after the
    promotion must reach the clients (it has to move to the new primary)."""
    await _sentinel_failover(sentinel, start_server, sentinel.failover, grace=0.5)


@pytest.mark.gen_test(timeout=60)
async def test_sentinel_primary_killed(sentinel, start_server):
    """kill -9 of the primary while publishing: the server and the
    Publisher follow the promotion; nothing is lost silently."""
    took = await _sentinel_failover(sentinel, start_server, sentinel.kill_primary)
    assert took < RESUME_WITHIN


@pytest.mark.gen_test(timeout=60)
async def test_sentinel_lost_writes_get_the_gap_notice(sentinel, start_server):
    """The replica promoted lacks the primary's last writes (its link was
    cut): positions restart below what clients already hold.  The defined
    outcome is the gap notice, not the reused positions passed off as the
    messages that follow."""
    server = await start_server(sentinel.url)
    name = "trade.%sL_USDT" % token()
    client = await Client.connect(server, [name])
    await subscribed(server, [client], [name])
    primary = sentinel.primary()
    replica = next(node for node in sentinel.data if node is not primary)
    with contextlib.closing(Publisher(sentinel.url, history=100, ttl=600)) as publisher:
        for i in range(3):
            await in_thread(publisher.publish, name, {"e": "trade", "i": i})
        await in_thread(replicated, sentinel)
        replica.call("REPLICAOF", "127.0.0.1", 1)  # cut off: later writes stay on the primary
        killed = False
        try:
            lost = [
                await in_thread(publisher.publish, name, {"e": "trade", "i": i})
                for i in range(3, 6)
            ]
            await async_wait_until(lambda: len(client.items(name)) == 6, message="live")
            await in_thread(sentinel.kill_primary)
            killed = True
        finally:
            if not killed:
                replica.call("REPLICAOF", "127.0.0.1", primary.port)

        async def publish_after():
            for _ in range(100):
                try:
                    return await in_thread(publisher.publish, name, {"e": "trade", "i": 6})
                except Exception:
                    await asyncio.sleep(0.05)

        seq = await publish_after()
        if seq is None or seq > lost[-1]:
            raise RuntimeError("the promoted replica had the writes after all: nothing to test")
        # A message published before the server resubscribed on the new
        # primary is announced by the gap notice, not delivered: keep
        # publishing until one after the failover arrives.
        i = 6
        deadline = time.monotonic() + 5
        while not any(n >= 6 for n, _ in client.items(name)):
            assert time.monotonic() < deadline, "no message after the failover arrived"
            await asyncio.sleep(0.2)
            if not any(n >= 6 for n, _ in client.items(name)):
                i += 1
                await in_thread(publisher.publish, name, {"e": "trade", "i": i})
    assert not client.closed
    gaps = client.gaps(name)
    assert gaps, "positions %r were reused after the failover without a gap notice: %r" % (
        lost,
        client.items(name),
    )
    assert {gap["data"]["reason"] for _, gap in gaps} == {"lost_writes"}, gaps
    # The gap notice comes before the first message of the new history.
    after = [when for when, _, m in client.frames[name] if m["data"].get("i", 0) >= 6][0]
    assert gaps[0][0] <= after


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",
        "redis+cluster:///",
        "bogus://127.0.0.1:6379",
        "redis+sentinel://127.0.0.1:26379",
    ],
)
def test_bad_redis_url_stops_start_up(url):
    """A bad [redis] url / REDIS_URL stops the server (and the feed) with
    exit code 2 and a message naming the setting."""
    by_flag = ServerProcess("--redis-url", url)
    by_env = ServerProcess(env={"REDIS_URL": url})
    feed = subprocess.run(
        [sys.executable, "-m", "marketstream.demo.feed", "--redis-url", url, "--duration", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    for process in (by_flag, by_env):
        try:
            assert process.proc.wait(15) == 2, process.output
        finally:
            process.stop()
        process._reader.join(5)
        assert "[redis] url" in process.output, process.output
        assert "Traceback" not in process.output, process.output
    assert "command line" in by_flag.output, by_flag.output
    assert "REDIS_URL" in by_env.output, by_env.output
    assert feed.returncode == 2, feed.stdout + feed.stderr
