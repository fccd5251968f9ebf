"""The fan-out core: subscriptions, delivery batches, resubscribe and
recovery bookkeeping, without any I/O.

No sockets, no ``await``: a shell (:mod:`marketstream.channels`) feeds it
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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, Protocol

from marketstream import protocol
from marketstream.counters import Counters

__all__ = ["Core", "Want", "Read", "History", "split_position"]

class Connection(Hashable, Protocol):
    """What the core delivers to (the WebSocket handler)."""

    def write_frames(self, data: bytes) -> None: ...


Conn = Connection


def split_position(payload: bytes) -> tuple[int | None, bytes]:
    """(position, frame) of a payload published by the recovery script, or
    (None, payload) for a plain one; no JSON parsing.

    >>> split_position(b'@42 {"stream":"t.A_B","data":{},"seq":42}')
    (42, b'{"stream":"t.A_B","data":{},"seq":42}')
    >>> split_position(b'{"stream":"t.A_B","data":{}}')
    (None, b'{"stream":"t.A_B","data":{}}')
    """
    if payload[:1] != b"@":
        return None, payload
    space = payload.find(b" ", 1, 24)
    digits = payload[1:space]
    if space < 0 or not digits.isdigit():
        return None, payload
    return int(digits), payload[space + 1:]


class Want(NamedTuple):
    """What a connection asked for when subscribing a stream."""

    since: int | None = None     # resume after this position
    snapshot: bool = False       # start from the stream's snapshot
    repair: bool = False         # the server's own catch-up after a link outage


class Read(NamedTuple):
    """A history read the shell must do for one stream: everything after
    ``after`` (None: from the snapshot on, or nothing), and the snapshot if
    ``snapshot``."""

    stream: str
    after: int | None
    snapshot: bool
    token: int = 0               # pass it back to read_done / read_failed


class History(NamedTuple):
    """What a history read found: the stream's latest position (None for a
    stream without positions), its snapshot as (position, frame), and the
    entries after the asked position, oldest first, as (position, frame)."""

    latest: int | None
    snapshot: tuple[int, bytes] | None
    entries: list[tuple[int, bytes]]


@dataclass
class _Recovery:
    waiting: dict[Conn, Want] = field(default_factory=dict)   # read not started
    reading: dict[Conn, Want] = field(default_factory=dict)   # read in flight
    buffer: list[tuple[int | None, bytes]] = field(default_factory=list)  # since the read began
    in_flight: bool = False
    token: int = 0                                 # which read is in flight


class Core:
    """Registry and fan-out of one process (see the module docstring)."""

    def __init__(self, counters: Counters, payload_format: str = "envelope",
                 max_replay: int = 1000,
                 on_malformed: Callable[[bytes, bytes, str], None] | None = None) -> None:
        self.counters = counters
        self.on_malformed = on_malformed
        self.wrap = payload_format == "data"
        self.max_replay = max_replay
        self.streams: dict[str, dict[Conn, None]] = {}      # live listeners per stream
        self.connections: dict[Conn, dict[str, None]] = {}  # streams per connection
        self.pending: dict[Conn, list[bytes]] = {}          # frames of the current batch
        self.batch_messages = 0
        self.last_seq: dict[str, int] = {}    # last position delivered live, per stream
        self.recovering: dict[str, _Recovery] = {}
        self.confirmed: set[str] = set()      # channels Redis confirmed on the live link
        self._resync: set[str] = set()        # channels to catch up once resubscribed
        # Connections just caught up from the history, per stream: the
        # position each holds.  A live message at or below it was already
        # delivered from the history (the read and the pub/sub link are two
        # Redis connections, so it may still be on its way): skip it for them.
        self._holding: dict[str, dict[Conn, int]] = {}
        self._live_seq: dict[str, int] = {}   # last position seen on the link, per stream
        self._reads = 0
        self.wanted_changed = False           # the shell syncs upstream when set

    # --- registry ---------------------------------------------------------

    def register(self, conn: Conn) -> None:
        """Track a new connection (before it subscribes to anything)."""
        self.connections.setdefault(conn, {})

    def wanted(self) -> set[str]:
        """The channels the Redis link must be subscribed to."""
        wanted = set(self.streams)
        wanted.update(self.recovering)
        return wanted

    def subscribe(self, conn: Conn, names: list[str],
                  wants: dict[str, Want] | None = None) -> list[str]:
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
                    if name not in self.recovering:
                        self.wanted_changed = True
                    self.streams[name] = {conn: None}
                else:
                    listeners[conn] = None
            added.append(name)
        return added

    def unsubscribe(self, conn: Conn, names: list[str]) -> list[str]:
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

    def remove(self, conn: Conn) -> None:
        """Forget a departed connection entirely."""
        mine = self.connections.pop(conn, None)
        self.pending.pop(conn, None)
        if mine:
            for name in mine:
                self._drop_listener(name, conn)

    def subscriptions(self, conn: Conn) -> list[str]:
        return list(self.connections.get(conn, ()))

    def _drop_listener(self, name: str, conn: Conn) -> None:
        listeners = self.streams.get(name)
        if listeners is not None:
            listeners.pop(conn, None)
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
            recovery.waiting.pop(conn, None)
            recovery.reading.pop(conn, None)
            self._forget_if_idle(name)

    def _unwanted(self, name: str) -> None:
        """Nobody listens to ``name`` any more."""
        self.wanted_changed = True
        self.last_seq.pop(name, None)
        self._live_seq.pop(name, None)

    def _forget_if_idle(self, name: str) -> None:
        """Drop a recovery nobody waits for any more."""
        recovery = self.recovering.get(name)
        if recovery is None or recovery.waiting or recovery.reading or recovery.in_flight:
            return
        del self.recovering[name]
        if name not in self.streams:
            self._unwanted(name)

    def _hold(self, conn: Conn, name: str, want: Want) -> None:
        recovery = self.recovering.get(name)
        if recovery is None:
            if name not in self.streams:
                self.wanted_changed = True
            recovery = self.recovering[name] = _Recovery()
        recovery.waiting[conn] = want

    # --- the Redis link -----------------------------------------------------

    def upstream_confirmed(self, name: str) -> None:
        """Redis confirmed the subscription of ``name`` on the live link."""
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
            self._enqueue(listeners, protocol.text_frame(protocol.gap_notice(name)))
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
            recovery.waiting.update(recovery.reading)
            recovery.reading.clear()
            recovery.buffer.clear()
            recovery.in_flight = False
        for name in list(self.recovering):
            self._forget_if_idle(name)

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
            self.upstream_confirmed(name)

    def link_restored(self, channels: set[str]) -> None:
        """The link is back and SUBSCRIBE was sent for ``channels``: each
        is caught up when Redis confirms it (:meth:`upstream_confirmed`)."""
        self._resync &= set(channels)

    # --- history reads ------------------------------------------------------

    def start_reads(self) -> list[Read]:
        """History reads to start now: one per stream with connections
        waiting whose channel Redis has confirmed."""
        reads = []
        for name, recovery in self.recovering.items():
            if recovery.in_flight or not recovery.waiting or name not in self.confirmed:
                continue
            recovery.in_flight = True
            self._reads += 1
            recovery.token = self._reads
            recovery.buffer = []
            recovery.reading, recovery.waiting = recovery.waiting, {}
            sinces = [w.since for w in recovery.reading.values() if w.since is not None]
            snapshot = any(w.snapshot for w in recovery.reading.values())
            # A resume the history cannot cover falls back to the snapshot.
            reads.append(Read(name, min(sinces) if sinces else None, snapshot or bool(sinces),
                              recovery.token))
        return reads

    def read_failed(self, name: str, token: int | None = None) -> None:
        """The read for ``name`` (``token`` from its :class:`Read`) failed:
        its connections wait for the next.  A stale answer is ignored."""
        recovery = self.recovering.get(name)
        if recovery is not None and recovery.in_flight and token in (None, recovery.token):
            recovery.waiting.update(recovery.reading)
            recovery.reading.clear()
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
        # Frame what was read once, and build each catch-up once per kind of
        # request: in a reconnect storm a thousand clients ask for the same.
        frame = protocol.text_frame
        framed = self._framed(name, history)
        buffer = [(seq, frame(data)) for seq, data in recovery.buffer]
        gap = frame(protocol.gap_notice(name))
        counters = self.counters
        built: dict[Want, tuple[bytes, int, int, tuple[int, int, int]]] = {}
        for conn, want in recovery.reading.items():
            done = built.get(want)
            if done is None:
                before = (counters.replayed, counters.snapshots_sent, counters.gap_notices)
                frames, position = self._catch_up(name, want, framed, buffer, gap)
                counted = (counters.replayed - before[0], counters.snapshots_sent - before[1],
                           counters.gap_notices - before[2])
                done = built[want] = (b"".join(frames), len(frames), position, counted)
            else:
                counters.replayed += done[3][0]
                counters.snapshots_sent += done[3][1]
                counters.gap_notices += done[3][2]
            data, count, position, _ = done
            if data:
                self._queue(conn, [data], count)
                queued = True
            if listeners is None:
                listeners = self.streams[name] = {}
            listeners[conn] = None
            if position:
                self._holding.setdefault(name, {})[conn] = position
                held = max(held, position)
        if held and recovery.reading:
            # Where the live stream is for the next outage's repair.
            self.last_seq[name] = held
        recovery.reading = {}
        recovery.buffer = []
        self._forget_if_idle(name)  # else the next read serves those waiting
        return queued

    def _framed(self, name: str, history: History) -> History:
        """``history`` with WebSocket frames; a stored frame that is not the
        recovery script's for ``name`` is dropped and counted like a live
        one (an entry keeps its position, with no frame)."""
        channel = name.encode()
        frame = protocol.text_frame
        latest, snapshot, entries = history
        checked: list[tuple[int, bytes]] = []
        for seq, data in entries:
            problem = protocol.frame_problem(channel, seq, data)
            if problem is None:
                checked.append((seq, frame(data)))
            else:
                self._dropped(channel, data, problem)
                checked.append((seq, b""))
        framed_snapshot = None
        if snapshot is not None:
            problem = protocol.frame_problem(channel, snapshot[0], snapshot[1])
            if problem is None:
                framed_snapshot = (snapshot[0], frame(snapshot[1]))
            else:
                self._dropped(channel, snapshot[1], problem)
        return History(latest, framed_snapshot, checked)

    def _catch_up(self, name: str, want: Want, history: History,
                  buffer: list[tuple[int | None, bytes]],
                  gap: bytes) -> tuple[list[bytes], int]:
        """The frames one connection gets before joining the live stream,
        and the position it then holds (0: none).  ``history`` and
        ``buffer`` hold WebSocket frames; ``gap`` is the gap notice's."""
        counters = self.counters
        latest, snapshot, entries = history
        out: list[bytes] = []
        last = 0  # the position the connection holds after ``out``
        if latest is None:
            # No position in Redis.  A stream this process has seen
            # positions on lost its history (a Redis restart, expired keys):
            # what was missed is gone.  Otherwise it is a plain stream, and a
            # resume or a snapshot asks for nothing that exists.
            if want.since is not None and name in self.last_seq:
                counters.gap_notices += 1
                out.append(gap)
        elif want.since is not None and (
                self._covers(entries, want.since, latest) if want.since < latest
                # A client ahead of the latest position missed nothing; the
                # server itself ahead of it means positions went back (a
                # failover lost writes): what it holds is not the history.
                else want.since == latest or not want.repair):
            last = min(want.since, latest)
            out = [frame for seq, frame in entries if seq > last and frame]
            if entries and entries[-1][0] > last:
                last = entries[-1][0]
            counters.replayed += len(out)
        else:
            if want.since is not None:  # the history does not reach back far enough
                counters.gap_notices += 1
                out.append(gap)
            usable = snapshot is not None and (
                snapshot[0] >= latest or self._covers(entries, snapshot[0], latest))
            if snapshot is not None and usable:
                last = snapshot[0]
                out.append(snapshot[1])
                counters.snapshots_sent += 1
                replay = [frame for seq, frame in entries if seq > last and frame]
            elif want.since is not None and want.since > latest:
                # Positions went back: the history after them is not what
                # the clients missed; the gap notice says so, live follows.
                replay = []
                last = latest
            elif want.since is not None:
                replay = [frame for _, frame in entries[-self.max_replay:] if frame] \
                    if self.max_replay else []
            else:
                replay = []
                last = latest  # a plain "from now on" subscribe
            out.extend(replay)
            counters.replayed += len(replay)
            if replay or (usable and entries):
                last = max(last, entries[-1][0])
        for seq, frame in buffer:
            if seq is None or seq > last:
                out.append(frame)
                if seq is not None:
                    last = seq
        return out, last

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
                return self._dropped(channel, payload, protocol.MALFORMED)
            problem = protocol.frame_problem(channel, seq, frame)
            if problem is not None:
                return self._dropped(channel, payload, problem)
            payload = frame
            if listeners:
                self.last_seq[name] = seq
        elif self.wrap:
            if not protocol.is_json_object(payload):
                return self._dropped(channel, payload, protocol.MALFORMED)
            seq = None
            payload = protocol.wrap_data(channel, payload)
        else:
            problem = protocol.envelope_problem(name, payload)
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
        self._enqueue(listeners, protocol.text_frame(payload))
        return True

    def _positions_restarted(self, name: str, listeners: dict[Conn, None]) -> None:
        """A position at or below one already delivered: the stream's
        history was lost (a failover that lost writes) and positions are
        reused for other data.  Listeners get the gap notice first, so that
        they accept the new positions."""
        self._holding.pop(name, None)
        self.counters.gap_notices += len(listeners)
        self._enqueue(listeners, protocol.text_frame(protocol.gap_notice(name)))

    def _not_holding(self, name: str, holding: dict[Conn, int],
                     listeners: dict[Conn, None], seq: int) -> dict[Conn, None]:
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
        """Drop a payload that ``problem`` (:data:`protocol.MALFORMED` or
        :data:`protocol.WRONG_STREAM`) rules out; count and report it."""
        if problem == protocol.WRONG_STREAM:
            self.counters.dropped_wrong_stream += 1
        else:
            self.counters.dropped_malformed += 1
        if self.on_malformed is not None:
            self.on_malformed(channel, payload, problem)
        return False

    def _enqueue(self, listeners: dict[Conn, None], frame: bytes) -> None:
        pending = self.pending
        for conn in listeners:
            frames = pending.get(conn)
            if frames is None:
                pending[conn] = [frame]
            else:
                frames.append(frame)
        self.counters.deliveries += len(listeners)
        self.batch_messages += 1

    def _queue(self, conn: Conn, frames: list[bytes], count: int) -> None:
        """Queue ``frames`` (holding ``count`` WebSocket frames) for ``conn``."""
        pending = self.pending.get(conn)
        if pending is None:
            self.pending[conn] = list(frames)
        else:
            pending.extend(frames)
        self.counters.deliveries += count

    def take_batch(self) -> dict[Conn, bytes]:
        """Each connection's frames of this batch, joined into one write."""
        pending, self.pending = self.pending, {}
        counters = self.counters
        counters.batches += 1
        if len(counters.batch_sizes) < 100_000:
            counters.batch_sizes.append(self.batch_messages)
        self.batch_messages = 0
        sent = 0
        batch: dict[Conn, Any] = pending  # the lists become their joined bytes, in place
        for conn, frames in pending.items():
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            sent += len(data)
            batch[conn] = data
        counters.bytes_sent += sent
        return batch
