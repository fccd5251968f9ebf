"""permessage-deflate through the server: the handshake on both accept
paths (the shortcut and Tornado's) with every offer shape, compressed and
plain clients side by side, replies, compression off, client messages
inflated and bounded; decoded by python-websockets, an implementation of
its own."""

import asyncio
import json

import pytest
import websockets
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from marketstream.testing import async_wait_until, handshake_request
from tests.helpers import connect, envelope, listeners, read, send, subscribed, ws_url

S = "depth.BTC_USDT"
ANSWER = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
BOOK = envelope(S, bids=[["%d.5" % (60000 - i), "0.25"] for i in range(100)])


async def raw_answer(server, offer):
    """The 101's Sec-WebSocket-Extensions (None without) for ``offer``."""
    port = server.settings.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    headers = {} if offer is None else {"Sec-WebSocket-Extensions": offer}
    writer.write(handshake_request(port, headers=headers))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    lines = head.decode("latin1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 101"), lines[0]
    found = [
        line.split(":", 1)[1].strip()
        for line in lines
        if line.lower().startswith("sec-websocket-extensions:")
    ]
    assert len(found) <= 1
    return found[0] if found else None


OFFERS = [
    (None, None),
    ("permessage-deflate", ANSWER),
    ("permessage-deflate; client_max_window_bits", ANSWER),
    ("permessage-deflate; client_max_window_bits=9; client_no_context_takeover", ANSWER),
    ("permessage-deflate; server_max_window_bits=15", ANSWER + "; server_max_window_bits=15"),
    ("permessage-deflate; server_max_window_bits=10, permessage-deflate", ANSWER),
    ("permessage-deflate; server_max_window_bits=10", None),
    ("permessage-deflate; client_max_window_bits=99", None),
    ("permessage-deflate; bogus", None),
    ("x-webkit-deflate-frame", None),
    ("permessage-deflate;;;", None),
]


@pytest.mark.parametrize("fast_handshake", ["true", "false"])
@pytest.mark.gen_test(timeout=60)
async def test_every_offer_shape_on_both_accept_paths(server_factory, fast_handshake):
    server = await server_factory(server__fast_handshake=fast_handshake)
    before = server.http_server.handshakes
    for offer, answer in OFFERS:
        assert await raw_answer(server, offer) == answer, offer
    taken = server.http_server.handshakes - before
    assert taken == (len(OFFERS) if fast_handshake == "true" else 0)


@pytest.mark.gen_test(timeout=60)
async def test_compression_off_declines_every_offer(server_factory):
    server = await server_factory(server__compression="false")
    for offer, _ in OFFERS:
        assert await raw_answer(server, offer) is None


