"""Recovery end to end: positions, resume with ``since``, snapshots on
subscribe, history limits, Redis link outages, churn, order books and bad
input, with a real Redis, real servers and real WebSocket clients.

Every stream name is unique to its test (all tests share one Redis), and
"nothing else arrived" is checked with a probe: a message published last
must be the next frame.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.parse
import uuid
from decimal import Decimal

import pytest
import tornado.httpclient
import tornado.iostream
import tornado.websocket
import ujson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marketstream.client import OrderBook
from marketstream.wire.positions import MAX_POSITION
from marketstream.wire.replies import GAP_REASONS
from marketstream.publisher import AsyncPublisher, Publisher
from marketstream.demo.simulator import Feed, encode
from marketstream.testing import async_wait_until
from tests.checksums import crc_of
from tests.helpers import abort, connect, listeners, subscribed, ws_url


# --- helpers -------------------------------------------------------------------


def market(prefix="R"):
    """A market name no other test uses."""
    return "%s%s_USDT" % (prefix, uuid.uuid4().hex[:10].upper())


class Reader:
    """A WebSocket client whose frames are read in the background::

    reader = await Reader.open(server, "/ws")
    await reader.send({"method": "SUBSCRIBE", "params": [s], "since": {s: 5}})
    await reader.wait(lambda: len(reader.of(s)) == 3)
    """

    def __init__(self, ws):
        self.ws = ws
        self.frames: list[str] = []
        self.closed = False
        self._task = asyncio.ensure_future(self._run())

    @classmethod
    async def open(cls, server, path="/ws"):
        return cls(await connect(server, path))

    async def _run(self):
        while True:
            frame = await self.ws.read_message()
            if frame is None:
                self.closed = True
                return
            self.frames.append(frame)

    @property
    def messages(self):
        return [ujson.loads(frame) for frame in self.frames]

    def of(self, stream):
        """Frames of ``stream`` (data, snapshots and gap notices), parsed."""
        return [m for m in self.messages if m.get("stream") == stream]

    def raw(self, stream):
        return [f for f in self.frames if ujson.loads(f).get("stream") == stream]

    def seqs(self, stream):
        return [m["seq"] for m in self.of(stream) if "seq" in m]

    def replies(self):
        return [m for m in self.messages if "stream" not in m]

    async def send(self, message):
        await self.ws.write_message(json.dumps(message))

    async def wait(self, predicate, timeout=5.0, message="frames"):
        await async_wait_until(predicate, timeout=timeout, message=message)

    async def wait_seq(self, stream, seq, timeout=5.0):
        """Wait until the frame at position ``seq`` of ``stream`` arrived."""
        await self.wait(
            lambda: seq in self.seqs(stream),
            timeout,
            "position %d on %s (got %s)" % (seq, stream, self.seqs(stream)[-5:]),
        )

    def close(self):
        self.ws.close()


def is_gap(message):
    return message["data"].get("e") == "gap"


def gap_reasons(messages):
    """The ``data.reason`` of each gap notice among ``messages``; each one
    also carries its documented words in ``data.msg``."""
    gaps = [m["data"] for m in messages if is_gap(m)]
    assert all(gap["msg"] == GAP_REASONS[gap["reason"]] for gap in gaps), gaps
    return [gap["reason"] for gap in gaps]


def trade(i):
    return {"e": "trade", "t": i}


def diff(i):
    return {"e": "depth", "U": i, "u": i, "b": [["1.%d" % i, "1"]], "a": []}


def book_at(i):
    return {"e": "depthSnapshot", "u": i, "b": [["1.%d" % i, "1"]], "a": []}


def book_checksums(datas):
    """The checksum of the book after each of ``datas`` (a snapshot, then
    diffs: bids only here), computed by the tests' own code."""
    levels, sums = {}, []
    for data in datas:
        if data["e"] == "depthSnapshot":
            levels = {}
        for price, qty in data["b"]:
            levels[Decimal(price)] = [price, qty]
        bids = [levels[key] for key in sorted(levels, reverse=True) if Decimal(levels[key][1])]
        sums.append(crc_of(bids, []))
    return sums


def subscribe(params, request_id=1, **extra):
    message = {"method": "SUBSCRIBE", "params": params, "id": request_id}
    message.update(extra)
    return message


@pytest.fixture
def pub(redis_client):
    publisher = Publisher(redis_client, history=1000, ttl=600)
    yield publisher
    publisher.close()


@pytest.fixture
def acks_server(io_loop, server_factory):
    return io_loop.run_sync(lambda: server_factory(protocol__acks="true"))


# --- positions -------------------------------------------------------------------


@pytest.mark.gen_test
async def test_positions_on_recoverable_frames_and_plain_frames_unchanged(
    server, redis_client, pub
):
    rec, plain = "trade.%s" % market(), "trade.%s" % market()
    reader = await Reader.open(server)
    await reader.send(subscribe([rec, plain]))
    await listeners(server, rec, 1)
    await subscribed(redis_client, rec, plain)

    seqs = [pub.publish(rec, trade(i)) for i in range(5)]
    # Plain PUBLISH with the publisher's own spacing and key order: sent as is.
    payloads = [
        '{"stream": "%s",  "data": {"t": 1, "e": "trade"}}' % plain,
        '{"data":{"e":"trade","t":2,"p":"1.50"},"stream":"%s"}' % plain,
    ]
    for payload in payloads:
        redis_client.publish(plain, payload)
    await reader.wait(lambda: len(reader.frames) == 7)

    assert seqs == list(range(seqs[0], seqs[0] + 5))  # +1 per message
    assert 0 < seqs[0] < 2**53
    assert reader.raw(rec) == [
        '{"stream":"%s","data":{"e":"trade","t":%d},"seq":%d}' % (rec, i, seq)
        for i, seq in enumerate(seqs)
    ]
    assert reader.raw(plain) == payloads
    reader.close()


# --- resume with since -------------------------------------------------------------


