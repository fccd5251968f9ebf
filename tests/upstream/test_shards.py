"""The Redis Cluster pub/sub link (marketstream.upstream.shards.ShardedSubscriber)
against a real Redis Cluster (tests/redis_topology.py): one link per
primary, delivery in order, slot migration, MOVED, failover, silence."""

import asyncio
import collections
import contextlib
import time

import pytest

from marketstream.testing import async_wait_until
from marketstream.upstream.clients import async_client, sync_client
from marketstream.upstream.link import READ_SIZE
from marketstream.upstream.shards import ShardedSubscriber
from marketstream.upstream.slots import key_slot
from tests.redis_topology import cluster, redis_cluster  # noqa: F401
from tests.upstream.test_link import Listener

FAST = dict(ping_interval=0.2, ping_timeout=0.5, connect_timeout=0.5, backoff_max=0.25)


def in_thread(func, *args):
    """Run a blocking topology operation without stalling the event loop."""
    return asyncio.get_running_loop().run_in_executor(None, func, *args)


class Recorder(Listener):
    """The link's listener (the ChannelManager's side), recorded per channel."""

    def __init__(self):
        super().__init__()
        self.messages = collections.defaultdict(list)  # channel -> [payload]
        self.resubscribed = []  # (monotonic time, [channels])

    def want(self, names, wanted=True):
        for name in names:
            super().want(name, wanted)

    def on_message(self, channel, payload):
        self.messages[channel.decode()].append(payload)

    def on_interrupted(self, names):
        self.resubscribed.append((time.monotonic(), list(names)))

    def on_lost(self):
        raise AssertionError("a cluster link reports interruptions per channel")

    def on_restored(self, channels):
        raise AssertionError("a cluster link reports interruptions per channel")

    def resubscribed_at(self, channel, after=0.0):
        for when, channels in self.resubscribed:
            if when >= after and channel in channels:
                return when
        return None

    def subscriber(self, cluster, **kwargs):
        options = dict(FAST)
        options.update(kwargs)
        return ShardedSubscriber(cluster.seeds, self, **options)

    async def subscribe(self, sub, names, timeout=5):
        """Want ``names`` and wait for every confirmation (an event, once each)."""
        self.want(names)
        sub.changed()
        await async_wait_until(
            lambda: set(names) <= set(self.subscribed), timeout=timeout, message="confirmed"
        )


def channels_on_every_shard(cluster, per_shard, prefix="trade"):
    """``per_shard`` channel names for each primary: {Node: [names]}."""
    primaries = cluster.primaries()
    owners = {}
    for node, ranges in primaries.items():
        for start, end in ranges:
            for slot in range(start, end + 1):
                owners[slot] = node
    result = {node: [] for node in primaries}
    i = 0
    while any(len(names) < per_shard for names in result.values()):
        name = "%s.S%d_USDT" % (prefix, i)
        names = result[owners[key_slot(name)]]
        if len(names) < per_shard:
            names.append(name)
        i += 1
    return result


def pubsub_clients(node):
    """The sharded-pub/sub connections a node has (CLIENT LIST ssub > 0)."""
    listing = node.call("CLIENT", "LIST", "TYPE", "pubsub")
    return [line for line in listing.splitlines() if " ssub=" in line and " ssub=0" not in line]


class Publisher:
    """Publishes 0, 1, 2, ... on a channel through a RedisCluster client
    (which follows MOVED and failovers) until stopped."""

    def __init__(self, cluster, channel, interval=0.005):
        self.client = async_client(cluster.url, socket_timeout=1)
        self.channel = channel
        self.interval = interval
        self.sent = 0
        self.task = None

    def start(self):
        self.task = asyncio.ensure_future(self.run())
        return self

    async def run(self):
        while True:
            try:
                await self.client.spublish(self.channel, str(self.sent))
                self.sent += 1
            except Exception:
                pass  # the cluster is failing over: try again
            await asyncio.sleep(self.interval)

    async def stop(self):
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        await self.client.aclose()


def assert_in_order(payloads):
    seq = [int(p) for p in payloads]
    assert seq == sorted(set(seq)), "out of order or duplicated: %r" % seq[:50]


