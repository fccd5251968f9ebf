"""Acknowledgements and refused streams: per-connection acks, the reply
that says which streams were subscribed and which refused, replies in the
order of the requests, and the server's own record of refused names (a
rate-limited INFO line, /metrics), against a real server and Redis."""

import logging
import time

import pytest
import ujson

from marketstream.testing import async_wait_until
from tests.helpers import connect, listeners, no_message, numsub, read, subscribed
from tests.server.test_metrics import Watch


async def request(ws, method, params=None, request_id=1, **extra):
    message = {"method": method, "id": request_id, **extra}
    if params is not None:
        message["params"] = params
    await ws.write_message(ujson.dumps(message))


@pytest.mark.gen_test
async def test_acks_true_turns_replies_on_for_that_connection_only(server, redis_client):
    """With [protocol] acks off (the default), a client that asks gets
    replies; the others (the web client that breaks on them) still none."""
    asking, other = await connect(server), await connect(server)
    await request(asking, "SUBSCRIBE", ["trade.ACK_USDT"], 1, acks=True)
    assert ujson.loads(await read(asking)) == {"result": None, "id": 1}
    assert numsub(redis_client, "trade.ACK_USDT") == 1  # the reply waited for Redis
    await request(asking, "UNSUBSCRIBE", ["trade.ACK_USDT"], 2)  # on from then on
    assert ujson.loads(await read(asking)) == {"result": None, "id": 2}

    await request(other, "SUBSCRIBE", ["trade.ACK_USDT", "trades.ACK_USDT"], 1)
    await listeners(server, "trade.ACK_USDT", 1)
    await subscribed(redis_client, "trade.ACK_USDT")
    redis_client.publish("trade.ACK_USDT", '{"stream":"trade.ACK_USDT","data":{"e":"trade"}}')
    assert ujson.loads(await read(other))["data"] == {"e": "trade"}  # no reply before it
    await no_message(asking)


@pytest.mark.gen_test
async def test_a_bad_acks_value_is_an_invalid_request(server):
    ws = await connect(server)
    await request(ws, "SUBSCRIBE", ["trade.ACK_USDT"], 1, acks="yes")
    await request(ws, "LIST_SUBSCRIPTIONS", request_id=2)
    assert ujson.loads(await read(ws)) == {"result": [], "id": 2}  # acks off: no error reply
    assert server.counters.invalid_frames == 1


@pytest.mark.gen_test
async def test_some_good_some_bad_says_which_were_subscribed_and_which_refused(server_factory):
    server = await server_factory(protocol__acks="true", limits__max_streams_per_connection=3)
    ws = await connect(server)
    await request(
        ws,
        "SUBSCRIBE",
        [
            "trade.A_USDT",
            "trades.A_USDT",
            "trade.a_usdt",
            "ausdt@trade",
            "trade.A_USDT",
            "depth.A_USDT",
        ],
    )
    error = ujson.loads(await read(ws))["error"]
    assert error["code"] == 2
    assert error["subscribed"] == ["trade.A_USDT", "depth.A_USDT"]
    assert error["refused"] == {
        "trades.A_USDT": "unknown stream type 'trades' (allowed: depth, trade, ticker, "
        "bookTicker, kline)",
        "trade.a_usdt": "invalid market 'a_usdt' (must match ^[A-Z0-9]+_[A-Z0-9]+$)",
        "ausdt@trade": "stream name must be <type>.<MARKET>, e.g. trade.BTC_USDT",
    }
    assert "trades.A_USDT: unknown stream type 'trades'" in error["msg"]
    # One stream left of three: the second is refused for the limit.
    await request(ws, "SUBSCRIBE", ["ticker.A_USDT", "trade.A_USDT", "kline.1m.A_USDT"], 2)
    error = ujson.loads(await read(ws))["error"]
    assert error["subscribed"] == ["ticker.A_USDT", "trade.A_USDT"]
    assert error["refused"] == {"kline.1m.A_USDT": "too many streams (limit 3)"}
    await request(ws, "UNSUBSCRIBE", ["ticker.A_USDT", "nope.A_USDT"], 3)
    error = ujson.loads(await read(ws))["error"]
    assert error["unsubscribed"] == ["ticker.A_USDT"] and list(error["refused"]) == ["nope.A_USDT"]
    # All good: Binance's reply, unchanged.
    await request(ws, "SUBSCRIBE", ["bookTicker.A_USDT"], 4)
    assert ujson.loads(await read(ws)) == {"result": None, "id": 4}
    await request(ws, "LIST_SUBSCRIPTIONS", request_id=5)
    assert ujson.loads(await read(ws))["result"] == [
        "trade.A_USDT",
        "depth.A_USDT",
        "bookTicker.A_USDT",
    ]
    assert server.counters.rejected == {
        "invalid_name": 1,
        "unknown_type": 2,
        "unknown_market": 1,
        "too_many_streams": 1,
        "max_channels": 0,
        "user_stream": 0,
        "protected": 0,
        "unknown_speed": 0,
        "not_a_book": 0,
        "no_speed": 0,
        "no_book": 0,
    }


