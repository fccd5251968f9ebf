"""The server's books of one process, without any I/O: one
:class:`KeptBook` per book stream someone reads (the stream itself or a
stream derived from it), started from the stream's snapshot and kept by
each message once, whatever the number of subscribers.

The core hands every message of a kept stream to its book
(:meth:`KeptBook.on_frame`, the stream's *tap*) and delivers what it
returns: the frame with the book's checksum after ``"seq"``::

    keeper = BookKeeper(DerivedRules(), DEFAULT_FIELDS, counters, core.tap, core.untap)
    keeper.keep("depth.BTC_USDT")                  # a first reader: a start read is due
    [read] = keeper.start(confirmed={"depth.BTC_USDT"})
    keeper.read_done("depth.BTC_USDT", history, read.token)   # snapshot + what followed
    frame = keeper.streams["depth.BTC_USDT"].on_frame(seq, frame)   # now with "checksum"

A book starts from the snapshot the stream's history read finds (the
recovery script's ``{S}:snap``), then the entries after it and the live
messages that arrived during the read, each once.  A diff that does not
follow (a gap, data the book cannot read) unsyncs the book: its frames go
out without a checksum until a new start read synced it again.  A stream
published without snapshots has no server book (:attr:`KeptBook.bookless`):
its frames are delivered as they are.

Catch-ups of a book stream (``since``, ``snapshot``) carry checksums too:
:meth:`BookKeeper.chain` gives the checksums of a history read's frames,
computed from the read's own snapshot on, and from the book's recent
positions (:data:`RECENT`) before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container
from typing import Protocol

from marketstream.fanout.books import APPLIED, SNAPSHOT, Book, DiffMerger
from marketstream.fanout.counters import Counters
from marketstream.fanout.records import History, Read
from marketstream.wire.books import BookFields, with_checksum
from marketstream.wire.positions import FRAME_END
from marketstream.wire.derived import DerivedRules

__all__ = [
    "BookKeeper",
    "KeptBook",
    "Chain",
    "Tap",
    "RECENT",
    "READ_BYTES",
    "MAX_BUFFERED",
    "RETRY_BASE",
    "RETRY_MAX",
    "BOOKLESS_FOR",
]

#: Positions whose checksum a book remembers (for catch-ups that replay
#: entries older than the stream's snapshot).
RECENT = 1024
#: A start read asks for at most this many bytes of snapshot and history.
READ_BYTES = 8 << 20
#: Live messages buffered while a start read is in flight; past it the
#: read is done again.
MAX_BUFFERED = 10_000
#: Start reads that do not sync a book are done again after 0, 0.05, 0.15,
#: 0.35 ... seconds, at most RETRY_MAX apart.
RETRY_BASE = 0.025
RETRY_MAX = 5.0
#: A stream found without a snapshot is taken as one for this many seconds:
#: its derived streams are refused at once; after that, a new subscriber
#: makes the server look again.
BOOKLESS_FOR = 5.0


class Tap(Protocol):
    """What the core calls with each message of a tapped stream: the
    message's position and frame; it returns the frame to deliver."""

    def __call__(self, seq: int | None, frame: bytes) -> bytes: ...


