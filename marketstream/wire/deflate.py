"""permessage-deflate (RFC 7692) for a fan-out server, without any I/O.

Per-connection compression costs a zlib compressor per client (~260 KB)
and a compression per message per client.  This server answers every
offer it accepts with ``server_no_context_takeover``, which RFC 7692
allows even when the client did not ask for it: each message is then
deflated on its own, without history, and the compressed frame is the same
bytes for every client that negotiated compression.  It is built once per
message, like the plain frame, and shared (see
:class:`~marketstream.fanout.core.Core`).  A message may go uncompressed
on a compressing connection (RSV1 clear), so small messages, which deflate
badly without history, stay plain.

Negotiation: :func:`negotiate` takes the client's
``Sec-WebSocket-Extensions`` and returns the server's answer, or None
(plain frames, as for a client that offers nothing):

>>> negotiate("permessage-deflate; client_max_window_bits").response
'permessage-deflate; server_no_context_takeover; client_no_context_takeover'
>>> negotiate("permessage-deflate; server_max_window_bits=10") is None
True
>>> negotiate("x-webkit-deflate-frame") is None
True

The server always compresses with a 32 KB window (15 bits, the RFC's
default): an offer that limits the server's window below that
(``server_max_window_bits`` < 15) is declined, and the next offer is
considered.  ``client_no_context_takeover`` is always in the answer
(RFC 7692 7.1.1.2 lets the server ask it): a client compresses each of its
messages on its own too, so the server keeps no inflater between a
client's messages (its requests are few and small).  The client's window
(``client_max_window_bits``) is the client's choice: the server inflates
with the largest window, which reads any smaller one, so the answer never
limits it.

Compressing a message (:class:`Deflater`):

>>> deflater = Deflater(min_bytes=0)
>>> frame = deflater.frame(b'{"e":"depth","bids":[' + b'["1.00","2"],' * 50 + b'[]]}')
>>> frame[0] == 0xC1 and len(frame) < 100     # FIN, RSV1, text
True
>>> inflate_frame(frame)[:10]
b'{"e":"dept'
"""

from __future__ import annotations

import re
import zlib
from typing import NamedTuple

from marketstream.wire.frames import text_frame

__all__ = [
    "EXTENSION",
    "WINDOW_BITS",
    "MIN_BYTES",
    "Agreement",
    "parse_offers",
    "negotiate",
    "Deflater",
    "deflated_frame",
    "inflate_frame",
]

#: The extension's name in ``Sec-WebSocket-Extensions``.
EXTENSION = "permessage-deflate"
#: The LZ77 window the server compresses with (2**15 bytes).
WINDOW_BITS = 15
#: Messages shorter than this go plain by default (``[server]
#: compression_min_bytes``): without history, deflate saves little on small
#: JSON and costs a compression for each (see the README's Performance).
MIN_BYTES = 512
#: The zlib level: 6 (zlib's default) compresses depth snapshots ~5 % better
#: than 1, at about twice the time; a message is compressed once, whatever
#: the number of clients.
LEVEL = 6

# What the RFC defines: parameter -> whether it takes a value (None: optional).
_PARAMETERS = {
    "server_no_context_takeover": False,
    "client_no_context_takeover": False,
    "server_max_window_bits": True,
    "client_max_window_bits": None,
}
# A token, or a quoted string (RFC 7230 3.2.6).
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE = re.compile(r'\s*(%s|"(?:[^"\\]|\\.)*")' % _TOKEN)
_NAME = re.compile(r"\s*(%s)" % _TOKEN)
_BITS = re.compile(r"(?:[89]|1[0-5])\Z")  # 8..15, no sign, no leading zero
_TAIL = b"\x00\x00\xff\xff"  # what a sync flush ends with, removed (RFC 7692 7.2.1)
#: The longest ``Sec-WebSocket-Extensions`` value read; a longer one is
#: declined whole (a client gets plain frames).
MAX_HEADER = 4096


# The two answers (shared strings: a connection keeps its answer).
_ANSWER = "%s; server_no_context_takeover; client_no_context_takeover" % EXTENSION
_ANSWER_WINDOW = _ANSWER + "; server_max_window_bits=%d" % WINDOW_BITS


class Agreement(NamedTuple):
    """An accepted offer: the ``Sec-WebSocket-Extensions`` of the 101, and
    the parameters in the form Tornado's protocol takes them (the inflater
    of the client's messages)."""

    response: str
    parameters: dict[str, str | None]


def parse_offers(header: str) -> list[tuple[str, list[tuple[str, str | None]]]] | None:
    """The offers of a ``Sec-WebSocket-Extensions`` value (RFC 6455 9.1),
    in order, as (extension, [(parameter, value or None)]) with quotes
    removed; None if the value does not follow the grammar.

    >>> parse_offers('permessage-deflate; client_max_window_bits, permessage-deflate')
    [('permessage-deflate', [('client_max_window_bits', None)]), ('permessage-deflate', [])]
    >>> parse_offers('permessage-deflate; server_max_window_bits="10"')
    [('permessage-deflate', [('server_max_window_bits', '10')])]
    >>> parse_offers('permessage-deflate;;') is None
    True
    """
    if len(header) > MAX_HEADER:
        return None
    offers: list[tuple[str, list[tuple[str, str | None]]]] = []
    position = 0
    end = len(header)
    while True:
        match = _NAME.match(header, position)
        if match is None:
            return None
        name, position = match.group(1), match.end()
        parameters: list[tuple[str, str | None]] = []
        while True:
            position = _skip_space(header, position)
            if position >= end or header[position] == ",":
                break
            if header[position] != ";":
                return None
            match = _NAME.match(header, position + 1)
            if match is None:
                return None
            key, position = match.group(1), match.end()
            value: str | None = None
            position = _skip_space(header, position)
            if position < end and header[position] == "=":
                match = _VALUE.match(header, position + 1)
                if match is None:
                    return None
                value, position = match.group(1), match.end()
                if value.startswith('"'):
                    value = re.sub(r"\\(.)", r"\1", value[1:-1])
            parameters.append((key, value))
        offers.append((name, parameters))
        if position >= end:
            return offers
        position += 1  # the comma


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t":
        position += 1
    return position


