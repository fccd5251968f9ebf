"""Server books end to end: a real Redis, a server in the test's IOLoop, real
WebSocket clients (and bare sockets for readers that stall).

A random order flow is published through the recovery script
(:class:`~marketstream.publisher.Publisher`), its snapshots with it; the
test keeps the publisher's own book after every position and checks what
the server sends against it: every checksum (computed here with
``tests/checksums.py``, never with the server's or the clients' book code),
the top N of ``depth5|10|20``, the book the merged diffs of ``@100ms`` and
``@250ms`` rebuild, and the book a reader that stalled ends with.

Every stream name is unique to its test (all tests share one Redis).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
import uuid
from decimal import Decimal

import pytest
import tornado.httpclient
import tornado.websocket
import ujson
from prometheus_client.parser import text_string_to_metric_families

from marketstream.publisher import Publisher
from marketstream.testing import async_wait_until, masked_frame, raw_socket, server_frames
from marketstream.wire.replies import GAP_REASONS
from tests.checksums import crc_of
from tests.helpers import connect, listeners, make_settings, subscribed

# --- the publisher's side --------------------------------------------------------


def market():
    """A market name no other test uses."""
    return "B%s_USDT" % uuid.uuid4().hex[:10].upper()


def _price(ticks):
    return "%d.%02d" % divmod(ticks, 100)


class Flow:
    """A random order flow and the publisher's book after each position.

    Levels are added, changed and removed anywhere in the first 45 of each
    side, so the top 10 and the top 20 keep changing from below and from
    above; prices and quantities are strings, as a publisher sends them.
    """

    def __init__(self, pub, stream, seed, snapshot_every=20):
        self.pub = pub
        self.stream = stream
        self.symbol = stream.partition(".")[2]
        self.rng = random.Random(seed)
        self.snapshot_every = snapshot_every
        self.bids: dict[int, str] = {}  # price in ticks -> quantity
        self.asks: dict[int, str] = {}
        self.u = 1000
        self.books: dict[int, tuple[list, list]] = {}  # position -> (bids, asks) after it
        self.ids: dict[int, int] = {}  # position -> the last update id after it
        self.depths = {"top10": 0, "top20": 0, "below20": 0, "removed_best": 0}
        self.published = 0
        self.snapshots: list[int] = []  # positions published with a snapshot
        mid = 100_000
        for k in range(30):
            self.bids[mid - 1 - 2 * k] = self.qty()
            self.asks[mid + 1 + 2 * k] = self.qty()

    def qty(self):
        return "%d.%03d" % (self.rng.randint(0, 9), self.rng.randint(1, 999))

    def sides(self):
        bids = [[_price(p), self.bids[p]] for p in sorted(self.bids, reverse=True)]
        asks = [[_price(p), self.asks[p]] for p in sorted(self.asks)]
        return bids, asks

    def snapshot(self):
        bids, asks = self.sides()
        return {"e": "depthSnapshot", "s": self.symbol, "u": self.u, "b": bids, "a": asks}

    def start(self):
        """The first snapshot (published with a diff that changes nothing
        new: the snapshot is what a server book starts from)."""
        return self.publish(changes=0)

    def _change(self, side, other, descending):
        rng = self.rng
        ordered = sorted(side, reverse=descending)
        action = rng.random()
        if len(side) < 8 or (action < 0.4 and len(side) < 60):
            best_other = (min if descending else max)(other)
            price = (
                best_other - rng.randint(1, 45) if descending else best_other + rng.randint(1, 45)
            )
            if price in side:
                return None
            side[price] = self.qty()
            index = sorted(side, reverse=descending).index(price)
            qty = side[price]
        elif action < 0.75:
            price = rng.choice(ordered[:45])
            index = ordered.index(price)
            qty = side[price] = self.qty()
        else:
            index = min(int(rng.expovariate(1 / 8)), len(ordered) - 1)
            price = ordered[index]
            del side[price]
            qty = "0"
            if index == 0:
                self.depths["removed_best"] += 1
        self.depths["top10" if index < 10 else "top20" if index < 20 else "below20"] += 1
        return [_price(price), qty]

    def diff(self, changes=None):
        rng = self.rng
        n = rng.randint(1, 6) if changes is None else changes
        b: dict[str, list] = {}
        a: dict[str, list] = {}
        for _ in range(n):
            if rng.random() < 0.5:
                level = self._change(self.bids, self.asks, True)
                if level is not None:
                    b[level[0]] = level  # a price changed twice: its last change
            else:
                level = self._change(self.asks, self.bids, False)
                if level is not None:
                    a[level[0]] = level
        first = self.u + 1
        self.u += rng.randint(1, 3)
        return {
            "e": "depth",
            "s": self.symbol,
            "U": first,
            "u": self.u,
            "b": list(b.values()),
            "a": list(a.values()),
        }

    def publish(self, changes=None):
        """One diff (with the snapshot after it every ``snapshot_every``);
        its position."""
        data = self.diff(changes)
        snap = self.snapshot() if self.published % self.snapshot_every == 0 else None
        seq = self.pub.publish(self.stream, data, snapshot=snap)
        if snap is not None:
            self.snapshots.append(seq)
        self.published += 1
        self.books[seq] = self.sides()
        self.ids[seq] = self.u
        return seq

    def burst(self, count):
        """``count`` diffs in one pipeline (the server reads them in one
        batch), the snapshot after the last; the last position."""
        messages, books, ids = [], [], []
        for _ in range(count):
            messages.append((self.stream, self.diff(), None))
            books.append(self.sides())
            ids.append(self.u)
        messages[-1] = (self.stream, messages[-1][1], self.snapshot())
        seqs = self.pub.publish_many(messages)
        self.snapshots.append(seqs[-1])
        self.published += count
        self.books.update(zip(seqs, books))
        self.ids.update(zip(seqs, ids))
        return seqs[-1]

    def last(self):
        return max(self.books)

    def crossed_the_tops(self):
        """Whether the flow so far changed levels in, around and below
        the top 10 and 20."""
        return all(self.depths.values())


@pytest.fixture
def pub(redis_client):
    publisher = Publisher(redis_client, history=2000, ttl=600)
    yield publisher
    publisher.close()


# --- the clients' side ---------------------------------------------------------


class Reader:
    """A WebSocket client whose frames are read in the background, each
    with the time it arrived."""

    def __init__(self, ws):
        self.ws = ws
        self.frames: list[tuple[float, dict]] = []
        self.closed = False
        self._task = asyncio.ensure_future(self._run())

    @classmethod
    async def open(cls, server):
        return cls(await connect(server))

    async def _run(self):
        while True:
            frame = await self.ws.read_message()
            if frame is None:
                self.closed = True
                return
            self.frames.append((time.monotonic(), ujson.loads(frame)))

    def of(self, stream):
        return [m for _, m in self.frames if m.get("stream") == stream]

    def timed(self, stream):
        return [(t, m) for t, m in self.frames if m.get("stream") == stream]

    def replies(self):
        return [m for _, m in self.frames if "stream" not in m]

    async def send(self, params, request_id=1, method="SUBSCRIBE", **extra):
        message = {"method": method, "params": params, "id": request_id, **extra}
        await self.ws.write_message(json.dumps(message))

    async def reply(self, request_id, timeout=10):
        await async_wait_until(
            lambda: any(m.get("id") == request_id for m in self.replies()),
            timeout=timeout,
            message="the reply to request %s" % request_id,
        )
        return next(m for m in self.replies() if m.get("id") == request_id)

    async def wait(self, predicate, timeout=20, message="frames"):
        await async_wait_until(predicate, timeout=timeout, message=message)

    def close(self):
        self.ws.close()


class LocalBook:
    """The client's book, kept here from the frames (no library code)."""

    def __init__(self, data):
        self.bids = {Decimal(p): [p, q] for p, q in data["b"]}
        self.asks = {Decimal(p): [p, q] for p, q in data["a"]}
        self.u = data["u"]

    def apply(self, data):
        assert data["U"] == self.u + 1, "not contiguous: U %s after u %s" % (data["U"], self.u)
        for side, levels in ((self.bids, data["b"]), (self.asks, data["a"])):
            for price, qty in levels:
                if Decimal(qty) == 0:
                    side.pop(Decimal(price), None)
                else:
                    side[Decimal(price)] = [price, qty]
        self.u = data["u"]

    def sides(self):
        bids = [self.bids[p] for p in sorted(self.bids, reverse=True)]
        asks = [self.asks[p] for p in sorted(self.asks)]
        return bids, asks