async def _resume_scenario(server, redis_client, pub, url_form):
    a, b, c = ("trade.%s" % market() for _ in range(3))
    published = {s: [pub.publish(s, trade(i)) for i in range(5)] for s in (a, b, c)}
    since = {a: published[a][1], b: published[b][3]}
    if url_form:
        query = urllib.parse.urlencode(
            {
                "streams": "/".join((a, b, c)),
                "since": ",".join("%s:%d" % kv for kv in since.items()),
            }
        )
        reader = await Reader.open(server, "/stream?" + query)
    else:
        reader = await Reader.open(server)
        await reader.send(subscribe([a, b, c], since=since))
    # Published while the server reads the history: each still arrives once.
    for i in range(5, 8):
        for s in (a, b):
            published[s].append(pub.publish(s, trade(i)))
    for s in (a, b, c):
        await listeners(server, s, 1)
    await subscribed(redis_client, a, b, c)
    for i in range(8, 10):
        for s in (a, b, c):
            published[s].append(pub.publish(s, trade(i)))
    for s in (a, b, c):
        await reader.wait_seq(s, published[s][-1])

    assert reader.seqs(a) == published[a][2:]
    assert reader.seqs(b) == published[b][4:]
    assert [m["data"]["t"] for m in reader.of(a)] == list(range(2, 10))
    # Without since: a plain "from now on" subscribe.
    assert reader.seqs(c) == published[c][-2:]
    assert not any(is_gap(m) for m in reader.messages if "stream" in m)
    assert reader.replies() == []  # acks are off
    reader.close()


@pytest.mark.gen_test
async def test_resume_with_since_in_subscribe(server, redis_client, pub):
    await _resume_scenario(server, redis_client, pub, url_form=False)


@pytest.mark.gen_test
async def test_resume_with_since_in_the_url(server, redis_client, pub):
    await _resume_scenario(server, redis_client, pub, url_form=True)


@pytest.mark.gen_test
async def test_since_wins_over_snapshot(server, redis_client, pub):
    stream = "depth.%s" % market()
    seqs = [
        pub.publish(stream, diff(i), snapshot=book_at(i) if i == 6 else None) for i in range(10)
    ]
    reader = await Reader.open(server)
    await reader.send(subscribe([stream], since={stream: seqs[2]}, snapshot=True))
    await listeners(server, stream, 1)
    probe = pub.publish(stream, diff(10))
    await reader.wait_seq(stream, probe)
    assert reader.seqs(stream) == seqs[3:] + [probe]
    assert all(m["data"]["e"] == "depth" for m in reader.of(stream))
    reader.close()


@pytest.mark.gen_test
async def test_since_ahead_of_latest_gets_the_gap_notice_then_live(server, redis_client, pub):
    """A position ahead of the stream's is not from its history (a failover
    lost writes the client saw): the notice lets the client take the next
    positions instead of dropping them as already seen."""
    stream = "trade.%s" % market()
    seqs = [pub.publish(stream, trade(i)) for i in range(3)]
    reader = await Reader.open(server)
    await reader.send(subscribe([stream], since={stream: seqs[-1] + 1000}))
    await listeners(server, stream, 1)
    await subscribed(redis_client, stream)
    live = [pub.publish(stream, trade(i)) for i in range(3, 6)]
    await _expect_gap_then(reader, stream, live, seqs[-1], reason="since_ahead")
    assert server.counters.ignored == {"bad_since": 0, "bad_snapshot": 0}
    reader.close()


@pytest.mark.gen_test
async def test_since_on_a_plain_stream_is_a_plain_subscribe(acks_server, redis_client):
    server = acks_server
    stream = "trade.%s" % market()
    redis_client.publish(stream, '{"stream":"%s","data":{"t":0}}' % stream)  # before: lost
    reader = await Reader.open(server)
    await reader.send(subscribe([stream], since={stream: 5}, snapshot=True))
    await reader.wait(lambda: reader.replies())
    assert reader.replies() == [{"result": None, "id": 1}]
    await listeners(server, stream, 1)
    payload = '{"stream":"%s", "data":{"t":1}}' % stream
    redis_client.publish(stream, payload)
    await reader.wait(lambda: reader.raw(stream))
    assert reader.raw(stream) == [payload]
    assert server.counters.ignored == {"bad_since": 0, "bad_snapshot": 0}
    reader.close()


@pytest.mark.gen_test
async def test_duplicate_subscribe_with_since_is_ignored(server, redis_client, pub):
    stream = "trade.%s" % market()
    reader = await Reader.open(server)
    await reader.send(subscribe([stream]))
    await listeners(server, stream, 1)
    await subscribed(redis_client, stream)
    seqs = [pub.publish(stream, trade(i)) for i in range(5)]
    await reader.wait_seq(stream, seqs[-1])
    replayed = server.counters.replayed
    await reader.send(subscribe([stream], request_id=2, since={stream: seqs[0]}, snapshot=True))
    await reader.send({"method": "LIST_SUBSCRIPTIONS", "id": 3})
    await reader.wait(lambda: reader.replies())
    probe = pub.publish(stream, trade(5))
    await reader.wait_seq(stream, probe)
    assert reader.seqs(stream) == seqs + [probe]
    assert reader.replies() == [{"result": [stream], "id": 3}]
    assert server.counters.replayed == replayed
    reader.close()


