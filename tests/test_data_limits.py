"""What one hostile client or publisher can do to resources and data, each
measured attack against a real server and a real Redis, bounded in count
and time: connections and channels from one address, subscription churn,
resumes far behind on many streams, and payloads that would land on
another stream or break a browser's ``JSON.parse``.

Stream names are unique to each test (all tests share one Redis).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import psutil
import pytest
import redis
import tornado.httpclient
import ujson

from marketstream.publisher import Publisher, stream_keys
from tests.server.net.test_accept import descriptors  # noqa: F401 (a fixture)
from marketstream.testing import RawClient, async_wait_until, raw_socket
from tests.helpers import ServerProcess, connect, listeners, read, send, subscribed
from tests.server.test_metrics import Watch


def tag() -> str:
    return uuid.uuid4().hex[:8].upper()


def calls(redis_client, *commands):
    stats = redis_client.info("commandstats")
    return {name: stats.get("cmdstat_" + name, {}).get("calls", 0) for name in commands}


# --- connections and channels from one address --------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_one_address_gets_500_connections_by_default_then_429(server, descriptors):
    """The attack opened 98 connections from one address (no limit by
    default); now the 501st is refused with HTTP 429 and counted."""
    assert descriptors >= 1200, "the open-file limit is too low for this test"
    assert server.settings.server.max_connections_per_ip == 500
    port = server.settings.port
    sockets = []
    try:
        for _ in range(500):
            sock, _ = await raw_socket(port)
            sockets.append(sock)
        with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
            await connect(server)
        assert refused.value.code == 429
        assert server.counters.refused["max_connections_per_ip"] == 1
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.gen_test(timeout=60)
async def test_the_channel_cap_refuses_new_streams_with_an_error_and_counts_them(
    server_factory, redis_client
):
    server = await server_factory(limits__max_channels=4, protocol__acks="true")
    names = ["trade.CAP%d%s_USDT" % (i, tag()) for i in range(6)]
    watch = await Watch(server).start()
    first = await connect(server)
    await send(first, "SUBSCRIBE", names[:3], 1)
    assert json.loads(await read(first)) == {"result": None, "id": 1}
    # names[1] and [2] exist already, [3] is the fourth channel, [4] and [5] are one too many.
    second = await connect(server)
    await send(second, "SUBSCRIBE", names[1:], 2)
    reply = json.loads(await read(second))
    assert reply["id"] == 2 and reply["error"]["code"] == 2
    assert reply["error"]["msg"] == "; ".join(
        "%s: too many streams on this server" % name for name in names[4:]
    )
    await send(second, "LIST_SUBSCRIPTIONS", request_id=3)
    assert json.loads(await read(second)) == {"result": names[1:4], "id": 3}
    assert sorted(redis_client.pubsub_channels("trade.CAP*")) == sorted(
        name.encode() for name in names[:4]
    )
    assert server.counters.rejected["max_channels"] == 2
    await watch.moved("marketstream_rejected_streams_total{cause=max_channels}", 2)
    # The first client leaves: its own channel lingers, and gives way to a new one.
    first.close()
    await async_wait_until(lambda: len(server.manager.connections) == 1)
    await send(second, "SUBSCRIBE", names[4:5], 4)
    assert json.loads(await read(second)) == {"result": None, "id": 4}
    await async_wait_until(
        lambda: (
            sorted(redis_client.pubsub_channels("trade.CAP*"))
            == sorted(name.encode() for name in names[1:5])
        ),
        message="names[0] released for names[4]",
    )


@pytest.mark.gen_test(timeout=60)
async def test_many_connections_of_many_streams_stop_at_the_channel_cap(
    server_factory, redis_client
):
    """The measured attack (98 connections x 1,024 streams = 100,352 Redis
    channels in 3.1 s), scaled down: 6 connections x 200 streams against a
    cap of 500.  Without acks the refused streams are ignored like invalid
    names, and counted."""
    server = await server_factory(limits__max_channels=500)
    prefix = "trade.ATK%s" % tag()
    clients = [await RawClient.connect(server.settings.port) for _ in range(6)]
    for c, client in enumerate(clients):
        client.send(
            ujson.dumps(
                {
                    "method": "SUBSCRIBE",
                    "id": c,
                    "params": ["%sC%dS%d_USDT" % (prefix, c, j) for j in range(200)],
                }
            )
        )
    await async_wait_until(
        lambda: server.counters.rejected["max_channels"] == 700,
        timeout=20,
        message="700 streams refused",
    )
    await async_wait_until(
        lambda: len(redis_client.pubsub_channels(prefix + "*")) == 500,
        timeout=20,
        message="500 channels subscribed",
    )
    assert sum(len(streams) for streams in server.manager.connections.values()) == 500
    # Valid names, refused for the cap: counted with the other refused streams.
    assert server.counters.rejected_streams == 700
    assert server.counters.rejected["invalid_name"] == 0
    for client in clients:
        client.close()


@pytest.mark.gen_test(timeout=60)
async def test_subscribe_unsubscribe_churn_costs_redis_nothing(server_factory, redis_client):
    """Churn within the message limit cost 10% of a core per connection:
    every SUBSCRIBE and UNSUBSCRIBE went to Redis (1,024 channels each, and
    1,024 confirmations back).  A channel that had listeners a moment ago
    stays subscribed for up to a second, so churn never reaches Redis."""
    server = await server_factory(protocol__acks="true")
    names = ["trade.CH%d%s_USDT" % (i, tag()) for i in range(200)]
    ws = await connect(server)
    await send(ws, "SUBSCRIBE", names, 1)
    assert json.loads(await read(ws)) == {"result": None, "id": 1}
    before = calls(redis_client, "subscribe", "unsubscribe")
    for i in range(10):  # each change apart from the next, as a client within the limit
        await send(ws, "UNSUBSCRIBE", names, 2 + 2 * i)
        assert json.loads(await read(ws)) == {"result": None, "id": 2 + 2 * i}
        await asyncio.sleep(0.05)
        await send(ws, "SUBSCRIBE", names, 3 + 2 * i)
        assert json.loads(await read(ws)) == {"result": None, "id": 3 + 2 * i}
        await asyncio.sleep(0.05)
    await send(ws, "LIST_SUBSCRIPTIONS", request_id="list")
    assert json.loads(await read(ws)) == {"result": names, "id": "list"}
    assert calls(redis_client, "subscribe", "unsubscribe") == before
    # Once nobody wants them, the channels are released after all.
    ws.close()
    await async_wait_until(
        lambda: redis_client.pubsub_channels("trade.CH*") == [],
        timeout=10,
        message="channels released",
    )
    assert calls(redis_client, "unsubscribe")["unsubscribe"] > before["unsubscribe"]


# --- resumes far behind on many streams ---------------------------------------------

STREAMS, HISTORY, PAD = 120, 200, "x" * 380


def publish_histories(redis_url, names):
    with Publisher(redis_url, history=HISTORY, ttl=600) as pub:
        for i in range(HISTORY):
            pub.publish_many([(name, '{"e":"trade","t":%d,"x":"%s"}' % (i, PAD)) for name in names])
        latest = pub.publish_many(
            [(name, '{"e":"trade","t":%d,"x":"%s"}' % (HISTORY, PAD)) for name in names]
        )
    return dict(zip(names, latest))


def test_five_clients_resuming_everything_from_zero_cost_what_they_can_be_sent(redis_url):
    """The amplification (~11,000x): a 7 KB SUBSCRIBE with ``since: 0`` on
    200 streams of 1,000 messages made the server read 83 MB from Redis,
    grow by 120 MB, and close the client as a slow consumer.  Here five
    clients do it at once on 120 streams of 200 messages (about 11 MB
    stored): what would not fit half of each client's buffer is not read;
    every client gets each stream's gap notice and then its newest
    messages, and stays connected; Redis sends a few MB, and the server
    grows by a few MB."""
    client = redis.Redis.from_url(redis_url)
    prefix = "trade.RSM%s" % tag()
    names = ["%s%d_USDT" % (prefix, k) for k in range(STREAMS)]
    latest = publish_histories(redis_url, names)
    server = ServerProcess("--redis-url", redis_url)
    try:
        server.wait_healthy()
        proc = psutil.Process(server.proc.pid)

        async def scenario():
            clients = [await RawClient.connect(server.port) for _ in range(5)]
            await asyncio.sleep(0.5)
            rss_before = proc.memory_info().rss
            sent_before = int(client.info("stats")["total_net_output_bytes"])
            request = json.dumps(
                {
                    "method": "SUBSCRIBE",
                    "params": names,
                    "id": 1,
                    "since": {name: 0 for name in names},
                }
            )
            assert len(request) > 5000
            for raw in clients:
                raw.send(request)
            got = await asyncio.gather(*(read_catch_up(raw) for raw in clients))
            redis_sent = int(client.info("stats")["total_net_output_bytes"]) - sent_before
            grown = proc.memory_info().rss - rss_before
            for frames, size in got:
                assert size <= 600_000  # half of max_buffer_bytes, and the frame headers
                for name in names:
                    mine = frames[name]
                    assert mine[0] == "gap", mine[:3]
                    seqs = mine[1:]
                    assert seqs and seqs[-1] == latest[name], (name, seqs[-5:])
                    assert seqs == list(range(seqs[0], latest[name] + 1))  # the newest, in order
            for raw in clients:  # still connected and served
                raw.send('{"method":"LIST_SUBSCRIPTIONS","id":2}')
                reply = await read_reply(raw)
                assert reply == {"result": names, "id": 2}
                raw.close()
            return redis_sent, grown

        redis_sent, grown = asyncio.run(scenario())
        assert redis_sent < 4_000_000, redis_sent  # 11 MB stored, 5 clients
        assert grown < 8_000_000, grown
        assert "slow consumer" not in server.output
        assert "failed" not in server.output, server.output
    finally:
        server.stop()
        client.close()


async def read_catch_up(raw):
    """Read a resuming client's frames until each stream of the request has
    reached its newest position: ``({stream: ["gap" | seq, ...]}, bytes)``."""
    frames: dict[str, list] = {}
    size = 0
    done = set()
    deadline = time.monotonic() + 30
    while len(done) < STREAMS:
        opcode, payload = await raw.recv(max(0.1, deadline - time.monotonic()))
        assert opcode == 0x1, (opcode, payload[:100])
        size += len(payload) + 4
        message = json.loads(payload)
        name = message["stream"]
        if message["data"].get("e") == "gap":
            frames.setdefault(name, []).append("gap")
        else:
            frames.setdefault(name, []).append(message["seq"])
            if message["data"]["t"] == HISTORY:
                done.add(name)
    return frames, size


async def read_reply(raw):
    while True:
        opcode, payload = await raw.recv()
        message = json.loads(payload)
        if "stream" not in message:
            return message


@pytest.mark.gen_test(timeout=60)
async def test_a_resume_on_many_streams_reads_the_history_a_few_at_a_time(
    server, redis_client, redis_url, caplog
):
    """200 streams resumed at once made 200 history reads at once; past
    redis-py's pool of 100 connections they failed and were retried, with
    a warning per stream and per retry.  Reads run a few at a time."""
    prefix = "trade.RDS%s" % tag()
    names = ["%s%d_USDT" % (prefix, k) for k in range(150)]
    with Publisher(redis_client, history=10, ttl=600) as pub:
        latest = dict(zip(names, pub.publish_many([(name, {"e": "trade"}) for name in names])))
    caplog.set_level(logging.WARNING, "marketstream")
    raw = await RawClient.connect(server.settings.port)
    raw.send(
        json.dumps(
            {
                "method": "SUBSCRIBE",
                "params": names,
                "id": 1,
                "since": {name: latest[name] - 1 for name in names},
            }
        )
    )
    seen = {}
    while len(seen) < len(names):
        opcode, payload = await raw.recv(10)
        message = json.loads(payload)
        seen[message["stream"]] = message["seq"]
    assert seen == latest
    assert server.counters.replayed == len(names) and server.counters.gap_notices == 0
    assert not [r for r in caplog.records if "history" in r.getMessage()]
    raw.close()


# --- payloads that would land on another stream -------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_payloads_that_are_not_the_channels_own_never_reach_clients(
    server, redis_client, caplog
):
    """A publisher (or anyone who can write to Redis) sent ``@<seq> ``
    followed by invalid UTF-8 or a second ``"stream"``, and clients got it
    (a browser's ``JSON.parse`` takes the last ``"stream"``: the frame
    lands on another stream).  Positioned payloads are now checked like
    plain ones, and a frame whose ``"stream"`` is not its channel's is
    dropped, counted and logged at most once a second."""
    name = "trade.PAY%s_USDT" % tag()
    other = "trade.OTHER%s_USDT" % tag()
    caplog.set_level(logging.WARNING, "marketstream.server.channels")
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
    assert message == {
        "stream": name,
        "data": {"e": "trade", "stream": "inside data is data"},
        "seq": probe,
    }
    assert server.counters.dropped_malformed == len(malformed)
    assert server.counters.dropped_wrong_stream == len(wrong)
    await watch.moved("marketstream_dropped_total{cause=malformed_payload}", len(malformed))
    await watch.moved("marketstream_dropped_total{cause=wrong_stream}", len(wrong))
    lines = [r for r in caplog.records if "dropped a payload" in r.getMessage()]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]  # one per cause and second


@pytest.mark.gen_test(timeout=60)
async def test_stored_messages_that_are_not_the_streams_own_are_not_replayed(server, redis_client):
    """What the history holds is checked like what is published: an entry
    written with another stream's frame is not replayed."""
    name = "trade.HST%s_USDT" % tag()
    with Publisher(redis_client) as pub:
        first = pub.publish(name, {"t": 1})
    bad = first + 1
    log_key = stream_keys(name)[1]
    redis_client.xadd(
        log_key,
        {"p": b'@%d {"stream":"depth.X_Y","data":{},"seq":%d}' % (bad, bad)},
        id="%d-0" % bad,
    )
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
