"""Server-side order books, without any I/O: one :class:`Book` per book
stream, kept from its snapshot and each diff once per message, its checksum,
its top N, and :class:`DiffMerger`, the merged diffs of update speeds.

Levels stay the publisher's strings, ordered by numeric price (bids highest
first, asks lowest first).  A snapshot (``e = depthSnapshot``) starts the
book; each diff must follow the last applied one (``U`` = last ``u`` + 1);
quantity ``"0"`` removes a level:

>>> import zlib
>>> book = Book("BTC_USDT")
>>> book.apply({"e": "depthSnapshot", "u": 10,
...             "b": [["99.5", "2"], ["100.0", "1"]], "a": [["100.5", "3"]]}, seq=41)
'snapshot'
>>> book.apply({"e": "depth", "U": 11, "u": 12,
...             "b": [["99.5", "0"], ["100.25", "4"]], "a": [["101", "1.5"]]}, seq=42)
'applied'
>>> book.top(10)
([['100.25', '4'], ['100.0', '1']], [['100.5', '3'], ['101', '1.5']])
>>> book.checksum == zlib.crc32(b"100.25:4:100.5:3:100.0:1:101:1.5")
True

What the server calls per message of a book stream, on the frame it got
from Redis (``frame`` without the position prefix): the book, then the
frame with its checksum, built once for every subscriber:

>>> frame = b'{"stream":"depth.BTC_USDT","data":{"e":"depth","U":13,"u":13,' \\
...         b'"b":[],"a":[["101","0"]]},"seq":43}'
>>> book.apply_frame(frame)
'applied'
>>> with_checksum(frame, book.checksum) == frame[:-1] + b',"checksum":%d}' % book.checksum
True

A diff that does not follow is a gap: it is not applied and the book waits
for a snapshot (:attr:`Book.synced` is False) -- the server reads the
stream's snapshot again:

>>> book.apply({"e": "depth", "U": 15, "u": 15, "b": [], "a": []}, seq=45)
'gap'
>>> book.synced
False

Per interval, the top N if it changed since it was last taken
(``depth5|10|20.<MARKET>``), and the merged diff of each update speed
(``<stream>@100ms``):

>>> book.apply({"e": "depthSnapshot", "u": 20, "b": [["100", "1"]], "a": []}, seq=50)
'snapshot'
>>> book.take_top(5)
{'e': 'depthTop', 's': 'BTC_USDT', 'u': 20, 'b': [['100', '1']], 'a': []}
>>> book.take_top(5) is None   # unchanged since
True
>>> merger = DiffMerger()
>>> for u, qty in ((21, "2"), (22, "3")):
...     _ = book.apply({"e": "depth", "U": u, "u": u, "b": [["100", qty]], "a": []}, seq=u + 30)
...     merger.add(book.last_diff, book.seq, book.checksum)
>>> merged = merger.take()
>>> merged.data["U"], merged.data["u"], merged.data["b"], merged.seq
(21, 22, [['100', '3']], 52)
"""

import bisect
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

import orjson

from marketstream.wire.books import (
    CHECKSUM_LEVELS,
    DEFAULT_FIELDS,
    DEPTH_TOP,
    BookFields,
    book_checksum,
    with_checksum,
)

__all__ = [
    "Book",
    "BookFields",
    "DiffMerger",
    "Merged",
    "ParsedDiff",
    "APPLIED",
    "SNAPSHOT",
    "STALE",
    "GAP",
    "MALFORMED",
    "merge_diffs",
    "with_checksum",
]

#: What :meth:`Book.apply` did: a diff applied, a snapshot taken ...
APPLIED = "applied"
SNAPSHOT = "snapshot"
#: ... a diff already in the book (its ``u``, or its position, not past the
#: book's): skipped ...
STALE = "stale"
#: ... a diff that does not follow the last one applied, or any diff while
#: the book waits for a snapshot: not applied, the book is unsynced ...
GAP = "gap"
#: ... data the book cannot read (not a JSON object, levels that are not
#: ``[price, qty]`` strings of finite numbers, a negative quantity, update
#: ids that are not integers): not applied, the book is unsynced.
MALFORMED = "malformed"

