"""The Python client checks book checksums: a corrupted frame makes its
book raise BookGap, and ``Client.resync`` starts that stream over from its
snapshot on the same connection, while the other streams go on.

The server here is a scripted WebSocket server on a real socket: it sends
frames built in this test, with checksums computed here with zlib.crc32
(never with the server's book code), and records what the client asks.
"""

import asyncio
import json

import pytest
import tornado.httpserver
import tornado.testing
import tornado.web
import tornado.websocket

from marketstream.client import BookGap, Client, OrderBook
from marketstream.testing import async_wait_until
from tests.checksums import crc_of


def book_frame(stream, e, seq, u, bids, asks, checksum_of=None, first=None):
    """A frame of ``stream``; its checksum is that of ``checksum_of`` (the
    server's book after it), or of ``bids``/``asks`` for a snapshot."""
    data = {"e": e, "s": "X_Y", "u": u, "b": bids, "a": asks}
    if first is not None:
        data["U"] = first
    book = checksum_of or (bids, asks)
    return json.dumps(
        {"stream": stream, "data": data, "seq": seq, "checksum": crc_of(*book)},
        separators=(",", ":"),
    )


A, B = "depth.A_B", "depth.C_D"


class ScriptedServer(tornado.websocket.WebSocketHandler):
    """Plays a fixed script: A's third frame carries a wrong checksum; after
    the client's UNSUBSCRIBE of A, one frame of A still in flight, then on
    its SUBSCRIBE with a snapshot, A's fresh snapshot and a diff."""

    requests: list = []

    def on_message(self, message):
        request = json.loads(message)
        self.requests.append(request)
        method, params = request["method"], request["params"]
        send = self.write_message
        if method == "SUBSCRIBE" and params == [A, B]:
            send(book_frame(A, "depthSnapshot", 10, 100, [["5", "1"]], [["6", "1"]]))
            send(book_frame(B, "depthSnapshot", 20, 200, [["50", "1"]], [["60", "1"]]))
            send(
                book_frame(A, "depth", 11, 101, [["5", "2"]], [], ([["5", "2"]], [["6", "1"]]), 101)
            )
            send(
                book_frame(
                    B, "depth", 21, 201, [["50", "2"]], [], ([["50", "2"]], [["60", "1"]]), 201
                )
            )
            # A's book after 102 is 5:3 / 6:1, but the checksum says 5:9.
            send(
                book_frame(A, "depth", 12, 102, [["5", "3"]], [], ([["5", "9"]], [["6", "1"]]), 102)
            )
            send(
                book_frame(
                    B, "depth", 22, 202, [["50", "3"]], [], ([["50", "3"]], [["60", "1"]]), 202
                )
            )
        elif method == "UNSUBSCRIBE" and params == [A]:
            send(
                book_frame(
                    A,
                    "depth",
                    13,
                    103,
                    [["4", "1"]],
                    [],
                    ([["5", "3"], ["4", "1"]], [["6", "1"]]),
                    103,
                )
            )
            send(
                book_frame(
                    B,
                    "depth",
                    23,
                    203,
                    [["49", "1"]],
                    [],
                    ([["50", "3"], ["49", "1"]], [["60", "1"]]),
                    203,
                )
            )
        elif method == "SUBSCRIBE" and params == [A] and request.get("snapshot") == [A]:
            bids = [["5", "3"], ["4", "1"]]
            send(book_frame(A, "depthSnapshot", 13, 103, bids, [["6", "1"]]))
            send(book_frame(A, "depth", 14, 104, [], [["6", "0"]], (bids, []), 104))
            send(
                book_frame(
                    B, "depth", 24, 204, [["49", "0"]], [], ([["50", "3"]], [["60", "1"]]), 204
                )
            )


@pytest.fixture
def scripted(io_loop):
    sock, port = tornado.testing.bind_unused_port()
    app = tornado.web.Application([(r"/ws", ScriptedServer)])
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets([sock])
    ScriptedServer.requests = []
    yield "ws://127.0.0.1:%d/ws" % port
    server.stop()


