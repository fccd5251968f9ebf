"""What one hostile client or publisher can do to resources and data, each
measured attack against a real server and a real Redis, bounded in count
and time: payloads that would land on another stream or break a browser's
``JSON.parse``.

Stream names are unique to each test (all tests share one Redis).
"""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from marketstream.publisher import Publisher, stream_keys
from tests.helpers import RawClient, connect, listeners, read, send, subscribed
from tests.test_metrics import Watch


def tag() -> str:
    return uuid.uuid4().hex[:8].upper()


# --- payloads that would land on another stream -------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_payloads_that_are_not_the_channels_own_never_reach_clients(server, redis_client,
                                                                          caplog):
    """A publisher (or anyone who can write to Redis) sent ``@<seq> ``
    followed by invalid UTF-8 or a second ``"stream"``, and clients got it
    (a browser's ``JSON.parse`` takes the last ``"stream"``: the frame
    lands on another stream).  Positioned payloads are now checked like
    plain ones, and a frame whose ``"stream"`` is not its channel's is
    dropped, counted and logged at most once a second."""
    name = "trade.PAY%s_USDT" % tag()
    other = "trade.OTHER%s_USDT" % tag()
    caplog.set_level(logging.WARNING, "marketstream.channels")
    ws = await connect(server)
    await send(ws, "SUBSCRIBE", [name])
    await listeners(server, name, 1)
    await subscribed(redis_client, name)
    watch = await Watch(server).start()
    malformed = [
        b'@5 {"stream":"%s","data":{"p":"\xff"},"seq":5}',
        b'@5 {"stream":"%s","data":{"p":1},"stream":"' + other.encode() + b'","seq":5}',
        b'@5 {"stream":"%s","data":{"p":1},"seq":6}',
        b'@05 {"stream":"%s","data":{"p":1},"seq":05}',
        b'@5 {"stream":"%s","data":[1],"seq":5}',
        b'@5 {"stream":"%s","data":{"p":1}',
        b'@9007199254740993 {"stream":"%s","data":{},"seq":9007199254740993}',
        b'{"stream":"%s","data":{"p":"\xff"}}',
    ]
    wrong = [
        b'@5 {"stream":"' + other.encode() + b'","data":{"p":1},"seq":5}',
        b'{"stream":"' + other.encode() + b'","data":{"p":1}}',
        b'{"stream":"%s","data":{"p":1},"stream":"' + other.encode() + b'"}',
        b'{"stream":"%s","data":{},"str\\u0065am":"' + other.encode() + b'"}',
        b'{"data":{"p":1}}',
    ]
    for payload in malformed + wrong:
        redis_client.publish(name, payload.replace(b"%s", name.encode()))
    probe = Publisher(redis_client).publish(name, {"e": "trade", "stream": "inside data is data"})
    message = json.loads(await read(ws))
    assert message == {"stream": name, "data": {"e": "trade", "stream": "inside data is data"},
                       "seq": probe}
    assert server.counters.dropped_malformed == len(malformed)
    assert server.counters.dropped_wrong_stream == len(wrong)
    await watch.moved("marketstream_dropped_total{cause=malformed_payload}", len(malformed))
    await watch.moved("marketstream_dropped_total{cause=wrong_stream}", len(wrong))
    lines = [r for r in caplog.records if "dropped a payload" in r.getMessage()]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]  # one per cause and second


@pytest.mark.gen_test(timeout=60)
async def test_stored_messages_that_are_not_the_streams_own_are_not_replayed(server,
                                                                             redis_client):
    """What the history holds is checked like what is published: an entry
    written with another stream's frame is not replayed."""
    name = "trade.HST%s_USDT" % tag()
    with Publisher(redis_client) as pub:
        first = pub.publish(name, {"t": 1})
    bad = first + 1
    log_key = stream_keys(name)[1]
    redis_client.xadd(log_key, {"p": b'@%d {"stream":"depth.X_Y","data":{},"seq":%d}'
                                % (bad, bad)}, id="%d-0" % bad)
    redis_client.set(stream_keys(name)[0], bad)
    with Publisher(redis_client) as pub:
        last = pub.publish(name, {"t": 3})
    raw = await RawClient.connect(server.settings.port)
    raw.send(json.dumps({"method": "SUBSCRIBE", "params": [name], "since": {name: first - 1}}))
    got = []
    while len(got) < 2:
        opcode, payload = await raw.recv(10)
        got.append(json.loads(payload))
    assert [(m["stream"], m["seq"]) for m in got] == [(name, first), (name, last)]
    assert server.counters.dropped_wrong_stream == 1
    raw.close()
