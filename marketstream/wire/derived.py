"""Derived stream names, without any I/O: top-N books and update speeds.

``depth5|10|20.<MARKET>`` is the top N of the book stream ``depth.<MARKET>``
(full snapshots, when the top changed, at most every 100 ms);
``<stream>@100ms|250ms|500ms|1000ms`` is ``<stream>`` at an update speed:
merged diffs for a book stream, the latest message for ``ticker``,
``bookTicker`` and ``kline`` streams; ``depthN.<MARKET>@1000ms`` a top N at
most every second.  :meth:`DerivedRules.parse` says which, from the name:

>>> rules = DerivedRules()
>>> rules.parse("depth10.BTC_USDT")
Derived(name='depth10.BTC_USDT', base='depth.BTC_USDT', kind='top', interval_ms=100, depth=10)
>>> rules.parse("depth.BTC_USDT@250ms")[1:4]
('depth.BTC_USDT', 'merged', 250)
>>> rules.parse("ticker.BTC_USDT@1000ms").kind
'latest'
>>> rules.parse("trade.BTC_USDT") is None    # not derived: the stream itself
True
>>> rules.parse("trade.BTC_USDT@100ms").reason
'trade streams have no update speeds: every trade matters'
>>> rules.parse("depth.BTC_USDT@200ms").reason
"unknown update speed '200ms' (allowed: 100ms, 250ms, 500ms, 1000ms)"

The base stream is then checked as any stream name is
(:class:`marketstream.wire.requests.StreamRules`), and whether the server
keeps a book for it (a book stream published without snapshots has none)
is for the server to say.
"""

import re
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import NamedTuple

__all__ = [
    "INTERVALS",
    "TOP_DEPTHS",
    "TOP_INTERVAL_MS",
    "MERGED",
    "LATEST",
    "TOP",
    "Derived",
    "Refused",
    "DerivedRules",
]

#: Update speeds: suffix -> milliseconds.
INTERVALS = {"100ms": 100, "250ms": 250, "500ms": 500, "1000ms": 1000}
#: The N of ``depthN.<MARKET>``.
TOP_DEPTHS = (5, 10, 20)
#: A top-N stream without a speed is sent at most this often.
TOP_INTERVAL_MS = 100

#: Kinds of derived stream: merged diffs of a book stream, the latest
#: message of a conflatable stream, the top N of a book.
MERGED = "merged"
LATEST = "latest"
TOP = "top"

#: Names whose :meth:`DerivedRules.is_book_stream` answer is remembered, at most.
_KNOWN = 65536
_TOP_TYPE = re.compile(r"depth[0-9]+")
_TOP_NAMES = {"depth%d" % n: n for n in TOP_DEPTHS}


class Derived(NamedTuple):
    """A derived stream: its ``name``, the ``base`` stream it comes from, its
    ``kind`` (:data:`MERGED`, :data:`LATEST` or :data:`TOP`), its interval
    and, for a top-N stream, N (``depth``)."""

    name: str
    base: str
    kind: str
    interval_ms: int
    depth: int | None


class Refused(NamedTuple):
    """A derived name the server refuses: a ``cause`` (one of
    :attr:`DerivedRules.CAUSES`) and the ``reason``, a sentence for the
    client."""

    cause: str
    reason: str


class DerivedRules:
    """Which derived names exist.  ``book_streams``: patterns (``fnmatch``:
    ``*``, ``?``, ``[...]``) of the book streams (``[books] streams``);
    ``latest_types``: stream types whose update speed keeps the latest
    message; ``trade_types``: stream types refused at any speed.

    >>> DerivedRules(book_streams=["book.*"]).parse("depth5.BTC_USDT").reason
    'depth.BTC_USDT is not a book stream, so it has no depth5 stream'
    """

    #: Why a derived name is refused.
    CAUSES = ("invalid_name", "unknown_speed", "not_a_book", "no_speed")

    def __init__(
        self,
        book_streams: Iterable[str] = ("depth.*",),
        latest_types: Iterable[str] = ("ticker", "bookTicker", "kline"),
        trade_types: Iterable[str] = ("trade",),
    ) -> None:
        self.book_streams = tuple(book_streams)
        self.latest_types = frozenset(latest_types)
        self.trade_types = frozenset(trade_types)
        self._books: dict[str, bool] = {}  # is_book_stream's answers, at most _KNOWN

    def is_book_stream(self, name: str) -> bool:
        """Whether ``name`` (not derived) is a book stream.

        >>> DerivedRules().is_book_stream("depth.BTC_USDT")
        True
        """
        known = self._books.get(name)
        if known is None:
            known = any(fnmatchcase(name, pattern) for pattern in self.book_streams)
            if len(self._books) >= _KNOWN:
                self._books.clear()  # bounded: names come from clients
            self._books[name] = known
        return known

    def parse(self, name: str) -> Derived | Refused | None:
        """The derived stream ``name`` names, :class:`Refused` with why it
        cannot be served, or None if ``name`` is not a derived name."""
        base, at, speed = name.partition("@")
        interval = None
        if at:
            interval = INTERVALS.get(speed)
            if "@" in speed or not base:
                return Refused("invalid_name", "at most one update speed: <stream>@<speed>")
            if interval is None:
                return Refused(
                    "unknown_speed",
                    "unknown update speed %.20r (allowed: %s)" % (speed, ", ".join(INTERVALS)),
                )
        kind, dot, rest = base.partition(".")
        top = _TOP_TYPE.fullmatch(kind)
        if top is not None and dot:
            depth = _TOP_NAMES.get(kind, 0)
            if not depth:
                return Refused(
                    "invalid_name",
                    "no %s stream: depth5, depth10 and depth20 exist" % kind[:12],
                )
            book = "depth." + rest
            if not self.is_book_stream(book):
                return Refused(
                    "not_a_book", "%s is not a book stream, so it has no %s stream" % (book, kind)
                )
            return Derived(name, book, TOP, interval or TOP_INTERVAL_MS, depth)
        if interval is None:
            return None
        if self.is_book_stream(base):
            return Derived(name, base, MERGED, interval, None)
        if kind in self.latest_types:
            return Derived(name, base, LATEST, interval, None)
        if kind in self.trade_types:
            return Refused(
                "no_speed", "%s streams have no update speeds: every trade matters" % kind
            )
        return Refused(
            "no_speed",
            "%s has no update speeds (book streams and %s streams have)"
            % (base, ", ".join(sorted(self.latest_types))),
        )
