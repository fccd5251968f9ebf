"""End to end: a real server in the test's IOLoop, real Redis, real WebSockets."""

import asyncio
import collections
import gc
import inspect

import pytest
import tornado.httpclient
import tornado.websocket
import ujson

from marketstream.testing import (
    async_wait_until,
    free_port,
    masked_frame,
    raw_socket,
    server_frames,
)
from tests.helpers import (
    abort,
    connect,
    envelope,
    listeners,
    no_message,
    numsub,
    read,
    released,
    send,
    subscribe_all,
    subscribed,
    ws_url,
)


# --- delivery ----------------------------------------------------------------


@pytest.mark.gen_test
async def test_envelope_delivered_byte_for_byte(server, redis_client):
    ws = await connect(server)
    await send(ws, "SUBSCRIBE", ["trade.SOL_USDC"])
    await subscribed(redis_client, "trade.SOL_USDC")
    payload = '{"stream":"trade.SOL_USDC","data":{"e":"trade","t":42,"m":true,"p":"101.5","q":"0.3","s":"SOL_USDC","T":1727866324088}}'
    redis_client.publish("trade.SOL_USDC", payload)
    assert await read(ws) == payload
    # Unusual spacing and key order survive untouched: no re-encoding.
    odd = '{ "data" : {"e":"trade", "p":"1.10"} ,"stream":"trade.SOL_USDC" }'
    redis_client.publish("trade.SOL_USDC", odd)
    assert await read(ws) == odd


@pytest.mark.gen_test
async def test_data_format_wraps_once(server_factory, redis_client):
    server = await server_factory(redis__format="data")
    ws1, ws2 = await connect(server), await connect(server)
    await subscribe_all(server, redis_client, (ws1, ws2), "depth.BTC_USDT")
    redis_client.publish("depth.BTC_USDT", '{"e":"depth","U":1,"u":2}')
    expected = '{"stream":"depth.BTC_USDT","data":{"e":"depth","U":1,"u":2}}'
    assert await read(ws1) == expected
    assert await read(ws2) == expected


@pytest.mark.gen_test
async def test_stream_endpoint_subscribes_at_connect(server, redis_client):
    ws = await connect(server, "/stream?streams=trade.SOL_USDC/ticker.ETH_USDT")
    await subscribed(redis_client, "trade.SOL_USDC", "ticker.ETH_USDT")
    redis_client.publish("ticker.ETH_USDT", envelope("ticker.ETH_USDT", c="1"))
    assert ujson.loads(await read(ws))["stream"] == "ticker.ETH_USDT"
    await send(ws, "LIST_SUBSCRIPTIONS")
    assert ujson.loads(await read(ws)) == {"result": ["trade.SOL_USDC", "ticker.ETH_USDT"], "id": 1}


@pytest.mark.gen_test
async def test_root_path_and_ws_url_path(server_factory, redis_client):
    port = free_port()
    server = await server_factory(server__listen="ws://127.0.0.1:%d/market-ws" % port)
    for path in ("/", "/ws", "/market-ws"):
        ws = await connect(server, path)
        await send(ws, "LIST_SUBSCRIPTIONS")
        assert ujson.loads(await read(ws)) == {"result": [], "id": 1}
        ws.close()


@pytest.mark.gen_test
async def test_subscribe_every_param_and_repeated_subscribe_delivers_once(server, redis_client):
    ws = await connect(server)
    streams = ["trade.SOL_USDC", "depth.SOL_USDC", "ticker.SOL_USDC"]
    await send(ws, "SUBSCRIBE", streams)
    await send(ws, "SUBSCRIBE", ["trade.SOL_USDC", "trade.SOL_USDC"], request_id=2)
    await subscribed(redis_client, *streams)
    for stream in streams:
        redis_client.publish(stream, envelope(stream))
    received = [ujson.loads(await read(ws))["stream"] for _ in streams]
    assert received == streams
    redis_client.publish("trade.SOL_USDC", envelope("trade.SOL_USDC", t=2))
    assert ujson.loads(await read(ws))["data"]["t"] == 2  # not a duplicate of the first
    assert server.manager.subscriptions(list(server.manager.connections)[0]) == streams


