"""The Client (marketstream.client.client) against a real server and a real
Redis, including forced disconnects."""

import asyncio
import random
import socket
import struct

import pytest
import ujson

from marketstream.client import (
    GAP,
    MESSAGE,
    SNAPSHOT,
    BookGap,
    Client,
    ConnectionLost,
    OrderBook,
    StreamsRefused,
)
from marketstream.demo.simulator import MarketSimulator
from marketstream.publisher import AsyncPublisher, Publisher
from marketstream.testing import async_wait_until
from tests.helpers import listeners, subscribed, ws_url


# --- helpers -------------------------------------------------------------------


def feed_book(sim):
    """The simulator's own book in the published form, best first."""
    return {
        "bids": [[sim.price(p), sim.qty(q)] for p, q in sorted(sim._bids.items(), reverse=True)],
        "asks": [[sim.price(p), sim.qty(q)] for p, q in sorted(sim._asks.items())],
    }


def depth_snapshot(sim):
    book = feed_book(sim)
    return {
        "e": "depthSnapshot",
        "s": sim.market,
        "u": sim._update_id,
        "b": book["bids"],
        "a": book["asks"],
    }


def kick(server, rst):
    """Close every client connection of ``server`` from the server side:
    a TCP reset, or a WebSocket close frame."""
    for conn in list(server.manager.connections):
        ws = conn.ws_connection
        if ws is None or ws.stream is None:
            continue
        if rst:
            ws.stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            ws.stream.close()
        else:
            conn.close(1001, "kicked")


class Collector:
    """Iterates a client in a task, keeping every message."""

    running = []

    def __init__(self, client):
        self.client = client
        self.messages = []
        self.task = asyncio.ensure_future(self._run())
        self.running.append(self)

    async def _run(self):
        async for msg in self.client:
            self.messages.append(msg)

    def of(self, stream, kind=MESSAGE):
        return [m for m in self.messages if m.stream == stream and m.kind == kind]

    async def stop(self):
        await self.client.close()
        await asyncio.wait_for(self.task, 5)


@pytest.fixture(autouse=True)
def close_clients(io_loop):
    """Clients a failed test left running are closed."""
    yield
    collectors, Collector.running[:] = list(Collector.running), []

    async def close_all():
        for collector in collectors:
            await collector.client.close()
        await asyncio.wait([c.task for c in collectors], timeout=5)

    if collectors:
        io_loop.run_sync(close_all)


async def connected_client(server, redis_client, streams, **kwargs):
    kwargs.setdefault("backoff", (0.005, 0.05))
    states = []
    client = Client(ws_url(server), streams, on_state=states.append, **kwargs)
    collector = Collector(client)
    await async_wait_until(lambda: client.connected, message="client connected")
    for stream in streams:
        await listeners(server, stream, 1)
    await subscribed(redis_client, *streams)
    collector.states = states
    return client, collector


async def reconnected(client, collector, kicks):
    """Wait for the connection made after ``kicks`` kicks; returns how many
    messages came before it.  Whatever arrives afterwards came on it, so the
    server knows that connection and the next kick reaches it (a message read
    from the kicked connection before its end would not say so)."""
    await async_wait_until(
        lambda: client.connects == kicks + 1 and client.connected,
        timeout=20,
        message="connection %d" % (kicks + 1),
    )
    return len(collector.messages)


def plain(stream, **data):
    return ujson.dumps({"stream": stream, "data": data})


# --- plain streams -------------------------------------------------------------


@pytest.mark.gen_test
async def test_client_receives_plain_messages_in_order(server, redis_client):
    client, collector = await connected_client(server, redis_client, ["trade.SOL_USDC"])
    for t in range(50):
        redis_client.publish("trade.SOL_USDC", plain("trade.SOL_USDC", e="trade", t=t))
    await async_wait_until(lambda: len(collector.messages) == 50, message="50 messages")
    assert [m.data["t"] for m in collector.messages] == list(range(50))
    first = collector.messages[0]
    assert (first.stream, first.seq, first.kind) == ("trade.SOL_USDC", None, MESSAGE)
    assert first.raw == plain("trade.SOL_USDC", e="trade", t=0)
    assert collector.states == ["connecting", "connected"]
    await collector.stop()
    assert collector.states[-1] == "closed" and not client.connected