# --- delivery ---------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_channels_on_every_shard_delivered_once_and_in_order(cluster):
    rec = Recorder()
    sub = rec.subscriber(cluster)
    await sub.start()
    try:
        by_shard = channels_on_every_shard(cluster, 100)
        names = [name for names in by_shard.values() for name in names]
        await rec.subscribe(sub, names)
        assert sorted(rec.subscribed) == sorted(names)  # once each
        # One pub/sub connection per primary, each holding that shard's channels.
        for node, shard_names in by_shard.items():
            assert len(pubsub_clients(node)) == 1
            assert {sub.node_of(n) for n in shard_names} == {node.label}
        assert sub.links == {node.label: True for node in by_shard}
        assert sub.healthy

        rounds = 20

        def publish():  # interleaved across channels and shards, pipelined
            with contextlib.closing(sync_client(cluster.url)) as client:
                for i in range(rounds):
                    pipe = client.pipeline(transaction=False)
                    for name in names:
                        pipe.spublish(name, str(i))
                    assert pipe.execute() == [1] * len(names)

        await in_thread(publish)
        await async_wait_until(
            lambda: sum(map(len, rec.messages.values())) == rounds * len(names),
            timeout=10,
            message="every message delivered",
        )
        for name in names:
            assert rec.messages[name] == [str(i).encode() for i in range(rounds)]
        health = sub.health()["nodes"]
        for node, shard_names in by_shard.items():
            assert health[node.label]["messages"] == rounds * len(shard_names)
            assert health[node.label]["channels"] == len(shard_names)

        # Unsubscribing releases the channels upstream.
        rec.want(names[:10], False)
        sub.changed()
        assert rec.unsubscribed == names[:10]
        node = next(iter(by_shard))
        await async_wait_until(
            lambda: all(node.call("PUBSUB", "SHARDNUMSUB", n)[1] == 0 for n in names[:10]),
            message="channels released upstream",
        )
        assert not rec.resubscribed
    finally:
        await sub.stop()


# --- topology changes ----------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_slot_migration_resubscribes_on_the_new_owner(cluster):
    rec = Recorder()
    sub = rec.subscriber(cluster)
    await sub.start()
    publisher = None
    try:
        by_shard = channels_on_every_shard(cluster, 3)
        names = [n for ns in by_shard.values() for n in ns]
        await rec.subscribe(sub, names)
        busy = names[0]
        source = cluster.owner(key_slot(busy))
        target = next(node for node in by_shard if node is not source)
        publisher = Publisher(cluster, busy).start()
        await async_wait_until(lambda: len(rec.messages[busy]) > 20, message="busy stream flowing")

        await in_thread(cluster.migrate_slot, key_slot(busy), target)
        moved = time.monotonic()
        await in_thread(cluster.wait_settled)
        settled = time.monotonic()
        when = await async_wait_until(
            lambda: rec.resubscribed_at(busy, after=moved - 1),
            timeout=5,
            message="resubscribed after the migration",
        )
        assert when - settled < 2.0
        assert sub.node_of(busy) == target.label
        assert pubsub_clients(source) and len(pubsub_clients(target)) == 1  # still one link each

        count = len(rec.messages[busy])
        await async_wait_until(
            lambda: len(rec.messages[busy]) > count + 20,
            message="delivery continues from the new owner",
        )
        assert_in_order(rec.messages[busy])
        # Channels of other slots were not disturbed.
        assert all(busy in channels for _, channels in rec.resubscribed)
        assert sub.healthy
    finally:
        if publisher is not None:
            await publisher.stop()
        await sub.stop()


@pytest.mark.gen_test(timeout=60)
async def test_stale_slot_map_is_corrected_by_moved(cluster):
    rec = Recorder()
    sub = rec.subscriber(cluster, refresh_interval=60)
    await sub.start()
    try:
        # Move a slot nobody subscribes to: no sunsubscribe push, so the
        # subscriber's map is stale until a shard answers MOVED.
        name = "trade.MOVED_USDT"
        slot = key_slot(name)
        source = cluster.owner(slot)
        target = next(node for node in cluster.primaries() if node is not source)
        await in_thread(cluster.migrate_slot, slot, target)
        await in_thread(cluster.wait_settled)
        refreshes = sub.refreshes
        await rec.subscribe(sub, [name], timeout=2)
        assert sub.node_of(name) == target.label
        client = async_client(cluster.url)
        await client.spublish(name, "1")
        await client.aclose()
        await async_wait_until(lambda: rec.messages[name] == [b"1"], message="delivered")
        assert sub.refreshes >= refreshes
    finally:
        await sub.stop()


