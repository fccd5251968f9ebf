"""Order books kept from a depth snapshot and Binance-style diffs, without
any I/O: :class:`OrderBook` applies the snapshot, then each diff, checks
their continuity (by update id, and by position when the stream has them)
and the server's checksum when the frame carries one, and raises
:class:`BookGap` when an update is missing or the book is not the server's.
"""

import heapq
import re
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, TypedDict

from marketstream.client.messages import GAP, SNAPSHOT, Message, is_snapshot_data
from marketstream.wire.books import CHECKSUM_LEVELS, DEPTH_TOP, book_checksum

__all__ = ["OrderBook", "BookGap", "Levels", "BookDict", "DepthData", "frame_checksum"]

#: Levels of one side, best first: ``[[price, qty], ...]`` (strings as received).
Levels = list[list[str]]

#: A depth message's data (``{"e": "depth", "U": 11, "u": 12, "b": [...], ...}``):
#: Any because it is what ``ujson.loads`` gives (:attr:`Message.data`).
DepthData = dict[str, Any]


class BookDict(TypedDict):
    """:meth:`OrderBook.as_dict`: the book as the browser client keeps it."""

    seq: int | None
    bids: Levels
    asks: Levels


#: The server puts a book frame's checksum last, after "seq".
_CHECKSUM = re.compile(r',"checksum":([0-9]{1,10})\}\s*\Z')


def frame_checksum(raw: str) -> int | None:
    """The ``checksum`` of a frame's text (the last key, where the server
    puts it), or None if it has none; the frame is not parsed again.

    >>> frame_checksum('{"stream":"depth.A_B","data":{},"seq":4,"checksum":77}')
    77
    >>> frame_checksum('{"stream":"trade.A_B","data":{"checksum":77},"seq":4}') is None
    True
    """
    found = _CHECKSUM.search(raw, max(0, len(raw) - 40))
    return int(found.group(1)) if found else None


def _is_top(data: Any) -> bool:
    """Whether ``data`` is a top-N frame (``depth5|10|20`` streams)."""
    return isinstance(data, dict) and data.get("e") == DEPTH_TOP


class BookGap(Exception):
    """An update is missing: the book is no longer right until the next snapshot."""