async def book_synced(server, stream):
    """Wait until the server's book of ``stream`` follows it (its start
    read done): from then on every frame carries a checksum."""
    books = server.manager.core.books
    await async_wait_until(
        lambda: books.synced(stream), timeout=20, message="the server's book of %s" % stream
    )


async def pace(flow, count, every=0.005):
    """Publish ``count`` diffs, one every ``every`` seconds (a publisher's
    pace, so that the update speeds' intervals see several each)."""
    for _ in range(count):
        flow.publish()
        await asyncio.sleep(every)
    return flow.last()


async def scrape(port):
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        "http://127.0.0.1:%d/metrics" % port
    )
    values = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            labels = ",".join("%s=%s" % item for item in sorted(sample.labels.items()))
            values[sample.name + ("{%s}" % labels if labels else "")] = sample.value
    return values


# --- 1. checksums of depth.X -----------------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_every_depth_frame_carries_the_checksum_of_the_publishers_book(server, pub):
    stream = "depth." + market()
    flow = Flow(pub, stream, seed=1)
    flow.start()
    reader = await Reader.open(server)
    await reader.send([stream])
    await listeners(server, stream, 1)
    await book_synced(server, stream)
    last = await pace(flow, 400, every=0)
    assert flow.crossed_the_tops(), flow.depths
    await reader.wait(
        lambda: any(m.get("seq") == last for m in reader.of(stream)), message="the last diff"
    )
    frames = reader.of(stream)
    assert len(frames) == 400
    for frame in frames:
        assert list(frame)[-2:] == ["seq", "checksum"], frame  # "checksum" right after "seq"
        assert frame["checksum"] == crc_of(*flow.books[frame["seq"]]), frame["seq"]
    reader.close()


