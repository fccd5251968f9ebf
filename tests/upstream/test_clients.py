"""Real redis-py clients for each REDIS_URL mode (marketstream.upstream.clients):
one server over TCP and a Unix socket, Sentinel through a failover, Cluster
with sharded pub/sub."""

import asyncio
import contextlib
import os
import tempfile
import time

import redis
import redis.asyncio
import redis.cluster

from marketstream.testing import RedisServer, wait_until
from marketstream.upstream.clients import async_client, sync_client
from tests.redis_topology import cluster, redis_cluster, redis_sentinel, sentinel  # noqa: F401


def _sync_roundtrip(client, channel, publish, subscribe, receive):
    """Subscribe, publish once, return the payload received (or None)."""
    pubsub = client.pubsub()
    try:
        getattr(pubsub, subscribe)(channel)
        deadline = time.monotonic() + 5
        payload = None
        while payload is None and time.monotonic() < deadline:
            getattr(client, publish)(channel, "hello")
            message = getattr(pubsub, receive)(timeout=0.2)
            while message is not None and message["type"] not in ("message", "smessage"):
                message = getattr(pubsub, receive)(timeout=0.2)
            if message is not None:
                payload = message["data"]
        return payload
    finally:
        pubsub.close()


def test_single_server_clients(redis_url):
    client = sync_client(redis_url)
    try:
        assert isinstance(client, redis.Redis)
        assert (
            _sync_roundtrip(client, "trade.ONE_USDT", "publish", "subscribe", "get_message")
            == b"hello"
        )
    finally:
        client.close()

    async def roundtrip():
        aclient = async_client(redis_url, decode_responses=True)
        assert isinstance(aclient, redis.asyncio.Redis)
        pubsub = aclient.pubsub()
        await pubsub.subscribe("trade.ONE_USDT")
        await pubsub.get_message(timeout=1)  # the subscribe confirmation
        await aclient.publish("trade.ONE_USDT", "async hello")
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        await pubsub.aclose()
        await aclient.aclose()
        return message["data"]

    assert asyncio.run(roundtrip()) == "async hello"


def test_unix_socket_client():
    directory = tempfile.mkdtemp(prefix="marketstream-unix-")
    path = os.path.join(directory, "redis.sock")
    with RedisServer(extra_args=["--unixsocket", path, "--unixsocketperm", "700"]):
        client = sync_client("unix://%s?db=2" % path)
        try:
            client.set("k", "v")
            assert client.get("k") == b"v"
            assert client.connection_pool.connection_kwargs["db"] == 2
        finally:
            client.close()
    os.rmdir(directory)


def test_sentinel_clients_reach_the_primary_and_follow_a_failover(sentinel):
    client = sync_client(sentinel.url, decode_responses=True)
    try:
        assert client.execute_command("ROLE")[0] == "master"
        assert client.connection_pool.get_master_address() == sentinel.primary().addr
        assert (
            _sync_roundtrip(client, "trade.HA_USDT", "publish", "subscribe", "get_message")
            == "hello"
        )
        client.set("before", "1")
        assert client.execute_command("WAIT", 1, 2000) == 1  # on the replica too

        old, new = sentinel.kill_primary()
        promoted = time.monotonic()

        def writes_reach_the_new_primary():
            with contextlib.suppress(
                redis.ConnectionError, redis.ReadOnlyError, redis.TimeoutError
            ):
                client.set("after", "2")
                return new.call("GET", "after") == "2"

        wait_until(
            writes_reach_the_new_primary,
            timeout=5,
            interval=0.05,
            message="the sentinel client to write to the new primary",
        )
        assert time.monotonic() - promoted < 2.0
        assert new.call("GET", "before") == "1"  # replicated before the kill
    finally:
        client.close()

    async def async_role():
        aclient = async_client(sentinel.url)
        try:
            role = await aclient.execute_command("ROLE")
            await aclient.publish("trade.HA_USDT", "x")
            return role[0], await aclient.connection_pool.get_master_address()
        finally:
            await aclient.aclose()

    role, addr = asyncio.run(async_role())
    assert role in (b"master", "master") and tuple(addr) == sentinel.primary().addr


def test_cluster_clients_sharded_publish_and_subscribe(cluster):
    client = sync_client(cluster.url)
    try:
        assert isinstance(client, redis.cluster.RedisCluster)
        assert (
            _sync_roundtrip(
                client, "trade.SHARD_USDT", "spublish", "ssubscribe", "get_sharded_message"
            )
            == b"hello"
        )
    finally:
        client.close()

    async def spublish():
        aclient = async_client(cluster.url)
        try:
            assert isinstance(aclient, redis.asyncio.cluster.RedisCluster)
            return await aclient.spublish("trade.SHARD_USDT", "x")
        finally:
            await aclient.aclose()

    assert asyncio.run(spublish()) == 0  # delivered to nobody: reached the owning shard
