"""Derived streams, without any I/O: top-N books (``depth10.BTC_USDT``)
and update speeds (``depth.BTC_USDT@100ms``, ``ticker.BTC_USDT@1000ms``),
each frame built once per interval and shared by all its subscribers.

A derived stream's subscribers are held here, not among the core's live
listeners: the core taps the base stream (its book, see
:mod:`~marketstream.fanout.bookkeeper`, or the latest message of a
conflatable stream) and the shell calls :meth:`DerivedStreams.tick` once
per interval (one timer per interval per process)::

    derived = DerivedStreams(rules, keeper, batch, compressing, core.tap, core.untap)
    derived.add(conn, "depth10.BTC_USDT", Want())   # True: a derived name, held here
    derived.intervals()                             # {100}: the timers the shell runs
    derived.tick(100)                               # frames queued in the batch

Per interval:

* ``merged`` (a book stream at a speed): the diffs applied since the last
  tick, merged (each level's latest quantity, ``U`` of the first, ``u`` of
  the last, ``seq`` and ``checksum`` of the last); nothing when nothing
  changed.  A new subscriber gets the server book's snapshot at its first
  tick instead, and everyone does after the book started over (a gap
  upstream).
* ``top`` (``depthN``): the top N levels as a full snapshot (``e =
  depthTop``), when they changed; a new subscriber gets it at its first tick.
* ``latest`` (``ticker``, ``bookTicker``, ``kline`` at a speed): the latest
  message of the interval, renamed; with ``snapshot`` (or ``since``), the
  latest message seen at the first tick.  When the process has seen none
  yet, the stream's snapshot is read (:meth:`LatestTaps.start`, the
  tokens are the keeper's) and stands for it, unless a newer message came.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

from marketstream.fanout.batching import Batch
from marketstream.fanout.bookkeeper import BookKeeper, KeptBook, Tap
from marketstream.fanout.books import DiffMerger
from marketstream.fanout.compressing import Compressing
from marketstream.fanout.records import Connection, History, Read, Want
from marketstream.wire.books import DEPTH_TOP, book_checksum, book_frame, no_book_notice, renamed
from marketstream.wire.derived import LATEST, MERGED, TOP, Derived, DerivedRules
from marketstream.wire.frames import text_frame

__all__ = ["DerivedStreams", "DerivedStream", "Latest", "LatestTaps", "SEED_BYTES"]

#: A read of a conflatable stream's snapshot asks for at most this many bytes.
SEED_BYTES = 1 << 20


class Latest:
    """The latest message of a conflatable stream (its tap) and how many
    arrived."""

    __slots__ = ("seq", "frame", "count", "users", "token")

    def __init__(self) -> None:
        self.seq: int | None = None
        self.frame: bytes | None = None
        self.count = 0
        self.users = 0
        self.token = 0  # the read of the stream's snapshot in flight (0: none)

    def on_frame(self, seq: int | None, frame: bytes) -> bytes:
        self.seq = seq
        self.frame = frame
        self.count += 1
        return frame


class LatestTaps:
    """The latest message of each conflatable stream a speed derives from
    (a tap on it, held while a speed of it has subscribers), and the reads
    of a stream's snapshot that stand for it while none came yet."""

    def __init__(
        self, keeper: BookKeeper, tap: Callable[[str, Tap], None], untap: Callable[[str], None]
    ) -> None:
        self.keeper = keeper  # (its read tokens)
        self._tap = tap
        self._untap = untap
        self.streams: dict[str, Latest] = {}
        # Streams whose snapshot a new subscriber wants read, and the reads
        # in flight (token -> stream).
        self.pending: dict[str, None] = {}
        self.reading: dict[int, str] = {}

    def hold(self, base: str) -> None:
        """One more speed of ``base`` has subscribers."""
        latest = self.streams.get(base)
        if latest is None:
            latest = self.streams[base] = Latest()
            self._tap(base, latest.on_frame)
        latest.users += 1

    def release(self, base: str) -> None:
        """One speed of ``base`` less; the last lets the tap go."""
        latest = self.streams.get(base)
        if latest is not None:
            latest.users -= 1
            if latest.users <= 0:
                del self.streams[base]
                self.pending.pop(base, None)
                self._untap(base)

    def want_state(self, base: str) -> None:
        """A new subscriber wants ``base``'s state: if nothing was seen on
        it yet, its snapshot is to be read."""
        latest = self.streams.get(base)
        if latest is not None and latest.frame is None and not latest.token:
            self.pending[base] = None

    def start(self, confirmed: set[str], most: int | None = None) -> list[Read]:
        """The snapshot reads due (at most ``most``), for streams whose
        channel Redis confirmed."""
        reads: list[Read] = []
        for base in list(self.pending):
            if most is not None and len(reads) >= most:
                break
            latest = self.streams.get(base)
            if latest is None or latest.frame is not None:
                del self.pending[base]
            elif base in confirmed:
                del self.pending[base]
                latest.token = self.keeper.new_token()
                self.reading[latest.token] = base
                reads.append(Read(base, None, True, latest.token, SEED_BYTES))
        return reads

    def read_done(self, history: History, token: int) -> None:
        """The snapshot read of ``token`` found ``history``: its snapshot
        is the stream's latest message, unless one came meanwhile."""
        latest = self._read_ended(token)
        snapshot = history.snapshot
        if latest is None or snapshot is None:
            return
        if latest.seq is None or snapshot[0] > latest.seq:
            latest.seq, latest.frame = snapshot
            latest.count += 1

    def read_failed(self, token: int) -> None:
        """The snapshot read of ``token`` failed: it is done again."""
        base = self.reading.get(token)
        latest = self._read_ended(token)
        if latest is not None and latest.frame is None and base is not None:
            self.pending[base] = None

    def _read_ended(self, token: int) -> Latest | None:
        """The read of ``token`` ended: its stream's latest (None: stale)."""
        base = self.reading.pop(token, None)
        latest = self.streams.get(base) if base is not None else None
        if latest is None or latest.token != token:
            return None
        latest.token = 0
        return latest

    def link_lost(self) -> None:
        """The reads in flight are void: done again once confirmed."""
        for token, base in self.reading.items():
            latest = self.streams.get(base)
            if latest is not None and latest.token == token:
                latest.token = 0
                if latest.frame is None:
                    self.pending[base] = None
        self.reading.clear()


