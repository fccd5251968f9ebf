"""Book frames, without any I/O: the field names of a depth stream, the
book checksum, and frames that carry it.

The checksum of a book (OKX's definition, top 10 here) is the CRC-32 (as
:func:`zlib.crc32`) of the UTF-8 string made of, for ``i`` in 0..9, the
``i``-th bid's price and quantity if it exists, then the ``i``-th ask's if
it exists, all joined with ``:``; each price and quantity exactly the string
the publisher sent:

>>> bids = [["100.5", "2"], ["100.0", "1"]]
>>> asks = [["101", "3"]]
>>> book_checksum(bids, asks) == zlib.crc32(b"100.5:2:101:3:100.0:1")
True
>>> book_checksum([], [])
0

Every frame of a book stream carries ``"checksum"`` after ``"seq"``; the
recovery script's frames end with ``"seq"``, so it goes in by bytes,
without encoding the data again:

>>> with_checksum(b'{"stream":"depth.A_B","data":{"u":7},"seq":42}', 3)
b'{"stream":"depth.A_B","data":{"u":7},"seq":42,"checksum":3}'

A frame of a stream served under a derived name (the latest ticker of an
interval, a book's snapshot for an update speed's subscriber) is renamed by
bytes too:

>>> renamed(b'{"stream":"ticker.A_B","data":{"c":"1"},"seq":5}', "ticker.A_B", "ticker.A_B@1000ms")
b'{"stream":"ticker.A_B@1000ms","data":{"c":"1"},"seq":5}'

Frames the server builds itself (top-N snapshots, merged diffs) have the
same shape:

>>> book_frame("depth5.A_B", {"e": "depthTop", "u": 7}, 42, 3)
b'{"stream":"depth5.A_B","data":{"e":"depthTop","u":7},"seq":42,"checksum":3}'
"""

import json
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

from marketstream.wire.positions import FRAME_DATA, FRAME_END, FRAME_START

__all__ = [
    "BookFields",
    "DEFAULT_FIELDS",
    "CHECKSUM_LEVELS",
    "book_checksum",
    "with_checksum",
    "book_frame",
    "renamed",
    "no_book_notice",
    "no_book_reason",
    "NO_BOOK",
    "DEPTH_TOP",
]

#: Levels of each side that make the checksum.
CHECKSUM_LEVELS = 10

#: ``data.e`` of a top-N snapshot (``depth5|10|20.<MARKET>`` streams).
DEPTH_TOP = "depthTop"


class BookFields(NamedTuple):
    """The field names of a book stream's data (defaults: the seed engine's
    depth format, Binance's): bids and asks (lists of ``[price, qty]``), the
    first and last update id of a diff (a snapshot has the last only), the
    event field and its value on a snapshot.

    >>> BookFields().bids, BookFields(bids="bids").bids
    ('b', 'bids')
    """

    bids: str = "b"
    asks: str = "a"
    first_id: str = "U"
    last_id: str = "u"
    event: str = "e"
    snapshot: str = "depthSnapshot"


#: The default field names.
DEFAULT_FIELDS = BookFields()


def book_checksum(bids: Sequence[Sequence[str]], asks: Sequence[Sequence[str]]) -> int:
    """The checksum of a book whose sides, best first, start with ``bids``
    and ``asks`` (``[price, qty]`` strings; levels past the 10th are not
    read)."""
    parts: list[str] = []
    for i in range(CHECKSUM_LEVELS):
        if i < len(bids):
            level = bids[i]
            parts.append(level[0])
            parts.append(level[1])
        if i < len(asks):
            level = asks[i]
            parts.append(level[0])
            parts.append(level[1])
    return zlib.crc32(":".join(parts).encode("utf-8"))


def with_checksum(frame: bytes, checksum: int) -> bytes:
    """``frame`` (a JSON object ending with ``"seq"``, as the recovery
    script writes it) with ``"checksum": <checksum>`` added last, by bytes.

    >>> with_checksum(b"[]", 1)
    Traceback (most recent call last):
    ...
    ValueError: not a JSON object: b'[]'
    """
    if frame[-1:] != b"}" or frame[:1] != b"{":
        raise ValueError("not a JSON object: %.40r" % (frame,))
    return b'%s,"checksum":%d}' % (frame[:-1], checksum)


def _encode(data: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(data)
    except TypeError:  # an integer past 64 bits: the standard library writes it
        return json.dumps(data, separators=(",", ":")).encode("ascii")


def book_frame(stream: str, data: dict[str, Any], seq: int, checksum: int) -> bytes:
    """A frame of ``stream`` the server builds itself, encoded once:
    ``{"stream":..,"data":..,"seq":..,"checksum":..}``."""
    return (
        FRAME_START
        + stream.encode("utf-8")
        + FRAME_DATA
        + _encode(data)
        + (FRAME_END % seq)[:-1]
        + b',"checksum":%d}' % checksum
    )


def renamed(frame: bytes, stream: str, name: str) -> bytes:
    """``frame``, a frame of ``stream`` in the recovery script's form, as a
    frame of ``name`` (by bytes: the data is not encoded again); a frame
    not of that form raises ``ValueError``."""
    head = FRAME_START + stream.encode("utf-8") + FRAME_DATA
    if not frame.startswith(head):
        raise ValueError("not a frame of %.100r: %.60r" % (stream, frame))
    return FRAME_START + name.encode("utf-8") + FRAME_DATA + frame[len(head) :]


#: ``data.reason`` of the notice a derived stream's subscriber gets when its
#: book stream turns out to have no server book.
NO_BOOK = "no_book"


def no_book_reason(stream: str, base: str) -> str:
    """Why ``stream``, derived from ``base``, is refused when ``base`` has
    no server book."""
    return (
        "%.100s has no snapshots, so the server keeps no book for it and cannot serve %.100s; "
        "subscribe to %.100s itself" % (base, stream, base)
    )


def no_book_notice(stream: str, base: str) -> bytes:
    """The notice that ends a derived stream whose book stream ``base`` has
    no snapshots (the server keeps no book for it): the client is
    unsubscribed from ``stream``.

    >>> json.loads(no_book_notice("depth10.A_B", "depth.A_B"))["data"]["e"]
    'unsubscribed'
    """
    data = {"e": "unsubscribed", "reason": NO_BOOK, "msg": no_book_reason(stream, base)}
    return orjson.dumps({"stream": stream, "data": data})