@pytest.mark.gen_test
async def test_the_reply_to_thousands_of_bad_names_stays_small(server_factory):
    """A 64 KiB frame of short names: every one is refused and
    counted, the reply names the first 100 and counts the others."""
    server = await server_factory(protocol__acks="true")
    ws = await connect(server)
    names = ["%x" % i for i in range(9900)]
    text = ujson.dumps({"method": "SUBSCRIBE", "params": names, "id": 1})
    assert 60_000 < len(text) <= 65536
    await ws.write_message(text)
    reply = await read(ws)
    error = ujson.loads(reply)["error"]
    assert len(reply) < 10_000, len(reply)
    assert list(error["refused"]) == names[:100] and error["refused_more"] == len(names) - 100
    assert error["subscribed"] == []
    assert server.counters.rejected_streams == len(names)


@pytest.mark.gen_test(timeout=30)
async def test_replies_come_in_the_order_of_the_requests(server_factory, redis_client):
    """A SUBSCRIBE's reply waits for Redis; replies to the requests after it
    wait for it, and the requests themselves are carried out meanwhile
    (reading never waits for Redis)."""
    server = await server_factory(protocol__acks="true")
    ws = await connect(server)
    await async_wait_until(lambda: server.manager.connections, message="registered")
    handler = next(iter(server.manager.connections))
    redis_client.execute_command("CLIENT", "PAUSE", "1500", "ALL")  # Redis answers nobody
    paused_at = time.monotonic()
    await request(ws, "SUBSCRIBE", ["trade.PAUSE_A"], 1)
    await request(ws, "SUBSCRIBE", ["nope.PAUSE_B", "trade.PAUSE_B"], 2)
    await request(ws, "LIST_SUBSCRIPTIONS", request_id=3)
    await ws.write_message("junk")
    await request(ws, "UNSUBSCRIBE", ["trade.PAUSE_A"], 4)
    # Carried out at once, while Redis is paused.
    await async_wait_until(
        lambda: server.manager.subscriptions(handler) == ["trade.PAUSE_B"],
        timeout=1.0,
        message="requests carried out during the pause",
    )
    assert time.monotonic() - paused_at < 1.0
    replies = [ujson.loads(await read(ws, timeout=10)) for _ in range(5)]
    assert [reply["id"] for reply in replies] == [1, 2, 3, None, 4]
    assert replies[0] == {"result": None, "id": 1}
    assert replies[1]["error"]["subscribed"] == ["trade.PAUSE_B"]
    assert replies[2] == {"result": ["trade.PAUSE_A", "trade.PAUSE_B"], "id": 3}
    assert replies[3]["error"]["code"] == 3
    assert replies[4] == {"result": None, "id": 4}
    # Once the replies are out, nothing is held for the connection.
    assert handler._acks is True


@pytest.mark.gen_test
async def test_refused_names_are_logged_at_info_at_most_once_a_second_and_counted(server, caplog):
    caplog.set_level(logging.INFO, logger="marketstream.server.handlers")
    watch = await Watch(server).start()
    ws = await connect(server)
    for i in range(20):  # acks off: the client hears nothing, the log does
        await request(ws, "SUBSCRIBE", ["trades.L%d_USDT" % i, "trade.l_usdt"], i)
    await async_wait_until(lambda: server.counters.rejected_streams == 40, message="counted")
    lines = [r.getMessage() for r in caplog.records if "refused stream" in r.getMessage()]
    assert lines[0].startswith("refused stream 'trades.L0_USDT' from 127.0.0.1:")
    assert lines[0].endswith(
        "unknown stream type 'trades' (allowed: depth, trade, ticker, bookTicker, kline)"
    )
    assert all(r.levelno == logging.INFO for r in caplog.records if "refused" in r.getMessage())
    assert len(lines) <= 2  # forty refusals in (most likely) well under two seconds
    await watch.moved("marketstream_rejected_streams_total{cause=unknown_type}", 20)
    await watch.moved("marketstream_rejected_streams_total{cause=unknown_market}", 20)
    await watch.moved("marketstream_dropped_total{cause=rejected_stream}", 40)
    # A second later, the next line says how many were held back.
    time.sleep(1.0)
    await request(ws, "SUBSCRIBE", ["nope.L_USDT"], 99)
    await async_wait_until(lambda: server.counters.rejected_streams == 41, message="counted")
    last = [r.getMessage() for r in caplog.records if "refused stream" in r.getMessage()][-1]
    assert "'nope.L_USDT'" in last and "more since the last line)" in last