# --- snapshots on subscribe -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["true", "list", "url", "config"])
@pytest.mark.gen_test
async def test_snapshot_on_subscribe(server_factory, redis_client, pub, mode):
    name = market()
    depth, ticker, trades = "depth." + name, "ticker." + name, "trade." + name
    server = await server_factory(
        **({"recovery__snapshot_types": "depth, ticker"} if mode == "config" else {})
    )
    seqs = [
        pub.publish(depth, diff(i), snapshot=book_at(i) if i in (3, 6) else None) for i in range(10)
    ]
    tickers = [pub.publish(ticker, {"e": "ticker", "n": i}, snapshot=True) for i in range(3)]
    old_trades = [pub.publish(trades, trade(i)) for i in range(3)]
    streams = [depth, ticker, trades]
    if mode == "url":
        reader = await Reader.open(server, "/stream?streams=%s&snapshot=1" % "/".join(streams))
    else:
        reader = await Reader.open(server)
        extra = {"true": {"snapshot": True}, "list": {"snapshot": [depth, ticker]}, "config": {}}[
            mode
        ]
        await reader.send(subscribe(streams, **extra))
    # Published while the snapshot is read: after it, each once.
    for i in range(10, 13):
        seqs.append(pub.publish(depth, diff(i)))
    for s in streams:
        await listeners(server, s, 1)
    await subscribed(redis_client, *streams)
    seqs.append(pub.publish(depth, diff(13)))
    tickers.append(pub.publish(ticker, {"e": "ticker", "n": 3}, snapshot=True))
    live_trade = pub.publish(trades, trade(3))
    await reader.wait_seq(depth, seqs[-1])
    await reader.wait_seq(ticker, tickers[-1])
    await reader.wait_seq(trades, live_trade)

    frames = reader.of(depth)
    # Each frame of the book stream carries the checksum of the book after it.
    assert [m.pop("checksum") for m in frames] == book_checksums([m["data"] for m in frames])
    assert frames[0] == {"stream": depth, "data": book_at(6), "seq": seqs[6]}
    assert [m["seq"] for m in frames] == seqs[6:]
    assert [m["data"]["u"] for m in frames[1:]] == list(range(7, 14))
    # A ticker is its own snapshot: the latest ticker frame, byte for byte.
    assert reader.raw(ticker)[0] == '{"stream":"%s","data":{"e":"ticker","n":2},"seq":%d}' % (
        ticker,
        tickers[2],
    )
    assert reader.seqs(ticker) == tickers[2:]
    # A stream without a snapshot (and one not asked for) starts live.
    assert reader.seqs(trades) == [live_trade] and old_trades[-1] < live_trade
    assert server.counters.snapshots_sent == 2
    reader.close()


@pytest.mark.gen_test
async def test_no_snapshot_unless_asked(server, redis_client, pub):
    stream = "depth.%s" % market()
    pub.publish(stream, diff(0), snapshot=book_at(0))
    reader = await Reader.open(server)
    await reader.send(subscribe([stream], snapshot=False))
    await listeners(server, stream, 1)
    await subscribed(redis_client, stream)
    probe = pub.publish(stream, diff(1))
    await reader.wait_seq(stream, probe)
    assert reader.seqs(stream) == [probe]
    reader.close()


# --- history limits ---------------------------------------------------------------------


async def _expect_gap_then(reader, stream, expected_seqs, since, timeout=3.0, reason=None):
    """The frames of ``stream`` are a gap notice (no seq; for ``reason``)
    followed by exactly ``expected_seqs``; positions only move forward from
    ``since``."""
    await reader.wait_seq(stream, expected_seqs[-1], timeout)
    frames = reader.of(stream)
    assert is_gap(frames[0]) and "seq" not in frames[0], frames[0]
    assert gap_reasons(frames) == [reason], frames[0]
    assert frames[0]["data"]["s"] == stream.split(".", 1)[1]
    assert isinstance(frames[0]["data"]["E"], int)
    assert [m.get("seq") for m in frames[1:]] == expected_seqs
    assert all(seq > since for seq in expected_seqs)
    assert expected_seqs == sorted(expected_seqs)


@pytest.mark.gen_test
async def test_trimmed_history_gives_gap_then_snapshot(server, redis_client):
    stream = "depth.%s" % market()
    with Publisher(redis_client, history=5) as small:
        seqs = [
            small.publish(stream, diff(i), snapshot=book_at(i) if i == 16 else None)
            for i in range(20)
        ]
        reader = await Reader.open(server)
        await reader.send(subscribe([stream], since={stream: seqs[2]}))
        await listeners(server, stream, 1)
        live = small.publish(stream, diff(20))
    await _expect_gap_then(reader, stream, seqs[16:] + [live], seqs[2], reason="history_trimmed")
    assert reader.of(stream)[1]["data"] == book_at(16)
    assert server.counters.gap_notices == 1
    reader.close()


@pytest.mark.gen_test
async def test_trimmed_history_without_snapshot_gives_gap_then_what_is_left(server, redis_client):
    stream = "trade.%s" % market()
    with Publisher(redis_client, history=5) as small:
        seqs = [small.publish(stream, trade(i)) for i in range(20)]
        reader = await Reader.open(server)
        await reader.send(subscribe([stream], since={stream: seqs[2]}))
        await listeners(server, stream, 1)
        live = small.publish(stream, trade(20))
    await _expect_gap_then(reader, stream, seqs[15:] + [live], seqs[2], reason="history_trimmed")
    reader.close()


@pytest.mark.gen_test
async def test_max_replay_exceeded_gives_gap(server_factory, redis_client, pub):
    server = await server_factory(recovery__max_replay="5")
    trades, depth = "trade.%s" % market(), "depth.%s" % market()
    t = [pub.publish(trades, trade(i)) for i in range(20)]
    d = [pub.publish(depth, diff(i), snapshot=book_at(i) if i == 16 else None) for i in range(20)]
    reader = await Reader.open(server)
    await reader.send(subscribe([trades, depth], since={trades: t[2], depth: d[2]}))
    await listeners(server, trades, 1)
    await listeners(server, depth, 1)
    t.append(pub.publish(trades, trade(20)))
    d.append(pub.publish(depth, diff(20)))
    # The newest max_replay, then live; the snapshot, then what follows it.
    await _expect_gap_then(reader, trades, t[15:], t[2], reason="max_replay")
    await _expect_gap_then(reader, depth, d[16:], d[2], reason="max_replay")
    # Within max_replay: no gap.
    other = await Reader.open(server)
    await other.send(subscribe([trades], since={trades: t[-6]}))
    await listeners(server, trades, 2)
    probe = pub.publish(trades, trade(21))
    await other.wait_seq(trades, probe)
    assert other.seqs(trades) == t[-5:] + [probe]
    reader.close()
    other.close()