#: One level change: (numeric price, price string, quantity string, whether
#: the quantity is zero: the level goes).
Change = tuple[Decimal, str, str, bool]


class ParsedDiff(NamedTuple):
    """A diff as read by the book: update ids, level changes per side, and
    the data it came in (the merged diff keeps the last one's other fields)."""

    first_id: int
    last_id: int
    bids: list[Change]
    asks: list[Change]
    data: dict[str, Any]


class Malformed(ValueError):
    """Data a book cannot read."""


def _number(text: object) -> Decimal:
    if not isinstance(text, str):
        raise Malformed("not a string: %.40r" % (text,))
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise Malformed("not a number: %.40r" % (text,)) from None
    if not value.is_finite():
        raise Malformed("not a finite number: %.40r" % (text,))
    return value


def _changes(levels: object) -> list[Change]:
    """``[[price, qty], ...]`` as changes; quantity zero removes."""
    if not isinstance(levels, list):
        raise Malformed("levels must be a list")
    changes: list[Change] = []
    for level in levels:
        if not isinstance(level, list) or len(level) < 2:
            raise Malformed("a level must be [price, qty]")
        price, qty = level[0], level[1]
        key = _number(price)
        amount = _number(qty)
        if amount < 0:
            raise Malformed("negative quantity %.40r" % (qty,))
        changes.append((key, price, qty, not amount))
    return changes


