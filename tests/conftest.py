"""Shared fixtures: a real redis-server per test session on a free port, and
marketstream servers running in the test's IOLoop."""

import gc

import pytest
import redis

from marketstream.testing import RedisServer
from marketstream.server.app import Server
from tests.helpers import make_settings


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


@pytest.fixture
def server_on(io_loop):
    """``await server_on(redis_url, **overrides)``: an in-process server in
    the test's IOLoop on that Redis (stopped after the test)."""
    servers = []

    async def start(url, **overrides):
        server = Server(make_settings(url, **overrides))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        io_loop.run_sync(server.stop)


@pytest.fixture
def server_factory(server_on, redis_url):
    """``await server_factory(**overrides)``: a server on the session's Redis."""
    return lambda **overrides: server_on(redis_url, **overrides)


@pytest.fixture
def server(io_loop, server_factory):
    return io_loop.run_sync(server_factory)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Collect garbage before pytest formats a failure.

    On CPython 3.11, ast.parse can fail with "SystemError: AST constructor
    recursion depth mismatch" when a garbage collection runs inside it and
    finalizes an asyncio task that logs (a server task that died with an
    exception); pytest parses source while it formats a failure, so such a
    failure would end the whole run with INTERNALERROR.
    """
    if call.excinfo is not None:
        gc.collect()
    yield