@pytest.mark.gen_test(timeout=30)
async def test_redis_restart_then_resume_gives_gap_then_snapshot(
    server, redis_server, redis_client
):
    name = market()
    depth, trades = "depth." + name, "trade." + name
    with Publisher(redis_client, history=100) as publisher:
        old_d = [
            publisher.publish(depth, diff(i), snapshot=book_at(i) if i == 0 else None)
            for i in range(5)
        ]
        old_t = [publisher.publish(trades, trade(i)) for i in range(5)]
        redis_server.kill()
        redis_server.restart()  # no persistence: positions, history, snapshot gone
        await async_wait_until(lambda: server.manager.healthy, timeout=10, message="link back")
        new_d = [
            publisher.publish(depth, diff(i), snapshot=book_at(i) if i == 7 else None)
            for i in range(5, 10)
        ]
        new_t = [publisher.publish(trades, trade(i)) for i in range(5, 8)]
        # Positions jump forward, never back, and then rise by 1 again.
        assert new_d[0] > old_d[-1] and new_t[0] > old_t[-1]
        assert new_d == list(range(new_d[0], new_d[0] + 5))
        reader = await Reader.open(server)
        await reader.send(subscribe([depth, trades], since={depth: old_d[-1], trades: old_t[-1]}))
        await listeners(server, depth, 1)
        await listeners(server, trades, 1)
        new_d.append(publisher.publish(depth, diff(10)))
        new_t.append(publisher.publish(trades, trade(8)))
    # The client's positions are older than the history that started over.
    await _expect_gap_then(reader, depth, new_d[2:], old_d[-1], reason="history_trimmed")
    assert reader.of(depth)[1]["data"] == book_at(7)
    await _expect_gap_then(reader, trades, new_t, old_t[-1], reason="history_trimmed")
    reader.close()


@pytest.mark.gen_test(timeout=30)
async def test_redis_restart_under_a_connected_client(server, redis_server, redis_client):
    """The server's own link across a Redis restart: the history it would
    catch up from is gone, so the client is told (gap notice) before the
    new positions, which jump forward."""
    stream = "trade.%s" % market()
    reader = await Reader.open(server)
    await reader.send(subscribe([stream]))
    await listeners(server, stream, 1)
    await subscribed(redis_client, stream)
    with Publisher(redis_client, history=100) as publisher:
        old = [publisher.publish(stream, trade(i)) for i in range(3)]
        await reader.wait_seq(stream, old[-1])
        reconnects = server.counters.reconnects
        redis_server.kill()
        redis_server.restart()
        # The link is back, Redis confirmed the channel and the catch-up
        # read is done: the listener is live again.
        await async_wait_until(
            lambda: (
                server.counters.reconnects > reconnects
                and stream in server.manager.upstream_channels
                and stream in server.manager.streams
                and stream not in server.manager.core.recovering
            ),
            timeout=10,
            message="listener back",
        )
        new = [publisher.publish(stream, trade(i)) for i in range(3, 6)]
    await reader.wait_seq(stream, new[-1])
    frames = reader.of(stream)
    assert [m["seq"] for m in frames[:3]] == old
    assert is_gap(frames[3]), frames[3:]
    assert gap_reasons(frames) == ["history_lost"]
    assert [m.get("seq") for m in frames[4:]] == new and new[0] > old[-1]
    reader.close()


# --- the server's Redis link ---------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_pubsub_link_killed_during_publishing(server, redis_client, redis_url):
    name = market()
    recoverable = ["trade." + name, "depth." + name, "ticker." + name]
    plain = "kline.1m." + name
    reader = await Reader.open(server)
    await reader.send(subscribe(recoverable + [plain]))
    for s in recoverable + [plain]:
        await listeners(server, s, 1)
    await subscribed(redis_client, *recoverable, plain)
    publisher = AsyncPublisher(redis_url, history=10000)
    published = {s: [] for s in recoverable}
    plain_sent = []
    stop = asyncio.Event()

    async def publish():
        i = 0
        while not stop.is_set():
            i += 1
            seqs = await publisher.publish_many([(s, trade(i)) for s in recoverable])
            for s, seq in zip(recoverable, seqs):
                published[s].append(seq)
            await publisher.client.publish(plain, '{"stream":"%s","data":{"t":%d}}' % (plain, i))
            plain_sent.append(i)
            await asyncio.sleep(0.002)

    task = asyncio.ensure_future(publish())
    try:
        for kill in range(3):
            count = len(reader.frames)
            await reader.wait(
                lambda count=count: len(reader.frames) > count + 20, message="flowing"
            )
            reconnects = server.counters.reconnects
            assert redis_client.client_kill_filter(_type="pubsub") >= 1
            await async_wait_until(
                lambda reconnects=reconnects: server.counters.reconnects > reconnects,
                message="link back after kill %d" % kill,
            )
        count = len(reader.frames)
        await reader.wait(lambda: len(reader.frames) > count + 20, message="flowing")
    finally:
        stop.set()
        await task
    for s in recoverable:
        await reader.wait_seq(s, published[s][-1])
    plain_last = plain_sent[-1]
    await reader.wait(lambda: any(m["data"].get("t") == plain_last for m in reader.of(plain)))
    await publisher.aclose()

    for s in recoverable:
        frames = reader.of(s)
        assert not [m for m in frames if is_gap(m)], s
        assert [m["seq"] for m in frames] == published[s], s
    plain_frames = reader.of(plain)
    assert gap_reasons(plain_frames) == ["link_outage"] * 3
    ts = [m["data"]["t"] for m in plain_frames if not is_gap(m)]
    assert ts == sorted(set(ts)) and ts[-1] == plain_last
    reader.close()