def _price(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        raise ValueError("invalid price %r" % (text,)) from None


class OrderBook:
    """An order book kept from a depth snapshot and Binance-style diffs.

    Prices and quantities stay the strings received; levels are ordered by
    their decimal value, best first.  Apply a snapshot (``depthSnapshot``
    data: ``b``, ``a``, ``u``), then diffs (``depth`` data: ``U``, ``u``,
    ``b``, ``a``; quantity ``"0"`` removes a level):

    >>> book = OrderBook()
    >>> book.apply_snapshot({"e": "depthSnapshot", "u": 10,
    ...                      "b": [["99.5", "2"], ["100.0", "1"]], "a": [["100.5", "3"]]})
    >>> book.apply({"e": "depth", "U": 11, "u": 12,
    ...             "b": [["99.5", "0"], ["100.25", "4"]], "a": [["101", "1.5"]]})
    True
    >>> book.bids()
    [['100.25', '4'], ['100.0', '1']]
    >>> book.asks()
    [['100.5', '3'], ['101', '1.5']]

    Diffs already contained in the snapshot are skipped; a missing update
    raises :class:`BookGap` and leaves the book unsynced until the next
    snapshot:

    >>> book.apply({"e": "depth", "U": 5, "u": 9, "b": [], "a": []})
    False
    >>> try:
    ...     book.apply({"e": "depth", "U": 14, "u": 14, "b": [], "a": [["100.5", "0"]]})
    ... except BookGap as exc:
    ...     print("gap:", exc)
    gap: depth: expected update 13, got 14..14
    >>> book.synced
    False

    With positions (``seq``), continuity is also checked by position, and
    :meth:`apply_message` takes a :class:`Message` of any kind:

    >>> book = OrderBook()
    >>> book.apply_message(Message("depth.X_Y", {"e": "depthSnapshot", "u": 3,
    ...     "b": [["1", "1"]], "a": [["2", "1"]]}, 41, "snapshot", ""))
    True
    >>> book.apply({"e": "depth", "U": 4, "u": 4, "b": [["1", "5"]], "a": []}, seq=42)
    True
    >>> book.as_dict()
    {'seq': 42, 'bids': [['1', '5']], 'asks': [['2', '1']]}

    A stream followed from its very first update can start from an empty
    book: ``OrderBook.empty()`` (a snapshot with no levels at ``u = 0``).

    Frames of a server book stream carry the book's ``checksum`` (CRC-32 of
    its top 10 levels, the frame's last key): after each snapshot or
    diff the book checks it, and a mismatch raises :class:`BookGap` (resync
    that stream: ``await client.resync(stream)``); frames without one are
    not checked.  The top-N frames of ``depth5|10|20`` streams (``e`` =
    ``depthTop``) replace the book each time:

    >>> import zlib
    >>> book = OrderBook()
    >>> book.apply_snapshot({"e": "depthTop", "u": 7, "b": [["1", "2"]], "a": [["3", "4"]]},
    ...                     seq=9, checksum=zlib.crc32(b"1:2:3:4"))
    >>> try:
    ...     book.apply({"e": "depth", "U": 8, "u": 8, "b": [["1", "5"]], "a": []},
    ...                seq=10, checksum=zlib.crc32(b"1:2:3:4"))
    ... except BookGap as exc:
    ...     print("gap:", exc)
    gap: depth: checksum mismatch after update 8 (the server's 1356781429, this book's 3808299877)
    >>> book.synced
    False
    """

    def __init__(self) -> None:
        self._bids: dict[Decimal, list[str]] = {}
        self._asks: dict[Decimal, list[str]] = {}
        self.u: int | None = None  # last update id applied
        self.seq: int | None = None  # last position applied (None: not known)
        self.synced = False
        self._first = False  # the next diff is the first after a snapshot

    @classmethod
    def empty(cls) -> "OrderBook":
        """A synced book with no levels at update id 0."""
        book = cls()
        book.apply_snapshot({"b": [], "a": [], "u": 0})
        return book

    def apply_snapshot(
        self, data: DepthData, seq: int | None = None, checksum: int | None = None
    ) -> None:
        """Replace the book with ``data`` (``b``, ``a``, ``u``: a snapshot, or
        a top-N frame) as of position ``seq``; with the frame's ``checksum``,
        :class:`BookGap` if the book does not match it."""
        self._bids = {}
        self._asks = {}
        self._update(self._bids, data.get("b", ()))
        self._update(self._asks, data.get("a", ()))
        self.u = int(data["u"])
        self.seq = seq
        self.synced = True
        self._first = True
        self._check(checksum)

    def checksum(self) -> int:
        """The book's checksum: CRC-32 of its top 10 levels, as the server's."""
        bids = heapq.nlargest(CHECKSUM_LEVELS, self._bids)
        asks = heapq.nsmallest(CHECKSUM_LEVELS, self._asks)
        return book_checksum([self._bids[k] for k in bids], [self._asks[k] for k in asks])

    def _check(self, checksum: int | None) -> None:
        if checksum is not None and checksum != self.checksum():
            self.synced = False
            raise BookGap(
                "depth: checksum mismatch after update %s (the server's %d, this book's %d)"
                % (self.u, checksum, self.checksum())
            )

    def apply(self, data: DepthData, seq: int | None = None, checksum: int | None = None) -> bool:
        """Apply one diff (or merged diff); True if applied, False if already
        contained in the book.  Raises :class:`BookGap` (and unsyncs the
        book) when updates are missing, while the book waits for a
        snapshot, and when the book after it does not match the frame's
        ``checksum``."""
        u = self.u
        if not self.synced or u is None:
            raise BookGap("depth: no snapshot applied")
        first_id, last_id = int(data["U"]), int(data["u"])
        if seq is not None and self.seq is not None:
            if seq <= self.seq:
                return False
            if seq != self.seq + 1:
                self.synced = False
                raise BookGap("depth: expected position %d, got %d" % (self.seq + 1, seq))
        if last_id <= u:
            if seq is not None and self.seq is not None:
                self.seq = seq  # a position without news for the book
            return False
        if (first_id > u + 1) or (not self._first and first_id != u + 1):
            self.synced = False
            raise BookGap("depth: expected update %d, got %d..%d" % (u + 1, first_id, last_id))
        self._update(self._bids, data.get("b", ()))
        self._update(self._asks, data.get("a", ()))
        self.u = last_id
        if seq is not None:
            self.seq = seq
        self._first = False
        self._check(checksum)
        return True

    def apply_message(self, message: Message) -> bool:
        """Apply a :class:`Message` of a depth stream: a snapshot (``kind``
        ``"snapshot"`` or ``data.e`` ``"depthSnapshot"``) or a top-N frame
        (``data.e`` ``"depthTop"``) replaces the book, a gap unsyncs it, a
        diff is applied; the message's checksum, if any, is checked.  True
        if the book changed."""
        data = message.data
        if message.kind == GAP:
            self.synced = False
            return False
        checksum = frame_checksum(message.raw)
        if message.kind == SNAPSHOT or is_snapshot_data(data) or _is_top(data):
            self.apply_snapshot(data, message.seq, checksum)
            return True
        if "@" in message.stream:  # merged diffs: positions skip, update ids follow
            applied = self.apply(data, None, checksum)
            if applied:
                self.seq = message.seq
            return applied
        return self.apply(data, message.seq, checksum)

    @staticmethod
    def _update(side: dict[Decimal, list[str]], levels: Iterable[Sequence[str]]) -> None:
        for price, qty in levels:
            key = _price(price)
            if Decimal(qty) == 0:
                side.pop(key, None)
            else:
                side[key] = [price, qty]

    def bids(self, depth: int | None = None) -> Levels:
        """Bid levels, highest price first: ``[[price, qty], ...]``."""
        return [list(self._bids[k]) for k in sorted(self._bids, reverse=True)[:depth]]

    def asks(self, depth: int | None = None) -> Levels:
        """Ask levels, lowest price first: ``[[price, qty], ...]``."""
        return [list(self._asks[k]) for k in sorted(self._asks)[:depth]]

    def as_dict(self) -> BookDict:
        """``{"seq": ..., "bids": [...], "asks": [...]}`` (the shape of the
        browser client's ``books`` entries)."""
        return {"seq": self.seq, "bids": self.bids(), "asks": self.asks()}

    def __repr__(self) -> str:
        return "<OrderBook u=%s seq=%s %d bids %d asks%s>" % (
            self.u,
            self.seq,
            len(self._bids),
            len(self._asks),
            "" if self.synced else " unsynced",
        )
