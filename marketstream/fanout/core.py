"""The fan-out core: subscriptions, delivery batches, resubscribe and
recovery bookkeeping, without any I/O.

No sockets, no ``await``: a shell (:mod:`marketstream.server.channels`) feeds it
what Redis said and writes out what it produced, and tests drive it
directly::

    core = Core(Counters())
    core.register(conn)
    core.subscribe(conn, ["trade.SOL_USDC"])        # core.wanted() now holds it
    core.upstream_confirmed("trade.SOL_USDC")       # Redis said "subscribe"
    core.on_message(b"trade.SOL_USDC", b'{"stream":"trade.SOL_USDC","data":{}}')
    for conn, data in core.take_batch().items():     # one write per connection
        conn.write_frames(data)

Delivery is batch-shaped: each message is framed once and the frame is
appended to every listener's pending list; :meth:`Core.take_batch` joins each
connection's frames into one write (:mod:`~marketstream.fanout.batching`).

Recovery (see the README's "Recovery"): a connection that subscribes with
``since`` or ``snapshot`` is held outside the stream's listeners while the
shell reads the stream's history once for everyone waiting
(:meth:`Core.start_reads` / :meth:`Core.read_done`); live messages that
arrive meanwhile are buffered, and each waiting connection gets the history
it missed merged with the buffer by position, each message once, before it
joins the live listeners (:mod:`~marketstream.fanout.recovery` holds the
recoveries, :func:`marketstream.fanout.catchup.catch_up` decides what each
connection is sent, :mod:`~marketstream.fanout.dedupe` which live messages
it must then skip).  After an outage of the Redis link, every
recoverable stream's listeners are caught up the same way from the last
position this process delivered; plain streams get the gap notice.

A catch-up is bounded by bytes: each connection may be sent at most
``replay_bytes`` of history and snapshots by the catch-ups it has in
progress, shared evenly among its streams, and a read asks for no more
than the largest share of the connections it serves.  What would not fit
is not read: that connection gets the gap notice, then the snapshot (or
the newest messages) if those fit (:mod:`~marketstream.fanout.budgets`).

Channels: :meth:`Core.wanted` is what the Redis link must hold, and
:meth:`Core.take_changes` what changed since the link last looked (a
subscribe and an unsubscribe of a channel the link never saw cancel out).
With ``linger``, a channel whose last listener left stays subscribed until
the second :meth:`Core.release_lingering` after that (the shell calls it
every half second), so that churn costs Redis nothing; ``max_channels``
caps the channels (:meth:`Core.over_channel_cap`), and lingering ones give
way first (:mod:`~marketstream.fanout.wanted`).
"""

from __future__ import annotations

from collections.abc import Callable

from marketstream.fanout.batching import Batch
from marketstream.fanout.bookkeeper import BookKeeper, Held
from marketstream.fanout.budgets import REPLAY_BYTES, ReplayBudgets
from marketstream.fanout.compressing import Compressing
from marketstream.fanout.counters import Counters
from marketstream.fanout.dedupe import LivePositions
from marketstream.fanout.records import Connection, History, Read, Want
from marketstream.fanout.recovery import MAX_WAITING, Recoveries
from marketstream.fanout.registry import Registry
from marketstream.fanout.speeds import DerivedStreams
from marketstream.fanout.wanted import WantedChannels
from marketstream.wire import payloads
from marketstream.wire.books import DEFAULT_FIELDS, BookFields
from marketstream.wire.deflate import Deflater
from marketstream.wire.derived import DerivedRules
from marketstream.wire.frames import text_frame
from marketstream.wire.positions import split_position

__all__ = ["Core", "Want", "Read", "History", "Connection", "REPLAY_BYTES"]