@pytest.mark.parametrize("history", [1000, 5])
@pytest.mark.gen_test(timeout=20)
async def test_link_outage_covered_or_not_by_the_history(server, redis_client, history):
    """Messages published while the server's link is down (the event loop is
    blocked, so it cannot come back before they are all out): caught up
    without a notice when the history covers them, else a gap notice and
    what the history still holds.  A plain stream gets the notice."""
    name = market()
    rec, plain = "trade." + name, "depth." + name
    reader = await Reader.open(server)
    await reader.send(subscribe([rec, plain]))
    await listeners(server, rec, 1)
    await listeners(server, plain, 1)
    await subscribed(redis_client, rec, plain)
    with Publisher(redis_client, history=history) as publisher:
        before = [publisher.publish(rec, trade(i)) for i in range(3)]
        await reader.wait_seq(rec, before[-1])
        reconnects = server.counters.reconnects
        assert redis_client.client_kill_filter(_type="pubsub") >= 1
        during = [publisher.publish(rec, trade(i)) for i in range(3, 23)]
        redis_client.publish(plain, '{"stream":"%s","data":{"t":1}}' % plain)  # lost
        await async_wait_until(lambda: server.counters.reconnects > reconnects, message="link back")
        await subscribed(redis_client, rec, plain)
        await async_wait_until(
            lambda: (
                {rec, plain} <= server.manager.upstream_channels
                and rec in server.manager.streams
                and rec not in server.manager.core.recovering
            ),
            message="caught up",
        )
        after = publisher.publish(rec, trade(23))
    redis_client.publish(plain, '{"stream":"%s","data":{"t":2}}' % plain)
    await reader.wait_seq(rec, after)
    await reader.wait(lambda: any(m["data"].get("t") == 2 for m in reader.of(plain)))
    if history > len(during):
        assert reader.of(rec) == [
            {"stream": rec, "data": trade(i), "seq": seq}
            for i, seq in enumerate(before + during + [after])
        ]
    else:
        frames = reader.of(rec)
        assert [m.get("seq") for m in frames[:3]] == before
        assert is_gap(frames[3]) and "seq" not in frames[3]
        assert gap_reasons(frames) == ["history_trimmed"]
        assert [m.get("seq") for m in frames[4:]] == during[-5:] + [after]
    plain_frames = reader.of(plain)
    assert len(plain_frames) == 2 and gap_reasons(plain_frames) == ["link_outage"]
    assert plain_frames[1]["data"] == {"t": 2}
    reader.close()


# --- resume under churn ---------------------------------------------------------------------