@pytest.mark.gen_test(timeout=120)
async def test_a_first_readers_frames_carry_checksums_from_the_very_first(server, pub):
    """Nobody read the stream on this server: the reader's subscribe starts
    the server's book, and the diffs published while its start read is in
    flight are held back until it ends, then sent with their checksums."""
    stream = "depth." + market()
    flow = Flow(pub, stream, seed=4)
    flow.start()
    books = server.manager.core.books
    reader = await Reader.open(server)
    await reader.send([stream])
    deadline = time.monotonic() + 20
    while not (stream in books.streams and books.streams[stream].reading):
        assert time.monotonic() < deadline, "the server's start read of the book"
        await asyncio.sleep(0)  # each turn of the loop: the read is in flight for several
    first = flow.publish()  # the loop waits: the read's answer cannot be taken meanwhile
    for _ in range(9):
        flow.publish()
    last = await pace(flow, 40, every=0.001)
    await reader.wait(lambda: any(m.get("seq") == last for m in reader.of(stream)))
    frames = reader.of(stream)
    assert [f["seq"] for f in frames] == list(range(first, last + 1))
    for frame in frames:
        assert frame["checksum"] == crc_of(*flow.books[frame["seq"]]), frame["seq"]
    reader.close()


# --- 2. depth5/10/20 -------------------------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_top_n_streams_are_the_publishers_top_n_at_their_seq(server, pub):
    name = market()
    stream = "depth." + name
    tops = {n: "depth%d.%s" % (n, name) for n in (5, 10, 20)}
    flow = Flow(pub, stream, seed=2)
    flow.start()
    reader = await Reader.open(server)
    started = time.monotonic()
    await reader.send(list(tops.values()))
    await book_synced(server, stream)
    await pace(flow, 300)
    flow.publish(changes=0)  # the last diff changes nothing: the tops settle
    final = flow.books[flow.last()]
    for n, top in tops.items():
        await reader.wait(
            lambda n=n, top=top: (
                reader.of(top)
                and [reader.of(top)[-1]["data"][k] for k in "ba"] == [final[0][:n], final[1][:n]]
            ),
            message="%s at the publisher's last top %d" % (top, n),
        )
    elapsed = time.monotonic() - started
    assert flow.crossed_the_tops(), flow.depths
    for n, top in tops.items():
        frames = reader.of(top)
        assert len(frames) >= 5, (top, len(frames))
        # At most one frame per 100 ms (and a few for a busy machine's timers).
        assert len(frames) <= elapsed / 0.1 + 3, (top, len(frames), elapsed)
        for frame in frames:
            data = frame["data"]
            assert data["e"] == "depthTop" and data["s"] == name
            bids, asks = flow.books[frame["seq"]]
            assert (data["b"], data["a"]) == (bids[:n], asks[:n]), (top, frame["seq"])
            assert data["u"] == flow.ids[frame["seq"]]
            assert frame["checksum"] == crc_of(data["b"], data["a"]), top
        # Sent when the top changed: never the same top twice in a row.
        sent = [(f["data"]["b"], f["data"]["a"]) for f in frames]
        assert all(a != b for a, b in zip(sent, sent[1:])), top
    reader.close()