@pytest.mark.gen_test
async def test_unsubscribe_releases_redis_channel(server, redis_client):
    a, b = await connect(server), await connect(server)
    await send(a, "SUBSCRIBE", ["trade.BTC_USDT", "depth.BTC_USDT"])
    await send(b, "SUBSCRIBE", ["trade.BTC_USDT"])
    await subscribed(redis_client, "trade.BTC_USDT", "depth.BTC_USDT")
    await send(a, "UNSUBSCRIBE", ["trade.BTC_USDT", "depth.BTC_USDT", "ticker.NOT_SUBSCRIBED"])
    await released(redis_client, "depth.BTC_USDT")
    assert numsub(redis_client, "trade.BTC_USDT") == 1  # b still listens
    redis_client.publish("trade.BTC_USDT", envelope("trade.BTC_USDT", t=1))
    assert ujson.loads(await read(b))["data"]["t"] == 1
    await send(a, "LIST_SUBSCRIPTIONS", request_id=5)
    assert ujson.loads(await read(a)) == {"result": [], "id": 5}
    await send(b, "UNSUBSCRIBE", ["trade.BTC_USDT"])
    await released(redis_client, "trade.BTC_USDT")
    assert server.manager.streams == {}


@pytest.mark.gen_test
async def test_close_frame_releases_everything(server, redis_client):
    ws = await connect(server)
    await send(ws, "SUBSCRIBE", ["trade.ETH_USDT"])
    await subscribed(redis_client, "trade.ETH_USDT")
    ws.close(1000)
    await released(redis_client, "trade.ETH_USDT")
    assert server.manager.connections == {} and server.manager.streams == {}


@pytest.mark.gen_test
async def test_aborted_tcp_releases_everything(server, redis_client):
    ws = await connect(server)
    await send(ws, "SUBSCRIBE", ["trade.ETH_USDC"])
    await subscribed(redis_client, "trade.ETH_USDC")
    abort(ws)
    await released(redis_client, "trade.ETH_USDC")
    assert server.manager.connections == {} and server.manager.streams == {}


@pytest.mark.gen_test(timeout=30)
async def test_fifty_clients_get_exactly_one_copy(server, redis_client):
    clients = [await connect(server) for _ in range(50)]
    await subscribe_all(server, redis_client, clients, "trade.SOL_USDT")
    for t in range(3):
        redis_client.publish("trade.SOL_USDT", envelope("trade.SOL_USDT", t=t))
    redis_client.publish("trade.SOL_USDT", envelope("trade.SOL_USDT", t="end"))
    for ws in clients:
        got = [ujson.loads(await read(ws))["data"]["t"] for _ in range(4)]
        assert got == [0, 1, 2, "end"]
        await no_message(ws, 0.01)


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


@pytest.mark.gen_test(timeout=30)
async def test_idle_connections_keep_no_empty_write_buffers_or_ack_sets(
    server_factory, redis_client
):
    """Per-connection memory: an open connection that keeps up has no write
    buffer and write-future queue of its own (two deques, ~1.5 KB) and no
    set of acknowledgements in flight (216 bytes) once they are sent."""
    server = await server_factory(protocol__acks="true")

    def containers():
        gc.collect()
        kinds = collections.Counter(type(o).__name__ for o in gc.get_objects())
        return kinds["deque"], kinds["set"]

    async def frame(sock, data):
        while True:
            frames, rest = server_frames(data)
            if frames:
                return ujson.loads(frames[0]), rest
            data += await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)

    loop = asyncio.get_running_loop()
    before = containers()
    # Bare sockets: a client library's own buffers would be counted too.
    clients = [await raw_socket(server.settings.port) for _ in range(40)]
    subscribe = masked_frame(
        ujson.dumps({"method": "SUBSCRIBE", "params": ["trade.XRP_USDT"], "id": 1})
    )
    for sock, _ in clients:
        await loop.sock_sendall(sock, subscribe)
    for sock, data in clients:
        assert (await frame(sock, data))[0] == {"result": None, "id": 1}
    await listeners(server, "trade.XRP_USDT", 40)
    deques, sets = containers()
    assert deques - before[0] < 10 and sets - before[1] < 10, (before, (deques, sets))
    redis_client.publish("trade.XRP_USDT", envelope("trade.XRP_USDT", t=1))
    for sock, _ in clients:
        assert (await frame(sock, b""))[0]["data"]["t"] == 1
        sock.close()


