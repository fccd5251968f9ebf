"""End to end: a real server in the test's IOLoop, real Redis, real WebSockets.

The handler's pieces have test files of their own (test_identity,
test_delivery, test_conversation, test_handshake); these run the whole
handler: delivery from Redis, subscriptions, closing."""

import pytest
import ujson

from marketstream.testing import (
    free_port,
)
from tests.helpers import (
    abort,
    connect,
    envelope,
    no_message,
    numsub,
    read,
    released,
    send,
    subscribe_all,
    subscribed,
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
    # Each once; the order across streams is not kept (the depth stream's first
    # frame waits for the server's book to read its snapshot).
    assert sorted(received) == sorted(streams)
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