@pytest.mark.gen_test
async def test_client_drops_repeated_positions_and_reports_jumps(server, redis_client):
    # Frames that carry "seq" (published here as envelopes, passed through).
    client, collector = await connected_client(server, redis_client, ["trade.SOL_USDC"])
    for seq in (1, 2, 2, 3, 6, 5, 7):
        redis_client.publish(
            "trade.SOL_USDC",
            ujson.dumps({"stream": "trade.SOL_USDC", "data": {"e": "trade", "t": seq}, "seq": seq}),
        )
    await async_wait_until(lambda: client.last_seq.get("trade.SOL_USDC") == 7, message="seq 7")
    kinds = [(m.kind, m.seq) for m in collector.messages]
    assert kinds == [
        (MESSAGE, 1),
        (MESSAGE, 2),
        (MESSAGE, 3),
        (GAP, None),
        (MESSAGE, 6),
        (MESSAGE, 7),
    ]
    gap = collector.messages[3].data
    assert (gap["e"], gap["from"], gap["to"]) == ("gap", 4, 5)
    assert (gap["reason"], gap["msg"]) == ("positions_missing", "positions 4 to 5 missing")
    assert client.duplicates == 2 and client.gaps == 1
    await collector.stop()


@pytest.mark.gen_test
async def test_resync_of_a_plain_stream_does_nothing(server, redis_client):
    client, collector = await connected_client(server, redis_client, ["depth.SOL_USDC"])
    redis_client.publish("depth.SOL_USDC", plain("depth.SOL_USDC", e="depth", U=5, u=5, b=[], a=[]))
    await async_wait_until(lambda: collector.messages, message="a diff")
    with pytest.raises(BookGap):
        OrderBook().apply_message(collector.messages[0])
    assert await client.resync("depth.SOL_USDC") is False
    assert client.connected and client.connects == 1
    await collector.stop()


@pytest.mark.gen_test
async def test_server_gap_notice_is_a_gap_message(server, redis_client):
    client, collector = await connected_client(server, redis_client, ["ticker.ETH_USDT"])
    notice = plain(
        "ticker.ETH_USDT",
        e="gap",
        s="ETH_USDT",
        E=1,
        reason="link_outage",
        msg="the server's Redis connection was lost and restored",
    )
    redis_client.publish("ticker.ETH_USDT", notice)
    await async_wait_until(lambda: collector.messages, message="gap notice")
    assert collector.messages[0].kind == GAP and collector.messages[0].raw == notice
    assert client.gaps == 1
    await collector.stop()


@pytest.mark.gen_test
async def test_client_without_reconnect_raises(server, redis_client):
    client = Client(ws_url(server), ["trade.SOL_USDC"], reconnect=False)
    collector = Collector(client)
    await listeners(server, "trade.SOL_USDC", 1)
    kick(server, rst=True)
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(collector.task, 5)


@pytest.mark.gen_test
async def test_client_retries_until_the_server_is_up(server_factory, redis_client):
    from marketstream.testing import free_port

    port = free_port()
    client = Client("ws://127.0.0.1:%d/ws" % port, ["trade.SOL_USDC"], backoff=(0.01, 0.05))
    collector = Collector(client)
    await async_wait_until(lambda: client.session.attempts >= 2, message="failed attempts")
    server = await server_factory(server__listen="127.0.0.1:%d" % port)
    await listeners(server, "trade.SOL_USDC", 1)
    await subscribed(redis_client, "trade.SOL_USDC")
    redis_client.publish("trade.SOL_USDC", plain("trade.SOL_USDC", e="trade", t=1))
    await async_wait_until(lambda: collector.messages, message="message after start")
    assert client.connects == 1 and client.reconnects == 0
    assert client.disconnect_reason.startswith("cannot connect: "), client.disconnect_reason
    await collector.stop()


@pytest.mark.gen_test
async def test_client_without_reconnect_raises_the_connection_error():
    from marketstream.testing import free_port

    states = []
    client = Client(
        "ws://127.0.0.1:%d/ws" % free_port(),
        ["trade.SOL_USDC"],
        reconnect=False,
        on_state=states.append,
    )
    with pytest.raises(ConnectionRefusedError):
        await asyncio.wait_for(client.__anext__(), 10)
    assert states == ["connecting"] and client.session.attempts == 1
    assert not client.connected and client.disconnect_reason is None