@pytest.mark.gen_test
async def test_junk_frames_are_ignored_and_counted(server, redis_client):
    ws = await connect(server)
    other = await connect(server)
    await send(other, "SUBSCRIBE", ["trade.SOL_USDC"])
    junk = [
        "not json",
        "[1,2]",
        "42",
        '"str"',
        "null",
        "{}",
        '{"method":"SUBSCRIBE"}',
        '{"method":"SUBSCRIBE","params":"trade.SOL_USDC","id":1}',
        '{"method":"SUBSCRIBE","params":[1,2],"id":1}',
        '{"method":"DELETE","params":["trade.SOL_USDC"],"id":1}',
        '{"method":7,"params":["trade.SOL_USDC"],"id":1}',
        '{"method":"SUBSCRIBE","params":["trade.sol_usdc"],"id":1}',
        "{" * 5000,
    ]
    for frame in junk:
        await ws.write_message(frame)
    await ws.write_message(b"\x00\x01binary", binary=True)
    # The connection still works: a valid subscribe after the junk.
    await send(ws, "SUBSCRIBE", ["trade.SOL_USDC"], request_id=9)
    await listeners(server, "trade.SOL_USDC", 2)
    await subscribed(redis_client, "trade.SOL_USDC")
    redis_client.publish("trade.SOL_USDC", envelope("trade.SOL_USDC", t=1))
    assert ujson.loads(await read(ws))["data"]["t"] == 1  # no replies to junk, acks are off
    assert ujson.loads(await read(other))["data"]["t"] == 1
    # Every junk frame but the well-formed one with a bad stream name, plus
    # the binary frame, is an invalid frame; the bad name is a rejected stream.
    assert server.counters.invalid_frames == len(junk)
    assert server.counters.rejected_streams == 1
    assert "trade.sol_usdc" not in server.manager.streams


@pytest.mark.gen_test
async def test_malformed_redis_payload_is_dropped_and_stream_continues(server, redis_client):
    ws = await connect(server)
    await send(ws, "SUBSCRIBE", ["trade.BTC_USDT"])
    await subscribed(redis_client, "trade.BTC_USDT")
    for bad in ("not json", "[1,2,3]", '{"truncated":', "", "\xff"):
        redis_client.publish("trade.BTC_USDT", bad)
    redis_client.publish("trade.BTC_USDT", envelope("trade.BTC_USDT", t="good"))
    assert ujson.loads(await read(ws))["data"]["t"] == "good"
    assert server.counters.dropped_malformed == 5


