"""marketstream.server.conversation: requests (junk ignored and counted),
acknowledgements in their shapes and in the order of the requests."""

import logging

import pytest
import ujson

from marketstream.testing import (
    RawClient,
)
from tests.helpers import (
    connect,
    envelope,
    listeners,
    numsub,
    read,
    send,
    subscribed,
)


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


@pytest.mark.gen_test
async def test_replies_keep_the_order_of_the_requests(server_factory, redis_client):
    """A SUBSCRIBE's acknowledgement waits for Redis; the requests sent
    right after it are read and carried out meanwhile, and their replies
    wait for it: they arrive in the order the requests were sent."""
    server = await server_factory(protocol__acks="true")
    ws = await connect(server)
    await ws.write_message(
        ujson.dumps({"method": "SUBSCRIBE", "params": ["trade.ORDER_USDT"], "id": 1})
    )
    await ws.write_message(ujson.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 2}))
    await ws.write_message("not json")
    await ws.write_message(
        ujson.dumps({"method": "UNSUBSCRIBE", "params": ["trade.ORDER_USDT"], "id": 3})
    )
    replies = [ujson.loads(await read(ws)) for _ in range(4)]
    assert [reply["id"] for reply in replies] == [1, 2, None, 3]
    assert replies[1]["result"] == ["trade.ORDER_USDT"]  # carried out before the ack
    assert replies[2]["error"]["code"] == 3


@pytest.mark.gen_test
async def test_a_client_over_its_message_budget_is_closed(server_factory, caplog):
    caplog.set_level(logging.INFO, "marketstream.server.handlers")
    server = await server_factory(limits__messages_per_second="1", limits__messages_burst="3")
    client = await RawClient.connect(server.settings.port)
    for request_id in range(10):
        client.send(ujson.dumps({"method": "LIST_SUBSCRIPTIONS", "id": request_id}))
    assert await client.recv_close() == (1008, "rate limit exceeded")
    client.close()
    assert server.counters.closed["rate_limit"] == 1
    assert any("rate limit exceeded" in r.getMessage() for r in caplog.records)