class KeptBook:
    """The book of one book stream, and what is merged from it per update
    speed (``mergers``, by interval in ms)."""

    __slots__ = (
        "name",
        "book",
        "users",
        "reading",
        "token",
        "buffer",
        "recent",
        "bookless",
        "epoch",
        "mergers",
        "keeper",
        "failures",
        "retry_at",
        "bookless_at",
    )

    def __init__(self, name: str, fields: BookFields, keeper: BookKeeper) -> None:
        self.name = name
        self.book = Book(name.partition(".")[2], fields)
        self.users = 0  # subscriptions that need it (the stream's and derived ones)
        self.reading = False  # a start read is in flight
        self.token = 0
        self.buffer: list[tuple[int | None, bytes]] | None = None  # live frames during the read
        self.recent: dict[int, int] = {}  # position -> checksum, the last RECENT
        self.bookless = False  # the stream has no snapshot: no server book
        self.epoch = 0  # rises each time the book starts over (a snapshot)
        self.mergers: dict[int, DiffMerger] = {}
        self.keeper = keeper
        self.failures = 0  # start reads in a row that did not sync it
        self.retry_at = 0.0  # the next start read not before (the keeper's clock)
        self.bookless_at = 0.0  # when it was found to have no snapshot

    @property
    def synced(self) -> bool:
        """Whether the book follows the stream (its frames get checksums)."""
        return self.book.synced and not self.reading

    def on_frame(self, seq: int | None, frame: bytes) -> bytes:
        """A live message of the stream: applied to the book; the frame to
        deliver, with the book's checksum when the book follows."""
        if self.reading:
            buffer = self.buffer
            if buffer is not None:
                if len(buffer) < MAX_BUFFERED:
                    buffer.append((seq, frame))
                else:
                    self.buffer = None  # too much: the read is done again
            return frame
        book = self.book
        if not book.synced or seq is None:
            return frame
        return self._apply(seq, frame, book.apply_frame(frame)) or frame

    def _apply(self, seq: int, frame: bytes, outcome: str) -> bytes | None:
        """After ``book`` applied ``frame``: merge, remember, checksum."""
        book = self.book
        if outcome == APPLIED:
            for merger in self.mergers.values():
                merger.add(book.last_diff, book.seq, book.checksum)
        elif outcome == SNAPSHOT:
            self._started_over()
        else:
            if not book.synced:  # a gap, or data it cannot read: start again
                self.keeper.counters.book_resyncs += 1
                self.keeper.restart(self)
            return None
        recent = self.recent
        recent[seq] = book.checksum
        if len(recent) > RECENT:
            del recent[next(iter(recent))]
        return with_checksum(frame, book.checksum)

    def _started_over(self) -> None:
        self.epoch += 1
        for merger in self.mergers.values():
            merger.reset()

    def started(
        self, history: History, buffered: list[tuple[int | None, bytes]] | None = None
    ) -> None:
        """A read found ``history``: the book starts from its snapshot,
        then takes its entries and the live frames buffered meanwhile
        (``buffered``, else its own start read's)."""
        if buffered is None:
            buffered = self.buffer or []
        self.buffer = None
        self.reading = False
        self.token = 0  # a start read still in flight is stale
        book = self.book
        book.synced = False
        if history.snapshot is None:
            self.bookless = not history.snapshot_skipped  # (too large: it is there)
            return
        seq, frame = history.snapshot
        if book.apply_frame(frame) != SNAPSHOT:
            self.bookless = True
            return
        self.bookless = False
        self._started_over()
        self.recent[seq] = book.checksum
        for position, entry in history.entries:
            if book.synced and (book.seq is None or position > book.seq):
                self._apply(position, entry, book.apply_frame(entry))
        for live, entry in buffered:
            if live is not None and book.synced and (book.seq is None or live > book.seq):
                self._apply(live, entry, book.apply_frame(entry))


class Chain:
    """The checksums of one history read's frames of a book stream: from
    the read's snapshot on, computed by a book of its own; before it, the
    kept book's recent positions."""

    __slots__ = ("book", "recent")

    def __init__(self, kept: KeptBook) -> None:
        self.book = Book(kept.book.symbol, kept.book.fields)
        self.recent = kept.recent

    def snapshot(self, seq: int, frame: bytes) -> bytes:
        """The snapshot's frame, with its checksum."""
        if self.book.apply_frame(frame) != SNAPSHOT:
            return frame
        return with_checksum(frame, self.book.checksum)

    def entry(self, seq: int, frame: bytes) -> bytes:
        """An entry's frame (entries oldest first, then the live frames
        buffered during the read), with its checksum if known."""
        book = self.book
        if not frame.endswith(FRAME_END % seq):  # a live frame that has it
            if book.synced and (book.seq is None or seq > book.seq):
                book.apply_frame(frame)
            return frame
        checksum = None
        fresh = book.synced and (book.seq is None or seq > book.seq)
        if fresh and book.apply_frame(frame) in (APPLIED, SNAPSHOT):
            checksum = book.checksum
        if checksum is None:
            checksum = self.recent.get(seq)
        return frame if checksum is None else with_checksum(frame, checksum)


