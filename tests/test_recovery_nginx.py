"""Resume across instances: a client churning through a real nginx in front
of two marketstream processes, one of them stopped mid-stream, ends with
exactly the positions the publisher got back."""

import asyncio
import json
import signal
import urllib.request

import pytest

from tests.helpers import ServerProcess
from tests.test_nginx import NGINX, nginx_factory  # noqa: F401  (the fixture)
from tests.test_recovery import _assert_exact, _churn, market

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")


def _connections(port):
    """How many WebSocket clients the instance on ``port`` holds."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=2) as response:
            return json.loads(response.read())["connections"]
    except OSError:
        return 0


async def _held_by(port):
    """True if the instance on ``port`` holds a connection for 50 ms on end
    (the client's current one, not an old one on its way out)."""
    for _ in range(3):
        if not await asyncio.to_thread(_connections, port):
            return False
        await asyncio.sleep(0.025)
    return True


def test_resume_under_churn_through_nginx_with_an_instance_stopped(redis_url, nginx_factory):
    instances = [
        ServerProcess("--redis-url", redis_url, "--set", "server.xheaders=true") for _ in range(2)
    ]
    try:
        for instance in instances:
            instance.wait_healthy()
        port = nginx_factory([instance.port for instance in instances])
        streams = ["trade.%s" % market("NX") for _ in range(10)]
        stopped = []

        async def stop_first(client):
            # Stop instance 1 while the client is connected to it: hold the
            # client's connection open until it is seen there (else let it
            # move on and look again), stop, then let the churn go on.
            first = instances[0]
            for _ in range(200):
                client.keep = True
                if await _held_by(first.port):
                    break
                client.keep = False
                await asyncio.sleep(0.03)
            else:
                raise AssertionError("the client never landed on instance 1")
            first.proc.send_signal(signal.SIGTERM)
            stopped.append(await asyncio.to_thread(first.proc.wait, 15))
            client.keep = False

        client, published = asyncio.run(
            _churn(
                "ws://127.0.0.1:%d" % port,
                redis_url,
                streams,
                cycles=100,
                seed=7,
                midway=stop_first,
            )
        )
        assert stopped == [0], instances[0].output
        assert client.server_closes >= 1, "the stop did not catch the client on that instance"
        _assert_exact(client, published)
        # Both instances served the client before the stop.
        for instance in instances:
            assert "connect 127.0.0.1" in instance.output
    finally:
        for instance in instances:
            instance.stop()