@pytest.mark.parametrize("fast_handshake", ["true", "false"])
@pytest.mark.gen_test(timeout=60)
async def test_compressing_and_plain_clients_receive_the_same_messages(
    server_factory, redis_client, fast_handshake
):
    server = await server_factory(server__fast_handshake=fast_handshake)
    url = ws_url(server)
    deflating = await websockets.connect(url)  # python-websockets offers it by default
    plain = await websockets.connect(url, compression=None)
    tornado_plain = await connect(server)  # Tornado's client offers nothing by default
    assert deflating.response.headers["Sec-WebSocket-Extensions"] == ANSWER
    assert "Sec-WebSocket-Extensions" not in plain.response.headers
    try:
        # The compressing client's requests are compressed too: the server inflates them.
        await deflating.send(json.dumps({"method": "SUBSCRIBE", "params": [S], "id": 1}))
        await plain.send(json.dumps({"method": "SUBSCRIBE", "params": [S], "id": 1}))
        await send(tornado_plain, "SUBSCRIBE", [S])
        await listeners(server, S, 3)
        await subscribed(redis_client, S)
        small = envelope(S, bids=[["1.5", "2"]])
        redis_client.publish(S, BOOK)
        redis_client.publish(S, small)
        for ws in (deflating, plain):
            assert [await asyncio.wait_for(ws.recv(), 10) for _ in range(2)] == [BOOK, small]
        assert [await read(tornado_plain) for _ in range(2)] == [BOOK, small]
        counters = server.manager.counters
        assert counters.deflated_messages == 1  # the book, once; the small one went plain
        assert counters.deflate_bytes_out < counters.deflate_bytes_in // 3
    finally:
        await deflating.close()
        await plain.close()
        tornado_plain.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_snapshot_reaches_a_compressing_client_compressed(server_factory, redis_url):
    """Replays and snapshots follow the rule of live messages: large ones
    compressed.  Frames are read raw to see RSV1."""
    server = await server_factory()
    port = server.settings.port
    from marketstream.upstream.publisher import Publisher

    publisher = Publisher(redis_url)
    publisher.publish(S, json.loads(BOOK)["data"], snapshot=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = handshake_request(
        port,
        "/stream?streams=%s&snapshot=1" % S,
        {"Sec-WebSocket-Extensions": "permessage-deflate"},
    )
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert b"permessage-deflate" in head
    first = await asyncio.wait_for(reader.readexactly(2), 10)
    assert first[0] == 0xC1  # FIN, RSV1, text: the snapshot, compressed
    writer.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_long_reply_is_compressed_and_a_short_one_not(server_factory):
    server = await server_factory(protocol__acks="true", limits__max_streams_per_connection=200)
    ws = await websockets.connect(ws_url(server))
    try:
        names = ["trade.M%03d_USDT" % i for i in range(120)]
        await ws.send(json.dumps({"method": "SUBSCRIBE", "params": names, "id": 1}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert reply["id"] == 1
        before = server.manager.counters.deflated_messages
        await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 2}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert sorted(reply["result"]) == sorted(names)
        assert server.manager.counters.deflated_messages > before
    finally:
        await ws.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_compressed_message_too_big_once_inflated_is_closed_with_1009(server_factory):
    """A client message is bounded after inflating, not only on the wire
    (a few kilobytes of deflate can inflate to gigabytes)."""
    server = await server_factory(limits__max_frame_bytes="65536")
    ws = await websockets.connect(ws_url(server), max_size=None)
    other = await connect(server)
    bomb = " " * 5_000_000  # ~5 KB on the wire
    await ws.send(bomb)
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd.code == 1009
    await send(other, "LIST_SUBSCRIPTIONS")  # the others are unharmed
    assert json.loads(await read(other))["result"] == []
    other.close()
    await async_wait_until(lambda: len(server.manager.connections) == 0)


@pytest.mark.gen_test(timeout=60)
async def test_client_offers_python_websockets_makes_are_all_accepted(server_factory):
    server = await server_factory()
    for factory in (
        ClientPerMessageDeflateFactory(),
        ClientPerMessageDeflateFactory(client_max_window_bits=10),
        ClientPerMessageDeflateFactory(
            server_no_context_takeover=True, client_no_context_takeover=True
        ),
        ClientPerMessageDeflateFactory(server_max_window_bits=15),
    ):
        ws = await websockets.connect(ws_url(server), extensions=[factory], compression=None)
        assert ws.response.headers["Sec-WebSocket-Extensions"].startswith(ANSWER)
        await ws.close()


@pytest.mark.gen_test(timeout=60)
async def test_the_python_client_asks_for_compression_only_when_told(server_factory, redis_url):
    from marketstream.client import Client
    from marketstream.upstream.publisher import Publisher

    server = await server_factory()
    data = json.loads(BOOK)["data"]
    Publisher(redis_url).publish(S, data, snapshot=True)
    before = server.manager.counters.deflated_messages
    for compression in (False, True):
        client = Client(ws_url(server), [S], snapshot=True, compression=compression)
        async with client:
            message = await asyncio.wait_for(client.__aiter__().__anext__(), 10)
            assert message.data == data
        compressed = server.manager.counters.deflated_messages - before
        assert compressed == (1 if compression else 0)