class BookKeeper:
    """The kept books of one process (see the module docstring).
    ``tap(name, fn)`` / ``untap(name)``: the core's, to receive a stream's
    messages (and hold its channel) or let them go."""

    def __init__(
        self,
        rules: DerivedRules,
        fields: BookFields,
        counters: Counters,
        tap: Callable[[str, Tap], None],
        untap: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rules = rules
        self.clock = clock
        self.fields = fields
        self.counters = counters
        self._tap = tap
        self._untap = untap
        self.streams: dict[str, KeptBook] = {}
        self.pending: dict[str, None] = {}  # books that wait for a start read
        self._reads = 0

    def is_book_stream(self, name: str) -> bool:
        return self.rules.is_book_stream(name)

    def synced(self, name: str) -> bool:
        """Whether ``name`` has a server book that follows it."""
        kept = self.streams.get(name)
        return kept is not None and kept.synced

    def keep(self, name: str) -> KeptBook | None:
        """One more subscription needs ``name``'s book (None: not a book stream)."""
        kept = self.streams.get(name)
        if kept is None:
            if not self.rules.is_book_stream(name):
                return None
            kept = self.streams[name] = KeptBook(name, self.fields, self)
            self.pending[name] = None
            self._tap(name, kept.on_frame)
        elif kept.bookless and self.clock() - kept.bookless_at >= BOOKLESS_FOR:
            kept.bookless = False  # a while ago: its publisher may store snapshots now
            self.restart(kept)
        kept.users += 1
        return kept

    def bookless(self, name: str) -> bool:
        """Whether ``name`` is known to have no snapshot (for
        :data:`BOOKLESS_FOR` seconds after a read found none)."""
        kept = self.streams.get(name)
        return kept is not None and kept.bookless and self.clock() - kept.bookless_at < BOOKLESS_FOR

    def release(self, name: str) -> None:
        """One subscription less needs ``name``'s book; the last lets it go."""
        kept = self.streams.get(name)
        if kept is None:
            return
        kept.users -= 1
        if kept.users <= 0:
            del self.streams[name]
            self.pending.pop(name, None)
            self._untap(name)

    def restart(self, kept: KeptBook) -> None:
        """``kept`` lost the stream (or its read did not sync it): read its
        snapshot again, at once the first time, then backing off (a stored
        history with a hole in it fails each read until a newer snapshot)."""
        if not kept.reading:
            kept.failures += 1
            delay = min(RETRY_BASE * (2**kept.failures - 2), RETRY_MAX)
            kept.retry_at = self.clock() + delay
            self.pending[kept.name] = None

    def start(self, confirmed: Container[str], most: int | None = None) -> list[Read]:
        """Start reads due now (at most ``most``), for books whose channel
        Redis confirmed (so that no live message falls between)."""
        reads: list[Read] = []
        now = self.clock()
        for name in list(self.pending):
            if most is not None and len(reads) >= most:
                break
            kept = self.streams[name]
            if name not in confirmed or now < kept.retry_at:
                continue
            del self.pending[name]
            self._reads += 1
            kept.token = -self._reads  # the core tells the books' reads by their sign
            kept.reading = True
            kept.buffer = []
            reads.append(Read(name, None, True, kept.token, READ_BYTES))
        return reads

    def read_done(self, name: str, history: History, token: int | None) -> KeptBook | None:
        """The start read of ``token`` ended: the book starts (returned);
        None for a stale answer."""
        kept = self.streams.get(name)
        if kept is None or not kept.reading or kept.token != token:
            return None
        overflowed = kept.buffer is None
        kept.started(history)
        if overflowed:
            kept.book.synced = False
            self.restart(kept)
        elif kept.book.synced:
            self.counters.books_started += 1
            kept.failures = 0
        elif kept.bookless:
            kept.bookless_at = self.clock()
        return kept

    def start_from(
        self, name: str, history: History, buffered: list[tuple[int | None, bytes]]
    ) -> None:
        """A client's history read of ``name`` found ``history`` (and the
        live frames ``buffered`` since it began): a book still waiting for
        its snapshot starts from it (its own read, if any, is then stale)."""
        kept = self.streams.get(name)
        if kept is None or kept.synced or history.snapshot is None:
            return
        self.pending.pop(name, None)
        kept.started(history, buffered)
        if kept.book.synced:
            self.counters.books_started += 1
            kept.failures = 0

    def read_failed(self, name: str, token: int | None) -> None:
        """The start read of ``token`` failed: it is done again."""
        kept = self.streams.get(name)
        if kept is not None and kept.reading and kept.token == token:
            kept.reading = False
            kept.buffer = None
            self.restart(kept)

    def link_lost(self) -> None:
        """What was published meanwhile is missed: every book starts again
        once its channel is confirmed."""
        for kept in self.streams.values():
            kept.reading = False
            kept.buffer = None
            kept.book.synced = False
            self.pending[kept.name] = None

    def chain(self, name: str) -> Chain | None:
        """The checksums of a history read of ``name`` (None: not kept)."""
        kept = self.streams.get(name)
        return None if kept is None or kept.bookless else Chain(kept)
