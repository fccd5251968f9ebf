"""``python scripts/redis_local.py cluster|sentinel up|down``: the local
Redis Cluster and Sentinel set-ups a user starts to try the scaling modes.
``up`` prints a URL marketstream serves through; ``down`` leaves nothing
running."""

import asyncio
import json
import os
import re
import socket
import subprocess
import sys

import psutil
import pytest
import tornado.websocket
import ujson

from marketstream.publisher import AsyncPublisher
from tests.helpers import ROOT, ServerProcess
from tests.redis_topology import find_redis7

SCRIPT = os.path.join(ROOT, "scripts", "redis_local.py")
REDIS7, REASON = find_redis7()

pytestmark = pytest.mark.skipif(REDIS7 is None, reason=REASON)


def run(*args):
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=180
    )


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def refused(port):
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def delivered(port, redis_url, stream):
    """A client of the server on ``port`` gets what a publisher made from
    ``redis_url`` publishes (with a position)."""
    ws = await tornado.websocket.websocket_connect("ws://127.0.0.1:%d/ws" % port)
    await ws.write_message(ujson.dumps({"method": "SUBSCRIBE", "params": [stream], "id": 1}))
    reply = await asyncio.wait_for(ws.read_message(), 20)
    assert ujson.loads(reply) == {"result": None, "id": 1}  # subscribed in Redis
    publisher = AsyncPublisher(redis_url)
    seq = await publisher.publish(stream, {"e": "trade", "p": "1.5"})
    frame = ujson.loads(await asyncio.wait_for(ws.read_message(), 20))
    assert frame == {"stream": stream, "data": {"e": "trade", "p": "1.5"}, "seq": seq}
    ws.close()


@pytest.mark.parametrize("kind, servers", [("cluster", 6), ("sentinel", 5)])
def test_up_gives_a_url_marketstream_serves_through_and_down_stops_it(kind, servers, tmp_path):
    directory = str(tmp_path / kind)
    started = run(kind, "up", "--dir", directory, "--port", "0")
    state = {"pids": [], "ports": []}
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        url = re.search(r"^REDIS_URL=(\S+)$", started.stdout, re.M).group(1)
        assert url.startswith("redis+%s://" % kind)
        assert "export REDIS_URL=%s" % url in started.stdout
        with open(os.path.join(directory, "state.json")) as handle:
            state = json.load(handle)
        assert len(state["pids"]) == servers and all(alive(pid) for pid in state["pids"])

        server = ServerProcess("--redis-url", url, "--acks")
        try:
            server.wait_healthy()
            asyncio.run(delivered(server.port, url, "trade.LOCAL_USDT"))
        finally:
            server.stop()

        again = run(kind, "up", "--dir", directory)
        assert again.returncode == 0 and "already runs" in again.stdout
        assert "REDIS_URL=%s\n" % url in again.stdout
    finally:
        stopped = run(kind, "down", "--dir", directory)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not [pid for pid in state["pids"] if alive(pid)]
    assert all(refused(port) for port in state["ports"])
    assert not os.path.exists(directory)
    # Nothing left to stop.
    assert run(kind, "down", "--dir", directory).returncode == 0