@pytest.mark.gen_test(timeout=30)
async def test_a_checksum_mismatch_resyncs_that_stream_only_on_the_same_connection(scripted):
    client = Client(scripted, [A, B], reconnect=False)
    books = {A: OrderBook(), B: OrderBook()}
    gaps = []

    async def consume():
        async for msg in client:
            try:
                books[msg.stream].apply_message(msg)
            except BookGap as exc:
                gaps.append((msg.stream, msg.seq, str(exc)))
                await client.resync(msg.stream)

    task = asyncio.ensure_future(consume())
    try:
        await async_wait_until(
            lambda: books[A].seq == 14 and books[B].seq == 24, message="both books at the end"
        )
    finally:
        await client.close()
        await asyncio.wait_for(task, 10)
    assert [(stream, seq) for stream, seq, _ in gaps] == [(A, 12)]
    assert "checksum mismatch" in gaps[0][2]
    assert client.connects == 1 and client.reconnects == 0
    assert [(r["method"], r["params"], r.get("snapshot")) for r in ScriptedServer.requests] == [
        ("SUBSCRIBE", [A, B], None),
        ("UNSUBSCRIBE", [A], None),
        ("SUBSCRIBE", [A], [A]),
    ]
    # A's frame in flight (seq 13) was dropped; its snapshot rebuilt the book.
    assert books[A].synced and (books[A].bids(), books[A].asks()) == ([["5", "3"], ["4", "1"]], [])
    # B went on, every frame checked, never resynced.
    assert books[B].synced and (books[B].bids(), books[B].asks()) == ([["50", "3"]], [["60", "1"]])
    assert client.gaps == 0


class DerivedServer(tornado.websocket.WebSocketHandler):
    """Frames of a top-N stream and of an update speed: their positions skip."""

    def on_message(self, message):
        top, speed = "depth5.A_B", "depth.A_B@100ms"
        for seq, bids in ((10, [["5", "1"]]), (15, [["5", "2"], ["4", "1"]]), (31, [["4", "1"]])):
            self.write_message(book_frame(top, "depthTop", seq, seq * 10, bids, []))
        self.write_message(book_frame(speed, "depthSnapshot", 10, 100, [["5", "1"]], []))
        merged = [(14, 101, 104, [["5", "2"], ["4", "1"]]), (31, 105, 131, [["5", "0"]])]
        book = {"5": "1"}
        for seq, first, last, changes in merged:
            for price, qty in changes:
                if qty == "0":
                    book.pop(price)
                else:
                    book[price] = qty
            levels = sorted(([p, q] for p, q in book.items()), key=lambda kv: -float(kv[0]))
            self.write_message(
                book_frame(speed, "depth", seq, last, changes, [], (levels, []), first)
            )


@pytest.mark.gen_test(timeout=30)
async def test_top_n_frames_and_merged_diffs_skip_positions_without_a_gap(io_loop):
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/ws", DerivedServer)]))
    server.add_sockets([sock])
    top, speed = "depth5.A_B", "depth.A_B@100ms"
    client = Client("ws://127.0.0.1:%d/ws" % port, [top, speed], reconnect=False)
    books = {top: OrderBook(), speed: OrderBook()}
    received = []

    async def consume():
        async for msg in client:
            received.append(msg)
            books[msg.stream].apply_message(msg)  # a BookGap would end the task

    task = asyncio.ensure_future(consume())
    try:
        await async_wait_until(
            lambda: books[top].seq == 31 and books[speed].seq == 31, message="both at 31"
        )
    finally:
        await client.close()
        await asyncio.wait_for(task, 10)
        server.stop()
    assert client.gaps == 0 and all(msg.kind != "gap" for msg in received)
    assert books[top].bids() == [["4", "1"]] and books[speed].bids() == [["4", "1"]]
    assert books[speed].u == 131
