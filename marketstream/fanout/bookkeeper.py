"""The server's books of one process, without any I/O: one
:class:`KeptBook` per book stream someone reads (the stream itself or a
stream derived from it), started from the stream's snapshot and kept by
each message once, whatever the number of subscribers.

The core hands every message of a kept stream to its book
(:meth:`KeptBook.on_frame`, the stream's *tap*) and delivers what it
returns: the frame with the book's checksum after ``"seq"``::

    keeper = BookKeeper(DerivedRules(), DEFAULT_FIELDS, counters, tap, untap, deliver_held)
    keeper.keep("depth.BTC_USDT")                  # a first reader: a start read is due
    [read] = keeper.start(confirmed={"depth.BTC_USDT"})
    keeper.read_done("depth.BTC_USDT", history, read.token)   # snapshot + what followed
    frame = keeper.streams["depth.BTC_USDT"].on_frame(seq, frame)   # now with "checksum"

A book starts from the snapshot the stream's history read finds (the
recovery script's ``{S}:snap``), then the entries after it and the live
messages that arrived during the read, each once.  While it waits for that
read, the stream's live frames are held back from its listeners (the tap
returns None) and handed to ``deliver_held(name, frames)`` once the read
ended, each with its checksum: so even the first frames a subscriber gets
carry one (all but a frame older than the snapshot the read found: a book
cannot run backwards).  A diff that does not follow (a gap, data the book cannot read)
unsyncs the book, and its frames are held again while it reads its
snapshot once more.  Only when those reads keep failing (a stored history
with a hole in it) do frames go out without a checksum, as they are, until
a read syncs the book again.  A stream published without snapshots has no
server book (:attr:`KeptBook.bookless`): its frames are delivered as they
are.

Catch-ups of a book stream (``since``, ``snapshot``) carry checksums too:
:meth:`BookKeeper.chain` gives the checksums of a history read's frames,
computed from the read's own snapshot on, and from the book's recent
positions (:data:`RECENT`) before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container
from typing import Protocol

from marketstream.fanout.books import APPLIED, SNAPSHOT, STALE, Book, DiffMerger
from marketstream.fanout.counters import Counters
from marketstream.fanout.records import History, Read
from marketstream.wire.books import BookFields, with_checksum
from marketstream.wire.positions import FRAME_END
from marketstream.wire.derived import DerivedRules

__all__ = [
    "BookKeeper",
    "Held",
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
#: Live messages held back while a book waits for its start read; past it
#: they go out as they are, and a read in flight is done again.
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
    message's position and frame; it returns the frame to deliver (None:
    held back, to be released later)."""

    def __call__(self, seq: int | None, frame: bytes) -> bytes | None: ...