class DerivedStream:
    """One derived stream: what it is, its subscribers, those that get
    its state at the next tick, and what it last sent."""

    __slots__ = ("spec", "listeners", "fresh", "parked", "epoch", "sent", "top")

    def __init__(self, spec: Derived) -> None:
        self.spec = spec
        self.listeners: dict[Connection, None] = {}
        self.fresh: dict[Connection, None] = {}  # get the state, not a change
        self.parked: dict[Connection, None] = {}  # slow readers: nothing for now
        self.epoch = -1  # the book's epoch last sent (merged)
        self.sent = 0  # the latest message's count last sent (latest)
        self.top: tuple[list[list[str]], list[list[str]]] | None = None  # last top sent


def _renamed(frame: bytes, base: str, name: str) -> bytes:
    try:
        return renamed(frame, base, name)
    except ValueError:  # a publisher's own envelope: encoded again
        message = orjson.loads(frame)
        message["stream"] = name
        return orjson.dumps(message)


class DerivedStreams:
    """The derived streams of one process (see the module docstring)."""

    def __init__(
        self,
        rules: DerivedRules,
        keeper: BookKeeper,
        batch: Batch,
        compressing: Compressing,
        tap: Callable[[str, Tap], None],
        untap: Callable[[str], None],
    ) -> None:
        self.rules = rules
        self.keeper = keeper
        self.batch = batch
        self.counters = batch.counters
        self.compressing = compressing
        self._tap = tap
        self._untap = untap
        self.streams: dict[str, DerivedStream] = {}
        self.by_interval: dict[int, dict[str, DerivedStream]] = {}
        self.latest_taps = LatestTaps(keeper, tap, untap)
        self.latest = self.latest_taps.streams

    def parse(self, name: str) -> Derived | None:
        """The derived stream ``name`` names (None: not a derived name, or
        one the rules refuse)."""
        if "@" not in name and not name.startswith("depth"):
            return None
        spec = self.rules.parse(name)
        return spec if isinstance(spec, Derived) else None

    def base_of(self, name: str) -> str:
        """The stream ``name`` derives from if it is a derived stream with
        subscribers, else ``name``."""
        stream = self.streams.get(name)
        return name if stream is None else stream.spec.base

    def intervals(self) -> set[int]:
        """The intervals (ms) with derived streams: the shell's timers."""
        return set(self.by_interval)

    def bookless(self, name: str) -> str | None:
        """If ``name`` is derived from a book stream the server keeps no
        book for (it has no snapshots), that stream; else None."""
        spec = self.parse(name)
        if spec is None or spec.kind not in (MERGED, TOP):
            return None
        return spec.base if self.keeper.bookless(spec.base) else None

    def add(self, conn: Connection, name: str, want: Want | None) -> bool:
        """Subscribe ``conn`` to ``name`` if it is a derived name (True)."""
        spec = self.parse(name)
        if spec is None:
            return False
        stream = self.streams.get(name)
        if stream is None:
            stream = self.streams[name] = DerivedStream(spec)
            self.by_interval.setdefault(spec.interval_ms, {})[name] = stream
            self._hold_base(spec)
        stream.listeners[conn] = None
        if spec.kind != LATEST or (want is not None and want.recovers):
            stream.fresh[conn] = None
            if spec.kind == LATEST:
                self.latest_taps.want_state(spec.base)
        return True

    def drop(self, conn: Connection, name: str) -> bool:
        """Unsubscribe ``conn`` from ``name`` if it is a derived stream (True)."""
        stream = self.streams.get(name)
        if stream is None:
            return False
        stream.listeners.pop(conn, None)
        stream.fresh.pop(conn, None)
        stream.parked.pop(conn, None)
        if not stream.listeners and not stream.parked:
            spec = stream.spec
            del self.streams[name]
            same = self.by_interval[spec.interval_ms]
            del same[name]
            if not same:
                del self.by_interval[spec.interval_ms]
            self._release_base(spec)
        return True

    def park(self, conn: Connection, name: str) -> bool:
        """``conn`` reads too slowly: no more frames of ``name`` until
        :meth:`unpark` (True if ``name`` is a derived stream)."""
        stream = self.streams.get(name)
        if stream is None:
            return False
        if stream.listeners.pop(conn, 0) is None:
            stream.fresh.pop(conn, None)
            stream.parked[conn] = None
        return True

    def unpark(self, conn: Connection, name: str) -> bool:
        """``conn`` gets ``name``'s state at its next tick, then its frames
        (True if ``name`` is a derived stream)."""
        stream = self.streams.get(name)
        if stream is None:
            return False
        if stream.parked.pop(conn, 0) is None:
            stream.listeners[conn] = None
            stream.fresh[conn] = None
        return True

    def _hold_base(self, spec: Derived) -> None:
        if spec.kind in (MERGED, TOP):
            kept = self.keeper.keep(spec.base)
            if kept is not None and spec.kind == MERGED:
                kept.mergers[spec.interval_ms] = DiffMerger(kept.book.fields)
            return
        self.latest_taps.hold(spec.base)

    def _release_base(self, spec: Derived) -> None:
        if spec.kind in (MERGED, TOP):
            kept = self.keeper.streams.get(spec.base)
            if kept is not None and spec.kind == MERGED:
                kept.mergers.pop(spec.interval_ms, None)
            self.keeper.release(spec.base)
            return
        self.latest_taps.release(spec.base)

    def refuse_bookless(self, base: str) -> list[tuple[Connection, str]]:
        """``base`` turned out to have no server book (no snapshots): each
        subscriber of a stream derived from it is told (one notice frame
        per stream, counted as a refused stream); the pairs (connection,
        derived name) to unsubscribe."""
        refused: list[tuple[Connection, str]] = []
        for name, stream in self.streams.items():
            if stream.spec.base != base or stream.spec.kind == LATEST:
                continue
            told = {**stream.listeners, **stream.parked}  # slow readers are told too
            self._send(name, told, no_book_notice(name, base))
            self.counters.rejected_streams += len(told)
            self.counters.rejected["no_book"] += len(told)
            refused.extend((conn, name) for conn in told)
        return refused

    def tick(self, interval: int) -> bool:
        """The interval ``interval`` (ms) passed: queue each of its
        streams' frame; True if frames were queued."""
        queued = False
        for name, stream in self.by_interval.get(interval, {}).items():
            kind = stream.spec.kind
            if kind == MERGED:
                queued = self._merged(name, stream) or queued
            elif kind == TOP:
                queued = self._top(name, stream) or queued
            else:
                queued = self._latest(name, stream) or queued
        return queued

    def _send(self, name: str, listeners: dict[Connection, None], payload: bytes) -> None:
        if not listeners:
            return
        if self.compressing.connections:
            self.compressing.deliver(name, listeners, payload)
        else:
            self.batch.enqueue(listeners, text_frame(payload))

    def _send_split(
        self, name: str, stream: DerivedStream, state: bytes, change: bytes | None
    ) -> bool:
        """``state`` to the fresh subscribers, ``change`` to the others."""
        fresh = stream.fresh
        if fresh:
            stream.fresh = {}
            self._send(name, fresh, state)
            if change is not None and len(fresh) < len(stream.listeners):
                others = {conn: None for conn in stream.listeners if conn not in fresh}
                self._send(name, others, change)
            return True
        if change is None:
            return False
        self._send(name, stream.listeners, change)
        return True

    def _kept(self, stream: DerivedStream) -> KeptBook | None:
        kept = self.keeper.streams.get(stream.spec.base)
        return kept if kept is not None and kept.synced else None

    def _merged(self, name: str, stream: DerivedStream) -> bool:
        kept = self._kept(stream)
        if kept is None:
            return False
        merger = kept.mergers.get(stream.spec.interval_ms)
        merged = merger.take() if merger is not None else None
        book = kept.book
        if stream.epoch != kept.epoch:  # the book started over: everyone gets it
            stream.epoch = kept.epoch
            stream.fresh = dict(stream.listeners)
            merged = None
        change = None
        if merged is not None and merged.seq is not None:
            change = book_frame(name, merged.data, merged.seq, merged.checksum)
        if not stream.fresh:
            return self._send_split(name, stream, b"", change)
        fields = book.fields
        data = {
            fields.event: fields.snapshot,
            "s": book.symbol,
            fields.last_id: book.u,
            fields.bids: book.bids(),
            fields.asks: book.asks(),
        }
        state = book_frame(name, data, book.seq or 0, book.checksum)
        return self._send_split(name, stream, state, change)

    def _top(self, name: str, stream: DerivedStream) -> bool:
        kept = self._kept(stream)
        if kept is None:
            return False
        book = kept.book
        depth = stream.spec.depth or 0
        top = book.top(depth)
        changed = top != stream.top
        if not changed and not stream.fresh:
            return False
        stream.top = top
        data = {"e": DEPTH_TOP, "s": book.symbol, "u": book.u, "b": top[0], "a": top[1]}
        # The checksum of the levels sent (the book's own for N >= 10).
        frame = book_frame(name, data, book.seq or 0, book_checksum(top[0], top[1]))
        # A new subscriber's top is no change for the others: they get none.
        return self._send_split(name, stream, frame, frame if changed else None)

    def _latest(self, name: str, stream: DerivedStream) -> bool:
        latest = self.latest.get(stream.spec.base)
        if latest is None or latest.frame is None:
            return False
        if latest.count == stream.sent and not stream.fresh:
            return False
        frame = _renamed(latest.frame, stream.spec.base, name)
        if latest.count == stream.sent:  # nothing new: the state for the fresh ones
            return self._send_split(name, stream, frame, None)
        stream.sent = latest.count
        stream.fresh = {}
        self._send(name, stream.listeners, frame)
        return True