# --- 3. merged diffs ---------------------------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_merged_diffs_rebuild_the_book_of_the_raw_diffs(server, pub):
    name = market()
    stream = "depth." + name
    speeds = {0.1: stream + "@100ms", 0.25: stream + "@250ms"}
    flow = Flow(pub, stream, seed=3)
    flow.start()
    reader = await Reader.open(server)
    subscribed_at = time.monotonic()
    await reader.send([stream, *speeds.values()])
    await listeners(server, stream, 1)
    await book_synced(server, stream)
    last = await pace(flow, 400)
    final = flow.books[last]
    for merged in speeds.values():
        await reader.wait(
            lambda merged=merged: any(m.get("seq") == last for m in reader.of(merged)),
            message="%s at the last position" % merged,
        )
    raw_frames = reader.of(stream)  # the raw diffs, from the book before the first
    start = raw_frames[0]["seq"] - 1
    raw = LocalBook({"b": flow.books[start][0], "a": flow.books[start][1], "u": flow.ids[start]})
    for frame in raw_frames:
        raw.apply(frame["data"])
    assert raw.sides() == final
    for interval, merged in speeds.items():
        timed = reader.timed(merged)
        frames = [m for _, m in timed]
        snapshot = frames[0]
        assert snapshot["data"]["e"] == "depthSnapshot", snapshot
        book = LocalBook(snapshot["data"])
        assert book.sides() == flow.books[snapshot["seq"]]
        assert snapshot["checksum"] == crc_of(*flow.books[snapshot["seq"]])
        for frame in frames[1:]:
            assert frame["data"]["e"] == "depth", frame
            book.apply(frame["data"])  # U follows the previous u
            assert frame["data"]["u"] == flow.ids[frame["seq"]]
            assert book.sides() == flow.books[frame["seq"]], (merged, frame["seq"])
            assert frame["checksum"] == crc_of(*flow.books[frame["seq"]])
        assert book.sides() == final == raw.sides()
        # Fewer frames than diffs, and at most one per interval (with slack
        # for a busy machine's timers).
        elapsed = timed[-1][0] - subscribed_at
        assert 1 < len(frames) < 400
        assert len(frames) <= elapsed / interval + 3, (merged, len(frames), elapsed)
    reader.close()


# --- 4. slow readers -----------------------------------------------------------------