#: Frames held back from a stream's listeners, released: (position, frame).
Held = list[tuple[int | None, bytes]]


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
        # Live frames held back while the book waits for its start read
        # (None: not holding; during a read: it overflowed).
        self.buffer: Held | None = []
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

    def on_frame(self, seq: int | None, frame: bytes) -> bytes | None:
        """A live message of the stream: applied to the book; the frame to
        deliver, with the book's checksum when the book follows; None while
        the book waits for its start read (the frame is held back)."""
        buffer = self.buffer
        if buffer is not None:
            return self._hold(buffer, seq, frame)
        book = self.book
        if self.reading or not book.synced or seq is None:
            return frame
        checked = self._apply(seq, frame, book.apply_frame(frame))
        if checked is not None:
            return checked
        if self.buffer is not None:  # it lost the stream and reads it again: held from here
            return self._hold(self.buffer, seq, frame)
        return frame

    def _hold(self, buffer: Held, seq: int | None, frame: bytes) -> bytes | None:
        """Hold ``frame`` back until the start read ended; past
        :data:`MAX_BUFFERED`, what was held goes out as it is (then this
        frame), and a read in flight is done again."""
        if len(buffer) < MAX_BUFFERED:
            buffer.append((seq, frame))
            return None
        self.buffer = None
        self.keeper.deliver_held(self.name, buffer)
        return frame

    def _apply(self, seq: int, frame: bytes, outcome: str) -> bytes | None:
        """After ``book`` applied ``frame``: merge, remember, checksum."""
        book = self.book
        if outcome == APPLIED:
            for merger in self.mergers.values():
                merger.add(book.last_diff, book.seq, book.checksum)
        elif outcome == SNAPSHOT:
            self._started_over()
        elif not _unchanged(book, seq, outcome):
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
        (``buffered``, else those it held back); then the frames it held
        back are released, each with its checksum if the book has it."""
        held = self.buffer or []
        self.buffer = None
        self.reading = False
        self.token = 0  # a start read still in flight is stale
        sums = self._start(history, held if buffered is None else buffered)
        if held:  # released, each with its checksum (the start's, or a book's before it)
            recent = self.recent
            frames: Held = []
            for seq, frame in held:
                checksum = None if seq is None else sums.get(seq, recent.get(seq))
                frames.append((seq, frame if checksum is None else with_checksum(frame, checksum)))
            self.keeper.deliver_held(self.name, frames)

    def _start(self, history: History, buffered: list[tuple[int | None, bytes]]) -> dict[int, int]:
        """Start the book from ``history``'s snapshot, then its entries and
        ``buffered``; the checksum after each position it took."""
        book = self.book
        book.synced = False
        sums: dict[int, int] = {}
        if history.snapshot is None:
            self.bookless = not history.snapshot_skipped  # (too large: it is there)
            return sums
        seq, frame = history.snapshot
        if book.apply_frame(frame) != SNAPSHOT:
            self.bookless = True
            return sums
        self.bookless = False
        self._started_over()
        self.recent[seq] = sums[seq] = book.checksum
        for position, entry in [*history.entries, *buffered]:
            fresh = book.seq is None or (position is not None and position > book.seq)
            if position is None or not (book.synced and fresh):
                continue
            if self._apply(position, entry, book.apply_frame(entry)) is not None:
                sums[position] = book.checksum
        return sums


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
        if fresh:
            outcome = book.apply_frame(frame)
            if outcome in (APPLIED, SNAPSHOT) or _unchanged(book, seq, outcome):
                checksum = book.checksum
        if checksum is None:
            checksum = self.recent.get(seq)
        return frame if checksum is None else with_checksum(frame, checksum)


def _unchanged(book: Book, seq: int, outcome: str) -> bool:
    """Whether a frame at ``seq`` left ``book`` as it was: a diff already in
    it (its ``u`` not past the book's), at a new position."""
    return outcome == STALE and book.synced and (book.seq is None or seq > book.seq)


class BookKeeper:
    """The kept books of one process (see the module docstring).
    ``tap(name, fn)`` / ``untap(name)``: the core's, to receive a stream's
    messages (and hold its channel) or let them go; ``deliver_held(name,
    frames)``: to deliver frames a book held back to the stream's
    listeners (in order, before any later frame)."""

    def __init__(
        self,
        rules: DerivedRules,
        fields: BookFields,
        counters: Counters,
        tap: Callable[[str, Tap], None],
        untap: Callable[[str], None],
        deliver_held: Callable[[str, Held], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rules = rules
        self.deliver_held = deliver_held
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
        history with a hole in it fails each read until a newer snapshot).
        Live frames are held back until a read done at once ends; while
        reads back off, they go out as they are."""
        if not kept.reading:
            kept.failures += 1
            delay = min(RETRY_BASE * (2**kept.failures - 2), RETRY_MAX)
            kept.retry_at = self.clock() + delay
            self.pending[kept.name] = None
            if delay <= 0:
                if kept.buffer is None:
                    kept.buffer = []
            elif kept.buffer is not None:
                held, kept.buffer = kept.buffer, None
                if held:
                    self.deliver_held(kept.name, held)

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
            kept.token = self.new_token()
            kept.reading = True
            if kept.buffer is None:
                kept.buffer = []
            reads.append(Read(name, None, True, kept.token, READ_BYTES))
        return reads

    def new_token(self) -> int:
        """A token for a read of this keeper's (or of a derived stream's
        state): negative, so that the core tells them from recoveries."""
        self._reads += 1
        return -self._reads

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
            self.restart(kept)  # (what it held stays held if it reads again at once)

    def link_lost(self) -> None:
        """What was published meanwhile is missed: every book starts again
        once its channel is confirmed.  The frames it held back are dropped:
        never delivered, they are in what the listeners catch up."""
        for kept in self.streams.values():
            kept.reading = False
            kept.buffer = []
            kept.book.synced = False
            self.pending[kept.name] = None

    def chain(self, name: str) -> Chain | None:
        """The checksums of a history read of ``name`` (None: not kept)."""
        kept = self.streams.get(name)
        return None if kept is None or kept.bookless else Chain(kept)