def test_the_clients_state_is_its_sessions():
    """The shell keeps no protocol state: its public attributes are the
    session's, read and written."""
    client = Client("ws://127.0.0.1:1/ws", ["trade.A_B", "depth.A_B"], since={"depth.A_B": 4})
    session = client.session
    assert client.streams is session.streams and client.last_seq == {"depth.A_B": 4}
    states = []
    client.on_state = states.append
    client.backoff = (1.0, 2.0)
    session.connecting()
    assert states == ["connecting"] and client.state == "connecting"
    assert 0.5 <= client.delay(0) <= 1.0 and session.backoff == (1.0, 2.0)


@pytest.mark.gen_test(timeout=60)
async def test_plain_streams_survive_100_forced_disconnects(server, redis_client):
    """Plain streams cannot be replayed: after every reconnection the client
    reports a gap on each stream and goes on in order."""
    streams = ["trade.SOL_USDC", "trade.BTC_USDT"]
    client, collector = await connected_client(server, redis_client, streams)
    rng = random.Random(7)
    counter = 0
    stop = asyncio.Event()

    async def publish():
        nonlocal counter
        while not stop.is_set():
            for stream in streams:
                counter += 1
                redis_client.publish(stream, plain(stream, e="trade", t=counter))
            await asyncio.sleep(0.001)

    publisher = asyncio.ensure_future(publish())
    for kick_no in range(100):
        # Each round: connected, something new on every stream, then a kick at a random moment.
        seen = await reconnected(client, collector, kick_no)
        await async_wait_until(
            lambda seen=seen: (
                {m.stream for m in collector.messages[seen:] if m.kind == MESSAGE} == set(streams)
            ),
            message="messages after reconnection %d" % kick_no,
        )
        await asyncio.sleep(rng.random() * 0.005)
        kick(server, rst=kick_no % 2 == 0)
    await async_wait_until(lambda: client.connects == 101, timeout=20, message="last reconnection")
    for stream in streams:
        await listeners(server, stream, 1)
    stop.set()
    await publisher
    final = counter
    for stream in streams:  # a marker that must arrive after the last reconnection
        redis_client.publish(stream, plain(stream, e="trade", t=final + 1))
    await async_wait_until(
        lambda: all(any(m.data["t"] == final + 1 for m in collector.of(s)) for s in streams),
        message="the last messages",
    )
    await collector.stop()
    assert client.reconnects == 100 and client.resumes == 0
    for stream in streams:
        ts = [m.data["t"] for m in collector.of(stream)]
        assert ts == sorted(set(ts)), "duplicates or disorder on %s" % stream
        assert len(collector.of(stream, GAP)) == 100
        assert {m.data["reason"] for m in collector.of(stream, GAP)} == {"reconnected"}
    assert collector.states.count("disconnected") >= 100


# --- refusals, closing, why a connection ended ------------------------------------


@pytest.mark.gen_test
async def test_refused_streams_raise_with_the_servers_reason_and_the_others_go_on(
    server, redis_client
):
    """acks off on the server: the client asks for them on its connection."""
    client = Client(ws_url(server), ["trade.OK_USDT", "trades.OK_USDT", "trade.ok_usdt"])
    with pytest.raises(StreamsRefused) as refused:
        await asyncio.wait_for(client.__anext__(), 10)
    expected = {
        "trades.OK_USDT": "unknown stream type 'trades' (allowed: depth, trade, "
        "ticker, bookTicker, kline)",
        "trade.ok_usdt": "invalid market 'ok_usdt' (must match ^[A-Z0-9]+_[A-Z0-9]+$)",
    }
    assert refused.value.refused == expected == client.refused
    assert "trades.OK_USDT: unknown stream type 'trades'" in str(refused.value)
    assert client.streams == ["trade.OK_USDT"]
    await listeners(server, "trade.OK_USDT", 1)
    await subscribed(redis_client, "trade.OK_USDT")
    redis_client.publish("trade.OK_USDT", plain("trade.OK_USDT", e="trade", t=1))
    message = await asyncio.wait_for(client.__anext__(), 10)  # iterating again goes on
    assert message.data == {"e": "trade", "t": 1}
    await client.close()


@pytest.mark.gen_test
async def test_async_with_after_a_break_closes_with_a_close_frame(server, redis_client, caplog):
    caplog.set_level("INFO", logger="marketstream.server.handlers")

    async def publish():
        await listeners(server, "trade.BYE_USDT", 1)
        await subscribed(redis_client, "trade.BYE_USDT")
        for t in range(3):
            redis_client.publish("trade.BYE_USDT", plain("trade.BYE_USDT", e="trade", t=t))

    publisher = asyncio.ensure_future(publish())
    async with Client(ws_url(server), ["trade.BYE_USDT"]) as client:
        first = await client.__anext__()  # as a loop that breaks after one
    await publisher
    assert first.data["t"] == 0 and client.state == "closed"
    await async_wait_until(lambda: not server.manager.connections, message="connection gone")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("disconnect")]
    assert len(lines) == 1 and " code=1000 " in lines[0], lines


