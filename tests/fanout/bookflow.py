"""A book stream's publisher for the fan-out tests of the server books
(:mod:`marketstream.fanout.bookkeeper`, :mod:`~marketstream.fanout.speeds`,
:mod:`~marketstream.fanout.registry`): :class:`BookFeed` publishes a depth
stream as the recovery script stores it (``@<seq> {"stream":..,"data":..,
"seq":..}``, a snapshot of the whole book at some positions) and keeps its
own book, :class:`Ladder`, written here on its own (a dict sorted on every
read, the checksum from :mod:`tests.checksums`), so that what the server
sends is checked against the publisher, never against the server's code.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

from marketstream.fanout.core import Core, Want
from marketstream.fanout.counters import Counters
from marketstream.wire.derived import DerivedRules
from tests.checksums import crc_of
from tests.fanout.doubles import T, Conn, Feed, finish, flush

Levels = list[list[str]]


class Ladder:
    """A book as price string -> quantity string per side; quantity zero
    removes a level."""

    def __init__(self) -> None:
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}

    def copy(self) -> Ladder:
        other = Ladder()
        other.bids, other.asks = dict(self.bids), dict(self.asks)
        return other

    def apply(self, bids: Levels, asks: Levels) -> None:
        for side, levels in ((self.bids, bids), (self.asks, asks)):
            for price, qty in levels:
                for known in [p for p in side if Decimal(p) == Decimal(price)]:
                    del side[known]  # the latest string of a price counts
                if Decimal(qty) != 0:
                    side[price] = qty

    def apply_data(self, data: dict[str, Any]) -> None:
        """A snapshot's or a diff's data (the default field names)."""
        if data.get("e") == "depthSnapshot":
            self.bids, self.asks = {}, {}
        self.apply(data["b"], data["a"])

    def top(self, n: int | None = None) -> tuple[Levels, Levels]:
        bids = sorted(self.bids.items(), key=lambda kv: Decimal(kv[0]), reverse=True)
        asks = sorted(self.asks.items(), key=lambda kv: Decimal(kv[0]))
        return [list(kv) for kv in bids[:n]], [list(kv) for kv in asks[:n]]

    def checksum(self) -> int:
        return crc_of(*self.top(10))


def price(tick: int) -> str:
    """Prices of varying length (9.75 < 10.00 < 100.25): string order is
    not numeric order."""
    return "%d.%02d" % (tick // 4, 25 * (tick % 4))


class BookFeed(Feed):
    """A depth stream as a recoverable publisher leaves it in Redis (see
    :class:`tests.fanout.doubles.Feed`), with the publisher's own book
    after each position (:attr:`books`)."""

    def __init__(self, name: str = T, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.ladder = Ladder()
        self.u = 100
        self.books: dict[int, Ladder] = {}  # position -> the book after it

    def encode(self, seq: int, data: dict[str, Any]) -> bytes:
        return b'{"stream":"%s","data":%s,"seq":%d}' % (self.name.encode(), orjson.dumps(data), seq)

    def publish_data(self, data: dict[str, Any], frame: bytes | None = None) -> tuple[int, bytes]:
        """Publish ``data`` (or a ``frame`` as is) at the next position."""
        seq = self.base if self.latest is None else self.latest + 1
        self.latest = seq
        frame = self.encode(seq, data) if frame is None else frame
        self.log.append((seq, frame))
        while len(self.log) > self.cap:
            self.log.popleft()
        self.books[seq] = self.ladder.copy()
        if self.snapshot_every and seq % self.snapshot_every == 0:
            self.store_snapshot(seq)
        return seq, b"@%d " % seq + frame

    def diff(
        self, bids: Levels | None = None, asks: Levels | None = None, ids: int = 1
    ) -> tuple[int, bytes]:
        """Publish a diff of ``ids`` update ids that follows the last."""
        bids, asks = [list(b) for b in bids or ()], [list(a) for a in asks or ()]
        data = {"e": "depth", "U": self.u + 1, "u": self.u + ids, "b": bids, "a": asks}
        self.u += ids
        self.ladder.apply(bids, asks)
        return self.publish_data(data)

    def gap(self, bids: Levels | None = None) -> tuple[int, bytes]:
        """Publish a diff that skips update ids (a message lost upstream)."""
        self.u += 5
        return self.diff(bids)

    def snapshot_data(self) -> dict[str, Any]:
        bids, asks = self.ladder.top()
        return {"e": "depthSnapshot", "u": self.u, "b": bids, "a": asks}

    def store_snapshot(self, seq: int) -> None:
        """The snapshot of the book after ``seq`` (the latest position)."""
        assert seq == self.latest
        self.snapshot = (seq, self.encode(seq, self.snapshot_data()))

    def checksum(self, seq: int) -> int:
        return self.books[seq].checksum()


def book_core(**kwargs: Any) -> Core:
    """A core that keeps the default book streams (``depth.*``)."""
    return Core(Counters(), books=DerivedRules(), **kwargs)


def join(core: Core, conn: Conn, names: list[str], wants: dict[str, Want] | None = None) -> None:
    """``conn`` subscribes ``names``; every channel wanted is confirmed."""
    core.register(conn)
    core.subscribe(conn, names, wants)
    for name in core.wanted():
        if name not in core.confirmed:
            core.upstream_confirmed(name)


def send(core: Core, feed: BookFeed, published: tuple[int, bytes]) -> int:
    """Hand a published message to the core; its position."""
    seq, payload = published
    core.on_message(feed.name.encode(), payload)
    return seq


def start_book(core: Core, feed: BookFeed) -> None:
    """Do the book's start read now (the feed as it stands)."""
    reads = [read for read in core.start_reads() if read.token < 0]
    assert len(reads) == 1, reads
    finish(core, reads[0], feed.read(reads[0], core.max_replay))


def seeded(core: Core, feed: BookFeed, levels: int = 12) -> None:
    """Publish ``levels`` levels a side and a snapshot after them."""
    feed.diff(
        [[price(100 - i), str(i + 1)] for i in range(levels)],
        [[price(300 + i), str(i + 1)] for i in range(levels)],
    )
    feed.store_snapshot(feed.latest or 0)


def booked(core: Core, feed: BookFeed, conn: Conn, names: list[str]) -> None:
    """``conn`` subscribes ``names`` of a seeded feed, whose book starts at once."""
    seeded(core, feed)
    join(core, conn, names)
    start_book(core, feed)
    assert core.books.synced(feed.name)


def frames(conn: Conn, stream: str) -> list[dict[str, Any]]:
    """What ``conn`` got of ``stream`` (after a flush)."""
    return [m for m in conn.got if m["stream"] == stream]


def got(core: Core, conn: Conn, stream: str) -> list[dict[str, Any]]:
    """Flush, then what ``conn`` got of ``stream`` so far, and forget it."""
    flush(core)
    mine = frames(conn, stream)
    conn.got = [m for m in conn.got if m["stream"] != stream]
    return mine