def _update_id(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Malformed("update id not an integer: %.40r" % (value,))
    return value


class _Side:
    """One side of a book: levels by sort key (the price, negated for bids)
    and the sorted keys, so that the best levels are the first keys."""

    __slots__ = ("levels", "keys", "sign")

    def __init__(self, descending: bool) -> None:
        self.levels: dict[Decimal, tuple[str, str]] = {}
        self.keys: list[Decimal] = []
        self.sign = -1 if descending else 1

    def clear(self) -> None:
        self.levels = {}
        self.keys = []

    def change(self, key: Decimal, price: str, qty: str, remove: bool) -> int:
        """Set (or remove) a level; returns its rank (0: the best), or a
        large number if nothing changed."""
        if self.sign < 0:
            key = -key
        levels = self.levels
        if remove:
            if key not in levels:
                return 1 << 30
            del levels[key]
            rank = bisect.bisect_left(self.keys, key)
            del self.keys[rank]
            return rank
        if key in levels:
            levels[key] = (price, qty)
            return bisect.bisect_left(self.keys, key)
        levels[key] = (price, qty)
        rank = bisect.bisect_left(self.keys, key)
        self.keys.insert(rank, key)
        return rank

    def top(self, depth: int | None) -> list[list[str]]:
        levels = self.levels
        return [list(levels[key]) for key in self.keys[:depth]]


class Book:
    """The order book of one book stream (``symbol``: the market, the ``s``
    of its top-N snapshots).  ``fields`` names the data's fields.

    After every :meth:`apply`, :attr:`checksum` is the book's checksum,
    :attr:`u` and :attr:`seq` the last update id and position applied, and
    :attr:`last_diff` the diff just applied (None after a snapshot).
    """

    def __init__(self, symbol: str = "", fields: BookFields = DEFAULT_FIELDS) -> None:
        self.symbol = symbol
        self.fields = fields
        self._bids = _Side(descending=True)
        self._asks = _Side(descending=False)
        self.u: int | None = None
        self.seq: int | None = None
        self.synced = False
        self.checksum = 0
        self.last_diff: ParsedDiff | None = None
        self._taken: dict[int, tuple[list[list[str]], list[list[str]]]] = {}

    def __len__(self) -> int:
        """Levels on both sides."""
        return len(self._bids.levels) + len(self._asks.levels)

    def apply_frame(self, frame: bytes) -> str:
        """Apply the data of a frame ``{"stream":..,"data":..,"seq":..}`` (the
        recovery script's, without its position prefix); see :meth:`apply`."""
        try:
            message = orjson.loads(frame)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self.synced = False
            return MALFORMED
        seq = message.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int):
            seq = None
        return self.apply(message.get("data"), seq)

    def apply(self, data: object, seq: int | None = None) -> str:
        """Apply a snapshot or a diff (``data``, at position ``seq`` if the
        stream has positions): :data:`SNAPSHOT`, :data:`APPLIED`,
        :data:`STALE`, :data:`GAP` or :data:`MALFORMED`."""
        if not isinstance(data, dict):
            self.synced = False
            return MALFORMED
        fields = self.fields
        try:
            if data.get(fields.event) == fields.snapshot:
                self._snapshot(data, seq)
                return SNAPSHOT
            return self._diff(data, seq)
        except Malformed:
            self.synced = False
            self.last_diff = None
            return MALFORMED

    def _snapshot(self, data: dict[str, Any], seq: int | None) -> None:
        fields = self.fields
        last_id = _update_id(data.get(fields.last_id))
        bids = _changes(data.get(fields.bids, []))
        asks = _changes(data.get(fields.asks, []))
        self._bids.clear()
        self._asks.clear()
        for side, changes in ((self._bids, bids), (self._asks, asks)):
            for key, price, qty, remove in changes:
                side.change(key, price, qty, remove)
        self.u = last_id
        self.seq = seq
        self.synced = True
        self.last_diff = None
        self._checksum()

    def _diff(self, data: dict[str, Any], seq: int | None) -> str:
        fields = self.fields
        first_id = _update_id(data.get(fields.first_id))
        last_id = _update_id(data.get(fields.last_id))
        if last_id < first_id:
            raise Malformed("first update id after the last")
        bids = _changes(data.get(fields.bids, []))
        asks = _changes(data.get(fields.asks, []))
        u = self.u
        if not self.synced or u is None:
            return GAP
        if (seq is not None and self.seq is not None and seq <= self.seq) or last_id <= u:
            return STALE
        if first_id != u + 1:
            self.synced = False
            self.last_diff = None
            return GAP
        top = CHECKSUM_LEVELS
        for key, price, qty, remove in bids:
            if self._bids.change(key, price, qty, remove) < CHECKSUM_LEVELS:
                top = 0
        for key, price, qty, remove in asks:
            if self._asks.change(key, price, qty, remove) < CHECKSUM_LEVELS:
                top = 0
        self.u = last_id
        if seq is not None:
            self.seq = seq
        self.last_diff = ParsedDiff(first_id, last_id, bids, asks, data)
        if top == 0:
            self._checksum()
        return APPLIED

    def _checksum(self) -> None:
        bids, asks = self._bids, self._asks
        self.checksum = book_checksum(
            [bids.levels[key] for key in bids.keys[:CHECKSUM_LEVELS]],
            [asks.levels[key] for key in asks.keys[:CHECKSUM_LEVELS]],
        )

    def bids(self, depth: int | None = None) -> list[list[str]]:
        """Bid levels, highest price first: ``[[price, qty], ...]``."""
        return self._bids.top(depth)

    def asks(self, depth: int | None = None) -> list[list[str]]:
        """Ask levels, lowest price first: ``[[price, qty], ...]``."""
        return self._asks.top(depth)

    def top(self, depth: int) -> tuple[list[list[str]], list[list[str]]]:
        """The best ``depth`` levels of each side: ``(bids, asks)``."""
        return self._bids.top(depth), self._asks.top(depth)

    def depth_top(self, depth: int) -> dict[str, Any]:
        """The data of a top-N snapshot: ``{"e": "depthTop", "s", "u", "b", "a"}``."""
        bids, asks = self.top(depth)
        return {"e": DEPTH_TOP, "s": self.symbol, "u": self.u, "b": bids, "a": asks}

    def take_top(self, depth: int) -> dict[str, Any] | None:
        """:meth:`depth_top` if the top ``depth`` levels changed since the
        last time this was called for ``depth`` (or it is the first), else
        None; None also while the book is unsynced."""
        if not self.synced:
            return None
        top = self.top(depth)
        if self._taken.get(depth) == top:
            return None
        self._taken[depth] = top
        return {"e": DEPTH_TOP, "s": self.symbol, "u": self.u, "b": top[0], "a": top[1]}

    def __repr__(self) -> str:
        return "<Book %s u=%s seq=%s %d bids %d asks%s>" % (
            self.symbol,
            self.u,
            self.seq,
            len(self._bids.levels),
            len(self._asks.levels),
            "" if self.synced else " unsynced",
        )


