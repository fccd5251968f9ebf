"""Shared fixtures: a real redis-server per test session on a free port."""

import asyncio
import time

import pytest
import redis

from marketstream.embedded import RedisServer


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server; tests may kill() and restart() it (same port)."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    if not redis_server.running:
        redis_server.restart()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url):
    """A synchronous client for publishing and inspecting (PUBSUB NUMSUB)."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def wait_until(predicate, timeout=5.0, interval=0.01, message="condition"):
    """Poll a synchronous predicate until it is true or fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % message)
        time.sleep(interval)


async def async_wait_until(predicate, timeout=5.0, interval=0.01, message="condition"):
    """Like wait_until, but yields to the event loop between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % message)
        await asyncio.sleep(interval)