@pytest.mark.gen_test
async def test_disconnect_reason_says_why(server, redis_client):
    states = []
    client = Client(
        ws_url(server),
        ["trade.WHY_USDT"],
        backoff=(0.005, 0.05),
        on_state=lambda state: states.append((state, client.disconnect_reason)),
    )
    collector = Collector(client)
    await listeners(server, "trade.WHY_USDT", 1)
    kick(server, rst=False)  # close 1001 "kicked"
    await async_wait_until(lambda: client.connects == 2, message="reconnected")
    await listeners(server, "trade.WHY_USDT", 1)
    kick(server, rst=True)  # no close frame
    await async_wait_until(lambda: client.connects == 3, message="reconnected again")
    await collector.stop()
    reasons = [reason for state, reason in states if state == "disconnected"]
    assert reasons[0] == "closed by the server: 1001 kicked"
    assert reasons[1] in (
        "connection lost (no close frame)",
        "connection failed: Stream is closed",
    ), reasons


# --- the feed's order book -------------------------------------------------------


@pytest.mark.gen_test
async def test_book_from_plain_feed_equals_feed_book(server, redis_client):
    """Followed from the feed's first diff, the book equals the simulator's."""
    sim = MarketSimulator("SOL_USDC", seed=3)
    client, collector = await connected_client(server, redis_client, ["depth.SOL_USDC"])
    for i in range(300):
        redis_client.publish(
            "depth.SOL_USDC",
            ujson.dumps({"stream": "depth.SOL_USDC", "data": sim.depth(1_000_000 * i)}),
        )
        if i % 3 == 0:
            sim.trade(1_000_000 * i)  # moves the price
    await async_wait_until(lambda: len(collector.messages) == 300, message="300 diffs")
    book = OrderBook.empty()
    for msg in collector.messages:
        book.apply_message(msg)
    assert {"bids": book.bids(), "asks": book.asks()} == feed_book(sim)
    assert len(book.bids()) >= 10 and len(book.asks()) >= 10
    await collector.stop()


# --- recoverable streams (server-side recovery) -----------------------------------


@pytest.mark.gen_test
async def test_recoverable_frames_carry_seq(server, redis_client):
    client, collector = await connected_client(server, redis_client, ["trade.SOL_USDC"])
    with Publisher(redis_client, history=100) as pub:
        seqs = [pub.publish("trade.SOL_USDC", {"e": "trade", "t": t}) for t in range(5)]
    await async_wait_until(lambda: len(collector.messages) == 5, message="5 messages")
    assert [m.seq for m in collector.messages] == seqs
    assert collector.messages[0].raw == (
        '{"stream":"trade.SOL_USDC","data":{"e":"trade","t":0},"seq":%d}' % seqs[0]
    )
    await collector.stop()


@pytest.mark.gen_test
async def test_snapshot_then_diffs_build_the_feed_book(server, redis_client):
    sim = MarketSimulator("BTC_USDT", seed=5)
    with Publisher(redis_client, history=1000) as pub:
        for i in range(50):
            last = pub.publish("depth.BTC_USDT", sim.depth(i), snapshot=None)
        pub.publish("depth.BTC_USDT", sim.depth(50), snapshot=depth_snapshot(sim))
        client, collector = await connected_client(
            server, redis_client, ["depth.BTC_USDT"], snapshot=True
        )
        await async_wait_until(lambda: collector.messages, message="the snapshot")
        first = collector.messages[0]
        assert (
            first.kind == SNAPSHOT and first.seq == last + 1 and first.data["e"] == "depthSnapshot"
        )
        for i in range(51, 100):
            last = pub.publish("depth.BTC_USDT", sim.depth(i))
    await async_wait_until(
        lambda: client.last_seq.get("depth.BTC_USDT") == last, message="last diff"
    )
    book = OrderBook()
    for msg in collector.messages:
        book.apply_message(msg)
    assert book.seq == last and {"bids": book.bids(), "asks": book.asks()} == feed_book(sim)
    await collector.stop()