class Stalled:
    """A bare socket that subscribed and then reads nothing until told
    to; the server's side of it given a small kernel buffer, so that what
    it cannot send queues in the server at once."""

    def __init__(self, sock, data):
        self.sock = sock
        self.data = data
        self.frames: list[dict] = []

    @classmethod
    async def open(cls, server, streams):
        sock, data = await raw_socket(server.settings.port, rcvbuf=4096)
        request = {"method": "SUBSCRIBE", "params": streams, "id": 1}
        sock.send(masked_frame(json.dumps(request)))
        await async_wait_until(
            lambda: any(server.manager.subscriptions(h) for h in server.manager.connections),
            message="subscribed",
        )
        (handler,) = server.manager.connections
        handler.ws_connection.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return cls(sock, data), handler

    async def read_until(self, until, timeout=30):
        """Read frames until ``until()`` is true."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not until():
            assert loop.time() < deadline, "read %d frames; the last: %s" % (
                len(self.frames),
                self.frames[-3:],
            )
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 16), 1)
            except asyncio.TimeoutError:
                continue
            assert chunk, "the server closed the connection"
            done, self.data = server_frames(self.data + chunk)
            self.frames += [ujson.loads(f) for f in done]

    def of(self, stream):
        return [f for f in self.frames if f.get("stream") == stream]

    def reached(self, stream, seq):
        return any(f.get("seq") == seq for f in self.of(stream))

    def split(self, stream):
        """``stream``'s frames before and after its one gap notice, which
        says ``slow_reader``."""
        frames = self.of(stream)
        gaps = [i for i, f in enumerate(frames) if f["data"]["e"] == "gap"]
        assert len(gaps) == 1, (stream, gaps)
        gap = frames[gaps[0]]["data"]
        assert (gap["reason"], gap["msg"]) == ("slow_reader", GAP_REASONS["slow_reader"])
        return frames[: gaps[0]], frames[gaps[0] + 1 :]

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("burst", [False, True], ids=["paced", "burst"])
@pytest.mark.gen_test(timeout=180)
async def test_a_stalled_book_reader_gets_a_snapshot_and_is_never_disconnected(
    server_factory, pub, burst
):
    """``burst``: the diffs come 500 at a time, each burst read in one
    batch larger than max_buffer_bytes (a backlog Redis hands over at once):
    the batch that passes the cap parks the reader too."""
    server = await server_factory(limits__max_buffer_bytes=65536)
    before = await scrape(server.settings.port)
    name = market()
    stream, merged, top = "depth." + name, "depth.%s@100ms" % name, "depth10." + name
    flow = Flow(pub, stream, seed=4)
    flow.start()
    stalled, handler = await Stalled.open(server, [stream, merged, top])
    await listeners(server, stream, 1)
    await book_synced(server, stream)
    # 3000 diffs (several hundred KB): far past the kernel's buffers and
    # max_buffer_bytes, which would have closed the reader before.
    for i in range(6 if burst else 3000):
        if burst:
            flow.burst(500)
        else:
            flow.publish()
        if burst or i % 50 == 0:
            await asyncio.sleep(0.001)
    await async_wait_until(
        lambda: server.counters.slow_reader_fallbacks == 1, timeout=30, message="parked"
    )
    assert server.manager.books.parked(handler)
    last = flow.publish()  # published while it is parked
    assert handler in server.manager.connections
    # It reads again: the queued frames, then the notice, the snapshot, live.
    await stalled.read_until(lambda: stalled.reached(stream, last))
    before_gap, after_gap = stalled.split(stream)
    assert before_gap and all(f["data"]["e"] == "depth" for f in before_gap)
    for frame in before_gap:
        assert frame["checksum"] == crc_of(*flow.books[frame["seq"]]), frame["seq"]
    snapshot = after_gap[0]
    assert snapshot["data"]["e"] == "depthSnapshot", snapshot
    book = LocalBook(snapshot["data"])
    assert snapshot["checksum"] == crc_of(*book.sides())
    assert book.sides() == flow.books[snapshot["seq"]]
    for frame in after_gap[1:]:
        if frame["seq"] <= snapshot["seq"]:
            continue  # history before the snapshot (the snapshot covers it)
        book.apply(frame["data"])
        assert frame["checksum"] == crc_of(*flow.books[frame["seq"]]), frame["seq"]
    assert book.sides() == flow.books[last]
    # Still connected, live again: the next diff arrives on each stream.
    nxt = flow.publish()
    final = flow.books[nxt]
    await stalled.read_until(
        lambda: (
            stalled.reached(stream, nxt)
            and stalled.reached(merged, nxt)
            and stalled.of(top)[-1]["data"]["b"] == final[0][:10]
            and stalled.of(top)[-1]["data"]["a"] == final[1][:10]
        )
    )
    assert stalled.of(stream)[-1]["checksum"] == crc_of(*final)
    # The derived streams too: the notice, their state, then changes.
    _, after_gap = stalled.split(merged)
    assert after_gap[0]["data"]["e"] == "depthSnapshot"
    book = LocalBook(after_gap[0]["data"])
    for frame in after_gap[1:]:
        book.apply(frame["data"])
        assert frame["checksum"] == crc_of(*flow.books[frame["seq"]])
    assert book.sides() == final
    _, after_gap = stalled.split(top)
    assert after_gap and all(f["data"]["e"] == "depthTop" for f in after_gap)
    assert after_gap[0]["seq"] >= last
    assert handler in server.manager.connections
    assert not server.manager.books.parked(handler)
    assert server.counters.closed["slow_consumer"] == 0
    after = await scrape(server.settings.port)
    fallbacks = "marketstream_slow_reader_fallbacks_total"
    assert after[fallbacks] - before.get(fallbacks, 0) == 1
    stalled.close()


@pytest.mark.gen_test(timeout=120)
async def test_a_batch_past_twice_the_cap_still_closes_a_book_reader(server_factory, pub):
    """The batch that passes max_buffer_bytes is queued anyway when it
    parks the reader's book streams, but only up to twice the cap: the
    memory a stalled reader holds stays bounded."""
    server = await server_factory(limits__max_buffer_bytes=16384)
    stream = "depth." + market()
    flow = Flow(pub, stream, seed=5)
    flow.start()
    stalled, handler = await Stalled.open(server, [stream])
    await listeners(server, stream, 1)
    await book_synced(server, stream)
    flow.burst(1000)  # some 150 KB in one batch: past 2 x 16 KB
    await async_wait_until(
        lambda: server.counters.closed["slow_consumer"] == 1, timeout=30, message="closed"
    )
    assert server.counters.slow_reader_fallbacks == 0
    await async_wait_until(lambda: not server.manager.connections, message="removed")
    stalled.close()


@pytest.mark.gen_test(timeout=120)
async def test_a_stalled_trade_reader_is_still_closed_as_a_slow_consumer(
    server_factory, redis_client, pub
):
    server = await server_factory(limits__max_buffer_bytes=65536)
    stream = "trade." + market()
    stalled, handler = await Stalled.open(server, [stream])
    await listeners(server, stream, 1)
    await subscribed(redis_client, stream)
    for i in range(2000):
        pub.publish(stream, {"e": "trade", "t": i, "pad": "x" * 200})
        if i % 50 == 0:
            await asyncio.sleep(0)
    await async_wait_until(
        lambda: server.counters.closed["slow_consumer"] == 1, timeout=30, message="closed"
    )
    await async_wait_until(lambda: not server.manager.connections, message="removed")
    assert server.counters.slow_reader_fallbacks == 0
    stalled.close()


# --- 5. refused names ------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_trades_at_speeds_unknown_speeds_and_depth7_are_refused(server_factory):
    server = await server_factory(protocol__acks="true")
    name = market()
    refused = {
        "trade.%s@100ms" % name: "no_speed",
        "trade.%s@1000ms" % name: "no_speed",
        "depth.%s@50ms" % name: "unknown_speed",
        "depth7.%s" % name: "invalid_name",
    }
    reader = await Reader.open(server)
    await reader.send(["ticker.%s@100ms" % name, *refused])
    reply = await reader.reply(1)
    error = reply["error"]
    assert error["subscribed"] == ["ticker.%s@100ms" % name]
    assert set(error["refused"]) == set(refused)
    assert "every trade matters" in error["refused"]["trade.%s@100ms" % name]
    assert "50ms" in error["refused"]["depth.%s@50ms" % name]
    assert "depth7" in error["refused"]["depth7.%s" % name]
    counters = server.counters
    assert counters.rejected["no_speed"] == 2
    assert counters.rejected["unknown_speed"] == 1
    assert counters.rejected["invalid_name"] == 1
    metrics = await scrape(server.settings.port)
    assert metrics["marketstream_rejected_streams_total{cause=no_speed}"] == 2
    assert server.manager.subscriptions(next(iter(server.manager.connections))) == [
        "ticker.%s@100ms" % name
    ]
    reader.close()


# --- 6. depth streams without snapshots ------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_a_plain_depth_stream_is_served_and_its_derived_streams_refused(
    server_factory, redis_client
):
    server = await server_factory(protocol__acks="true")
    name = market()
    stream, top = "depth." + name, "depth10." + name

    def diff(i):
        return ujson.dumps(
            {"stream": stream, "data": {"e": "depth", "U": i, "u": i, "b": [["1", "%d" % i]]}}
        )

    redis_client.publish(stream, diff(0))  # plain PUBLISH: no position, no snapshot
    # The first subscriber of a derived stream: accepted, then told (the
    # server learns that the stream has no snapshot by reading it).
    first = await Reader.open(server)
    await first.send([top])
    assert await first.reply(1) == {"result": None, "id": 1}
    await first.wait(lambda: first.of(top), message="the no_book notice")
    assert len(first.of(top)) == 1
    notice = first.of(top)[0]["data"]
    assert notice["e"] == "unsubscribed" and notice["reason"] == "no_book", notice
    assert stream in notice["msg"]
    (handler,) = server.manager.connections
    await async_wait_until(
        lambda: server.manager.subscriptions(handler) == [], message="unsubscribed"
    )
    # The plain stream is served as before: as published, no checksum.
    plain = await Reader.open(server)
    await plain.send([stream])
    assert await plain.reply(1) == {"result": None, "id": 1}
    await async_wait_until(
        lambda: server.manager.books.bookless(top) == stream, message="known bookless"
    )
    redis_client.publish(stream, diff(1))
    await plain.wait(lambda: plain.of(stream), message="the plain diff")
    assert plain.of(stream) == [ujson.loads(diff(1))]
    # Later subscribers: refused in the reply.
    later = await Reader.open(server)
    await later.send([top, stream + "@100ms", "depth5." + name, stream])
    error = (await later.reply(1))["error"]
    assert error["subscribed"] == [stream]
    assert set(error["refused"]) == {top, stream + "@100ms", "depth5." + name}
    assert all(stream in reason for reason in error["refused"].values())
    assert server.counters.rejected["no_book"] == 4
    metrics = await scrape(server.settings.port)
    assert metrics["marketstream_rejected_streams_total{cause=no_book}"] == 4
    redis_client.publish(stream, diff(2))
    for reader in (plain, later):
        await reader.wait(lambda reader=reader: reader.of(stream)[-1:] == [ujson.loads(diff(2))])
    assert not first.of(stream) and len(first.of(top)) == 1
    for reader in (plain, first, later):
        reader.close()


# --- 7. snapshot and since on derived streams ------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_snapshot_and_since_on_derived_streams_give_a_snapshot_then_live(server, pub):
    name = market()
    stream = "depth." + name
    flow = Flow(pub, stream, seed=7)
    flow.start()
    for _ in range(30):
        flow.publish()
    since = flow.last() - 10
    reader = await Reader.open(server)
    await reader.send(["depth10." + name], snapshot=True)
    await reader.send([stream + "@100ms"], request_id=2, since={stream + "@100ms": since})
    # The state, without anything new published.
    await reader.wait(
        lambda: reader.of("depth10." + name) and reader.of(stream + "@100ms"),
        message="the derived books' state",
    )
    book = flow.books[flow.last()]
    top = reader.of("depth10." + name)[0]
    assert top["seq"] == flow.last()
    assert (top["data"]["b"], top["data"]["a"]) == (book[0][:10], book[1][:10])
    merged = reader.of(stream + "@100ms")[0]
    assert merged["data"]["e"] == "depthSnapshot" and merged["seq"] == flow.last()
    assert (merged["data"]["b"], merged["data"]["a"]) == book
    assert merged["checksum"] == crc_of(*book)
    # Then live frames: merged diffs that follow the snapshot.
    last = await pace(flow, 20, every=0.02)
    await reader.wait(
        lambda: (
            reader.of(stream + "@100ms")[-1]["seq"] == last
            and reader.of("depth10." + name)[-1]["data"]["b"] == flow.books[last][0][:10]
        ),
        message="live frames",
    )
    local = LocalBook(merged["data"])
    for frame in reader.of(stream + "@100ms")[1:]:
        assert frame["data"]["e"] == "depth"
        local.apply(frame["data"])
    assert local.sides() == flow.books[last]
    reader.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_ticker_speeds_first_reader_gets_the_streams_snapshot_from_redis(server, pub):
    """Nobody read the ticker on this server: a subscribe with ``snapshot``
    to its speed gets the stream's snapshot from Redis at the first tick,
    without anything new published; then the latest message per interval."""
    ticker = "ticker." + market()
    published = [
        pub.publish(ticker, {"e": "24hrTicker", "c": str(i)}, snapshot=True) for i in range(3)
    ]
    reader = await Reader.open(server)
    await reader.send([ticker + "@250ms"], snapshot=True)
    await reader.wait(lambda: reader.of(ticker + "@250ms"), message="the ticker's snapshot")
    assert reader.of(ticker + "@250ms") == [
        {"stream": ticker + "@250ms", "data": {"e": "24hrTicker", "c": "2"}, "seq": published[-1]}
    ]
    newer = pub.publish(ticker, {"e": "24hrTicker", "c": "3"}, snapshot=True)
    await reader.wait(lambda: reader.of(ticker + "@250ms")[-1]["seq"] == newer, message="live")
    reader.close()


async def _resumed(server, pub, seed, held, **want):
    """A reader that resumes (``want``: since or snapshot) on a book stream
    published with a snapshot every 20 diffs, after 60 diffs; ``held``:
    another reader keeps the server's book already.  Its frames of the
    stream, and the publisher's flow."""
    stream = "depth." + market()
    flow = Flow(pub, stream, seed=seed)
    flow.start()
    if held:
        other = await Reader.open(server)
        await other.send([stream])
        await book_synced(server, stream)
    for _ in range(60):
        flow.publish()
    reader = await Reader.open(server)
    extra = {key: ({stream: flow.last() - 45} if key == "since" else v) for key, v in want.items()}
    await reader.send([stream], **extra)
    await reader.wait(lambda: any(m.get("seq") == flow.last() for m in reader.of(stream)))
    return reader.of(stream), flow