class Core:
    """Registry and fan-out of one process (see the module docstring): who
    listens to what, and the coordination of its helpers -- the batch, the
    link's channels, the recoveries and their budgets, the live positions."""

    #: Each connection's frames of this batch, joined: ``Batch.take``.
    take_batch: Callable[[], dict[Connection, bytes]]
    #: The link's channels: ``WantedChannels``' methods of those jobs.
    take_changes: Callable[[], dict[str, bool]]
    is_wanted: Callable[[str], bool]
    over_channel_cap: Callable[[list[str]], list[str]]
    release_lingering: Callable[[], None]
    #: Who listens to what: ``Registry``'s methods.
    register: Callable[..., None]
    subscribe: Callable[..., list[str]]
    unsubscribe: Callable[[Connection, list[str]], list[str]]
    remove: Callable[[Connection], None]
    subscriptions: Callable[[Connection], list[str]]

    def __init__(
        self,
        counters: Counters,
        payload_format: str = "envelope",
        max_replay: int = 1000,
        on_malformed: Callable[[bytes, bytes, str], None] | None = None,
        replay_bytes: int = REPLAY_BYTES,
        max_channels: int = 0,
        linger: bool = False,
        deflater: Deflater | None = None,
        books: DerivedRules | None = None,
        book_fields: BookFields = DEFAULT_FIELDS,
    ) -> None:
        self.counters = counters
        self.on_malformed = on_malformed
        self.wrap = payload_format == "data"
        self.max_replay = max_replay
        self.streams: dict[str, dict[Connection, None]] = {}  # live listeners per stream
        self.confirmed: set[str] = set()  # channels Redis confirmed on the live link
        self._resync: set[str] = set()  # channels to catch up once resubscribed
        self.channels = WantedChannels(max_channels, linger)
        self.batch = Batch(counters)
        self.budgets = ReplayBudgets(replay_bytes)
        self.positions = LivePositions()
        self.compressing = Compressing(deflater, self.batch, self.streams)
        self.recoveries = Recoveries(
            self.budgets, self.batch, self.positions, counters, max_replay, self._dropped
        )
        self.recoveries.compressing = self.compressing
        registry = self.registry = Registry(
            self.streams,
            self.channels,
            self.batch,
            self.budgets,
            self.positions,
            self.compressing,
            self.recoveries,
        )
        self.connections = registry.connections  # streams per connection
        self.taps = registry.taps
        rules = books or DerivedRules(())
        self.books = registry.books = BookKeeper(
            rules, book_fields, counters, registry.tap, registry.untap, self._deliver_held
        )
        self.recoveries.chain = self.books.chain
        self.derived = registry.derived = DerivedStreams(
            rules, self.books, self.batch, self.compressing, registry.tap, registry.untap
        )
        self.latest_taps = self.derived.latest_taps
        self.register = registry.register
        self.subscribe = registry.subscribe
        self.unsubscribe = registry.unsubscribe
        self.remove = registry.remove
        self.subscriptions = registry.subscriptions
        self._hold = registry.hold
        self._forget_if_idle = registry.forget_if_idle
        self.take_changes = self.channels.take_changes
        self.is_wanted = self.channels.channels.__contains__
        self.over_channel_cap = self.channels.over_cap
        self.release_lingering = self.channels.release_lingering
        self.lingering = self.channels.lingering  # unwanted channels kept a moment
        # The hot path's names, bound once (the dicts are never replaced).
        self.take_batch = self.batch.take
        self._enqueue = self.batch.enqueue
        self.recovering = self.recoveries.streams
        self.last_seq = self.positions.delivered  # last position delivered live, per stream
        self._live_seq = self.positions.live  # last position seen on the link, per stream
        self._holding = self.positions.holding  # connections caught up to a position
        self._not_holding = self.positions.skip
        self._deflating = self.compressing.connections

    # --- the link's channels (see WantedChannels) ---------------------------

    @property
    def wanted_changed(self) -> bool:
        """The wanted channels changed (the shell syncs upstream, clears it)."""
        return self.channels.changed

    @wanted_changed.setter
    def wanted_changed(self, value: bool) -> None:
        self.channels.changed = value

    def wanted(self) -> set[str]:
        """The channels the Redis link must be subscribed to: streams with
        listeners, streams being recovered, and lingering ones."""
        return set(self.channels.channels)

    # --- the Redis link -----------------------------------------------------

    def upstream_confirmed(self, name: str, reason: str = "link_outage") -> None:
        """Redis confirmed the subscription of ``name`` on the live link
        (after an outage: ``reason`` is the gap notice's, for a plain stream)."""
        self.confirmed.add(name)
        if name not in self._resync:
            return
        self._resync.discard(name)
        listeners = self.streams.get(name)
        if not listeners:
            return
        since = self.last_seq.get(name)
        if since is None:
            # A plain stream: what was published meanwhile is gone.
            self.compressing.notice(name, listeners, reason)
            return
        # A recoverable stream: its listeners catch up from the history.
        del self.streams[name]
        for conn in listeners:
            self._hold(conn, name, Want(since=since, repair=True))

    def upstream_dropped(self, name: str) -> None:
        """Redis confirmed an unsubscribe (or dropped the channel)."""
        self.confirmed.discard(name)

    def link_lost(self) -> None:
        """The pub/sub link is gone: every channel must be confirmed again,
        and what was published meanwhile must be caught up (or announced)."""
        self.confirmed.clear()
        self._resync = self.wanted()
        self.recoveries.link_lost()
        self.books.link_lost()
        self.latest_taps.link_lost()
        for name in list(self.recovering):
            self._forget_if_idle(name)

    def channels_interrupted(self, names: list[str]) -> None:
        """These channels were cut off (a Cluster slot moved, a shard failed
        over) and are subscribed again: catch them up like after an outage."""
        for name in names:
            self.confirmed.discard(name)
            self.read_failed(name)  # the read in flight, if any, is redone
            self._resync.add(name)
            self.upstream_confirmed(name, "shard_interrupted")

    def link_restored(self, channels: set[str]) -> None:
        """The link is back and SUBSCRIBE was sent for ``channels``: each
        is caught up when Redis confirms it (:meth:`upstream_confirmed`)."""
        self._resync &= set(channels)

    # --- history reads ------------------------------------------------------

    def start_reads(self, most: int | None = None) -> list[Read]:
        """History reads to start now (at most ``most``): ``Recoveries.start``."""
        reads = self.recoveries.start(self.confirmed, most)
        for own in (self.books, self.latest_taps):  # the server's own: books, tickers
            if own.pending:
                reads += own.start(self.confirmed, None if most is None else most - len(reads))
        return reads

    @property
    def reads_due(self) -> bool:
        """Whether history reads may be due (the shell then starts them)."""
        return bool(self.recovering or self.books.pending or self.latest_taps.pending)

    def read_failed(self, name: str, token: int | None = None) -> None:
        """The read for ``name`` (``token`` from its :class:`Read`) failed:
        its connections wait for the next.  A stale answer is ignored."""
        if token is not None and token in self.latest_taps.reading:  # a ticker's snapshot
            self.latest_taps.read_failed(token)
        elif token is not None and token < 0:  # a book's start read
            self.books.read_failed(name, token)  # (what it held may be released)
        elif self.recoveries.failed(name, token):
            self._forget_if_idle(name)

    def read_done(self, name: str, history: History, token: int | None = None) -> bool:
        """Deliver what each connection of the finished read (``token`` from
        its :class:`Read`) missed, then make it a live listener.  True if
        frames were queued.  A stale answer is ignored."""
        if token is not None and token in self.latest_taps.reading:  # a ticker's snapshot
            self.latest_taps.read_done(history, token)  # (sent at the next tick)
            return False
        if token is not None and token < 0:  # a book's start read
            kept = self.books.read_done(name, history, token)
            if kept is not None and kept.bookless:  # no snapshots: no derived streams
                for conn, derived in self.derived.refuse_bookless(name):
                    self.unsubscribe(conn, [derived])
            return bool(self.batch.pending)  # (the frames it held back, released)
        recovery = self.recoveries.in_flight(name, token)
        if recovery is None:
            return False
        if name in self.books.streams:  # a book waiting for its snapshot starts here
            self.books.start_from(name, history, recovery.buffer)
        listeners = self.streams.setdefault(name, {}) if recovery.reading else {}
        queued = self.recoveries.serve(name, recovery, history, listeners)
        self.compressing.changed(name)
        self._forget_if_idle(name)  # else the next read serves those waiting
        return queued or bool(self.batch.pending)  # (frames a book released)

    # --- delivery -----------------------------------------------------------

    def on_message(self, channel: bytes, payload: bytes) -> bool:
        """A message from Redis; True if frames were queued (the shell then
        schedules a flush)."""
        counters = self.counters
        counters.messages_in += 1
        name = channel.decode()
        listeners = self.streams.get(name)
        recovery = self.recovering.get(name) if self.recovering else None
        tap = self.taps.get(name) if self.taps else None
        if not listeners and recovery is None and tap is None:
            counters.dropped_no_listener += 1
            return False
        if payload[:1] == b"@":
            seq, frame = split_position(payload)
            if seq is None:
                return self._dropped(channel, payload, payloads.MALFORMED)
            problem = payloads.frame_problem(channel, seq, frame)
            if problem is not None:
                return self._dropped(channel, payload, problem)
            payload = frame
        elif self.wrap:
            if not payloads.is_json_object(payload):
                return self._dropped(channel, payload, payloads.MALFORMED)
            seq = None
            payload = payloads.wrap_data(channel, payload)
        else:
            problem = payloads.envelope_problem(name, payload)
            if problem is not None:
                return self._dropped(channel, payload, problem)
            seq = None
        # None: its book holds it back while it starts (released later).
        delivered = payload if tap is None else tap(seq, payload)
        if recovery is not None and (recovery.in_flight or len(recovery.buffer) < MAX_WAITING):
            # (a plain stream's are in no history)
            recovery.buffer.append((seq, payload if delivered is None else delivered))
        if not listeners or delivered is None:
            return False
        return self._deliver(name, seq, delivered, listeners)

    def _deliver(
        self, name: str, seq: int | None, payload: bytes, listeners: dict[Connection, None]
    ) -> bool:
        """Queue a live frame for ``listeners`` (the stream's); True."""
        if seq is not None:
            self.last_seq[name] = seq
            live = self._live_seq.get(name)
            self._live_seq[name] = seq
            if live is not None and seq <= live:
                self._positions_restarted(name, listeners)
            elif self._holding:
                holding = self._holding.get(name)
                if holding is not None:
                    listeners = self._not_holding(name, holding, listeners, seq)
        if self._deflating:  # some connection compresses: the listeners by kind
            return self.compressing.deliver(name, listeners, payload)
        self._enqueue(listeners, text_frame(payload))
        return True

    def _deliver_held(self, name: str, frames: Held) -> None:
        """Frames a book held back while it started, for the stream's live
        listeners now (in order, before any later frame)."""
        for seq, frame in frames:
            listeners = self.streams.get(name)
            if listeners:
                self._deliver(name, seq, frame, listeners)

    def _positions_restarted(self, name: str, listeners: dict[Connection, None]) -> None:
        """A position at or below one already delivered: the stream's
        history was lost (a failover that lost writes) and positions are
        reused for other data.  Listeners get the gap notice first, so that
        they accept the new positions."""
        self.positions.drop_holdings(name)
        self.compressing.notice(name, listeners, "lost_writes")

    def _dropped(self, channel: bytes, payload: bytes, problem: str) -> bool:
        """Count and report a payload ``problem`` rules out (a payloads cause)."""
        if problem == payloads.WRONG_STREAM:
            self.counters.dropped_wrong_stream += 1
        else:
            self.counters.dropped_malformed += 1
        if self.on_malformed is not None:
            self.on_malformed(channel, payload, problem)
        return False
