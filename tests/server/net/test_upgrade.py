"""The handshake shortcut: which requests take it, that it answers exactly as
a WebSocket server must, and that everything else still gets Tornado's
answer with nothing lost from the socket."""

import asyncio
import doctest
import logging
import socket

from unittest import mock
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import tornado.httpclient
import tornado.httputil
import tornado.websocket
import ujson

from marketstream.server.handlers import StreamHandler
from marketstream.server.net.upgrade import defer_accept, upgrade_request
from marketstream.testing import RawClient, async_wait_until, masked_frame
from tests.helpers import connect, envelope, listeners, read, send, subscribed, ws_url

PATHS = frozenset(["/", "/ws", "/stream"])
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455, section 1.3


def request(path="/ws", lines=None, drop=(), version="HTTP/1.1", method="GET"):
    headers = {
        "Host": "127.0.0.1:4000",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
    }
    for name in drop:
        del headers[name]
    text = "%s %s %s\r\n" % (method, path, version)
    text += "".join("%s: %s\r\n" % item for item in headers.items())
    text += "".join(line + "\r\n" for line in (lines or ()))
    return (text + "\r\n").encode()


# --- which requests qualify --------------------------------------------------


def test_plain_upgrade_qualifies_and_its_length_is_the_head_only():
    data = request("/stream?streams=trade.BTC_USDT") + b"\x81\x85 pipelined frame"
    start, headers, length = upgrade_request(data, PATHS)
    assert start.path == "/stream?streams=trade.BTC_USDT"
    assert headers["Sec-WebSocket-Key"] == KEY
    assert data[length:] == b"\x81\x85 pipelined frame"


@pytest.mark.parametrize(
    "data",
    [
        request(method="POST"),
        request(method="HEAD"),
        request(version="HTTP/1.0"),
        request("/health"),
        request("/wsx"),
        request(drop=["Sec-WebSocket-Key"]),
        request(drop=["Host"]),
        request(drop=["Upgrade"]),
        request(drop=["Connection"]),
        request(drop=["Sec-WebSocket-Version"]),
        request(drop=["Sec-WebSocket-Version"], lines=["Sec-WebSocket-Version: 8"]),
        request(drop=["Connection"], lines=["Connection: keep-alive"]),
        request(lines=["Sec-WebSocket-Protocol: chat"]),
        request(lines=["Content-Length: 5"]),
        request(lines=["Transfer-Encoding: chunked"]),
        request(lines=["bad header line"]),
        request()[:-2],  # head not complete yet
        request().replace(b"\r\n", b"\n"),  # bare LF line ends
        b"\r\n" + request(),  # leading blank line
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
        b"",
    ],
    ids=lambda data: data[:60].decode("latin1"),
)
def test_anything_else_is_left_to_tornado(data):
    assert upgrade_request(data, PATHS) is None


def test_header_names_are_case_insensitive_and_connection_is_a_token_list():
    data = request(
        drop=["Connection", "Upgrade"],
        lines=["connection: keep-alive, Upgrade", "upgrade: WebSocket"],
    )
    assert upgrade_request(data, PATHS) is not None


def test_defer_accept_is_set_on_tcp_listeners():
    if not hasattr(socket, "TCP_DEFER_ACCEPT"):
        pytest.skip("TCP_DEFER_ACCEPT is Linux-only")
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        defer_accept([sock])
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
    finally:
        sock.close()


# --- on a real server --------------------------------------------------------