@pytest.mark.gen_test
async def test_acks_in_binance_shapes(server_factory, redis_client):
    server = await server_factory(protocol__acks="true")
    ws = await connect(server)
    await send(ws, "SUBSCRIBE", ["trade.SOL_USDC"], request_id=1)
    assert ujson.loads(await read(ws)) == {"result": None, "id": 1}
    # The ack means Redis confirmed the subscription: a publish now arrives.
    assert numsub(redis_client, "trade.SOL_USDC") == 1
    await send(ws, "SUBSCRIBE", ["nope.SOL_USDC", "depth.SOL_USDC"], request_id=2)
    reply = ujson.loads(await read(ws))
    assert (
        reply["id"] == 2
        and reply["error"]["code"] == 2
        and "nope.SOL_USDC" in reply["error"]["msg"]
    )
    await send(ws, "UNSUBSCRIBE", ["depth.SOL_USDC"], request_id=3)
    assert ujson.loads(await read(ws)) == {"result": None, "id": 3}
    await ws.write_message("garbage")
    assert ujson.loads(await read(ws)) == {"error": {"code": 3, "msg": "invalid JSON"}, "id": None}
    await ws.write_message('{"method":"NOPE","params":[],"id":4}')
    reply = ujson.loads(await read(ws))
    assert reply["id"] == 4 and reply["error"]["code"] == 2


# --- identity and HTTP -------------------------------------------------------


@pytest.mark.gen_test
async def test_identity_is_peer_address(server, caplog):
    caplog.set_level("INFO", logger="marketstream.server.handlers")
    ws = await connect(server)
    local_port = ws.protocol.stream.socket.getsockname()[1]
    await async_wait_until(lambda: server.manager.connections)
    conn = list(server.manager.connections)[0]
    assert conn.identity == "127.0.0.1:%d" % local_port
    ws.close()
    await async_wait_until(lambda: not server.manager.connections)
    lines = [r.getMessage() for r in caplog.records if r.name == "marketstream.server.handlers"]
    assert "connect 127.0.0.1:%d" % local_port in lines
    assert any(line.startswith("disconnect 127.0.0.1:%d" % local_port) for line in lines)


@pytest.mark.gen_test
async def test_identity_behind_proxy_uses_forwarded_ip_and_stays_unique(server_factory):
    server = await server_factory(server__xheaders="true")
    headers = {"X-Real-IP": "203.0.113.7"}
    a = await tornado.websocket.websocket_connect(
        tornado.httpclient.HTTPRequest(ws_url(server), headers=headers)
    )
    b = await tornado.websocket.websocket_connect(
        tornado.httpclient.HTTPRequest(ws_url(server), headers=headers)
    )
    await async_wait_until(lambda: len(server.manager.connections) == 2)
    identities = sorted(conn.identity for conn in server.manager.connections)
    assert all(identity.startswith("203.0.113.7:") for identity in identities)
    assert identities[0] != identities[1]
    a.close(), b.close()
    # With the client's port from the proxy, the identity is the client's own.
    c = await tornado.websocket.websocket_connect(
        tornado.httpclient.HTTPRequest(
            ws_url(server), headers={"X-Real-IP": "203.0.113.8", "X-Real-Port": "51234"}
        )
    )
    await async_wait_until(
        lambda: any(conn.identity == "203.0.113.8:51234" for conn in server.manager.connections)
    )
    c.close()


@pytest.mark.gen_test
async def test_proxy_headers_ignored_unless_trusted(server):
    ws = await tornado.websocket.websocket_connect(
        tornado.httpclient.HTTPRequest(ws_url(server), headers={"X-Real-IP": "203.0.113.7"})
    )
    await async_wait_until(lambda: server.manager.connections)
    assert list(server.manager.connections)[0].identity.startswith("127.0.0.1:")
    ws.close()


@pytest.mark.gen_test
async def test_a_handler_keeps_compact_attribute_storage(server):
    """CPython keeps a handler's attributes in compact storage shared with
    the other handlers only while they fit its shared keys; one attribute
    more than today's 29 gave each connection a dict of its own (about
    1.5 KB more per connection: 6.3 -> 7.9 KB measured at 10,000 idle
    connections)."""
    ws = await connect(server)
    await async_wait_until(lambda: server.manager.connections, message="registered")
    handler = next(iter(server.manager.connections))
    assert len(vars(handler)) <= 29, sorted(vars(handler))
    ws.close()


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
