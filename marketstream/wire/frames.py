"""WebSocket frames as the server sends them, and the close codes it uses.

An unmasked server text frame without compression is the same bytes for
every recipient, so the fan-out builds it once per message and writes it to
many sockets:

>>> text_frame(b'{"e":"trade"}')
b'\\x81\\r{"e":"trade"}'
>>> CLOSE_GOING_AWAY
1001
"""

import struct

__all__ = [
    "text_frame",
    "CLOSE_NORMAL",
    "CLOSE_GOING_AWAY",
    "CLOSE_POLICY",
    "CLOSE_TOO_BIG",
    "OP_TEXT",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
]

#: Close codes (RFC 6455 7.4.1): a normal closure (what clients send when
#: they close) ...
CLOSE_NORMAL = 1000
#: ... the server shutting down, or a peer that stopped answering pings ...
CLOSE_GOING_AWAY = 1001
#: ... a client past a limit (message or frame rate, slow consumer) ...
CLOSE_POLICY = 1008
#: ... and a frame over ``[limits] max_frame_bytes``.
CLOSE_TOO_BIG = 1009

#: Opcodes (RFC 6455 5.2).
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def text_frame(payload: bytes) -> bytes:
    """A complete, unmasked, final WebSocket text frame (RFC 6455 5.2) for
    ``payload`` (UTF-8 bytes).

    A server frame without compression is the same bytes for every recipient,
    so the fan-out builds it once per message and writes it to many sockets.
    """
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x81, 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 127, length)
    return header + payload