class Resumer:
    """A client that keeps the last position of each stream and resumes from
    it on every new connection (JSON SUBSCRIBE or URL form, alternately)."""

    def __init__(self, base_url, streams, last):
        self.base_url = base_url
        self.streams = streams
        self.last = dict(last)
        self.got = {s: [] for s in streams}
        self.other: list[str] = []  # anything else (gap notices, replies)
        self.connects = 0
        self.failed_connects = 0
        self.server_closes = 0  # connections the server (or a proxy) ended
        self.keep = False  # while True, the client does not drop by itself

    def _record(self, frame):
        message = ujson.loads(frame)
        stream, seq = message.get("stream"), message.get("seq")
        if stream in self.got and seq is not None:
            self.got[stream].append(seq)
            self.last[stream] = seq
        else:
            self.other.append(frame)

    async def connect(self):
        self.connects += 1
        since = {s: self.last[s] for s in self.streams}
        if self.connects % 2:
            url = "%s/stream?streams=%s&since=%s" % (
                self.base_url,
                "/".join(self.streams),
                ",".join("%s:%d" % item for item in since.items()),
            )
            ws = await tornado.websocket.websocket_connect(url)
        else:
            ws = await tornado.websocket.websocket_connect(self.base_url + "/ws")
            await ws.write_message(ujson.dumps(subscribe(self.streams, since=since)))
        return ws

    async def read(self, ws):
        """Record frames until the connection ends."""
        while True:
            frame = await ws.read_message()
            if frame is None:
                return
            self._record(frame)

    async def visit(self, hold, rst):
        """One connection, dropped after ``hold`` seconds (or earlier by
        the server)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                ws = await self.connect()
                break
            except (
                OSError,
                tornado.httpclient.HTTPClientError,
                tornado.iostream.StreamClosedError,
            ):
                # An instance going away behind a proxy: try again, as clients do.
                self.failed_connects += 1
                assert time.monotonic() < deadline, "no connection for 10 s"
                await asyncio.sleep(0.01)
        reader = asyncio.ensure_future(self.read(ws))
        done, _ = await asyncio.wait([reader], timeout=hold)
        while not done and self.keep:  # held open on purpose (see the nginx test)
            done, _ = await asyncio.wait([reader], timeout=0.01)
        if done:
            self.server_closes += 1
        else:
            if rst:
                abort(ws)
            else:
                ws.close()
            await asyncio.wait_for(reader, 10)

    def caught_up(self, published):
        return all(self.last[s] == published[s][-1] for s in self.streams if published[s])


async def _churn(base_url, redis_url, streams, cycles, seed, midway=None):
    """Publish on ``streams`` while a :class:`Resumer` is dropped ``cycles``
    times at random moments; returns (resumer, published).  ``midway(resumer)``
    is started half-way and runs beside the churn."""
    rng = random.Random(seed)
    publisher = AsyncPublisher(redis_url, history=100000)
    base = await publisher.publish_many([(s, trade(0)) for s in streams])
    published = {s: [] for s in streams}
    stop = asyncio.Event()

    async def publish():
        i = 0
        while not stop.is_set():
            i += 1
            batch = rng.sample(streams, rng.randint(1, len(streams)))
            for s, seq in zip(batch, await publisher.publish_many([(s, trade(i)) for s in batch])):
                published[s].append(seq)
            await asyncio.sleep(0.001)

    client = Resumer(base_url, streams, dict(zip(streams, base)))
    task = asyncio.ensure_future(publish())
    side = None
    try:
        for cycle in range(cycles):
            if midway is not None and cycle == cycles // 2:
                side = asyncio.ensure_future(midway(client))  # runs while the client churns on
            await client.visit(rng.uniform(0.0, 0.03), rst=rng.random() < 0.5)
        if side is not None:
            await side
    finally:
        stop.set()
        await task
    await publisher.aclose()
    # A last connection catches up with everything published.
    ws = await client.connect()
    reader = asyncio.ensure_future(client.read(ws))
    await async_wait_until(
        lambda: client.caught_up(published), timeout=10, message="every last position"
    )
    ws.close()
    await asyncio.wait_for(reader, 10)
    return client, published


def _assert_exact(client, published):
    assert client.other == []  # no gap notice, nothing unexpected
    for stream, seqs in published.items():
        assert len(seqs) > 20, "too little published on %s" % stream
        assert client.got[stream] == seqs, stream


@pytest.mark.gen_test(timeout=60)
async def test_resume_under_churn(server, redis_url):
    streams = ["trade.%s" % market() for _ in range(10)]
    base_url = ws_url(server, "")
    client, published = await _churn(base_url, redis_url, streams, cycles=100, seed=12)
    assert client.connects == 101
    _assert_exact(client, published)


# --- order books ------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_book_from_feed_snapshot_and_diffs_equals_feed_book(server, redis_client, redis_url):
    """The demo feed's schedule and simulator published the way the feed
    does: a client starting from the stored snapshot holds the simulator's
    book at every position it compares."""
    name = market("BK")
    stream = "depth." + name
    feed = Feed([name], rate=400, seed=21, start=0.0)
    sim = feed.simulators[name]
    publisher = AsyncPublisher(redis_url, history=1000)
    books: dict[int, dict] = {}  # position of a depth diff -> the feed's book after it
    now = 0.0

    async def step(seconds):
        nonlocal now
        end = now + seconds
        while now < end:
            now += 0.01
            batch = feed.events(now)
            seqs = await publisher.publish_many(
                [
                    (
                        e.channel,
                        encode(e.data),
                        e.snapshot
                        if e.snapshot is None or e.snapshot is True
                        else encode(e.snapshot),
                    )
                    for e in batch
                ]
            )
            depth = [seq for e, seq in zip(batch, seqs) if e.kind == "depth"]
            if depth:
                books[depth[-1]] = sim.snapshot()

    await step(1.3)  # snapshots at 0 s, 0.5 s, 1 s: the client starts after the last
    reader = await Reader.open(server)
    await reader.send(subscribe([stream], snapshot=True))
    await listeners(server, stream, 1)
    await step(1.2)
    last = max(books)
    await reader.wait_seq(stream, last)
    await publisher.aclose()

    frames = reader.of(stream)
    assert frames[0]["data"]["e"] == "depthSnapshot"
    book = OrderBook()
    compared = 0
    for message in frames:
        if message["data"]["e"] == "depthSnapshot":
            book.apply_snapshot(message["data"], message["seq"])
        else:
            book.apply(message["data"], message["seq"])
        expected = books.get(message["seq"])
        if expected is not None:
            assert book.bids() == expected["b"] and book.asks() == expected["a"], message["seq"]
            assert book.u == expected["u"]
            compared += 1
    assert book.seq == last and compared > 50
    assert [m["seq"] for m in frames] == list(range(frames[0]["seq"], last + 1))
    reader.close()


@pytest.mark.gen_test(timeout=30)
async def test_book_from_running_demo_feed_equals_its_stored_snapshots(server, redis_url):
    """``run_feed`` itself: the book a client keeps from snapshot plus diffs
    equals each full-book snapshot the feed stores later, at its position."""
    from marketstream.demo.feed import run_feed
    from marketstream.upstream.history import read_snapshot
    import redis.asyncio

    name = market("FD")
    stream = "depth." + name
    stop = asyncio.Event()
    feed = asyncio.ensure_future(run_feed(redis_url, markets=name, rate=300, seed=4, stop=stop))
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        first = None
        deadline = time.monotonic() + 5
        while first is None:
            assert time.monotonic() < deadline, "the feed stored no snapshot"
            first = await read_snapshot(client, stream)
            await asyncio.sleep(0.02)
        reader = await Reader.open(server)
        await reader.send(subscribe([stream], snapshot=True))
        await listeners(server, stream, 1)
        stored = {}  # later snapshots the feed stored: position -> book
        while len(stored) < 3:
            snap = await read_snapshot(client, stream)
            if snap[0] > first[0]:
                stored[snap[0]] = ujson.loads(snap[1])["data"]
            await asyncio.sleep(0.05)
            assert time.monotonic() < deadline + 5, "too few snapshots stored"
        await reader.wait_seq(stream, max(stored))
    finally:
        stop.set()
        await asyncio.wait_for(feed, 10)
        await client.aclose()

    book = OrderBook()
    compared = 0
    for message in reader.of(stream):
        data = message["data"]
        if book.seq is None:
            assert data["e"] == "depthSnapshot"
            book.apply_snapshot(data, message["seq"])
            continue
        assert data["e"] == "depth", "a second snapshot frame"
        assert book.apply(data, message["seq"])
        if message["seq"] in stored:
            expected = stored[message["seq"]]
            assert [book.bids(), book.asks(), book.u] == [
                expected["b"],
                expected["a"],
                expected["u"],
            ]
            compared += 1
    assert compared == len(stored)
    reader.close()


# --- bad input ---------------------------------------------------------------------------------

# As JSON text: negative, beyond 2^53-1, beyond 64 bits, huge, not integers, floats.
BAD_SINCE = [
    "-1",
    "9007199254740992",
    "18446744073709551616",
    "1" + "0" * 30,
    '"5"',
    "1.5",
    "5.0",
    "1e3",
    "1e400",
    "true",
    "null",
    "[]",
    "{}",
]


async def _subscribed_and_live(server, reader, pub, stream, seqs):
    """The stream is subscribed as a plain SUBSCRIBE: live only, no replay."""
    await listeners(server, stream, 1)
    probe = pub.publish(stream, trade(99))
    await reader.wait_seq(stream, probe)
    assert reader.seqs(stream) == [probe], "replayed %s" % reader.seqs(stream)[:-1]
    assert all(seq < probe for seq in seqs)


@pytest.mark.parametrize("value", BAD_SINCE)
@pytest.mark.gen_test
async def test_bad_since_is_ignored_and_counted(server, redis_client, pub, value):
    stream = "trade.%s" % market()
    seqs = [pub.publish(stream, trade(i)) for i in range(3)]
    reader = await Reader.open(server)
    await reader.ws.write_message(
        '{"method":"SUBSCRIBE","params":["%s"],"id":1,"since":{"%s":%s}}' % (stream, stream, value)
    )
    await _subscribed_and_live(server, reader, pub, stream, seqs)
    assert server.counters.ignored == {"bad_since": 1, "bad_snapshot": 0}
    assert reader.replies() == []
    reader.close()


@pytest.mark.parametrize("since", [5, "trade.X_Y:5", [5], True], ids=repr)
@pytest.mark.gen_test
async def test_since_that_is_not_an_object_is_ignored_and_counted(server, redis_client, pub, since):
    stream = "trade.%s" % market()
    seqs = [pub.publish(stream, trade(i)) for i in range(3)]
    reader = await Reader.open(server)
    await reader.send(subscribe([stream], since=since))
    await _subscribed_and_live(server, reader, pub, stream, seqs)
    assert server.counters.ignored == {"bad_since": 1, "bad_snapshot": 0}
    reader.close()


@pytest.mark.parametrize("snapshot", [1, 0, "yes", {"a": 1}, [1], ["trade.X_Y", 2]], ids=repr)
@pytest.mark.gen_test
async def test_bad_snapshot_is_ignored_and_counted(server, redis_client, pub, snapshot):
    stream = "trade.%s" % market()
    seqs = [pub.publish(stream, trade(i), snapshot=True) for i in range(3)]
    reader = await Reader.open(server)
    await reader.send(subscribe([stream], snapshot=snapshot))
    await _subscribed_and_live(server, reader, pub, stream, seqs)
    assert server.counters.ignored == {"bad_since": 0, "bad_snapshot": 1}
    reader.close()


@pytest.mark.parametrize(
    "query, cause",
    [
        ("since={s}:-1", "bad_since"),
        ("since={s}:1.5", "bad_since"),
        ("since={s}:abc", "bad_since"),
        ("since={s}:", "bad_since"),
        ("since=:5", "bad_since"),
        ("since={s}", "bad_since"),
        ("since={s}:99999999999999999999", "bad_since"),
        ("since={s}:9007199254740992", "bad_since"),
        ("snapshot=maybe", "bad_snapshot"),
        ("snapshot=2", "bad_snapshot"),
    ],
)
@pytest.mark.gen_test
async def test_bad_url_since_and_snapshot_are_ignored_and_counted(
    server, redis_client, pub, query, cause
):
    stream = "trade.%s" % market()
    seqs = [pub.publish(stream, trade(i), snapshot=True) for i in range(3)]
    reader = await Reader.open(server, "/stream?streams=%s&%s" % (stream, query.format(s=stream)))
    await _subscribed_and_live(server, reader, pub, stream, seqs)
    expected = {"bad_since": 0, "bad_snapshot": 0}
    expected[cause] = 1
    assert server.counters.ignored == expected
    reader.close()


@pytest.mark.gen_test
async def test_bad_since_with_acks_gets_an_error_and_the_stream(acks_server, redis_client, pub):
    server = acks_server
    good, bad = "trade.%s" % market(), "trade.%s" % market()
    g = [pub.publish(good, trade(i)) for i in range(3)]
    for i in range(3):
        pub.publish(bad, trade(i))
    reader = await Reader.open(server)
    await reader.send(subscribe([good, bad], since={good: g[0], bad: -5}, snapshot="yes"))
    await reader.wait(lambda: reader.replies())
    reply = reader.replies()[0]
    assert reply["id"] == 1 and reply["error"]["code"] == 2
    assert bad in reply["error"]["msg"] and "snapshot" in reply["error"]["msg"]
    assert server.counters.ignored == {"bad_since": 1, "bad_snapshot": 1}
    await reader.send({"method": "LIST_SUBSCRIPTIONS", "id": 2})
    await reader.wait(lambda: len(reader.replies()) == 2)
    assert sorted(reader.replies()[1]["result"]) == sorted([good, bad])
    # The good resume is served; the bad one is a plain subscribe.
    await listeners(server, bad, 1)
    await listeners(server, good, 1)
    probes = pub.publish(good, trade(9)), pub.publish(bad, trade(9))
    await reader.wait_seq(good, probes[0])
    await reader.wait_seq(bad, probes[1])
    assert reader.seqs(good) == g[1:] + [probes[0]]
    assert reader.seqs(bad) == [probes[1]]
    reader.close()


@pytest.mark.gen_test
async def test_since_for_unknown_and_unrequested_streams(acks_server, redis_client, pub):
    server = acks_server
    unknown, other = "trade.%s" % market(), "trade.%s" % market()
    pub.publish(other, trade(0))
    reader = await Reader.open(server)
    # ``unknown`` never had positions; ``other`` is not in params.
    await reader.send(subscribe([unknown], since={unknown: 3, other: 0}))
    await reader.wait(lambda: reader.replies())
    assert reader.replies() == [{"result": None, "id": 1}]
    await reader.send({"method": "LIST_SUBSCRIPTIONS", "id": 2})
    await reader.wait(lambda: len(reader.replies()) == 2)
    assert reader.replies()[1] == {"result": [unknown], "id": 2}
    await listeners(server, unknown, 1)
    probe = pub.publish(unknown, trade(1))
    await reader.wait_seq(unknown, probe)
    assert reader.seqs(unknown) == [probe] and reader.of(other) == []
    assert server.counters.ignored == {"bad_since": 0, "bad_snapshot": 0}
    reader.close()


# Hypothesis: any JSON value for ``since`` (or one of its entries) and for
# ``snapshot`` gets the defined outcome.  The fuzzed stream has 20 messages
# with a snapshot at the 11th; positions are drawn relative to its first
# (``Rel``) so that the strategies do not depend on what Redis assigned.


class Rel(int):
    """An offset from the fuzzed stream's first position."""


