"""Redis down at start-up: the real ``marketstream`` command waits for it,
serving meanwhile (/health 503), and serves every client once a Redis
started late answers; with several workers too."""

import asyncio
import collections
import time

import pytest
import tornado.websocket
import ujson

from marketstream.testing import RedisServer, free_port, health_status, wait_until
from tests.test_process import spawn  # noqa: F401 (the fixture: server processes, stopped after)


@pytest.fixture
def late_redis():
    """A Redis on a port nothing listens on yet: ``start()`` it later."""
    server = RedisServer(port=free_port())
    yield server
    server.stop()


async def subscribe(port, stream):
    """A client that subscribed ``stream``; the reply is an error while
    Redis has not confirmed it (acks asked for on this connection)."""
    ws = await tornado.websocket.websocket_connect("ws://127.0.0.1:%d/ws" % port)
    await ws.write_message(
        ujson.dumps({"method": "SUBSCRIBE", "params": [stream], "id": 1, "acks": True})
    )
    return ws


async def next_data(ws, timeout=15):
    """The next frame that is not a reply."""
    deadline = time.monotonic() + timeout
    while True:
        frame = await asyncio.wait_for(ws.read_message(), max(0.1, deadline - time.monotonic()))
        assert frame is not None, "connection closed"
        message = ujson.loads(frame)
        if "stream" in message:
            return message


async def publish_until_received(redis_server, stream, clients):
    """Publish ``stream``'s probe until every client got it: the server
    subscribes its channel a moment after Redis answers."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    payload = '{"stream":"%s","data":{"e":"trade","t":1}}' % stream
    tasks = [asyncio.ensure_future(next_data(ws, timeout=30)) for ws in clients]
    try:
        deadline = time.monotonic() + 20
        while not all(task.done() for task in tasks):
            assert time.monotonic() < deadline, "the probe never arrived"
            client.publish(stream, payload)
            await asyncio.wait(tasks, timeout=0.2)
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        client.close()


def waiting_lines(server):
    return [line for line in server.lines if "waiting for Redis at" in line]


@pytest.mark.parametrize("processes", [1, 2])
def test_redis_down_at_start_is_waited_for_and_clients_get_their_streams(
    spawn, late_redis, processes
):
    url = "redis://127.0.0.1:%d/0" % late_redis.port
    server = spawn("--processes", str(processes), env={"REDIS_URL": url})
    wait_until(
        lambda: server.output.count("listening on") == processes or server.proc.poll() is not None,
        20,
        message="listening without Redis",
    )
    assert server.proc.poll() is None, server.output
    wait_until(lambda: health_status(server.port) == 503, 10, message="/health 503")
    wait_until(lambda: len(waiting_lines(server)) == processes, 10, message="the waiting line")
    assert (
        "waiting for Redis at %s (environment REDIS_URL), retrying until it answers" % url
    ) in waiting_lines(server)[0], server.output

    async def scenario():
        # Clients that connect while Redis is down (on every worker).
        clients = [await subscribe(server.port, "trade.LATE_USDT") for _ in range(6)]
        await asyncio.sleep(1.5)  # a few more retries: still one line per worker
        assert len(waiting_lines(server)) == processes, server.output
        assert server.proc.poll() is None
        late_redis.start()
        wait_until(
            lambda: all(health_status(server.port) == 200 for _ in range(10)),
            20,
            message="/health 200 from every worker",
        )
        got = await publish_until_received(late_redis, "trade.LATE_USDT", clients)
        assert [m["data"] for m in got] == [{"e": "trade", "t": 1}] * len(clients)
        for ws in clients:
            ws.close()

    asyncio.run(scenario())
    assert (
        collections.Counter("answers after" in line for line in server.lines)[True] == processes
    ), server.output
    assert "Traceback" not in server.output
    server.stop()
    assert server.proc.returncode == 0, server.output


def test_workers_that_cannot_reach_redis_stop_together(spawn):
    """With processes > 1, a worker past [redis] startup_timeout is not
    restarted: the command exits 1."""
    server = spawn(
        "--processes",
        "2",
        "--set",
        "redis.startup_timeout=1",
        env={"REDIS_URL": "redis://127.0.0.1:%d/0" % free_port()},
    )
    assert server.proc.wait(30) == 1, server.output
    assert "did not answer within [redis] startup_timeout = 1s" in server.output
    assert "restarting" not in server.output and "Traceback" not in server.output
