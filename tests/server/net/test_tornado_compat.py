"""The Tornado internals marketstream relies on: the stream without idle
write buffers, and the check that turns the fast paths off when Tornado
changes."""

import asyncio
import socket
import time

import pytest
import tornado.httpserver
import tornado.iostream
import tornado.websocket

from marketstream.server.net import tornado_compat as compat
from marketstream.testing import async_wait_until


def test_the_installed_tornado_has_everything():
    assert compat.MISSING == [] and compat.OK


def test_a_tornado_that_appends_elsewhere_turns_the_lean_stream_off():
    class Changed(tornado.iostream.BaseIOStream):
        def _flush_later(self, data):
            self._write_buffer.append(data)  # a second place that adds to the buffer

    assert compat._writes_only_in_write(tornado.iostream.BaseIOStream)
    assert not compat._writes_only_in_write(Changed)


@pytest.mark.gen_test(timeout=30)
async def test_a_lean_stream_buffers_while_the_kernel_is_full_and_lets_go_after():
    """Writes past a full kernel buffer wait in a buffer of the stream's
    own, arrive whole and in order, and once all is written the stream holds
    no buffer of its own again (and shares none with another stream)."""
    loop = asyncio.get_running_loop()
    server_side, client = socket.socketpair()
    other_side, other_client = socket.socketpair()
    for sock in (server_side, client):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    stream = compat.LeanIOStream(server_side)
    other = compat.LeanIOStream(other_side)

    def holds_its_own():
        return (
            stream._write_buffer is not other._write_buffer,
            stream._write_futures is not other._write_futures,
        )

    assert holds_its_own() == (False, False) and not stream.writing()

    chunks = [bytes([65 + i % 26]) * 50_000 for i in range(8)]
    futures = [stream.write(chunk) for chunk in chunks]
    assert stream.writing()  # the kernel took a few KB; the rest waits
    assert holds_its_own() == (True, True) and not other.writing()

    received = bytearray()
    deadline = time.monotonic() + 10
    while len(received) < sum(map(len, chunks)) and time.monotonic() < deadline:
        received += await asyncio.wait_for(loop.sock_recv(client, 1 << 16), 5)
    assert bytes(received) == b"".join(chunks)
    await asyncio.gather(*futures)
    await async_wait_until(lambda: not stream.writing())
    assert holds_its_own() == (False, False)

    # A small write the kernel takes at once never needs a buffer.
    await stream.write(b"x")
    assert holds_its_own() == (False, False)
    assert await asyncio.wait_for(loop.sock_recv(client, 10), 5) == b"x"

    stream.close()
    with pytest.raises(tornado.iostream.StreamClosedError):
        stream.write(b"late")
    assert stream._write_buffer is None  # nothing made for a closed stream
    other.close()
    for sock in (client, other_client):
        sock.close()
    # Closing cleared the shared placeholders, which were empty: still empty.
    fresh = compat.LeanIOStream(socket.socket())
    assert not fresh.writing() and not fresh._write_futures
    fresh.close()


# --- the checks look at what Tornado does, not at how its source is written ---


class _Reformatted(tornado.websocket.WebSocketProtocol13):
    """Tornado's protocol with its write methods written another way (as a
    reformat or a refactoring upstream might), still through _write_frame."""

    def write_ping(self, data: bytes) -> None:
        send = self._write_frame
        send(True, 0x9, data)

    def _send_pong(self, data: bytes) -> None:
        frame = (True, 0xA, data)
        self._pong_future = self._write_frame(*frame)


class _BypassesWriteFrame(tornado.websocket.WebSocketProtocol13):
    """A protocol whose ping goes to the stream without _write_frame."""

    def write_ping(self, data: bytes) -> None:
        self.stream.write(b"\x89" + bytes([len(data)]) + data)


def test_the_protocol_check_follows_the_writes_not_the_text():
    assert compat._writes_through(tornado.websocket.WebSocketProtocol13)
    assert compat._writes_through(_Reformatted)
    assert not compat._writes_through(_BypassesWriteFrame)


class _CompressorsElsewhere(tornado.websocket.WebSocketProtocol13):
    """A protocol that keeps its inflater under another name (as a Tornado
    release might): the server could not inflate a client's messages."""

    def _create_compressors(self, side, agreed_parameters, compression_options=None):
        super()._create_compressors(side, agreed_parameters, compression_options)
        self._inflater, self._decompressor = self._decompressor, None


class _CompressorsRewritten(tornado.websocket.WebSocketProtocol13):
    """The same state, set by a method written another way (no
    ``self._decompressor =`` in its text)."""

    def _create_compressors(self, side, agreed_parameters, compression_options=None):
        kept = self._get_compressor_options("client", agreed_parameters, compression_options)
        vars(self).update(
            _compressor=object(),
            _decompressor=tornado.websocket._PerMessageDeflateDecompressor(
                max_message_size=1 << 20, **kept
            ),
        )


def test_the_compressors_check_follows_what_the_protocol_keeps():
    """The inflater the server gives a compressing connection
    (tornado_compat.inflate_client_messages) is checked by inflating."""
    assert compat._makes_compressors(tornado.websocket.WebSocketProtocol13)
    assert compat._makes_compressors(_CompressorsRewritten)
    assert not compat._makes_compressors(_CompressorsElsewhere)


def test_a_write_buffer_that_counts_elsewhere_turns_the_fast_paths_off(monkeypatch):
    class Buffer:  # a _StreamBuffer that keeps its size under another name
        def __init__(self):
            self.size = 0

        def append(self, data):
            self.size += len(data)

        def advance(self, n):
            self.size -= n

        def __len__(self):
            return self.size

    assert compat._buffer_counts_bytes()
    monkeypatch.setattr(tornado.iostream, "_StreamBuffer", Buffer)
    assert not compat._buffer_counts_bytes()
    assert "tornado.iostream._StreamBuffer._size" in compat._check()


def test_a_request_context_that_ignores_proxy_headers_fails_its_check():
    real = tornado.httpserver._HTTPRequestContext

    class Ignoring(real):
        def _apply_xheaders(self, headers):
            pass

    assert compat._request_context_works(real)
    assert not compat._request_context_works(Ignoring)


def test_the_server_and_handler_checks_make_the_real_objects(monkeypatch):
    assert compat._server_keeps_settings() and compat._connections_keep_context()
    assert compat._handler_state() == (True, True)
    assert compat._params_kept()

    class Forgetful(tornado.httpserver.HTTPServer):
        def initialize(self, request_callback, **kwargs):
            super().initialize(request_callback)  # drops xheaders, protocol, ...

    monkeypatch.setattr(tornado.httpserver, "HTTPServer", Forgetful)
    assert not compat._server_keeps_settings()