@pytest.mark.parametrize("want", ["since", "snapshot"])
@pytest.mark.gen_test(timeout=60)
async def test_catch_ups_of_a_kept_book_carry_its_checksums(server, pub, want):
    frames, flow = await _resumed(server, pub, 10, held=True, **{want: True})
    assert frames[0]["data"]["e"] == ("depth" if want == "since" else "depthSnapshot")
    assert len(frames) == (45 if want == "since" else 1)
    for frame in frames:
        assert frame["checksum"] == crc_of(*flow.books[frame["seq"]]), frame["seq"]


@pytest.mark.gen_test(timeout=60)
async def test_a_first_readers_resume_never_carries_a_wrong_checksum(server, pub):
    """The book stream's first reader resumes from before the stream's
    latest snapshot: the server knows its book from that snapshot on, so
    the frames after it carry the right checksum and the older ones none
    (see the README: a book cannot be run backwards)."""
    frames, flow = await _resumed(server, pub, 11, held=False, since=True)
    assert len(frames) == 45
    snapshot = max(flow.snapshots)
    for frame in frames:
        if frame["seq"] >= snapshot:
            assert frame["checksum"] == crc_of(*flow.books[frame["seq"]]), frame["seq"]
        else:
            assert "checksum" not in frame, frame["seq"]


