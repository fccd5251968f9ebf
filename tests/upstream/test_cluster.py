"""Cluster and Sentinel discovery (marketstream.upstream.cluster) against
real Redis Cluster and Sentinel topologies (tests/redis_topology.py)."""

import asyncio
import time

import pytest

from marketstream.upstream.cluster import (
    SentinelWatcher,
    cluster_primaries,
    key_slot,
    sentinel_primary,
)
from marketstream.upstream.urls import node_label
from marketstream.testing import async_wait_until
from tests.redis_topology import cluster, redis_cluster, redis_sentinel, sentinel  # noqa: F401


def in_thread(func, *args):
    """Run a blocking topology operation without stalling the event loop."""
    return asyncio.get_running_loop().run_in_executor(None, func, *args)


# --- slots and discovery --------------------------------------------------------


def test_key_slot_matches_the_cluster(cluster):
    node = cluster.nodes[0]
    for name in ["trade.SOL_USDC", "depth.BTC_USDT", "{trade.SOL_USDC}:seq", "x{}y", "a{b}c", "é"]:
        assert key_slot(name) == node.call("CLUSTER", "KEYSLOT", name)
    assert key_slot("{trade.SOL_USDC}:log") == key_slot("trade.SOL_USDC")


@pytest.mark.gen_test(timeout=30)
async def test_cluster_primaries_asks_the_first_seed_that_answers(cluster):
    dead = ("127.0.0.1", 1)
    primaries = await cluster_primaries([dead] + cluster.seeds)
    expected = {node.addr: ranges for node, ranges in cluster.primaries().items()}
    assert primaries == expected
    assert sum(end - start + 1 for ranges in primaries.values() for start, end in ranges) == 16384
    with pytest.raises(Exception, match="no cluster seed answered"):
        await cluster_primaries([dead], timeout=0.5)


# --- Sentinel -------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_sentinel_primary_follows_a_failover(sentinel):
    dead = ("127.0.0.1", 1)
    seeds = [dead] + sentinel.seeds
    assert await sentinel_primary(seeds, sentinel.service) == sentinel.primary().addr
    with pytest.raises(Exception, match="no sentinel could name"):
        await sentinel_primary(sentinel.seeds, "nosuchservice")

    old, new = await in_thread(sentinel.failover)
    promoted = time.monotonic()

    async def current():
        try:
            return await sentinel_primary(seeds, sentinel.service, timeout=0.5)
        except Exception:
            return None

    found = None
    while found != new.addr:
        assert time.monotonic() - promoted < 2.0, "still %r" % (found,)
        found = await current()
        await asyncio.sleep(0.02)
    assert node_label(found) == new.label and new is not old


@pytest.mark.gen_test(timeout=60)
async def test_sentinel_watcher_announces_the_new_primary(sentinel):
    switches = []
    watcher = SentinelWatcher(
        sentinel.seeds + [("127.0.0.1", 1)],
        sentinel.service,
        lambda addr: switches.append((time.monotonic(), addr)),
    )
    await watcher.start()
    try:
        await async_wait_until(
            lambda: sum(watcher.connected.values()) == 3, message="watching every live sentinel"
        )
        old, new = await in_thread(sentinel.failover)
        promoted = time.monotonic()
        await async_wait_until(lambda: switches, timeout=2, message="+switch-master")
        assert [addr for _, addr in switches] == [new.addr]  # once, though 3 sentinels tell
        assert switches[0][0] - promoted < 2.0
        assert watcher.primary == new.addr
    finally:
        await watcher.stop()
