"""The recovery format in one place: positions, the keys of a stream's
history, and the frames the recovery script publishes and stores.

``recovery.lua`` (beside this module, :data:`SCRIPT_PATH`) assigns a
stream's next position, appends the message to a capped history, optionally
stores a snapshot and publishes, in one atomic call.  For stream ``S`` its
keys are ``{S}:seq {S}:log {S}:snap`` (:func:`stream_keys`: the stream name
is the Redis Cluster hash tag, so keys and channel share a slot), and what
it publishes on channel ``S``, and stores, is the frame clients receive
after a position prefix::

    @<seq> {"stream":"S","data":<data-json>,"seq":<seq>}

The server splits the prefix off without parsing JSON (:func:`split_position`)
and checks the frame's shape by bytes
(:func:`marketstream.wire.payloads.frame_problem`, with :data:`FRAME_START`,
:data:`FRAME_DATA` and :data:`FRAME_END`):

>>> split_position(b'@42 {"stream":"t.A_B","data":{},"seq":42}')
(42, b'{"stream":"t.A_B","data":{},"seq":42}')
>>> stream_keys("trade.SOL_USDC")
('{trade.SOL_USDC}:seq', '{trade.SOL_USDC}:log', '{trade.SOL_USDC}:snap')
>>> FRAME_START + b"t.A_B" + FRAME_DATA + b'{"p":"1"}' + FRAME_END % 7
b'{"stream":"t.A_B","data":{"p":"1"},"seq":7}'
"""

import os

__all__ = [
    "MAX_POSITION",
    "MAX_HISTORY",
    "MAX_TTL",
    "SCRIPT_PATH",
    "split_position",
    "stream_keys",
    "check_stream_name",
    "FRAME_START",
    "FRAME_DATA",
    "FRAME_END",
]

#: Positions are below 2^53 (exact in JavaScript).
MAX_POSITION = 2**53 - 1

#: The recovery script's bounds: messages kept per stream, and seconds of ttl.
MAX_HISTORY = 1_000_000
MAX_TTL = 31_536_000

#: The recovery script (read it with ``open(SCRIPT_PATH)``; publishers load
#: it with ``SCRIPT LOAD``).
SCRIPT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recovery.lua")

#: A frame of the recovery script is FRAME_START, the stream name,
#: FRAME_DATA, the data (one JSON object), then FRAME_END % position.
FRAME_START = b'{"stream":"'
FRAME_DATA = b'","data":'
FRAME_END = b',"seq":%d}'

_FORBIDDEN = frozenset(' \t\r\n\v\f"\\{}/')


def split_position(payload: bytes) -> tuple[int | None, bytes]:
    """(position, frame) of a payload published by the recovery script, or
    (None, payload) for a plain one; no JSON parsing.

    >>> split_position(b'@42 {"stream":"t.A_B","data":{},"seq":42}')
    (42, b'{"stream":"t.A_B","data":{},"seq":42}')
    >>> split_position(b'{"stream":"t.A_B","data":{}}')
    (None, b'{"stream":"t.A_B","data":{}}')
    """
    if payload[:1] != b"@":
        return None, payload
    space = payload.find(b" ", 1, 24)
    digits = payload[1:space]
    if space < 0 or not digits.isdigit():
        return None, payload
    return int(digits), payload[space + 1 :]


def check_stream_name(stream: object) -> str:
    """``stream`` if it can be a recoverable stream's name (the recovery
    script refuses the others), else ``ValueError``.

    >>> check_stream_name("trade.SOL_USDC")
    'trade.SOL_USDC'
    >>> check_stream_name("trade SOL")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: invalid stream name 'trade SOL': non-empty, without whitespace, ...
    """
    if (
        not isinstance(stream, str)
        or not stream
        or any(c in _FORBIDDEN or c.isspace() or c < " " for c in stream)
    ):
        raise ValueError(
            "invalid stream name %r: non-empty, without whitespace, '\"', '\\\\', "
            "'{', '}' or '/'" % (stream,)
        )
    return stream


def stream_keys(stream: str) -> tuple[str, str, str]:
    """The Redis keys of ``stream``: position, history and snapshot.

    >>> stream_keys("trade.SOL_USDC")
    ('{trade.SOL_USDC}:seq', '{trade.SOL_USDC}:log', '{trade.SOL_USDC}:snap')
    """
    return "{%s}:seq" % stream, "{%s}:log" % stream, "{%s}:snap" % stream