# --- 8. other streams ----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_frames_of_other_streams_are_unchanged(server, pub, redis_client):
    name = market()
    streams = ["trade." + name, "ticker." + name, "depth." + name]
    reader = await Reader.open(server)
    await reader.send(streams)
    await subscribed(redis_client, *streams)
    seqs = [
        pub.publish(streams[0], {"e": "trade", "t": 1}),
        pub.publish(streams[1], {"e": "24hrTicker", "c": "1"}, snapshot=True),
    ]
    redis_client.publish(streams[2], envelope_of(streams[2]))
    await reader.wait(lambda: all(reader.of(s) for s in streams))
    assert reader.of(streams[0]) == [
        {"stream": streams[0], "data": {"e": "trade", "t": 1}, "seq": seqs[0]}
    ]
    assert reader.of(streams[1]) == [
        {"stream": streams[1], "data": {"e": "24hrTicker", "c": "1"}, "seq": seqs[1]}
    ]
    assert reader.of(streams[2]) == [ujson.loads(envelope_of(streams[2]))]
    reader.close()


def envelope_of(stream):
    return ujson.dumps({"stream": stream, "data": {"e": "depth", "U": 1, "u": 1, "b": [], "a": []}})


@pytest.mark.gen_test(timeout=60)
async def test_without_book_streams_depth_frames_have_no_checksum(server_factory, pub):
    server = await server_factory(books__streams="")
    stream = "depth." + market()
    flow = Flow(pub, stream, seed=8)
    flow.start()
    reader = await Reader.open(server)
    await reader.send([stream])
    await listeners(server, stream, 1)
    last = flow.publish()
    await reader.wait(lambda: reader.of(stream))
    assert reader.of(stream)[0]["seq"] == last and "checksum" not in reader.of(stream)[0]
    reader.close()