_json_scalars = (
    st.none()
    | st.booleans()
    | st.text(max_size=5)
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([-1, MAX_POSITION + 1, 2**63, 2**64])
    | st.floats(allow_nan=False, allow_infinity=False)
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=4,
)
#: A position the history covers (Rel(-1): everything), or one ahead of it
#: (the gap notice, then the snapshot: not from this history).
_covered = st.builds(Rel, st.integers(min_value=-1, max_value=25)) | st.sampled_from(
    [MAX_POSITION, 2**52]
)
#: A valid position older than the history: the gap path.
_too_old = st.integers(min_value=0, max_value=10) | st.builds(Rel, st.sampled_from([-3, -2]))
_ABSENT = object()


def _valid_position(value):
    return type(value) is int and 0 <= value <= MAX_POSITION


def _fuzz_case(server, redis_client, data, gap):
    """Draw one request, predict its outcome, check it against the server."""
    state = _fuzz_case.__dict__
    if state.get("server") is not server:
        state["server"] = server
        state["stream"] = "depth.%s" % market("FZ")
        with Publisher(redis_client, history=1000) as publisher:
            state["seqs"] = [
                publisher.publish(
                    state["stream"], diff(i), snapshot=book_at(i) if i == 10 else None
                )
                for i in range(20)
            ]
    stream, seqs = state["stream"], state["seqs"]
    plain = "trade.%s" % market("FP")

    if gap:
        mine = data.draw(_too_old, label="since of the stream")
    else:
        mine = data.draw(
            st.one_of(
                st.just(_ABSENT),
                _covered,
                _json_values.filter(lambda v: not _valid_position(v) or v > 2**51),
            ),  # bad, or ahead of the stream
            label="since of the stream",
        )
    if isinstance(mine, Rel):
        mine = seqs[0] + mine
    others = data.draw(
        st.dictionaries(
            st.sampled_from([plain, "trade.NOPE_X", ""]),
            _json_values | st.integers(0, 10),
            max_size=2,
        ),
        label="other since entries",
    )
    since = {stream: mine} if mine is not _ABSENT else {}
    since.update(others)
    if not since and not gap:
        since = data.draw(st.one_of(st.just(None), _json_values), label="since")
    snapshot = data.draw(
        st.one_of(
            st.just(_ABSENT),
            st.booleans(),
            st.lists(st.sampled_from([stream, plain, "x"]), max_size=2),
            _json_values,
        ),
        label="snapshot",
    )
    request = subscribe([stream, plain], request_id=7)
    if since is not None:
        request["since"] = since
    if snapshot is not _ABSENT:
        request["snapshot"] = snapshot

    # The oracle: the contract's "Details".
    bad_since = 0
    valid_since = {}
    if since is not None:
        if not isinstance(since, dict):
            bad_since = 1
        else:
            for key, value in since.items():
                if _valid_position(value):
                    valid_since[key] = value
                else:
                    bad_since += 1
    snapshot_ok = (
        snapshot is _ABSENT
        or snapshot is None
        or isinstance(snapshot, bool)
        or (isinstance(snapshot, list) and all(isinstance(s, str) for s in snapshot))
    )
    wants_snapshot = snapshot_ok and (
        snapshot is True or (isinstance(snapshot, list) and stream in snapshot)
    )
    position = valid_since.get(stream)
    if position is not None:
        if position > seqs[-1]:  # ahead: not from this history
            expected = ["gap"] + seqs[10:]
        elif position == seqs[-1]:
            expected = []
        elif position + 1 >= seqs[0]:
            expected = [s for s in seqs if s > position]
        else:
            expected = ["gap"] + seqs[10:]
    elif wants_snapshot:
        expected = seqs[10:]
    else:
        expected = []
    assert ("gap" in expected) == (gap or (position is not None and position > seqs[-1]))

    async def check():
        before = dict(server.counters.ignored)
        reader = await Reader.open(server)
        try:
            await reader.send(request)
            await reader.wait(lambda: reader.replies(), message="the reply")
            reply = reader.replies()[0]
            if bad_since or not snapshot_ok:
                assert reply["id"] == 7 and reply["error"]["code"] == 2, reply
            else:
                assert reply == {"result": None, "id": 7}
            ignored = server.counters.ignored
            assert ignored["bad_since"] - before["bad_since"] == bad_since
            assert ignored["bad_snapshot"] - before["bad_snapshot"] == (0 if snapshot_ok else 1)
            await reader.send({"method": "LIST_SUBSCRIPTIONS", "id": 8})
            await reader.wait(lambda: len(reader.replies()) == 2, message="the list")
            assert sorted(reader.replies()[1]["result"]) == sorted([stream, plain])
            await async_wait_until(
                lambda: (
                    len(server.manager.streams.get(stream, ())) == 1
                    and stream not in server.manager.core.recovering
                ),
                message="caught up",
            )
            # Live from here on, whatever the position asked for.
            with Publisher(redis_client, history=1000) as publisher:
                probe = publisher.publish(stream, diff(len(seqs)))
            seqs.append(probe)
            await reader.wait_seq(stream, probe)
            frames = reader.of(stream) + reader.of(plain)
            got = ["gap" if is_gap(m) else m["seq"] for m in frames]
            assert got == expected + [probe], (request, got)
        finally:
            reader.close()
            await async_wait_until(
                lambda: (
                    not server.manager.streams.get(stream)
                    and stream not in server.manager.core.recovering
                ),
                message="connection gone",
            )

    return check


_FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_FUZZ
@given(data=st.data())
def test_fuzz_since_and_snapshot(io_loop, acks_server, redis_client, data):
    io_loop.run_sync(_fuzz_case(acks_server, redis_client, data, gap=False), timeout=20)


@settings(_FUZZ, max_examples=8)
@given(data=st.data())
def test_fuzz_since_older_than_the_history(io_loop, acks_server, redis_client, data):
    io_loop.run_sync(_fuzz_case(acks_server, redis_client, data, gap=True), timeout=20)
