"""marketstream.server.handshake: what an open connection keeps of its
handshake (nothing), and that a closed one goes without the cycle collector."""

import collections
import gc
import inspect

import pytest
import ujson

from marketstream.testing import (
    async_wait_until,
)
from tests.helpers import (
    abort,
    connect,
    envelope,
    listeners,
    read,
    subscribe_all,
    subscribed,
)


@pytest.mark.parametrize("fast_handshake", ["true", "false"])
@pytest.mark.gen_test(timeout=30)
async def test_open_connections_keep_no_handshake_state(
    server_factory, redis_client, fast_handshake
):
    """Per-connection memory: once open, a connection holds no HTTP
    connection objects, parsed headers or handshake coroutines, and it
    still reads frames, delivers and closes (through the handshake
    shortcut and through Tornado's own handshake)."""
    server = await server_factory(server__fast_handshake=fast_handshake)
    clients = [await connect(server) for _ in range(40)]
    await subscribe_all(server, redis_client, clients, "trade.XRP_USDT")
    gc.collect()
    objects = gc.get_objects()
    types = collections.Counter(type(o).__name__ for o in objects)
    frames = collections.Counter(o.cr_code.co_name for o in objects if inspect.iscoroutine(o))
    assert types["HTTP1ServerConnection"] < 5, types["HTTP1ServerConnection"]
    assert frames["_execute"] + frames["get"] + frames["_accept_connection"] < 5, frames
    for handler in server.manager.connections:
        assert handler.request.connection is None and not handler.request.headers
    redis_client.publish("trade.XRP_USDT", envelope("trade.XRP_USDT", t=1))
    for ws in clients:
        assert ujson.loads(await read(ws))["data"]["t"] == 1
    clients[0].close(1000)
    await async_wait_until(lambda: len(server.manager.connections) == 39)


@pytest.mark.gen_test
async def test_closed_connections_are_freed_without_the_cycle_collector(server):
    """The server runs the cycle collector rarely (GC_THRESHOLDS), which is
    only safe while a closed connection's objects hold no reference cycles:
    they must go the moment the connection does, aborted or closed."""
    import asyncio
    import weakref

    from marketstream.server.app import GC_THRESHOLDS

    assert GC_THRESHOLDS[0] > 700  # what makes this test matter
    clients = [await connect(server) for _ in range(20)]
    for ws in clients:
        ws.write_message(ujson.dumps({"method": "SUBSCRIBE", "params": ["trade.FREE_USDT"]}))
    await listeners(server, "trade.FREE_USDT", 20)
    handlers = list(server.manager.connections)
    refs = [
        weakref.ref(obj) for h in handlers for obj in (h, h.ws_connection, h.ws_connection.stream)
    ]
    del handlers
    gc.collect()
    gc.disable()
    try:
        for index, ws in enumerate(clients):
            if index % 2:
                abort(ws)
            else:
                ws.close()
        await async_wait_until(lambda: not server.manager.connections)
        await async_wait_until(
            lambda: all(ref() is None for ref in refs),
            timeout=5,
            message="closed connections freed by reference counting",
        )
        await asyncio.sleep(0)
    finally:
        gc.enable()


@pytest.mark.gen_test
async def test_streams_in_the_url_are_subscribed_at_open_and_released_at_close(
    server, redis_client
):
    """/stream?streams=a/b subscribes at open, before any request; the
    handshake's query is not kept; closing forgets both."""
    ws = await connect(server, "/stream?streams=trade.OPEN_USDT/depth.OPEN_USDT")
    await subscribed(redis_client, "trade.OPEN_USDT", "depth.OPEN_USDT")
    handler = next(iter(server.manager.connections))
    assert sorted(server.manager.connections[handler]) == ["depth.OPEN_USDT", "trade.OPEN_USDT"]
    assert handler.request.arguments == {} and handler.open_args is None
    ws.close()
    await async_wait_until(lambda: not server.manager.streams, message="released")