class Merged(NamedTuple):
    """A merged diff: its data, and the position and checksum of the last
    diff merged (those of the book after it)."""

    data: dict[str, Any]
    seq: int | None
    checksum: int


class DiffMerger:
    """Diffs merged over an interval (an update speed): each level's latest
    quantity, ``U`` of the first diff merged, ``u`` of the last, the other
    fields of the last.  Feed it every diff the book applied
    (:attr:`Book.last_diff`), in order; :meth:`take` once per interval.

    >>> merged = merge_diffs([
    ...     {"e": "depth", "U": 1, "u": 2, "b": [["10", "1"], ["9", "2"]], "a": []},
    ...     {"e": "depth", "U": 3, "u": 3, "b": [["10.0", "0"]], "a": [["11", "5"]]},
    ... ])
    >>> merged
    {'e': 'depth', 'U': 1, 'u': 3, 'b': [['10.0', '0'], ['9', '2']], 'a': [['11', '5']]}

    After the book took a snapshot (a gap), :meth:`reset` drops what was
    merged: the next merged diff starts after the snapshot.
    """

    def __init__(self, fields: BookFields = DEFAULT_FIELDS) -> None:
        self.fields = fields
        self._bids: dict[Decimal, tuple[str, str]] = {}
        self._asks: dict[Decimal, tuple[str, str]] = {}
        self._first: int | None = None
        self._last: ParsedDiff | None = None
        self._seq: int | None = None
        self._checksum = 0

    @property
    def pending(self) -> bool:
        """Whether a diff was merged since the last :meth:`take`."""
        return self._last is not None

    def reset(self) -> None:
        """Forget what was merged."""
        self._bids = {}
        self._asks = {}
        self._first = None
        self._last = None

    def add(self, diff: ParsedDiff | None, seq: int | None = None, checksum: int = 0) -> None:
        """Merge ``diff`` (the book's position and checksum after it: ``seq``,
        ``checksum``); None is ignored.  A diff that does not follow the
        last one merged raises ``ValueError``."""
        if diff is None:
            return
        last = self._last
        if last is not None and diff.first_id != last.last_id + 1:
            raise ValueError(
                "diff %d..%d does not follow %d" % (diff.first_id, diff.last_id, last.last_id)
            )
        if last is None:
            self._first = diff.first_id
        _merge(self._bids, diff.bids)
        _merge(self._asks, diff.asks)
        self._last = diff
        self._seq = seq
        self._checksum = checksum

    def add_data(self, data: dict[str, Any], seq: int | None = None, checksum: int = 0) -> None:
        """Merge a diff given as data (raises ``ValueError`` on data a book
        could not read)."""
        fields = self.fields
        first_id = _update_id(data.get(fields.first_id))
        last_id = _update_id(data.get(fields.last_id))
        bids = _changes(data.get(fields.bids, []))
        asks = _changes(data.get(fields.asks, []))
        self.add(ParsedDiff(first_id, last_id, bids, asks, data), seq, checksum)

    def take(self) -> Merged | None:
        """The merged diff since the last call, or None if nothing was merged."""
        last = self._last
        if last is None:
            return None
        fields = self.fields
        data = dict(last.data)
        data[fields.first_id] = self._first
        data[fields.last_id] = last.last_id
        data[fields.bids] = [list(self._bids[k]) for k in sorted(self._bids, reverse=True)]
        data[fields.asks] = [list(self._asks[k]) for k in sorted(self._asks)]
        merged = Merged(data, self._seq, self._checksum)
        self.reset()
        return merged


def _merge(side: dict[Decimal, tuple[str, str]], changes: Iterable[Change]) -> None:
    for key, price, qty, _ in changes:
        # A level takes the latest strings of its price and quantity (a
        # removal keeps the publisher's zero as sent).
        side[key] = (price, qty)


def merge_diffs(
    diffs: Iterable[dict[str, Any]], fields: BookFields = DEFAULT_FIELDS
) -> dict[str, Any] | None:
    """The merged data of contiguous ``diffs`` (None if there are none)."""
    merger = DiffMerger(fields)
    for data in diffs:
        merger.add_data(data)
    merged = merger.take()
    return None if merged is None else merged.data