# --- 9. the shipped timers -------------------------------------------------------------------


@pytest.mark.slow
def test_derived_streams_keep_flowing_past_the_longest_timer_with_shipped_defaults(redis_url):
    """Runs 45 s: longer than every timer the defaults ship (the keepalive
    ping every 20 s and its 20 s timeout, the 1000 ms speed, the 100 ms
    tops), so a timer that stops, or a ping that closes a busy derived
    reader, shows."""
    from marketstream.server.app import Server

    settings = make_settings(redis_url)
    assert settings.server.ping_interval == 20
    run_for = 2 * settings.server.ping_interval + 5
    name = market()
    stream = "depth." + name
    streams = [stream + "@1000ms", "depth10." + name]

    async def scenario():
        server = Server(settings)
        await server.start()
        publisher = Publisher(redis_url, history=1000, ttl=600)
        try:
            flow = Flow(publisher, stream, seed=9)
            flow.start()
            reader = Reader(
                await tornado.websocket.websocket_connect(
                    "ws://127.0.0.1:%d/ws" % server.settings.port
                )
            )
            await reader.send(streams)
            started = time.monotonic()
            while time.monotonic() - started < run_for:
                flow.publish()
                await asyncio.sleep(0.25)
            final = flow.books[flow.last()]
            await reader.wait(
                lambda: reader.of(streams[0]) and reader.of(streams[0])[-1]["seq"] == flow.last(),
                message="the last merged diff",
            )
            assert not reader.closed and reader.ws.close_code is None
            for name_ in streams:
                times = [t - started for t, _ in reader.timed(name_)]
                # Frames in every 5 s of the run, to its end.
                windows = {int(t // 5) for t in times if t < run_for}
                assert windows >= set(range(int(run_for // 5))), (name_, sorted(windows))
            assert reader.of(streams[1])[-1]["data"]["b"] == final[0][:10]
            reader.close()
        finally:
            publisher.close()
            await server.stop()

    asyncio.run(scenario())
