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
connection's frames into one write.

Recovery (see the README's "Recovery"): a connection that subscribes with
``since`` or ``snapshot`` is held outside the stream's listeners while the
shell reads the stream's history once for everyone waiting
(:meth:`Core.start_reads` / :meth:`Core.read_done`); live messages that
arrive meanwhile are buffered, and each waiting connection gets the history
it missed merged with the buffer by position, each message once, before it
joins the live listeners.  After an outage of the Redis link, every
recoverable stream's listeners are caught up the same way from the last
position this process delivered; plain streams get the gap notice.

A catch-up is bounded by bytes: each connection may be sent at most
``replay_bytes`` of history and snapshots by the catch-ups it has in
progress, shared evenly among its streams, and a read asks for no more
than the largest share of the connections it serves.  What would not fit
is not read: that connection gets the gap notice, then the snapshot (or
the newest messages) if those fit.

Channels: :meth:`Core.wanted` is what the Redis link must hold, and
:meth:`Core.take_changes` what changed since the link last looked (a
subscribe and an unsubscribe of a channel the link never saw cancel out).
With ``linger``, a channel whose last listener left stays subscribed until
the second :meth:`Core.release_lingering` after that (the shell calls it
every half second), so that churn costs Redis nothing; ``max_channels``
caps the channels (:meth:`Core.over_channel_cap`), and lingering ones give
way first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable, Hashable
from itertools import islice
from typing import Any, NamedTuple, Protocol

from marketstream.fanout.compressing import Compressing
from marketstream.fanout.counters import Counters
from marketstream.wire import payloads, replies
from marketstream.wire.deflate import Deflater
from marketstream.wire.frames import text_frame
from marketstream.wire.positions import split_position

__all__ = ["Core", "Want", "Read", "History"]


class Connection(Hashable, Protocol):
    """What the core delivers to (the WebSocket handler)."""

    def write_frames(self, data: bytes) -> None: ...


class Want(NamedTuple):
    """What a connection asked for when subscribing a stream."""

    since: int | None = None  # resume after this position
    snapshot: bool = False  # start from the stream's snapshot
    repair: bool = False  # the server's own catch-up after a link outage


class Read(NamedTuple):
    """A history read the shell must do for one stream: everything after
    ``after`` (None: from the snapshot on, or nothing), and the snapshot if
    ``snapshot``."""

    stream: str
    after: int | None
    snapshot: bool
    token: int = 0  # pass it back to read_done / read_failed
    max_bytes: int = 0  # read about this many bytes of history and snapshot at most


class History(NamedTuple):
    """What a history read found: the stream's latest position (None for a
    stream without positions), its snapshot as (position, frame), and the
    entries after the asked position, oldest first, as (position, frame).
    ``oldest``: the oldest position the history holds, read only when the
    entries do not reach back to the asked position (it tells a history
    that was trimmed from a resume that asked for too much).
    ``snapshot_skipped``: the stream has a snapshot larger than the read's
    ``max_bytes``, which was not read."""

    latest: int | None
    snapshot: tuple[int, bytes] | None
    entries: list[tuple[int, bytes]]
    oldest: int | None = None
    snapshot_skipped: bool = False


@dataclass
class _Recovery:
    waiting: dict[Connection, Want] = field(default_factory=dict)  # read not started
    reading: dict[Connection, Want] = field(default_factory=dict)  # read in flight
    buffer: list[tuple[int | None, bytes]] = field(default_factory=list)  # since the read began
    in_flight: bool = False
    token: int = 0  # which read is in flight
    shares: dict[Connection, int] = field(default_factory=dict)  # bytes each reader may be sent


class _Catchup(NamedTuple):
    """One connection's catch-up: its frames (WebSocket frames, without the
    live ones buffered during the read), the position it then holds, what
    it counts (replayed, snapshots, gap notices) and its bytes."""

    frames: list[bytes]
    position: int
    counts: tuple[int, int, int]
    size: int


#: Bytes of catch-up per connection unless told otherwise (half of the
#: default ``max_buffer_bytes``: live messages still fit behind it).
REPLAY_BYTES = 512 * 1024


class Core:
    """Registry and fan-out of one process (see the module docstring)."""

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
    ) -> None:
        self.counters = counters
        self.on_malformed = on_malformed
        self.wrap = payload_format == "data"
        self.max_replay = max_replay
        self.replay_bytes = replay_bytes
        self.max_channels = max_channels  # 0: no cap
        self.linger = linger
        self.streams: dict[str, dict[Connection, None]] = {}  # live listeners per stream
        self.connections: dict[Connection, dict[str, None]] = {}  # streams per connection
        self.pending: dict[Connection, list[bytes]] = {}  # frames of the current batch
        self.batch_messages = 0
        self.last_seq: dict[str, int] = {}  # last position delivered live, per stream
        self.recovering: dict[str, _Recovery] = {}
        self.confirmed: set[str] = set()  # channels Redis confirmed on the live link
        self._resync: set[str] = set()  # channels to catch up once resubscribed
        # Connections just caught up from the history, per stream: the
        # position each holds.  A live message at or below it was already
        # delivered from the history (the read and the pub/sub link are two
        # Redis connections, so it may still be on its way): skip it for them.
        self._holding: dict[str, dict[Connection, int]] = {}
        self._live_seq: dict[str, int] = {}  # last position seen on the link, per stream
        self._reads = 0
        # Per connection with catch-ups in progress: [bytes it may still be
        # sent, streams waiting for their read, reads in flight].
        self._budgets: dict[Connection, list[int]] = {}
        self._channels: set[str] = set()  # what the link must hold (see wanted())
        self._changes: dict[str, bool] = {}  # channel -> wanted, since the link last took them
        self.lingering: dict[str, int] = {}  # unwanted channels kept a moment -> their sweep
        self._sweep = 0
        self.wanted_changed = False  # the shell syncs upstream when set
        # Connections that negotiated permessage-deflate, kept apart
        # (compressing.py); None: compression off.
        self.compressing = Compressing(deflater, counters) if deflater is not None else None

    # --- registry ---------------------------------------------------------

    def register(self, conn: Connection, compressing: bool = False) -> None:
        """Track a new connection (before it subscribes to anything);
        ``compressing``: it negotiated permessage-deflate."""
        self.connections.setdefault(conn, {})
        if compressing and self.compressing is not None:
            self.compressing.add(conn)

    def wanted(self) -> set[str]:
        """The channels the Redis link must be subscribed to: streams with
        listeners, streams being recovered, and lingering ones."""
        return set(self._channels)

    def is_wanted(self, name: str) -> bool:
        return name in self._channels

    def take_changes(self) -> dict[str, bool]:
        """The channels wanted (True) or unwanted (False) since the last call."""
        changes, self._changes = self._changes, {}
        return changes

    def over_channel_cap(self, names: list[str]) -> list[str]:
        """The streams of ``names`` (distinct) that would need a channel
        beyond ``max_channels``; lingering channels are released to make
        room first, oldest first."""
        if not self.max_channels:
            return []
        new = [name for name in names if name not in self._channels]
        over = len(self._channels) + len(new) - self.max_channels
        if over <= 0:
            return []
        for name in list(islice(self.lingering, over)):
            self._release(name)
        return new[max(0, self.max_channels - len(self._channels)) :]

    def release_lingering(self) -> None:
        """Release the channels that have lingered since before the
        previous call (the shell calls this periodically)."""
        sweep = self._sweep
        self._sweep += 1
        for name, since in list(self.lingering.items()):  # oldest first
            if since >= sweep:
                break
            self._release(name)

    def _want(self, name: str) -> None:
        """``name`` has a listener or a recovery."""
        if name in self._channels:
            self.lingering.pop(name, None)
            return
        self._channels.add(name)
        self._changes[name] = True
        self.wanted_changed = True

    def _release(self, name: str) -> None:
        self._channels.discard(name)
        self.lingering.pop(name, None)
        self._changes[name] = False
        self.wanted_changed = True

    def subscribe(
        self, conn: Connection, names: list[str], wants: dict[str, Want] | None = None
    ) -> list[str]:
        """Add ``conn`` to each stream; returns the streams newly added.
        A stream with a :class:`Want` in ``wants`` is recovered first."""
        mine = self.connections.setdefault(conn, {})
        added = []
        for name in names:
            if name in mine:
                continue
            mine[name] = None
            want = wants.get(name) if wants else None
            if want is not None and (want.since is not None or want.snapshot):
                self._hold(conn, name, want)
            else:
                listeners = self.streams.get(name)
                if listeners is None:
                    self._want(name)
                    self.streams[name] = {conn: None}
                else:
                    listeners[conn] = None
                self._listeners_changed(name)
            added.append(name)
        return added

    def unsubscribe(self, conn: Connection, names: list[str]) -> list[str]:
        """Remove ``conn`` from each stream; unknown names are ignored."""
        mine = self.connections.get(conn)
        if not mine:
            return []
        removed = []
        for name in names:
            if mine.pop(name, 0) is None:
                self._drop_listener(name, conn)
                removed.append(name)
        return removed

    def remove(self, conn: Connection) -> None:
        """Forget a departed connection entirely."""
        mine = self.connections.pop(conn, None)
        self.pending.pop(conn, None)
        if mine:
            for name in mine:
                self._drop_listener(name, conn)
        self._budgets.pop(conn, None)
        if self.compressing is not None:
            self.compressing.discard(conn)

    def subscriptions(self, conn: Connection) -> list[str]:
        return list(self.connections.get(conn, ()))

    def _drop_listener(self, name: str, conn: Connection) -> None:
        listeners = self.streams.get(name)
        if listeners is not None:
            listeners.pop(conn, None)
            self._listeners_changed(name)
            holding = self._holding.get(name)
            if holding is not None:
                holding.pop(conn, None)
            if not listeners:
                del self.streams[name]
                self._holding.pop(name, None)
                if name not in self.recovering:
                    self._unwanted(name)
        recovery = self.recovering.get(name)
        if recovery is not None:
            if recovery.waiting.pop(conn, None) is not None:
                self._budget_moved(conn, -1, 0)
            if recovery.reading.pop(conn, None) is not None:
                recovery.shares.pop(conn, None)
                self._budget_moved(conn, 0, -1)
            self._forget_if_idle(name)

    def _unwanted(self, name: str) -> None:
        """Nobody listens to ``name`` any more: release its channel (at
        once if the link has not taken it yet, else after lingering)."""
        self.last_seq.pop(name, None)
        self._live_seq.pop(name, None)
        if self.linger and not self._changes.get(name):
            self.lingering[name] = self._sweep
        else:
            self._release(name)

    def _forget_if_idle(self, name: str) -> None:
        """Drop a recovery nobody waits for any more."""
        recovery = self.recovering.get(name)
        if recovery is None or recovery.waiting or recovery.reading or recovery.in_flight:
            return
        del self.recovering[name]
        if name not in self.streams:
            self._unwanted(name)

    def _hold(self, conn: Connection, name: str, want: Want) -> None:
        recovery = self.recovering.get(name)
        if recovery is None:
            self._want(name)
            recovery = self.recovering[name] = _Recovery()
        recovery.waiting[conn] = want
        budget = self._budgets.get(conn)
        if budget is None:
            self._budgets[conn] = [self.replay_bytes, 1, 0]
        else:
            budget[1] += 1

    def _budget_moved(
        self, conn: Connection, waiting: int, reading: int, bytes_back: int = 0
    ) -> None:
        """``conn`` has ``waiting`` more streams waiting for their read and
        ``reading`` more reads in flight, and ``bytes_back`` of its budget
        back; its budget is forgotten once it has neither."""
        budget = self._budgets.get(conn)
        if budget is None:
            return
        budget[0] += bytes_back
        budget[1] += waiting
        budget[2] += reading
        if budget[1] <= 0 and budget[2] <= 0:
            del self._budgets[conn]

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
            self.counters.gap_notices += len(listeners)
            self._deliver(name, listeners, replies.gap_notice(name, reason=reason))
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
        for recovery in self.recovering.values():
            self._back_to_waiting(recovery)
            recovery.buffer.clear()
            recovery.in_flight = False
        for name in list(self.recovering):
            self._forget_if_idle(name)

    def _back_to_waiting(self, recovery: _Recovery) -> None:
        """The read in flight will not be used: its connections wait for
        the next, with their shares back."""
        for conn in recovery.reading:
            self._budget_moved(conn, 1, -1, recovery.shares.get(conn, 0))
        recovery.waiting.update(recovery.reading)
        recovery.reading.clear()
        recovery.shares.clear()

    def channels_interrupted(self, names: list[str]) -> None:
        """These channels were cut off (a Cluster slot moved, a shard failed
        over) and are subscribed again: catch them up like after an outage."""
        for name in names:
            self.confirmed.discard(name)
            recovery = self.recovering.get(name)
            if recovery is not None and recovery.in_flight:
                self.read_failed(name)
                recovery.buffer.clear()
            self._resync.add(name)
            self.upstream_confirmed(name, "shard_interrupted")

    def link_restored(self, channels: set[str]) -> None:
        """The link is back and SUBSCRIBE was sent for ``channels``: each
        is caught up when Redis confirms it (:meth:`upstream_confirmed`)."""
        self._resync &= set(channels)

    # --- history reads ------------------------------------------------------

    def start_reads(self, most: int | None = None) -> list[Read]:
        """History reads to start now (at most ``most``): one per stream
        with connections waiting whose channel Redis has confirmed.  Each
        connection of a read gets its share of its budget (what is left
        of it, over its streams still waiting), and the read asks for the
        largest share."""
        reads: list[Read] = []
        for name, recovery in self.recovering.items():
            if most is not None and len(reads) >= most:
                break
            if recovery.in_flight or not recovery.waiting or name not in self.confirmed:
                continue
            recovery.in_flight = True
            self._reads += 1
            recovery.token = self._reads
            recovery.buffer = []
            recovery.reading, recovery.waiting = recovery.waiting, {}
            shares = recovery.shares
            for conn in recovery.reading:
                budget = self._budgets[conn]
                share = shares[conn] = max(0, budget[0]) // max(1, budget[1])
                budget[0] -= share
                budget[1] -= 1
                budget[2] += 1
            sinces = [w.since for w in recovery.reading.values() if w.since is not None]
            snapshot = any(w.snapshot for w in recovery.reading.values())
            # A resume the history cannot cover falls back to the snapshot.
            reads.append(
                Read(
                    name,
                    min(sinces) if sinces else None,
                    snapshot or bool(sinces),
                    recovery.token,
                    max(shares.values()),
                )
            )
        return reads

    def read_failed(self, name: str, token: int | None = None) -> None:
        """The read for ``name`` (``token`` from its :class:`Read`) failed:
        its connections wait for the next.  A stale answer is ignored."""
        recovery = self.recovering.get(name)
        if recovery is not None and recovery.in_flight and token in (None, recovery.token):
            self._back_to_waiting(recovery)
            recovery.in_flight = False
            self._forget_if_idle(name)

    def read_done(self, name: str, history: History, token: int | None = None) -> bool:
        """Deliver what each connection of the finished read (``token`` from
        its :class:`Read`) missed, then make it a live listener.  True if
        frames were queued.  A stale answer is ignored."""
        recovery = self.recovering.get(name)
        if recovery is None or not recovery.in_flight or token not in (None, recovery.token):
            return False
        recovery.in_flight = False
        queued = False
        listeners = self.streams.get(name)
        held = self.last_seq.get(name, 0)
        caught_up = 0  # the position the read took its connections to
        # Frame what was read once, and build each catch-up once per kind of
        # request: in a reconnect storm a thousand clients ask for the same.
        framed = self._framed(name, history)
        buffer = [(seq, text_frame(data)) for seq, data in recovery.buffer]
        gaps: dict[str, bytes] = {}

        def gap(reason: str) -> bytes:
            """The gap notice's frame for ``reason`` (built once per read)."""
            notice = gaps.get(reason)
            if notice is None:
                notice = gaps[reason] = text_frame(replies.gap_notice(name, reason=reason))
            return notice

        counters = self.counters
        built: dict[Any, tuple[bytes, int, int, tuple[int, int, int], int]] = {}
        # The same frames compressed, for connections that negotiated it.
        kinds: dict[bool, Any] = {False: (framed, buffer, gap)}
        deflating = self.compressing.connections if self.compressing is not None else ()
        for conn, want in recovery.reading.items():
            # Its share, and what no read of its reserved meanwhile.
            budget = self._budgets.get(conn)
            share = recovery.shares.get(conn, 0)
            allowed = share + max(0, budget[0]) if budget is not None else share
            kind = conn in deflating
            if kind not in kinds:
                kinds[kind] = self._deflated_catch_up(framed, buffer, gap)
            framed_k, buffer_k, gap_k = kinds[kind]
            done = built.get((kind, want))
            if done is None:  # what the connection gets if its share is enough
                done = built[kind, want] = self._joined(name, want, framed_k, buffer_k, gap_k, None)
            if done[4] > allowed:  # it is not: what fits
                key = (kind, want, allowed)
                done = built.get(key) or built.setdefault(
                    key, self._joined(name, want, framed_k, buffer_k, gap_k, allowed)
                )
            data, count, position, counts, size = done
            counters.replayed += counts[0]
            counters.snapshots_sent += counts[1]
            counters.gap_notices += counts[2]
            self._budget_moved(conn, 0, -1, share - size)
            if data:
                self._queue(conn, [data], count)
                queued = True
            if listeners is None:
                listeners = self.streams[name] = {}
            listeners[conn] = None
            self._listeners_changed(name)
            if position:
                self._holding.setdefault(name, {})[conn] = position
                held = max(held, position)
                caught_up = max(caught_up, position)
        if held and recovery.reading:
            # Where the live stream is for the next outage's repair.
            self.last_seq[name] = held
            if 0 < caught_up < self._live_seq.get(name, 0):
                # Positions went back and the catch-up said so: the next
                # live position is not another restart.
                self._live_seq[name] = caught_up
        recovery.reading = {}
        recovery.shares = {}
        recovery.buffer = []
        self._forget_if_idle(name)  # else the next read serves those waiting
        return queued

    def _deflated_catch_up(
        self,
        framed: History,
        buffer: list[tuple[int | None, bytes]],
        gap: Callable[[str], bytes],
    ) -> tuple[History, list[tuple[int | None, bytes]], Callable[[str], bytes]]:
        """A read's frames (``framed``, ``buffer``, ``gap``) as compressing
        connections get them: each frame compressed once for all of them."""
        assert self.compressing is not None
        reframe = self.compressing.reframer()
        latest, snapshot, entries, oldest, skipped = framed
        return (
            History(
                latest,
                None if snapshot is None else (snapshot[0], reframe(snapshot[1])),
                [(seq, reframe(frame)) for seq, frame in entries],
                oldest,
                skipped,
            ),
            [(seq, reframe(frame)) for seq, frame in buffer],
            lambda reason: reframe(gap(reason)),
        )

    def _framed(self, name: str, history: History) -> History:
        """``history`` with WebSocket frames; a stored frame that is not the
        recovery script's for ``name`` is dropped and counted like a live
        one (an entry keeps its position, with no frame)."""
        channel = name.encode()
        frame = text_frame
        latest, snapshot, entries, oldest, skipped = history
        checked: list[tuple[int, bytes]] = []
        for seq, data in entries:
            problem = payloads.frame_problem(channel, seq, data)
            if problem is None:
                checked.append((seq, frame(data)))
            else:
                self._dropped(channel, data, problem)
                checked.append((seq, b""))
        framed_snapshot = None
        if snapshot is not None:
            problem = payloads.frame_problem(channel, snapshot[0], snapshot[1])
            if problem is None:
                framed_snapshot = (snapshot[0], frame(snapshot[1]))
            else:
                self._dropped(channel, snapshot[1], problem)
        return History(latest, framed_snapshot, checked, oldest, skipped)

    def _joined(
        self,
        name: str,
        want: Want,
        history: History,
        buffer: list[tuple[int | None, bytes]],
        gap: Callable[[str], bytes],
        share: int | None,
    ) -> tuple[bytes, int, int, tuple[int, int, int], int]:
        """:meth:`_catch_up` with the live frames of ``buffer`` after it, as
        (bytes, frames, position, counts, bytes of the catch-up alone)."""
        frames, last, counts, size = self._catch_up(name, want, history, gap, share)
        for seq, frame in buffer:
            if seq is None or seq > last:
                frames.append(frame)
                if seq is not None:
                    last = seq
        return b"".join(frames), len(frames), last, counts, size

    def _catch_up(
        self,
        name: str,
        want: Want,
        history: History,
        gap: Callable[[str], bytes],
        share: int | None,
    ) -> _Catchup:
        """What one connection gets before joining the live stream, in at
        most ``share`` bytes (None: no bound).  ``history`` holds
        WebSocket frames; ``gap(reason)`` is the gap notice's frame.

        In order of preference: every message after ``want.since``; else
        the gap notice (if it resumed), the snapshot and every message
        after it; else the gap notice and the newest messages (at most
        ``max_replay``; none for a plain snapshot request)."""
        latest, snapshot, entries, oldest, skipped = history
        fits = (lambda size: True) if share is None else (lambda size: size <= share)
        if latest is None:
            # No position in Redis.  A stream this process has seen
            # positions on lost its history (a Redis restart, expired keys):
            # what was missed is gone.  Otherwise it is a plain stream, and a
            # resume or a snapshot asks for nothing that exists.
            if want.since is not None and name in self.last_seq:
                notice = gap("history_lost")
                return _Catchup([notice], 0, (0, 0, 1), len(notice))
            return _Catchup([], 0, (0, 0, 0), 0)
        covered = False
        if want.since is not None and (
            self._covers(entries, want.since, latest)
            if want.since < latest
            # A position ahead of the latest one is not from this
            # history: positions went back (a failover lost writes), and
            # what the client holds says nothing of what it missed.
            else want.since == latest
        ):
            last = min(want.since, latest)
            out = [frame for seq, frame in entries if seq > last and frame]
            size = sum(map(len, out))
            if fits(size):
                if entries and entries[-1][0] > last:
                    last = entries[-1][0]
                return _Catchup(out, last, (len(out), 0, 0), size)
            covered = True  # the history has it all, but not the room to send it
        head = [] if want.since is None else [gap(self._gap_reason(want, latest, oldest, covered))]
        usable = snapshot is not None and (
            snapshot[0] >= latest or self._covers(entries, snapshot[0], latest)
        )
        if snapshot is not None and usable:
            after = [frame for seq, frame in entries if seq > snapshot[0] and frame]
            out = head + [snapshot[1]] + after
            size = sum(map(len, out))
            if fits(size):
                last = max(snapshot[0], entries[-1][0]) if entries else snapshot[0]
                return _Catchup(out, last, (len(after), 1, len(head)), size)
        if want.since is not None and want.since > latest:
            # Positions went back: the history after them is not what the
            # clients missed; the gap notice says so, live follows.
            return _Catchup(head, latest, (0, 0, 1), len(head[0]))
        if want.since is None:
            # A plain "from now on" subscribe; a snapshot that did not fit
            # (or was too large to read) is announced by the gap notice.
            if skipped or snapshot is not None and usable:
                notice = gap("snapshot_too_large")
                return _Catchup([notice], latest, (0, 0, 1), len(notice))
            return _Catchup([], latest, (0, 0, 0), 0)
        # The newest messages, as many as fit (at most max_replay).
        room = (share if share is not None else -1) - len(head[0])
        newest: list[bytes] = []
        last = 0
        for seq, frame in reversed(entries[-self.max_replay :] if self.max_replay else []):
            if share is not None and len(frame) > room:
                break
            if frame:
                newest.append(frame)
                room -= len(frame)
            last = max(last, seq)
        newest.reverse()
        return _Catchup(
            head + newest, last, (len(newest), 0, 1), len(head[0]) + sum(map(len, newest))
        )

    def _gap_reason(self, want: Want, latest: int, oldest: int | None, covered: bool) -> str:
        """Why the history cannot take ``want.since`` to ``latest``
        (``covered``: what was read holds every message, but too many bytes
        for the connection's share of its send buffer)."""
        since = want.since
        assert since is not None
        if since > latest:
            return "lost_writes" if want.repair else "since_ahead"
        if covered or (oldest is not None and oldest <= since + 1):
            # The history has it all, but it is too much to replay.
            return "max_replay" if latest - since > self.max_replay else "replay_too_large"
        return "history_trimmed"

    @staticmethod
    def _covers(entries: list[tuple[int, bytes]], after: int, latest: int) -> bool:
        """Whether ``entries`` hold every position after ``after`` up to
        ``latest``."""
        if after >= latest:
            return True
        return bool(entries) and entries[0][0] <= after + 1 and entries[-1][0] >= latest

    # --- delivery -----------------------------------------------------------

    def on_message(self, channel: bytes, payload: bytes) -> bool:
        """A message from Redis; True if frames were queued (the shell then
        schedules a flush)."""
        counters = self.counters
        counters.messages_in += 1
        name = channel.decode()
        listeners = self.streams.get(name)
        recovery = self.recovering.get(name) if self.recovering else None
        if not listeners and recovery is None:
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
            if listeners:
                self.last_seq[name] = seq
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
        if recovery is not None and recovery.in_flight:
            recovery.buffer.append((seq, payload))
        if not listeners:
            return False
        if seq is not None:
            live = self._live_seq.get(name)
            self._live_seq[name] = seq
            if live is not None and seq <= live:
                self._positions_restarted(name, listeners)
            elif self._holding:
                holding = self._holding.get(name)
                if holding is not None:
                    listeners = self._not_holding(name, holding, listeners, seq)
        compressing = self.compressing
        if compressing is None or not compressing.connections:
            self._enqueue(listeners, text_frame(payload))
        else:  # some connections compress: the stream's listeners by kind
            self._deliver(name, listeners, payload)
        return True

    def _positions_restarted(self, name: str, listeners: dict[Connection, None]) -> None:
        """A position at or below one already delivered: the stream's
        history was lost (a failover that lost writes) and positions are
        reused for other data.  Listeners get the gap notice first, so that
        they accept the new positions."""
        self._holding.pop(name, None)
        self.counters.gap_notices += len(listeners)
        self._deliver(name, listeners, replies.gap_notice(name, reason="lost_writes"))

    def _not_holding(
        self, name: str, holding: dict[Connection, int], listeners: dict[Connection, None], seq: int
    ) -> dict[Connection, None]:
        """``listeners`` without those that already hold position ``seq``;
        forgets the holdings the live stream has passed."""
        for conn, position in list(holding.items()):
            if position < seq:
                del holding[conn]
        if not holding:
            del self._holding[name]
            return listeners
        return {conn: None for conn in listeners if conn not in holding}

    def _dropped(self, channel: bytes, payload: bytes, problem: str) -> bool:
        """Drop a payload that ``problem`` (:data:`payloads.MALFORMED` or
        :data:`payloads.WRONG_STREAM`) rules out; count and report it."""
        if problem == payloads.WRONG_STREAM:
            self.counters.dropped_wrong_stream += 1
        else:
            self.counters.dropped_malformed += 1
        if self.on_malformed is not None:
            self.on_malformed(channel, payload, problem)
        return False

    def _listeners_changed(self, name: str) -> None:
        """The listeners of ``name`` changed (their split by kind is stale)."""
        if self.compressing is not None:
            self.compressing.changed(name)

    def _deliver(self, name: str, listeners: dict[Connection, None], payload: bytes) -> None:
        """Queue ``payload`` for ``listeners`` of ``name``: its plain frame,
        and to those that negotiated compression the compressed frame,
        built once for all of them."""
        frame = text_frame(payload)
        compressing = self.compressing
        kinds = None
        if compressing is not None and compressing.connections:
            kinds = compressing.kinds(name, listeners, listeners is self.streams.get(name))
        if kinds is None:
            self._enqueue(listeners, frame)
            return
        plain, deflating = kinds
        self._enqueue(plain, frame)
        self._enqueue(deflating, compressing.frame(payload, frame))  # type: ignore[union-attr]
        self.batch_messages -= 1  # one message

    def _enqueue(self, listeners: dict[Connection, None], frame: bytes) -> None:
        pending = self.pending
        for conn in listeners:
            frames = pending.get(conn)
            if frames is None:
                pending[conn] = [frame]
            else:
                frames.append(frame)
        self.counters.deliveries += len(listeners)
        self.batch_messages += 1

    def _queue(self, conn: Connection, frames: list[bytes], count: int) -> None:
        """Queue ``frames`` (holding ``count`` WebSocket frames) for ``conn``."""
        pending = self.pending.get(conn)
        if pending is None:
            self.pending[conn] = list(frames)
        else:
            pending.extend(frames)
        self.counters.deliveries += count

    def take_batch(self) -> dict[Connection, bytes]:
        """Each connection's frames of this batch, joined into one write."""
        pending, self.pending = self.pending, {}
        counters = self.counters
        counters.batches += 1
        if len(counters.batch_sizes) < 100_000:
            counters.batch_sizes.append(self.batch_messages)
        self.batch_messages = 0
        sent = 0
        batch: dict[Connection, Any] = pending  # the lists become their joined bytes, in place
        for conn, frames in pending.items():
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            sent += len(data)
            batch[conn] = data
        counters.bytes_sent += sent
        return batch