@pytest.mark.gen_test(timeout=60)
async def test_primary_killed_replica_promoted_resubscribes(cluster):
    rec = Recorder()
    sub = rec.subscriber(cluster)
    await sub.start()
    publisher = None
    try:
        by_shard = channels_on_every_shard(cluster, 5)
        names = [n for ns in by_shard.values() for n in ns]
        await rec.subscribe(sub, names)
        victim = next(iter(by_shard))
        lost = by_shard[victim]
        busy = lost[0]
        publisher = Publisher(cluster, busy).start()
        await async_wait_until(lambda: len(rec.messages[busy]) > 20, message="busy stream flowing")

        killed = time.monotonic()
        victim.kill()
        await async_wait_until(lambda: not sub.healthy, timeout=2, message="outage noticed")
        assert sub.health()["nodes"][victim.label]["state"] == "down"
        await in_thread(cluster.wait_settled)
        settled = time.monotonic()
        await async_wait_until(
            lambda: all(rec.resubscribed_at(n, killed) for n in lost),
            timeout=5,
            message="the lost shard's channels resubscribed",
        )
        assert max(rec.resubscribed_at(n, killed) for n in lost) - settled < 2.0
        new_owner = cluster.owner(key_slot(busy))
        assert {sub.node_of(n) for n in lost} == {new_owner.label}
        # Only the dead shard's channels were interrupted.
        assert {n for _, ns in rec.resubscribed for n in ns} == set(lost)
        count = len(rec.messages[busy])
        await async_wait_until(
            lambda: len(rec.messages[busy]) > count + 20,
            message="delivery continues from the promoted replica",
        )
        assert_in_order(rec.messages[busy])
        await async_wait_until(lambda: sub.healthy, timeout=2, message="healthy again")
        assert victim.label not in sub.links and victim.label not in sub.health()["nodes"]
    finally:
        if publisher is not None:
            await publisher.stop()
        await sub.stop()


@pytest.mark.gen_test(timeout=60)
async def test_silent_shard_detected_by_ping(cluster):
    rec = Recorder()
    sub = rec.subscriber(cluster)
    await sub.start()
    try:
        by_shard = channels_on_every_shard(cluster, 2)
        names = [n for ns in by_shard.values() for n in ns]
        await rec.subscribe(sub, names)
        victim = next(iter(by_shard))
        victim.pause()  # SIGSTOP: the TCP connection stays open, nothing answers
        paused = time.monotonic()
        await async_wait_until(
            lambda: not sub.links.get(victim.label, False),
            timeout=2,
            message="silent link counted as down",
        )
        detected = time.monotonic() - paused
        assert detected < sub.ping_interval * 2 + sub.ping_timeout + 0.3
        assert not sub.healthy
        assert sub.health()["nodes"][victim.label]["state"] == "down"
        # The cluster fails the silent node over; the subscriber follows.
        await in_thread(cluster.wait_settled)
        settled = time.monotonic()
        await async_wait_until(
            lambda: all(rec.resubscribed_at(n, paused) for n in by_shard[victim]),
            timeout=5,
            message="resubscribed on the promoted replica",
        )
        assert max(rec.resubscribed_at(n, paused) for n in by_shard[victim]) - settled < 2.0
        await async_wait_until(lambda: sub.healthy, timeout=2, message="healthy again")
    finally:
        await sub.stop()


@pytest.mark.gen_test(timeout=30)
async def test_start_fails_clearly_without_a_reachable_seed():
    sub = ShardedSubscriber([("127.0.0.1", 1)], Recorder(), **FAST)
    with pytest.raises(Exception, match="no Redis Cluster node answered"):
        await sub.start(timeout=0.5)


@pytest.mark.gen_test(timeout=60)
async def test_every_shard_link_reads_wide(cluster):
    """The shard links are the one connection implementation: 4 MB reads
    (widen_reads) on Cluster as on one server."""
    rec = Recorder()
    sub = rec.subscriber(cluster)
    await sub.start()
    try:
        links = list(sub.links_by_addr.values())
        assert len(links) == len(cluster.primaries())
        for link in links:
            assert link.widened
            assert link._conn._reader._limit == READ_SIZE
    finally:
        await sub.stop()


@pytest.mark.gen_test(timeout=60)
async def test_a_listener_failing_on_a_confirmation_costs_no_link(cluster):
    """The confirmation is an event called from the shard's reader: a
    listener that raises there is logged, and the link reads on."""

    class Failing(Recorder):
        def on_subscribed(self, name):
            super().on_subscribed(name)
            raise RuntimeError("listener bug")

    rec = Failing()
    sub = rec.subscriber(cluster)
    await sub.start()
    try:
        names = [n for ns in channels_on_every_shard(cluster, 2).values() for n in ns]
        await rec.subscribe(sub, names)
        client = async_client(cluster.url)
        try:
            for name in names:
                await client.spublish(name, "1")
        finally:
            await client.aclose()
        await async_wait_until(
            lambda: all(rec.messages[n] == [b"1"] for n in names), message="delivered"
        )
        assert sub.healthy and not rec.resubscribed
    finally:
        await sub.stop()