def negotiate(header: str | None) -> Agreement | None:
    """The server's answer to a client's ``Sec-WebSocket-Extensions``: the
    first ``permessage-deflate`` offer it can accept, or None (plain frames).

    An offer is declined when a parameter is unknown, repeated or has an
    invalid value (RFC 7692 7), or when it limits the server's window
    below :data:`WINDOW_BITS`.  A header that does not follow the grammar
    is declined whole.

    >>> negotiate("permessage-deflate; server_max_window_bits=15").response.split("; ")[-1]
    'server_max_window_bits=15'
    >>> negotiate("permessage-deflate; client_max_window_bits=16") is None
    True
    >>> negotiate("permessage-deflate; server_max_window_bits=9, permessage-deflate").response
    'permessage-deflate; server_no_context_takeover; client_no_context_takeover'
    >>> negotiate(None) is None
    True
    """
    if not header:
        return None
    offers = parse_offers(header)
    if offers is None:
        return None
    for name, parameters in offers:
        if name.lower() == EXTENSION:
            agreement = _accept(parameters)
            if agreement is not None:
                return agreement
    return None


def _accept(parameters: list[tuple[str, str | None]]) -> Agreement | None:
    seen: dict[str, str | None] = {}
    for key, value in parameters:
        if key not in _PARAMETERS or key in seen:
            return None  # unknown or repeated
        takes = _PARAMETERS[key]
        if value is None:
            if takes is True:
                return None
        elif takes is False or _BITS.match(value) is None:
            return None
        seen[key] = value
    window = seen.get("server_max_window_bits")
    if window is not None and int(window) < WINDOW_BITS:
        return None  # the server's window is 15 bits for every client
    agreed: dict[str, str | None] = {
        "server_no_context_takeover": None,
        "client_no_context_takeover": None,
    }
    if window is None:
        return Agreement(_ANSWER, agreed)
    agreed["server_max_window_bits"] = window  # "15": a smaller one was declined above
    return Agreement(_ANSWER_WINDOW, agreed)


def deflated_frame(payload: bytes, compressor: zlib._Compress | None = None) -> bytes:
    """A final text frame with RSV1 set holding ``payload`` (UTF-8 bytes)
    deflated without history (RFC 7692 7.2.1): the same bytes for every
    client that negotiated ``server_no_context_takeover``.

    ``compressor``: a raw-deflate compressor to reuse (a full flush ends
    each message, so no message refers to another); a fresh one if None.
    """
    if compressor is None:
        compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, -WINDOW_BITS)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_FULL_FLUSH)
    if data.endswith(_TAIL):
        data = data[:-4]
    frame = text_frame(data)
    return b"\xc1" + frame[1:]


def inflate_frame(frame: bytes) -> bytes:
    """The payload of one whole, unmasked server frame, inflated if RSV1 is
    set (for tests and tools; the server never inflates its own frames).

    >>> inflate_frame(b'\\x81\\x02hi')
    b'hi'
    """
    length = frame[1] & 0x7F
    offset = 2
    if length == 126:
        length, offset = int.from_bytes(frame[2:4], "big"), 4
    elif length == 127:
        length, offset = int.from_bytes(frame[2:10], "big"), 10
    body = frame[offset : offset + length]
    if not frame[0] & 0x40:
        return body
    return zlib.decompressobj(-WINDOW_BITS).decompress(body + _TAIL)


class Deflater:
    """Compressed frames of messages, one compressor for the process.

    :meth:`frame` gives the frame for compressing clients: deflated, or
    ``plain`` (the message's plain frame) when the message is under
    ``min_bytes`` or does not get smaller.  It is the plain frame object
    itself then (``frame(...) is plain`` tells which).
    """

    __slots__ = ("min_bytes", "_compressor")

    def __init__(self, min_bytes: int = MIN_BYTES) -> None:
        self.min_bytes = min_bytes
        self._compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, -WINDOW_BITS)

    def frame(self, payload: bytes, plain: bytes | None = None) -> bytes:
        """The frame of ``payload`` for compressing clients (``plain``: its
        plain frame, if already built)."""
        if plain is None:
            plain = text_frame(payload)
        if len(payload) < self.min_bytes:
            return plain
        try:
            frame = deflated_frame(payload, self._compressor)
        except zlib.error:  # cannot happen with bytes; the plain frame is always right
            self._compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, -WINDOW_BITS)
            return plain
        return plain if len(frame) >= len(plain) else frame

    def reframe(self, plain: bytes) -> bytes:
        """:meth:`frame` of a plain frame's payload (``plain`` as
        :func:`~marketstream.wire.frames.text_frame` builds it)."""
        length = plain[1] & 0x7F
        offset = 2 if length < 126 else 4 if length == 126 else 10
        return self.frame(plain[offset:], plain)
