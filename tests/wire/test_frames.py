"""Server frames (marketstream.wire.frames): the WebSocket frame header,
checked against a minimal decoder and against Tornado's own parser over a
local TCP connection."""

import asyncio
import base64
import hashlib
import re
import struct

import pytest
import tornado.websocket
from hypothesis import given
from hypothesis import strategies as st

from marketstream.wire.frames import text_frame
from tests.wire.strategies import FUZZ


LENGTHS = [0, 1, 125, 126, 127, 65535, 65536, 70000]


def payload_of(length):
    """Valid UTF-8 of exactly ``length`` bytes, with multi-byte characters."""
    text = ("\u00e9" * (length // 2)).encode() + b"x" * (length % 2)
    assert len(text) == length
    return text


def decode_frame(data):
    """A minimal RFC 6455 5.2 decoder: (fin, opcode, masked, payload, rest)."""
    first, second = data[0], data[1]
    fin, rsv, opcode = first >> 7, (first >> 4) & 0x7, first & 0x0F
    assert rsv == 0
    masked, length = second >> 7, second & 0x7F
    offset = 2
    if length == 126:
        (length,) = struct.unpack("!H", data[2:4])
        assert length >= 126, "16-bit length must be minimal"
        offset = 4
    elif length == 127:
        (length,) = struct.unpack("!Q", data[2:10])
        assert length >> 63 == 0, "64-bit length must have its top bit clear"
        assert length > 0xFFFF, "64-bit length must be minimal"
        offset = 10
    if masked:
        key, offset = data[offset : offset + 4], offset + 4
        body = bytes(b ^ key[i % 4] for i, b in enumerate(data[offset : offset + length]))
    else:
        body = data[offset : offset + length]
    assert len(body) == length, "truncated frame"
    return bool(fin), opcode, bool(masked), body, data[offset + length :]


@pytest.mark.parametrize(
    "length, header",
    [
        (0, b"\x81\x00"),
        (1, b"\x81\x01"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (127, b"\x81\x7e\x00\x7f"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
        (70000, b"\x81\x7f" + struct.pack("!Q", 70000)),
    ],
)
def test_text_frame_header(length, header):
    payload = payload_of(length)
    data = text_frame(payload)
    assert data == header + payload
    fin, opcode, masked, body, rest = decode_frame(data)
    assert (fin, opcode, masked, body, rest) == (True, 0x1, False, payload, b"")


@FUZZ
@given(st.integers(min_value=0, max_value=70000))
def test_fuzz_text_frame_lengths(length):
    payload = b"a" * length
    data = text_frame(payload)
    assert decode_frame(data) == (True, 0x1, False, payload, b"")
    assert len(data) - length == (2 if length < 126 else 4 if length < 65536 else 10)


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def _tornado_reads(frames):
    """Serve a WebSocket handshake and then ``frames`` verbatim over a real
    local TCP socket; return what Tornado's client parser makes of them."""

    async def handle(reader, writer):
        request = await reader.readuntil(b"\r\n\r\n")
        key = re.search(rb"(?im)^sec-websocket-key:[ \t]*(\S+)", request).group(1)
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        writer.write(b"".join(frames))
        writer.write(b"\x88\x02\x03\xe8")  # close 1000
        await writer.drain()
        await reader.read()  # until the client has answered the close and hung up
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await tornado.websocket.websocket_connect(
            "ws://127.0.0.1:%d/" % port, max_message_size=1 << 20
        )
        messages = []
        while True:
            message = await client.read_message()
            if message is None:
                break
            messages.append(message)
        return messages, client.close_code
    finally:
        server.close()
        await server.wait_closed()


def test_tornado_parses_text_frames():
    payloads = [payload_of(length) for length in LENGTHS]
    messages, close_code = asyncio.run(
        asyncio.wait_for(_tornado_reads([text_frame(p) for p in payloads]), timeout=10)
    )
    assert close_code == 1000
    assert [type(m) for m in messages] == [str] * len(payloads)
    assert [len(m.encode()) for m in messages] == LENGTHS
    assert messages == [p.decode() for p in payloads]