async def raw_exchange(server, data, read_head=True):
    """Send ``data`` in one write; return (response head, reader, writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.settings.port)
    writer.write(data)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) if read_head else b""
    return head, reader, writer


@pytest.mark.gen_test
async def test_shortcut_answers_101_with_the_rfc_accept_value(server):
    head, reader, writer = await raw_exchange(server, request())
    lines = head.decode("latin1").split("\r\n")
    assert lines[0] == "HTTP/1.1 101 Switching Protocols"
    assert "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in lines
    assert "Upgrade: websocket" in lines and "Connection: Upgrade" in lines
    assert server.http_server.handshakes == 1
    await async_wait_until(lambda: len(server.manager.connections) == 1)
    writer.close()
    await async_wait_until(lambda: not server.manager.connections)


@pytest.mark.gen_test
async def test_frames_sent_with_the_request_are_not_lost(server, redis_client):
    """A client that pipelines its SUBSCRIBE behind the request: the shortcut
    reads the request only, and the frame reaches the WebSocket."""
    subscribe = masked_frame(
        ujson.dumps({"method": "SUBSCRIBE", "params": ["trade.ADA_USDT"], "id": 1})
    )
    head, reader, writer = await raw_exchange(server, request() + subscribe)
    assert head.startswith(b"HTTP/1.1 101")
    await listeners(server, "trade.ADA_USDT", 1)
    await subscribed(redis_client, "trade.ADA_USDT")
    payload = envelope("trade.ADA_USDT", t=7)
    redis_client.publish("trade.ADA_USDT", payload)
    frame = await asyncio.wait_for(reader.readexactly(2 + len(payload)), 5)
    assert frame == bytes([0x81, len(payload)]) + payload.encode()
    writer.close()


@pytest.mark.gen_test
async def test_tornado_clients_take_the_shortcut_and_get_data(server, redis_client):
    ws = await connect(server, "/stream?streams=ticker.DOT_USDT")
    await subscribed(redis_client, "ticker.DOT_USDT")
    redis_client.publish("ticker.DOT_USDT", envelope("ticker.DOT_USDT", c="5"))
    assert ujson.loads(await read(ws))["data"]["c"] == "5"
    assert server.http_server.handshakes == 1
    handler = next(iter(server.manager.connections))
    assert handler.request.connection is None and not handler.request.headers
    assert handler.get_status() == 101
    ws.close()


@pytest.mark.gen_test
async def test_request_arriving_in_pieces_is_served_by_tornado(server):
    data = request()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.settings.port)
    writer.write(data[:20])
    # The kernel hands the connection over on the first piece; the shortcut
    # passes it to Tornado's HTTP connection, which waits for the rest.
    await async_wait_until(
        lambda: server.http_server._connections, message="connection handed to Tornado"
    )
    writer.write(data[20:])
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    assert b"TornadoServer" in head  # Tornado's answer, not the shortcut's
    assert server.http_server.handshakes == 0
    await async_wait_until(lambda: len(server.manager.connections) == 1)
    writer.close()


@pytest.mark.gen_test
async def test_subprotocol_offer_is_served_by_tornado(server):
    head, reader, writer = await raw_exchange(
        server, request(lines=["Sec-WebSocket-Protocol: chat"])
    )
    assert head.startswith(b"HTTP/1.1 101") and b"TornadoServer" in head
    assert b"Sec-WebSocket-Protocol" not in head  # none selected
    assert server.http_server.handshakes == 0
    writer.close()


@pytest.mark.gen_test
async def test_refusals_keep_tornados_answers_and_counts(server_factory):
    server = await server_factory(
        server__max_connections=1, server__allowed_origins="https://exchange.example.com"
    )
    head, reader, writer = await raw_exchange(
        server, request(lines=["Origin: https://evil.example.net"])
    )
    assert head.startswith(b"HTTP/1.1 403")
    assert server.counters.refused["origin"] == 1
    writer.close()
    first = await tornado.websocket.websocket_connect(
        tornado.httpclient.HTTPRequest(
            ws_url(server), headers={"Origin": "https://exchange.example.com"}
        )
    )
    head, reader, writer = await raw_exchange(server, request())
    assert head.startswith(b"HTTP/1.1 503")
    assert server.counters.refused["max_connections"] == 1
    assert server.http_server.handshakes == 1  # only the admitted one
    writer.close()
    first.close()


@pytest.mark.gen_test
async def test_other_requests_on_the_same_port_are_untouched(server):
    head, reader, writer = await raw_exchange(
        server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert head.startswith(b"HTTP/1.1 200")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # keep-alive still works
    assert second.startswith(b"HTTP/1.1 200")
    head, reader2, writer2 = await raw_exchange(
        server, request(drop=["Sec-WebSocket-Version"], lines=["Sec-WebSocket-Version: 8"])
    )
    assert head.startswith(b"HTTP/1.1 426")
    writer.close(), writer2.close()
    assert server.http_server.handshakes == 0


@pytest.mark.gen_test
async def test_client_gone_right_after_its_request_leaves_nothing_behind(server, caplog):
    for _ in range(20):
        subscribe = masked_frame(ujson.dumps({"method": "SUBSCRIBE", "params": ["depth.LTC_USDT"]}))
        sock = socket.create_connection(("127.0.0.1", server.settings.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.sendall(request() + subscribe)
        sock.close()  # RST
    ok = await RawClient.connect(server.settings.port)
    await async_wait_until(
        lambda: len(server.manager.connections) == 1, message="only the live client left"
    )
    assert "depth.LTC_USDT" not in server.manager.streams
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    ok.writer.close()


@pytest.mark.gen_test
async def test_switch_off_sends_every_handshake_through_tornado(server_factory, redis_client):
    server = await server_factory(server__fast_handshake="false")
    ws = await connect(server)
    await send(ws, "SUBSCRIBE", ["trade.BNB_USDT"])
    await subscribed(redis_client, "trade.BNB_USDT")
    redis_client.publish("trade.BNB_USDT", envelope("trade.BNB_USDT", t=3))
    assert ujson.loads(await read(ws))["data"]["t"] == 3
    assert server.http_server.handshakes == 0
    ws.close()


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=600)
    | st.builds(
        lambda head, tail: request()[:head] + tail, st.integers(0, 200), st.binary(max_size=60)
    )
)
def test_any_bytes_get_an_answer_never_an_exception(data):
    found = upgrade_request(data, PATHS)
    if found is not None:
        start, headers, length = found
        assert data[:length].endswith(b"\r\n\r\n") and b"\r\n\r\n" not in data[: length - 4]
        assert start.method == "GET" and headers.get("Sec-WebSocket-Version") == "13"


_HEADER_TEXT = st.lists(
    st.sampled_from(
        list('aZ09-_:; ,\t"=/.()@')
        + [
            "\r",
            "\n",
            "\x00",
            "\x7f",
            "\xe9",
            "\r\n",
            "\r\n ",
            "Upgrade",
            "Host",
            "Sec-WebSocket-Version",
        ]
    ),
    max_size=12,
).map("".join)


_NAME = st.sampled_from(["X-Trace", "x-b", "Origin", "Host", "upgrade", "Cookie"]) | _HEADER_TEXT
_VALUE = (
    st.lists(st.sampled_from([" ", "\t", "v", "a, b", "\x00", "\r", "\xe9"]), max_size=6).map(
        "".join
    )
    | _HEADER_TEXT
)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(_NAME, _VALUE), max_size=4), st.booleans())
def test_what_the_shortcut_accepts_tornado_parses_the_same_way(extra, first):
    """The shortcut reads headers itself (faster than Tornado's parser, and
    stricter): whatever it accepts, Tornado's parser accepts too, with the
    same values."""
    odd = "".join("%s:%s\r\n" % pair for pair in extra).encode("latin1")
    usual = request()
    head, _, rest = usual.partition(b"\r\n")
    data = (head + b"\r\n" + odd + rest) if first else (usual[:-2] + odd + b"\r\n")
    found = upgrade_request(data, PATHS)
    if found is None:
        return
    start, headers, length = found
    text = data[:length].decode("latin1")
    theirs = tornado.httputil.HTTPHeaders.parse(text[text.index("\r\n") + 2 :])
    assert sorted(theirs.get_all()) == sorted(headers.get_all())


@pytest.mark.gen_test
async def test_a_failing_open_closes_that_client_only(server, redis_client, caplog):
    """A bug in open() (simulated) costs the one connection: it is closed and
    forgotten, logged, and the next client connects and gets data."""
    with mock.patch.object(
        StreamHandler, "_release_handshake_state", side_effect=RuntimeError("boom")
    ):
        head, reader, writer = await raw_exchange(server, request())
        assert head.startswith(b"HTTP/1.1 101")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    assert not server.manager.connections
    assert any(
        "boom" in (r.exc_text or "") or r.exc_info
        for r in caplog.records
        if r.levelno >= logging.ERROR
    )
    ws = await connect(server, "/stream?streams=trade.ETC_USDT")
    await subscribed(redis_client, "trade.ETC_USDT")
    redis_client.publish("trade.ETC_USDT", envelope("trade.ETC_USDT", t=1))
    assert ujson.loads(await read(ws))["data"]["t"] == 1
    ws.close()


def test_docstring_examples_hold():
    import marketstream.server.net.upgrade

    result = doctest.testmod(marketstream.server.net.upgrade)
    assert result.attempted and not result.failed