@pytest.mark.gen_test(timeout=90)
async def test_resume_under_100_forced_disconnects(server, redis_client, redis_url):
    """Kicked 100 times at random moments while several streams publish,
    the client ends with every position the publisher got back, in order,
    once, without gaps, and its book equals the feed's."""
    trades = ["trade.SOL_USDC", "trade.BTC_USDT", "trade.ETH_USDT"]
    depth = "depth.SOL_USDC"
    sim = MarketSimulator("SOL_USDC", seed=11)
    pub = AsyncPublisher(redis_url, history=100000)
    published = {stream: [] for stream in trades + [depth]}
    # The depth stream has a snapshot before the client arrives.
    published[depth].append(await pub.publish(depth, sim.depth(0), snapshot=depth_snapshot(sim)))
    client, collector = await connected_client(
        server, redis_client, trades + [depth], snapshot=[depth]
    )
    rng = random.Random(5)
    stop = asyncio.Event()

    async def publish():
        i = 0
        while not stop.is_set():
            i += 1
            for stream in trades:
                published[stream].append(await pub.publish(stream, {"e": "trade", "t": i}))
            data = sim.depth(i)
            snap = depth_snapshot(sim) if i % 20 == 0 else None
            published[depth].append(await pub.publish(depth, data, snapshot=snap))
            await asyncio.sleep(0.001)

    publisher = asyncio.ensure_future(publish())
    try:
        for kick_no in range(100):
            seen = await reconnected(client, collector, kick_no)
            await async_wait_until(
                lambda seen=seen: len(collector.messages) > seen,
                message="messages after reconnection %d" % kick_no,
            )
            await asyncio.sleep(rng.random() * 0.005)
            kick(server, rst=kick_no % 2 == 0)
        await async_wait_until(
            lambda: client.connects == 101, timeout=20, message="last reconnection"
        )
    finally:
        stop.set()
        await publisher
    await async_wait_until(
        lambda: all(client.last_seq.get(s) == published[s][-1] for s in published),
        timeout=20,
        message="every last position",
    )
    await collector.stop()
    await pub.aclose()

    assert client.reconnects == 100 and client.resumes == 100 and client.gaps == 0
    for stream in trades:
        assert [m.seq for m in collector.of(stream)] == published[stream]
    snapshots = collector.of(depth, SNAPSHOT)
    assert len(snapshots) == 1 and snapshots[0].seq == published[depth][0]
    assert [m.seq for m in collector.of(depth)] == published[depth][1:]
    book = OrderBook()
    for msg in collector.messages:
        if msg.stream == depth:
            book.apply_message(msg)
    assert book.synced and book.seq == published[depth][-1]
    assert {"bids": book.bids(), "asks": book.asks()} == feed_book(sim)


@pytest.mark.gen_test
async def test_resync_after_book_gap_gets_a_fresh_snapshot(server, redis_client):
    """The README's pattern: a book that cannot continue asks for a snapshot
    again (here: joined without one), on the same connection, and ends
    equal to the feed's."""
    sim = MarketSimulator("ETH_USDT", seed=9)
    client = Client(ws_url(server), ["depth.ETH_USDT", "trade.ETH_USDT"], backoff=(0.005, 0.05))
    book = OrderBook()
    resyncs = []

    async def consume():
        async for msg in client:
            if msg.stream != "depth.ETH_USDT":
                continue
            try:
                book.apply_message(msg)
            except BookGap:
                resyncs.append(msg.seq)
                await client.resync(msg.stream)

    task = asyncio.ensure_future(consume())
    await listeners(server, "depth.ETH_USDT", 1)
    await subscribed(redis_client, "depth.ETH_USDT")
    with Publisher(redis_client, history=1000) as pub:
        for i in range(100):
            snap = depth_snapshot_after(sim, i) if i % 10 == 0 else None
            last = pub.publish(
                "depth.ETH_USDT",
                sim.depth(i) if snap is None else snap[0],
                snapshot=None if snap is None else snap[1],
            )
            await asyncio.sleep(0.001)
    await async_wait_until(lambda: book.seq == last, message="book at the last position")
    await client.close()
    await asyncio.wait_for(task, 5)
    assert len(resyncs) == 1 and client.gaps == 0
    assert client.connects == 1 and client.reconnects == 0  # resynced without reconnecting
    assert book.synced and {"bids": book.bids(), "asks": book.asks()} == feed_book(sim)


def depth_snapshot_after(sim, i):
    """A diff and the snapshot of the book after it."""
    data = sim.depth(i)
    return data, depth_snapshot(sim)
