"""The sans-I/O fan-out core (:mod:`marketstream.fanout.core`), driven directly.

No sockets, no Redis, no event loop: connections are plain objects, Redis
messages are fed to :meth:`Core.on_message`, and history reads are answered
by :class:`Feed`, a model of a recoverable publisher's stored stream that
builds the :class:`History` exactly as the shell does (``ChannelManager._read``
over ``history.read_after``).  Every write a connection would get is taken
from :meth:`Core.take_batch`, split back into WebSocket frames and decoded,
so the assertions are about what a client would see.
"""

from __future__ import annotations

import json
from collections import deque

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from marketstream.fanout.core import Core, History, Read, Want
from marketstream.fanout.counters import Counters
from marketstream.testing import read_frames
from marketstream.wire.frames import OP_TEXT, text_frame
from marketstream.wire.positions import split_position
from marketstream.wire.replies import GAP_REASONS

S = "trade.SOL_USDC"
T = "depth.BTC_USDT"


# --- test doubles --------------------------------------------------------------


class Conn:
    """A fake connection: what it was sent, decoded, in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.writes: list[bytes] = []
        self.got: list[dict] = []

    def write_frames(self, data: bytes) -> None:
        self.writes.append(data)
        self.got.extend(json.loads(frame) for frame in split_frames(data))

    def __repr__(self) -> str:
        return f"Conn({self.name})"

    def labels(self, stream: str | None = None) -> list:
        """What arrived, one label per frame: a position, ``"gap"``,
        ``("snap", N)`` or ``("plain", i)``."""
        return [label(m) for m in self.got if stream is None or m["stream"] == stream]

    def reasons(self) -> list[str]:
        """The ``data.reason`` of each gap notice that arrived."""
        return [m["data"]["reason"] for m in self.got if m["data"].get("e") == "gap"]

    def positions(self, stream: str | None = None) -> list[int]:
        """The positions that arrived (the snapshot counts as its own)."""
        out = []
        for item in self.labels(stream):
            if isinstance(item, int):
                out.append(item)
            elif isinstance(item, tuple) and item[0] == "snap":
                out.append(item[1])
        return out


def label(message: dict):
    data = message["data"]
    if data.get("e") == "gap":
        assert "seq" not in message  # a gap notice carries no position
        return "gap"
    if data.get("e") == "snap":
        assert message["seq"] == data["at"]
        return ("snap", message["seq"])
    if "seq" in message:
        assert data["i"] == message["seq"]
        return message["seq"]
    return ("plain", data["i"])


def split_frames(data: bytes) -> list[bytes]:
    """The payloads of the unmasked text frames in ``data`` (nothing else)."""
    frames, rest = read_frames(data)
    assert rest == b"" and all(opcode == OP_TEXT for opcode, _ in frames)
    return [payload for _, payload in frames]


def flush(core: Core) -> dict:
    """Write the batch out as the shell does; returns it."""
    batch = core.take_batch()
    for conn, data in batch.items():
        conn.write_frames(data)
    return batch


class Feed:
    """One stream as a recoverable publisher leaves it in Redis: positions
    from ``base`` up by one, a history capped at ``history`` entries and an
    optional snapshot, stored after every ``snapshot_every``-th position."""

    def __init__(
        self, name: str = S, base: int = 1, history: int = 10_000, snapshot_every: int | None = None
    ) -> None:
        self.name = name
        self.base = base
        self.cap = history
        self.snapshot_every = snapshot_every
        self.latest: int | None = None
        self.log: deque[tuple[int, bytes]] = deque()
        self.snapshot: tuple[int, bytes] | None = None
        self.plain_count = 0

    def frame(self, seq: int) -> bytes:
        return b'{"stream":"%s","data":{"i":%d},"seq":%d}' % (self.name.encode(), seq, seq)

    def publish(self) -> tuple[int, bytes]:
        """Publish the next message: (its position, the published payload)."""
        seq = self.base if self.latest is None else self.latest + 1
        self.latest = seq
        frame = self.frame(seq)
        self.log.append((seq, frame))
        while len(self.log) > self.cap:
            self.log.popleft()
        if self.snapshot_every and seq % self.snapshot_every == 0:
            self.store_snapshot(seq)
        return seq, b"@%d " % seq + frame

    def publish_plain(self) -> bytes:
        """A plain PUBLISH (no position): the envelope itself."""
        self.plain_count += 1
        return b'{"stream":"%s","data":{"i":%d}}' % (self.name.encode(), self.plain_count)

    def store_snapshot(self, seq: int) -> None:
        self.snapshot = (
            seq,
            b'{"stream":"%s","data":{"e":"snap","at":%d},"seq":%d}'
            % (self.name.encode(), seq, seq),
        )

    def trim(self, keep: int) -> None:
        while len(self.log) > keep:
            self.log.popleft()

    def read(self, read: Read, max_replay: int) -> History:
        """The History the shell builds for ``read`` (``ChannelManager._read``
        over ``history.read_recent``): the snapshot unless it is larger than
        ``read.max_bytes``; the newest messages after the floor (``since``,
        or the snapshot's position if lower), at most ``max_replay``, until
        their stored bytes reach ``read.max_bytes``."""
        assert read.stream == self.name
        latest = self.latest
        if latest is None:
            return History(None, None, [])
        snapshot, skipped = None, False
        if read.snapshot and self.snapshot is not None:
            if stored_size(*self.snapshot) > read.max_bytes:
                skipped = True
            else:
                snapshot = self.snapshot
        floor = read.after
        if snapshot is not None:
            floor = snapshot[0] if floor is None else min(floor, snapshot[0])
        entries: list[tuple[int, bytes]] = []
        if floor is not None and max_replay and (read.after is not None or read.snapshot):
            size = 0
            for seq, frame in reversed(self.log):
                if seq > latest:
                    continue
                if seq <= floor or len(entries) >= max_replay or size >= read.max_bytes:
                    break
                entries.append((seq, frame))
                size += stored_size(seq, frame)
            entries.reverse()
        oldest = None
        after = read.after
        if after is not None and after < latest and not (entries and entries[0][0] <= after + 1):
            oldest = self.log[0][0] if self.log else None
        return History(latest, snapshot, entries, oldest, skipped)


def stored_size(seq: int, frame: bytes) -> int:
    """Bytes of a message as the recovery script stores it."""
    return len(b"@%d " % seq) + len(frame)


def finish(core: Core, read: Read, history: History) -> bool:
    """Hand a finished read to the core (one place, should its API change)."""
    return core.read_done(read.stream, history, read.token)


def asked(read: Read) -> tuple:
    """What a read asks for: (stream, after, snapshot)."""
    return (read.stream, read.after, read.snapshot)


def fail(core: Core, read: Read) -> None:
    core.read_failed(read.stream, read.token)


def make_core(**kwargs) -> Core:
    return Core(Counters(), **kwargs)


def live(core: Core, feed: Feed, count: int = 1) -> list[int]:
    """Publish ``count`` messages and hand each to the core at once."""
    seqs = []
    for _ in range(count):
        seq, payload = feed.publish()
        core.on_message(feed.name.encode(), payload)
        seqs.append(seq)
    return seqs


def subscribed(core: Core, conn: Conn, name: str = S, want: Want | None = None) -> None:
    """``conn`` subscribes ``name`` (with ``want``) on a confirmed channel."""
    core.register(conn)
    core.subscribe(conn, [name], {name: want} if want else None)
    core.upstream_confirmed(name)


def one_read(core: Core) -> Read:
    reads = core.start_reads()
    assert len(reads) == 1, reads
    return reads[0]


# --- registry and wanted channels ------------------------------------------------


def test_subscribe_changes_wanted_only_for_a_new_channel():
    core = make_core()
    a, b = Conn("a"), Conn("b")
    core.register(a)
    core.register(b)
    assert core.wanted() == set() and not core.wanted_changed
    assert core.subscribe(a, [S, T]) == [S, T]
    assert core.wanted() == {S, T}
    assert core.wanted_changed
    core.wanted_changed = False
    assert core.subscribe(b, [S]) == [S]  # a second listener: no upstream change
    assert not core.wanted_changed
    assert core.subscribe(a, [S]) == []  # a duplicate is ignored
    assert core.subscriptions(a) == [S, T]
    assert core.subscriptions(Conn("stranger")) == []


def test_unsubscribe_and_remove_change_wanted_when_the_last_listener_goes():
    core = make_core()
    a, b = Conn("a"), Conn("b")
    core.subscribe(a, [S, T])
    core.subscribe(b, [S])
    core.wanted_changed = False
    assert core.unsubscribe(a, [S, "unknown.X_Y"]) == [S]
    assert core.wanted() == {S, T} and not core.wanted_changed
    assert core.unsubscribe(a, [S]) == []  # already gone
    assert core.unsubscribe(Conn("stranger"), [S]) == []
    core.remove(b)
    assert core.wanted() == {T} and core.wanted_changed
    core.wanted_changed = False
    core.remove(a)
    assert core.wanted() == set() and core.wanted_changed
    assert core.connections == {} and core.streams == {}
    core.remove(a)  # twice is harmless


def test_remove_drops_the_frames_queued_for_the_connection():
    core = make_core()
    a, b = Conn("a"), Conn("b")
    core.subscribe(a, [S])
    core.subscribe(b, [S])
    core.on_message(S.encode(), Feed().publish()[1])
    core.remove(a)
    assert list(core.take_batch()) == [b]


def test_a_recovering_stream_is_wanted_until_its_connections_leave():
    core = make_core()
    a = Conn("a")
    core.register(a)
    core.subscribe(a, [S], {S: Want(since=5)})
    assert S in core.wanted() and S not in core.streams
    assert core.wanted_changed
    core.wanted_changed = False
    assert core.unsubscribe(a, [S]) == [S]
    assert core.wanted() == set() and core.wanted_changed
    assert core.recovering == {}


def test_want_without_since_or_snapshot_is_a_plain_subscribe():
    core = make_core()
    a = Conn("a")
    core.subscribe(a, [S], {S: Want()})
    assert a in core.streams[S] and core.recovering == {}


def test_subscribe_with_since_to_a_stream_already_held_is_ignored():
    core = make_core()
    feed = Feed()
    a = Conn("a")
    subscribed(core, a)
    assert core.subscribe(a, [S], {S: Want(since=0)}) == []
    assert core.recovering == {} and core.start_reads() == []
    live(core, feed, 2)
    flush(core)
    assert a.positions() == [1, 2]


# --- delivery ---------------------------------------------------------------------


def test_a_message_is_framed_once_and_the_same_bytes_go_to_every_listener():
    core = make_core()
    conns = [Conn(str(i)) for i in range(5)]
    for conn in conns:
        core.subscribe(conn, [S])
    payload = b'{"stream":"trade.SOL_USDC","data":{"i":1}}'
    assert core.on_message(S.encode(), payload) is True
    batch = core.take_batch()
    assert set(batch) == set(conns)
    first = batch[conns[0]]
    assert first == text_frame(payload)
    assert all(data is first for data in batch.values())
    assert core.counters.deliveries == 5


def test_a_batch_is_one_write_per_connection_with_frames_in_arrival_order():
    core = make_core()
    counters = core.counters
    a, b = Conn("a"), Conn("b")
    core.subscribe(a, [S, T])
    core.subscribe(b, [T])
    s, t = Feed(S), Feed(T)
    payloads = [(S, s.publish()[1]), (T, t.publish()[1]), (S, s.publish()[1]), (T, t.publish()[1])]
    for name, payload in payloads:
        core.on_message(name.encode(), payload)
    batch = flush(core)
    frames = [split_position(p)[1] for _, p in payloads]
    assert batch[a] == b"".join(text_frame(f) for f in frames)
    assert batch[b] == b"".join(text_frame(f) for f in frames[1::2])
    assert len(a.writes) == 1 and len(b.writes) == 1
    assert a.labels() == [1, 1, 2, 2] and b.labels(T) == [1, 2]
    assert counters.messages_in == 4
    assert counters.deliveries == 6
    assert counters.batches == 1 and counters.batch_sizes == [4]
    assert counters.bytes_sent == len(batch[a]) + len(batch[b])
    assert core.take_batch() == {}
    assert counters.batches == 2 and counters.batch_sizes == [4, 0]


def test_a_message_without_listeners_is_dropped_and_counted():
    core = make_core()
    assert core.on_message(S.encode(), b'{"stream":"trade.SOL_USDC","data":{}}') is False
    assert core.counters.dropped_no_listener == 1
    assert core.take_batch() == {}


def test_a_positioned_payload_loses_its_prefix_and_its_position_is_tracked():
    core = make_core()
    a = Conn("a")
    core.subscribe(a, [S])
    frame = b'{"stream":"trade.SOL_USDC","data":{"i":42},"seq":42}'
    core.on_message(S.encode(), b"@42 " + frame)
    assert core.take_batch()[a] == text_frame(frame)
    assert core.last_seq[S] == 42
    core.on_message(S.encode(), b'{"stream":"trade.SOL_USDC","data":{"i":1}}')
    assert core.last_seq[S] == 42  # a plain message has no position


def test_the_data_format_wraps_plain_payloads_only():
    core = make_core(payload_format="data")
    a = Conn("a")
    core.subscribe(a, [S])
    core.on_message(S.encode(), b'{"e":"trade","p":"1.5"}')
    frame = b'{"stream":"trade.SOL_USDC","data":{"i":7},"seq":7}'
    core.on_message(S.encode(), b"@7 " + frame)
    assert split_frames(core.take_batch()[a]) == [
        b'{"stream":"trade.SOL_USDC","data":{"e":"trade","p":"1.5"}}',
        frame,
    ]


def test_the_envelope_format_passes_plain_payloads_through():
    core = make_core()
    a = Conn("a")
    core.subscribe(a, [S])
    payload = b'{"stream":"trade.SOL_USDC","data":{"e":"trade"}}'
    core.on_message(S.encode(), payload)
    assert split_frames(core.take_batch()[a]) == [payload]


@pytest.mark.parametrize("payload_format", ["envelope", "data"])
@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"[1,2]",
        b'{"a":1',
        b"1",
        b'"text"',
        b"@",
        b"@12",
        b"@ {}",
        b"@x1 {}",
        b"@-1 {}",
        b"@" + b"9" * 30 + b" {}",
        b"\xff\xfe",
    ],
)
def test_a_malformed_payload_is_dropped_counted_and_reported(payload, payload_format):
    seen = []
    core = Core(Counters(), payload_format, on_malformed=lambda c, p, why: seen.append((c, p, why)))
    a = Conn("a")
    core.subscribe(a, [S])
    assert core.on_message(S.encode(), payload) is False
    assert core.counters.dropped_malformed == 1
    assert seen == [(S.encode(), payload, "malformed_payload")]
    assert core.take_batch() == {}
    assert S not in core.last_seq


def test_a_malformed_payload_during_a_read_is_not_buffered():
    core = make_core()
    feed = Feed()
    a = Conn("a")
    subscribed(core, a, S, Want(since=0))
    read = one_read(core)
    history = feed.read(read, core.max_replay)  # before anything was published
    core.on_message(S.encode(), b"garbage")
    live(core, feed, 1)
    finish(core, read, history)
    flush(core)
    assert a.labels() == [1]


# --- the Redis link: resubscribe and gap notices ---------------------------------


def test_a_plain_stream_gets_one_gap_notice_per_listener_after_an_outage():
    core = make_core()
    s, t = Feed(S), Feed(T)
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    for conn, name in ((a, S), (b, S), (c, T)):
        subscribed(core, conn, name)
    core.on_message(S.encode(), s.publish_plain())
    core.on_message(T.encode(), t.publish_plain())
    flush(core)
    core.link_lost()
    assert core.confirmed == set()
    s.publish_plain()  # lost in the outage
    core.link_restored({S, T})
    core.upstream_confirmed(S)
    core.upstream_confirmed(T)
    core.upstream_confirmed(S)  # a repeated confirmation: no second notice
    core.on_message(S.encode(), s.publish_plain())
    flush(core)
    assert a.labels() == b.labels() == [("plain", 1), "gap", ("plain", 3)]
    assert c.labels() == [("plain", 1), "gap"]
    assert core.counters.gap_notices == 3
    notice = a.got[1]
    assert notice["stream"] == S and notice["data"]["s"] == "SOL_USDC"
    assert notice["data"]["reason"] == "link_outage"
    assert notice["data"]["msg"] == GAP_REASONS["link_outage"]
    assert core.start_reads() == []  # nothing to read for plain streams


def test_a_channel_subscribed_during_the_outage_gets_no_gap_notice():
    core = make_core()
    a = Conn("a")
    subscribed(core, a, S)
    core.link_lost()
    b = Conn("b")
    core.register(b)
    core.subscribe(b, [T])
    core.link_restored({S, T})
    core.upstream_confirmed(T)
    flush(core)
    assert b.got == []


def test_a_recoverable_stream_catches_up_after_an_outage_without_a_gap_notice():
    core = make_core()
    feed = Feed()
    a, b = Conn("a"), Conn("b")
    subscribed(core, a)
    subscribed(core, b)
    live(core, feed, 5)
    flush(core)
    core.link_lost()
    for _ in range(3):
        feed.publish()  # published while the link was down
    core.link_restored({S})
    assert core.start_reads() == []  # not confirmed yet
    core.upstream_confirmed(S)
    assert S not in core.streams  # the listeners wait for the history
    assert S in core.wanted()
    read = one_read(core)
    assert asked(read) == (S, 5, True)
    assert finish(core, read, feed.read(read, core.max_replay)) is True
    live(core, feed, 1)
    flush(core)
    assert a.positions() == b.positions() == list(range(1, 10))
    assert "gap" not in a.labels()
    assert core.counters.gap_notices == 0
    assert core.counters.replayed == 6
    assert core.recovering == {}


def test_an_outage_the_history_cannot_cover_gives_the_gap_notice_then_the_snapshot():
    core = make_core()
    feed = Feed(history=3, snapshot_every=4)
    a = Conn("a")
    subscribed(core, a)
    live(core, feed, 2)
    flush(core)
    core.link_lost()
    for _ in range(8):  # 3..10; history holds 8..10, snapshot at 8
        feed.publish()
    core.link_restored({S})
    core.upstream_confirmed(S)
    read = one_read(core)
    finish(core, read, feed.read(read, core.max_replay))
    flush(core)
    assert a.labels() == [1, 2, "gap", ("snap", 8), 9, 10]
    assert a.reasons() == ["history_trimmed"]


def test_an_interrupted_plain_channel_gets_one_gap_notice_and_others_are_untouched():
    core = make_core()
    s, t = Feed(S), Feed(T)
    a, b = Conn("a"), Conn("b")
    subscribed(core, a, S)
    subscribed(core, b, T)
    core.on_message(S.encode(), s.publish_plain())
    core.channels_interrupted([S])  # its slot moved to another shard
    core.on_message(S.encode(), s.publish_plain())
    core.on_message(T.encode(), t.publish_plain())
    flush(core)
    assert a.labels() == [("plain", 1), "gap", ("plain", 2)]
    assert a.reasons() == ["shard_interrupted"]
    assert b.labels() == [("plain", 1)]
    assert core.counters.gap_notices == 1
    assert S in core.confirmed and T in core.confirmed


def test_an_interrupted_recoverable_channel_is_caught_up_from_the_history():
    core = make_core()
    feed = Feed()
    a = Conn("a")
    subscribed(core, a)
    live(core, feed, 3)
    core.channels_interrupted([S])
    for _ in range(2):  # 4, 5 published during the move
        feed.publish()
    read = one_read(core)
    assert asked(read) == (S, 3, True)
    finish(core, read, feed.read(read, core.max_replay))
    live(core, feed, 1)
    flush(core)
    assert a.labels() == [1, 2, 3, 4, 5, 6]
    assert core.counters.gap_notices == 0


def test_an_interruption_during_a_read_redoes_the_read():
    core = make_core()
    feed = Feed()
    for _ in range(4):
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(since=1))
    one_read(core)
    live(core, feed, 1)  # 5, buffered
    core.channels_interrupted([S])
    feed.publish()  # 6, lost with the old shard
    again = one_read(core)
    assert asked(again) == (S, 1, True)
    live(core, feed, 1)  # 7 on the new shard
    finish(core, again, feed.read(again, core.max_replay))
    flush(core)
    assert a.labels() == [2, 3, 4, 5, 6, 7]


def test_an_interruption_during_a_read_ignores_the_old_reads_answer():
    core = make_core()
    feed = Feed()
    for _ in range(4):
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(since=1))
    first = one_read(core)
    old = feed.read(first, core.max_replay)  # latest 4
    core.channels_interrupted([S])
    feed.publish()  # 5, lost with the old shard
    second = one_read(core)
    live(core, feed, 1)  # 6 during the second read
    fresh = feed.read(second, core.max_replay)
    finish(core, first, old)  # the old read's answer comes first
    finish(core, second, fresh)
    flush(core)
    assert a.labels() == [2, 3, 4, 5, 6]


# --- the recovery merge ----------------------------------------------------------------


def test_resume_covered_by_the_history_gets_exactly_the_missed_messages():
    core = make_core()
    feed = Feed()
    other = Conn("other")
    subscribed(core, other)
    live(core, feed, 10)
    flush(core)
    a = Conn("a")
    core.register(a)
    assert core.subscribe(a, [S], {S: Want(since=6)}) == [S]
    assert a not in core.streams[S]
    read = one_read(core)
    assert asked(read) == (S, 6, True)
    assert core.start_reads() == []  # one read in flight per stream
    history = feed.read(read, core.max_replay)
    assert finish(core, read, history) is True
    flush(core)
    assert a.positions() == [7, 8, 9, 10]
    live(core, feed, 2)
    flush(core)
    assert a.positions() == [7, 8, 9, 10, 11, 12]
    assert other.positions() == list(range(1, 13))
    assert core.counters.replayed == 4
    assert core.counters.gap_notices == 0 and core.counters.snapshots_sent == 0
    assert a in core.streams[S] and core.recovering == {}


def test_resume_at_the_latest_position_gets_live_messages_only():
    core = make_core()
    feed = Feed()
    for _ in range(10):
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(since=10))
    read = one_read(core)
    live(core, feed, 1)  # 11 arrives during the read
    assert finish(core, read, History(10, None, [])) is True
    live(core, feed, 1)
    flush(core)
    assert a.labels() == [11, 12]


def test_resume_ahead_of_the_latest_position_gets_the_gap_notice_then_live_messages():
    """A position ahead of the latest is not from this history (a failover
    lost the writes the client saw): without the notice, a client would
    drop the next positions as ones it already has."""
    core = make_core()
    feed = Feed()
    for _ in range(10):
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(since=500))
    read = one_read(core)
    assert finish(core, read, feed.read(read, core.max_replay)) is True
    live(core, feed, 2)
    flush(core)
    assert a.labels() == ["gap", 11, 12]
    assert a.reasons() == ["since_ahead"]
    assert core.counters.gap_notices == 1


def test_resume_ahead_of_the_latest_position_gets_the_snapshot_after_the_gap_notice():
    core = make_core()
    feed = Feed(snapshot_every=5)
    for _ in range(7):
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(since=500))
    read = one_read(core)
    finish(core, read, feed.read(read, core.max_replay))
    live(core, feed, 1)
    flush(core)
    assert a.labels() == ["gap", ("snap", 5), 6, 7, 8]
    assert a.reasons() == ["since_ahead"]


def test_resume_ahead_of_the_latest_position_keeps_the_messages_buffered_during_the_read():
    core = make_core()
    feed = Feed()
    for _ in range(10):
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(since=500))
    read = one_read(core)
    history = feed.read(read, core.max_replay)  # latest 10
    live(core, feed, 2)  # 11, 12 arrive during the read
    finish(core, read, history)
    live(core, feed, 2)  # 13, 14 live
    flush(core)
    assert a.labels() == ["gap", 11, 12, 13, 14]


def test_resume_not_covered_gets_the_gap_notice_the_snapshot_and_what_follows_it():
    core = make_core()
    feed = Feed(history=5, snapshot_every=7)
    for _ in range(10):  # history 6..10, snapshot at 7
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(since=2))
    read = one_read(core)
    assert asked(read) == (S, 2, True)
    live(core, feed, 1)  # 11 during the read, not in the history
    history = feed.read(read, core.max_replay)
    assert history.snapshot[0] == 7
    live(core, feed, 1)  # 12 after the read
    finish(core, read, history)
    live(core, feed, 1)
    flush(core)
    assert a.labels() == ["gap", ("snap", 7), 8, 9, 10, 11, 12, 13]
    assert a.reasons() == ["history_trimmed"]
    assert core.counters.gap_notices == 1 and core.counters.snapshots_sent == 1
    assert core.counters.replayed == 4


def test_resume_not_covered_without_snapshot_gets_what_the_history_holds():
    core = make_core()
    feed = Feed(history=4)
    for _ in range(10):  # history holds 7..10
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(since=3))
    read = one_read(core)
    finish(core, read, feed.read(read, core.max_replay))
    live(core, feed, 1)
    flush(core)
    assert a.labels() == ["gap", 7, 8, 9, 10, 11]
    assert core.counters.gap_notices == 1 and core.counters.snapshots_sent == 0


def test_resume_more_than_max_replay_behind_gets_at_most_max_replay_messages():
    core = make_core(max_replay=3)
    feed = Feed()  # the whole history is kept
    for _ in range(10):
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(since=2))  # 8 behind, 3 allowed
    read = one_read(core)
    history = feed.read(read, core.max_replay)
    finish(core, read, history)
    flush(core)
    assert a.labels() == ["gap", 8, 9, 10]
    assert a.reasons() == ["max_replay"]
    assert core.counters.replayed == 3


def test_resume_more_than_max_replay_behind_a_trimmed_history_is_history_trimmed():
    core = make_core(max_replay=3)
    feed = Feed(history=5)  # 6..10 kept
    for _ in range(10):
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(since=2))  # 8 behind, 3 allowed, 3..5 gone anyway
    read = one_read(core)
    finish(core, read, feed.read(read, core.max_replay))
    flush(core)
    assert a.labels() == ["gap", 8, 9, 10]
    assert a.reasons() == ["history_trimmed"]


def test_resume_not_covered_with_a_snapshot_the_history_cannot_reach_is_the_history_only():
    core = make_core()
    feed = Feed(history=3)
    for _ in range(10):
        feed.publish()
    feed.store_snapshot(4)  # older than the history (8..10)
    a = Conn("a")
    subscribed(core, a, S, Want(since=1))
    read = one_read(core)
    finish(core, read, feed.read(read, core.max_replay))
    flush(core)
    assert a.labels() == ["gap", 8, 9, 10]
    assert core.counters.snapshots_sent == 0


def test_resume_after_a_history_reset_gets_the_gap_notice_and_a_jump_forward():
    core = make_core()
    feed = Feed(base=1_700_000_000_000_000, snapshot_every=None)
    for _ in range(5):  # the stream restarted at a TIME position
        feed.publish()
    feed.store_snapshot(feed.latest)
    a = Conn("a")
    subscribed(core, a, S, Want(since=1042))
    read = one_read(core)
    finish(core, read, feed.read(read, core.max_replay))
    live(core, feed, 1)
    flush(core)
    base = feed.base
    assert a.labels() == ["gap", ("snap", base + 4), base + 5]
    assert a.reasons() == ["history_trimmed"]


def outage(core: Core, name: str = S) -> Read:
    """The link lost and back, ``name`` confirmed again: the read that
    repairs it."""
    core.link_lost()
    core.link_restored({name})
    core.upstream_confirmed(name)
    return one_read(core)


@pytest.mark.parametrize(
    "history, reason",
    [
        (None, "history_lost"),  # Redis restarted without its data
        (3, "lost_writes"),  # a failover lost 4 and 5
    ],
)
def test_an_outage_the_history_cannot_repair_says_why(history, reason):
    core = make_core()
    feed = Feed()
    a = Conn("a")
    subscribed(core, a)
    live(core, feed, 5)
    feed.latest = history
    read = outage(core)
    finish(core, read, feed.read(read, core.max_replay))
    flush(core)
    assert a.labels() == [1, 2, 3, 4, 5, "gap"]
    assert a.reasons() == [reason]
    if history:
        live(core, feed, 1)  # a new 4: one notice for the restart
        flush(core)
        assert a.labels()[-2:] == ["gap", 4]
        assert a.reasons() == [reason]


def test_a_live_position_at_or_below_one_delivered_gives_lost_writes():
    core = make_core()
    feed = Feed()
    a = Conn("a")
    subscribed(core, a)
    live(core, feed, 5)
    feed.latest = 3  # positions start over at 4
    live(core, feed, 1)
    flush(core)
    assert a.labels() == [1, 2, 3, 4, 5, "gap", 4]
    assert a.reasons() == ["lost_writes"]


def test_snapshot_on_subscribe_gives_the_snapshot_then_every_later_message():
    core = make_core()
    feed = Feed(snapshot_every=5)
    for _ in range(8):  # snapshot at 5
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(snapshot=True))
    read = one_read(core)
    assert asked(read) == (S, None, True)
    live(core, feed, 1)  # 9 during the read
    history = feed.read(read, core.max_replay)
    live(core, feed, 1)  # 10 after it
    finish(core, read, history)
    live(core, feed, 1)
    flush(core)
    assert a.labels() == [("snap", 5), 6, 7, 8, 9, 10, 11]
    assert core.counters.snapshots_sent == 1 and core.counters.gap_notices == 0


def test_snapshot_at_the_latest_position_is_followed_by_live_messages():
    core = make_core()
    feed = Feed(snapshot_every=1)
    for _ in range(3):
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(snapshot=True))
    read = one_read(core)
    history = feed.read(read, core.max_replay)
    assert history.entries == []
    live(core, feed, 2)
    finish(core, read, history)
    flush(core)
    assert a.labels() == [("snap", 3), 4, 5]


def test_snapshot_requested_on_a_stream_without_one_is_live_only():
    core = make_core()
    feed = Feed()
    for _ in range(5):
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(snapshot=True))
    read = one_read(core)
    history = feed.read(read, core.max_replay)
    assert history == History(5, None, [])
    live(core, feed, 1)
    finish(core, read, history)
    live(core, feed, 1)
    flush(core)
    assert a.labels() == [6, 7]
    assert core.counters.gap_notices == 0 and core.counters.snapshots_sent == 0


def test_since_wins_over_snapshot_on_one_stream():
    core = make_core()
    feed = Feed(snapshot_every=5)
    for _ in range(8):
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(since=6, snapshot=True))
    read = one_read(core)
    assert asked(read) == (S, 6, True)
    finish(core, read, feed.read(read, core.max_replay))
    flush(core)
    assert a.labels() == [7, 8]
    assert core.counters.snapshots_sent == 0


@pytest.mark.parametrize("want", [Want(since=5), Want(snapshot=True), Want(5, True)])
def test_recovery_on_a_plain_stream_is_a_plain_subscribe(want):
    core = make_core()
    feed = Feed()
    a = Conn("a")
    subscribed(core, a, S, want)
    read = one_read(core)
    core.on_message(S.encode(), feed.publish_plain())  # during the read
    history = feed.read(read, core.max_replay)
    assert history == History(None, None, [])
    core.on_message(S.encode(), feed.publish_plain())  # after the read
    finish(core, read, history)
    core.on_message(S.encode(), feed.publish_plain())  # live
    flush(core)
    assert a.labels() == [("plain", 1), ("plain", 2), ("plain", 3)]
    assert core.counters.gap_notices == 0


def test_live_messages_during_the_read_are_deduplicated_against_the_history():
    core = make_core()
    feed = Feed()
    other = Conn("other")
    subscribed(core, other)
    live(core, feed, 4)
    a = Conn("a")
    core.register(a)
    core.subscribe(a, [S], {S: Want(since=2)})
    read = one_read(core)
    live(core, feed, 2)  # 5, 6: in the buffer and in the history
    history = feed.read(read, core.max_replay)
    assert [seq for seq, _ in history.entries] == [3, 4, 5, 6]
    live(core, feed, 2)  # 7, 8: in the buffer only
    assert finish(core, read, history) is True
    live(core, feed, 1)
    flush(core)
    assert a.positions() == [3, 4, 5, 6, 7, 8, 9]
    assert other.positions() == list(range(1, 10))


def test_a_connection_that_leaves_during_the_read_gets_nothing():
    core = make_core()
    feed = Feed()
    for _ in range(5):
        feed.publish()
    a, b = Conn("a"), Conn("b")
    subscribed(core, a, S, Want(since=1))
    subscribed(core, b, S, Want(since=3))
    read = one_read(core)
    core.remove(a)
    live(core, feed, 1)
    finish(core, read, feed.read(read, core.max_replay))
    live(core, feed, 1)
    flush(core)
    assert a.got == []
    assert a not in core.streams[S] and a not in core.connections
    assert b.positions() == [4, 5, 6, 7]


def test_when_every_reader_leaves_the_channel_is_dropped_after_the_read():
    core = make_core()
    feed = Feed()
    a = Conn("a")
    subscribed(core, a, S, Want(since=0))
    read = one_read(core)
    core.unsubscribe(a, [S])
    core.wanted_changed = False
    assert S in core.wanted()  # the read still needs the channel
    finish(core, read, feed.read(read, core.max_replay))
    assert S not in core.wanted()
    assert core.wanted_changed  # the shell must unsubscribe upstream


def test_when_every_reader_leaves_and_the_read_fails_the_channel_is_dropped():
    core = make_core()
    a = Conn("a")
    subscribed(core, a, S, Want(since=0))
    read = one_read(core)
    core.remove(a)
    fail(core, read)
    assert core.recovering == {}
    assert S not in core.wanted() and core.wanted_changed


def test_when_every_reader_leaves_and_the_link_drops_the_channel_is_dropped():
    core = make_core()
    feed = Feed()
    a = Conn("a")
    subscribed(core, a, S, Want(since=0))
    read = one_read(core)
    core.remove(a)
    core.link_lost()
    finish(core, read, feed.read(read, core.max_replay))  # too late: ignored
    assert core.recovering == {}
    assert S not in core.wanted()


def test_a_failed_read_is_retried_for_the_same_connections():
    core = make_core()
    feed = Feed()
    for _ in range(5):
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(since=2))
    read = one_read(core)
    live(core, feed, 1)  # 6, buffered for the failed read
    fail(core, read)
    assert S in core.wanted() and a not in core.streams.get(S, {})
    assert finish(core, read, History(6, None, [])) is False  # no read in flight
    live(core, feed, 1)  # 7 while nothing is in flight
    retry = one_read(core)
    assert asked(retry) == asked(read)
    live(core, feed, 1)  # 8 during the retry
    finish(core, retry, feed.read(retry, core.max_replay))
    live(core, feed, 1)
    flush(core)
    assert a.positions() == [3, 4, 5, 6, 7, 8, 9]


def test_a_read_that_ends_after_the_link_dropped_is_ignored_and_redone():
    core = make_core()
    feed = Feed()
    for _ in range(5):
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(since=2))
    read = one_read(core)
    live(core, feed, 1)  # 6 during the read
    history = feed.read(read, core.max_replay)
    core.link_lost()
    assert finish(core, read, history) is False
    flush(core)
    assert a.got == []
    for _ in range(3):  # 7..9 while the link is down
        feed.publish()
    assert core.start_reads() == []
    core.link_restored({S})
    core.upstream_confirmed(S)
    again = one_read(core)
    assert asked(again) == asked(read)
    finish(core, again, feed.read(again, core.max_replay))
    live(core, feed, 1)
    flush(core)
    assert a.positions() == [3, 4, 5, 6, 7, 8, 9, 10]


def test_a_stale_read_finishing_during_the_next_read_is_not_taken_for_it():
    core = make_core()
    feed = Feed()
    for _ in range(5):
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(since=2))
    first = one_read(core)
    stale = feed.read(first, core.max_replay)  # latest 5
    core.link_lost()
    for _ in range(3):  # 6..8 while the link is down
        feed.publish()
    core.link_restored({S})
    core.upstream_confirmed(S)
    second = one_read(core)
    live(core, feed, 1)  # 9 during the second read
    fresh = feed.read(second, core.max_replay)
    finish(core, first, stale)  # the first read's late answer
    finish(core, second, fresh)
    flush(core)
    assert a.positions() == [3, 4, 5, 6, 7, 8, 9]


def test_several_connections_with_different_positions_share_one_read():
    core = make_core()
    feed = Feed(snapshot_every=4)
    other = Conn("other")
    subscribed(core, other)
    live(core, feed, 10)
    flush(core)
    wants = {
        "s2": Want(since=2),
        "s7": Want(since=7),
        "s10": Want(since=10),
        "snap": Want(snapshot=True),
        "both": Want(since=5, snapshot=True),
    }
    conns = {key: Conn(key) for key in wants}
    for key, conn in conns.items():
        core.register(conn)
        core.subscribe(conn, [S], {S: wants[key]})
    reads = core.start_reads()
    assert [asked(r) for r in reads] == [(S, 2, True)]
    live(core, feed, 1)  # 11 during the read
    history = feed.read(reads[0], core.max_replay)
    live(core, feed, 1)  # 12
    finish(core, reads[0], history)
    live(core, feed, 1)  # 13
    flush(core)
    assert conns["s2"].labels() == list(range(3, 14))
    assert conns["s7"].labels() == list(range(8, 14))
    assert conns["s10"].labels() == [11, 12, 13]
    assert conns["snap"].labels() == [("snap", 8), 9, 10, 11, 12, 13]
    assert conns["both"].labels() == list(range(6, 14))
    assert other.positions() == list(range(1, 14))
    assert core.counters.snapshots_sent == 1


def test_one_read_per_stream_and_streams_are_read_independently():
    core = make_core()
    s, t = Feed(S), Feed(T)
    for _ in range(3):
        s.publish()
        t.publish()
    a, b = Conn("a"), Conn("b")
    core.register(a)
    core.register(b)
    core.subscribe(a, [S, T], {S: Want(since=1), T: Want(since=2)})
    core.subscribe(b, [S], {S: Want(since=0)})
    core.upstream_confirmed(S)
    core.upstream_confirmed(T)
    reads = core.start_reads()
    assert sorted(map(asked, reads)) == sorted([(S, 0, True), (T, 2, True)])
    by_stream = {read.stream: read for read in reads}
    finish(core, by_stream[T], t.read(by_stream[T], core.max_replay))
    flush(core)
    assert a.labels(T) == [3] and a.labels(S) == [] and b.got == []
    finish(core, by_stream[S], s.read(by_stream[S], core.max_replay))
    flush(core)
    assert a.labels(S) == [2, 3] and b.labels() == [1, 2, 3]


def test_a_connection_that_subscribes_during_a_read_is_served_by_the_next_read():
    core = make_core()
    feed = Feed()
    for _ in range(5):
        feed.publish()
    a, b = Conn("a"), Conn("b")
    subscribed(core, a, S, Want(since=4))
    first = one_read(core)
    live(core, feed, 1)  # 6
    subscribed(core, b, S, Want(since=1))
    assert core.start_reads() == []  # the first read is still in flight
    live(core, feed, 1)  # 7
    history = feed.read(first, core.max_replay)
    finish(core, first, history)
    flush(core)
    assert a.positions() == [5, 6, 7] and b.got == []
    assert S in core.recovering
    second = one_read(core)
    assert asked(second) == (S, 1, True)
    live(core, feed, 1)  # 8: a is live, b is reading
    finish(core, second, feed.read(second, core.max_replay))
    live(core, feed, 1)
    flush(core)
    assert a.positions() == [5, 6, 7, 8, 9]
    assert b.positions() == [2, 3, 4, 5, 6, 7, 8, 9]
    assert core.recovering == {}


def test_catch_up_frames_join_the_same_batch_write_as_live_frames():
    core = make_core()
    feed = Feed()
    for _ in range(3):
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(since=0))
    read = one_read(core)
    finish(core, read, feed.read(read, core.max_replay))
    live(core, feed, 1)
    batch = flush(core)
    assert list(batch) == [a] and len(a.writes) == 1
    assert a.positions() == [1, 2, 3, 4]


# --- position bookkeeping across outages ---------------------------------------------


def test_listeners_that_joined_by_recovery_are_repaired_after_an_outage():
    core = make_core()
    feed = Feed()
    for _ in range(5):
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(since=2))
    read = one_read(core)
    finish(core, read, feed.read(read, core.max_replay))
    core.link_lost()
    feed.publish()  # 6 while the link is down
    core.link_restored({S})
    core.upstream_confirmed(S)
    for read in core.start_reads():
        finish(core, read, feed.read(read, core.max_replay))
    flush(core)
    assert a.labels() == [3, 4, 5, 6]


def test_two_outages_in_a_row_repair_without_duplicates():
    core = make_core()
    feed = Feed()
    a = Conn("a")
    subscribed(core, a)
    live(core, feed, 3)
    for _ in range(2):
        core.link_lost()
        feed.publish()
        feed.publish()
        core.link_restored({S})
        core.upstream_confirmed(S)
        for read in core.start_reads():
            finish(core, read, feed.read(read, core.max_replay))
    flush(core)
    assert a.positions() == [1, 2, 3, 4, 5, 6, 7]


def test_a_stale_position_of_departed_listeners_is_not_used_for_repair():
    core = make_core()
    feed = Feed(snapshot_every=5)
    a = Conn("a")
    subscribed(core, a)
    live(core, feed, 2)  # last_seq 2
    core.remove(a)
    for _ in range(8):  # 3..10, nobody listens; snapshot at 10
        feed.publish()
    b = Conn("b")
    subscribed(core, b, S, Want(snapshot=True))
    read = one_read(core)
    finish(core, read, feed.read(read, core.max_replay))
    core.link_lost()
    feed.publish()  # 11 during the outage
    core.link_restored({S})
    core.upstream_confirmed(S)
    for read in core.start_reads():
        finish(core, read, feed.read(read, core.max_replay))
    flush(core)
    assert b.labels() == [("snap", 10), 11]


def test_a_live_message_arriving_after_the_read_that_held_it_is_not_repeated():
    # The history read and the pub/sub link are two Redis connections: the
    # read's reply can be handled before a message published just before it.
    core = make_core()
    feed = Feed()
    for _ in range(3):
        feed.publish()
    a = Conn("a")
    subscribed(core, a, S, Want(since=1))
    read = one_read(core)
    _, late = feed.publish()  # 4, still on its way over pub/sub
    finish(core, read, feed.read(read, core.max_replay))
    core.on_message(S.encode(), late)
    live(core, feed, 1)
    flush(core)
    assert a.positions() == [2, 3, 4, 5]


# --- bounds: channels, churn, catch-up bytes, payload checks ---------------------------


def test_a_subscribe_and_unsubscribe_the_link_has_not_seen_cost_it_nothing():
    core = make_core(linger=True)
    a = Conn("a")
    core.subscribe(a, [S])
    core.unsubscribe(a, [S])  # before the link took the change
    assert core.wanted() == set() and core.lingering == {}
    assert core.take_changes() == {S: False}  # the link has nothing to unsubscribe


def test_a_channel_whose_last_listener_left_lingers_until_the_second_sweep():
    core = make_core(linger=True)
    a, b = Conn("a"), Conn("b")
    core.subscribe(a, [S, T])
    assert core.take_changes() == {S: True, T: True}
    core.upstream_confirmed(S)
    core.unsubscribe(a, [S])
    core.remove(a)
    assert core.wanted() == {S, T} and list(core.lingering) == [S, T]
    assert core.take_changes() == {}  # nothing for Redis to do yet
    core.subscribe(b, [S])  # back within the moment
    assert core.take_changes() == {} and list(core.lingering) == [T]
    assert core.is_wanted(S) and S in core.confirmed  # an acknowledgement needs no wait
    core.release_lingering()  # T lingered since before no sweep
    assert core.wanted() == {S, T}
    core.release_lingering()
    assert core.wanted() == {S} and core.take_changes() == {T: False}
    assert core.lingering == {}


def test_churn_within_one_sweep_asks_redis_for_nothing():
    core = make_core(linger=True)
    a = Conn("a")
    names = ["trade.C%d_USDT" % i for i in range(50)]
    core.subscribe(a, names)
    assert len(core.take_changes()) == 50
    for _ in range(100):
        core.unsubscribe(a, names)
        core.subscribe(a, names)
    assert core.take_changes() == {}
    assert core.wanted() == set(names) and core.lingering == {}


def test_the_channel_cap_refuses_new_channels_and_lingering_ones_give_way():
    core = make_core(max_channels=3, linger=True)
    a, b = Conn("a"), Conn("b")
    names = ["trade.K%d_USDT" % i for i in range(5)]
    assert core.over_channel_cap(names) == names[3:]
    core.subscribe(a, names[:3])
    core.take_changes()
    assert core.over_channel_cap([names[0]]) == []  # an existing channel needs no room
    assert core.over_channel_cap(names[3:]) == names[3:]
    core.unsubscribe(a, names[:2])  # two lingering channels
    assert len(core.wanted()) == 3
    assert core.over_channel_cap([names[3]]) == []  # the oldest lingering one gives way
    assert core.wanted() == {names[1], names[2]}
    assert core.take_changes() == {names[0]: False}
    core.subscribe(b, [names[3]])
    assert core.over_channel_cap([names[4]]) == []
    assert core.wanted() == {names[2], names[3]}
    core.subscribe(b, [names[4]])
    assert core.over_channel_cap(["trade.KX_USDT"]) == ["trade.KX_USDT"]
    assert make_core().over_channel_cap(names) == []  # 0: no cap


def big_feed(name: str, count: int, size: int = 400, **kwargs) -> Feed:
    """A feed whose frames are ``size`` bytes or so."""
    feed = Feed(name, **kwargs)
    pad = b"x" * size
    feed.frame = lambda seq: (
        b'{"stream":"%s","data":{"i":%d,"x":"%s"},"seq":%d}' % (name.encode(), seq, pad, seq)
    )
    for _ in range(count):
        feed.publish()
    return feed


def test_a_resume_far_behind_on_many_streams_is_bounded_by_the_connection_budget():
    """The amplification: ``since: 0`` on many streams with long histories.
    The connection's budget is shared among its streams; each read asks
    for no more than its share; what does not fit gets the gap notice and
    the newest messages that fit; the connection is sent about its budget."""
    budget = 20_000
    core = make_core(replay_bytes=budget)
    names = ["trade.F%d_USDT" % i for i in range(10)]
    feeds = {name: big_feed(name, 200) for name in names}
    a = Conn("a")
    core.register(a)
    core.subscribe(a, names, {name: Want(since=0) for name in names})
    for name in names:
        core.upstream_confirmed(name)
    reads = core.start_reads()
    assert len(reads) == 10
    assert all(read.max_bytes <= budget // 10 for read in reads)
    read_bytes = 0
    for read in reads:
        history = feeds[read.stream].read(read, core.max_replay)
        read_bytes += sum(stored_size(seq, frame) for seq, frame in history.entries)
        finish(core, read, history)
    flush(core)
    assert read_bytes <= budget + 10 * 500  # at most one message over per read
    sent = sum(map(len, a.writes))
    assert 0.5 * budget < sent <= budget
    for name in names:
        labels = a.labels(name)
        assert labels[0] == "gap" and 1 <= len(labels) - 1 < 10
        assert labels[1:] == list(range(201 - (len(labels) - 1), 201))  # the newest
    assert core.counters.gap_notices == 10
    assert core.budgets.budgets == {} and core.recovering == {}
    live(core, feeds[names[0]], 1)
    flush(core)
    assert a.labels(names[0])[-1] == 201  # then live


def test_a_client_far_behind_does_not_cost_a_client_just_behind_its_replay():
    """Both share one read, which reads the newest messages first: the
    client just behind gets exactly what it missed, the other the gap."""
    core = make_core(replay_bytes=4_000)
    feed = big_feed(S, 300)
    far, near = Conn("far"), Conn("near")
    subscribed(core, far, S, Want(since=0))
    subscribed(core, near, S, Want(since=296))
    read = one_read(core)
    assert asked(read) == (S, 0, True)
    finish(core, read, feed.read(read, core.max_replay))
    flush(core)
    assert near.labels() == [297, 298, 299, 300]
    assert far.labels()[0] == "gap" and far.labels()[-1] == 300
    assert sum(map(len, far.writes)) <= 4_000


def test_a_snapshot_that_fits_follows_the_gap_notice_and_one_that_does_not_is_not_read():
    core = make_core(replay_bytes=3_000)
    small = big_feed(S, 50, snapshot_every=50)  # snapshot at the latest position
    large = big_feed(T, 50)
    large.snapshot = (
        50,
        b'{"stream":"%s","data":{"e":"snap","at":50,"x":"%s"},"seq":50}'
        % (T.encode(), b"y" * 5000),
    )
    a, b = Conn("a"), Conn("b")
    subscribed(core, a, S, Want(since=1))
    subscribed(core, b, T, Want(since=1))
    subscribed(core, Conn("c"), T, Want(snapshot=True))
    reads = {read.stream: read for read in core.start_reads()}
    finish(core, reads[S], small.read(reads[S], core.max_replay))
    history = large.read(reads[T], core.max_replay)
    assert history.snapshot is None and history.snapshot_skipped
    finish(core, reads[T], history)
    flush(core)
    assert a.labels() == ["gap", ("snap", 50)]
    assert b.labels()[0] == "gap" and b.labels()[-1] == 50  # the newest that fit
    c = [conn for conn in core.streams[T] if conn.name == "c"][0]
    assert c.labels() == ["gap"]  # its snapshot did not fit: it is told


def test_a_connection_may_use_what_its_other_reads_left_over():
    """Streams held one after the other: the first read reserved the whole
    budget, so the next read has no share for the connection; once the
    first is done, what it did not use serves the second (which another
    client's share made large enough)."""
    core = make_core(replay_bytes=10_000)
    s, t = big_feed(S, 20), big_feed(T, 20)
    a, b = Conn("a"), Conn("b")
    subscribed(core, a, S, Want(since=15))
    first = one_read(core)
    assert first.max_bytes == 10_000
    subscribed(core, a, T, Want(since=15))
    subscribed(core, b, T, Want(since=15))
    second = one_read(core)
    assert second.max_bytes == 10_000 and second.token != first.token
    finish(core, first, s.read(first, core.max_replay))
    finish(core, second, t.read(second, core.max_replay))
    flush(core)
    assert a.labels(S) == [16, 17, 18, 19, 20] and a.labels(T) == [16, 17, 18, 19, 20]
    assert b.labels(T) == [16, 17, 18, 19, 20]


def test_budgets_are_forgotten_when_reads_fail_or_connections_leave():
    core = make_core(replay_bytes=1_000)
    a, b = Conn("a"), Conn("b")
    subscribed(core, a, S, Want(since=0))
    subscribed(core, b, S, Want(since=0))
    subscribed(core, a, T, Want(since=0))
    reads = core.start_reads()
    assert sorted(core.budgets.budgets[a]) == [0, 0, 2] and core.budgets.budgets[b][2] == 1
    fail(core, reads[0])
    core.link_lost()
    assert core.budgets.budgets[a] == [1_000, 2, 0]  # shares back, both streams wait again
    core.remove(a)
    core.unsubscribe(b, [S])
    assert core.budgets.budgets == {}


def watched_core() -> tuple[Core, Conn, list[str]]:
    """A core with one listener on S, and the causes of what it dropped."""
    seen: list[str] = []
    core = Core(Counters(), on_malformed=lambda c, p, why: seen.append(why))
    a = Conn("a")
    core.subscribe(a, [S])
    return core, a, seen


@pytest.mark.parametrize(
    "frame",
    [
        b'{"stream":"trade.SOL_USDC","data":{"i":5},"stream":"depth.BTC_USDT","seq":5}',
        b'{"stream":"trade.SOL_USDC","data":{"i":"\xff"},"seq":5}',
        b'{"stream":"trade.SOL_USDC","data":[5],"seq":5}',
        b'{"stream":"trade.SOL_USDC","data":{"i":5},"seq":6}',
        b'{"stream":"trade.SOL_USDC","data":{"i":5},"seq":5,"x":1}',
        b'{"stream":"trade.SOL_USDC","data":{"i":5}}',
        b'{"data":{"i":5},"stream":"trade.SOL_USDC","seq":5}',
    ],
)
def test_a_positioned_payload_is_checked_like_a_plain_one(frame):
    core, a, seen = watched_core()
    assert core.on_message(S.encode(), b"@5 " + frame) is False
    assert core.on_message(S.encode(), b"@05 " + frame.replace(b":5", b":05")) is False
    assert core.counters.dropped_malformed == 2 and seen == ["malformed_payload"] * 2
    assert core.take_batch() == {} and S not in core.last_seq


@pytest.mark.parametrize("payload_format", ["envelope", "data"])
@pytest.mark.parametrize(
    "payload",
    [
        b'@5 {"stream":"depth.BTC_USDT","data":{"i":5},"seq":5}',
        b'@5 {"stream":"trade.SOL_USDCX","data":{"i":5},"seq":5}',
    ],
)
def test_a_positioned_frame_of_another_stream_is_dropped(payload, payload_format):
    core = make_core(payload_format=payload_format)
    a = Conn("a")
    core.subscribe(a, [S])
    assert core.on_message(S.encode(), payload) is False
    assert core.counters.dropped_wrong_stream == 1 and core.take_batch() == {}


@pytest.mark.parametrize(
    "payload",
    [
        b'{"stream":"depth.BTC_USDT","data":{}}',
        b'{"data":{}}',
        b'{"stream":"trade.SOL_USDC","data":{},"stream":"depth.BTC_USDT"}',
        b'{"stream":"depth.BTC_USDT","data":{},"stream":"trade.SOL_USDC"}',
        b'{"stream":"trade.SOL_USDC","data":{},"str\\u0065am":"depth.BTC_USDT"}',
    ],
)
def test_an_envelope_whose_stream_is_not_the_channel_is_dropped(payload):
    core, a, seen = watched_core()
    assert core.on_message(S.encode(), payload) is False
    assert core.counters.dropped_wrong_stream == 1 and seen == ["wrong_stream"]
    good = b'{"stream":"trade.SOL_USDC","data":{"p":"\\u00e9","stream":"x"},"x":"stream"}'
    assert core.on_message(S.encode(), good) is True  # "stream" inside data is data
    assert split_frames(core.take_batch()[a]) == [good]


def test_stored_frames_that_fail_the_check_are_not_replayed():
    core = make_core()
    feed = Feed()
    for _ in range(5):
        feed.publish()
    feed.log[2] = (3, b'{"stream":"depth.BTC_USDT","data":{"i":3},"seq":3}')  # another stream's
    feed.log[3] = (4, b'{"stream":"trade.SOL_USDC","data":{"i":4},"seq":4')  # cut short
    a = Conn("a")
    subscribed(core, a, S, Want(since=1))
    read = one_read(core)
    finish(core, read, feed.read(read, core.max_replay))
    flush(core)
    assert a.labels() == [2, 5]  # as live delivery would have dropped them
    assert core.counters.dropped_wrong_stream == 1 and core.counters.dropped_malformed == 1


# --- property: resume under random interleavings -------------------------------------


class Run:
    """A random interleaving of publishes, pub/sub deliveries, subscribes,
    one stream's history reads and (optionally) outages of the Redis link,
    kept to what the real system guarantees: every message the history read
    saw has arrived on the pub/sub link before the read's answer is handled,
    unless the link was lost meanwhile (then it is gone, as is everything
    published while the link is down)."""

    def __init__(self, feed: Feed, max_replay: int) -> None:
        self.feed = feed
        self.core = Core(Counters(), max_replay=max_replay)
        self.pubsub: deque[tuple[int, bytes]] = deque()  # (index, payload) on its way
        self.published = 0
        self.down = False
        self.outages = 0
        self.read: Read | None = None
        self.history: History | None = None
        self.barrier = 0  # messages published before the read ran
        self.stale: list[tuple[Read, History | None]] = []  # reads the link loss overtook
        self.clients: list[tuple[Conn, Want | None]] = []
        self.reading: list[int] = []  # indexes of clients in the read
        self.waiting: list[int] = []
        self.covered: dict[int, bool | None] = {}  # client -> history covered it (None: plain)
        self.gaps_allowed: dict[int, int] = {}  # client -> outages it had no position in

    def publish(self) -> None:
        payload = self.feed.publish()[1]
        if not self.down:
            self.pubsub.append((self.published, payload))
        self.published += 1

    def deliver(self) -> None:
        if self.pubsub:
            self.core.on_message(self.feed.name.encode(), self.pubsub.popleft()[1])

    def subscribe(self, want: Want | None) -> None:
        conn = Conn(str(len(self.clients)))
        self.core.register(conn)
        self.core.subscribe(conn, [self.feed.name], {self.feed.name: want} if want else None)
        if not self.down:
            self.core.upstream_confirmed(self.feed.name)
        self.clients.append((conn, want))
        if want is not None and (want.since is not None or want.snapshot):
            self.waiting.append(len(self.clients) - 1)

    def start(self) -> None:
        reads = self.core.start_reads()
        if self.read is not None or self.down:
            assert reads == []
            return
        if self.outages:  # repairs join the waiting: not modelled
            if reads:
                assert len(reads) == 1
                self.read = reads[0]
            return
        if not self.waiting:
            assert reads == []
            return
        assert len(reads) == 1
        self.read = reads[0]
        wants = [self.clients[i][1] for i in self.waiting]
        sinces = [w.since for w in wants if w.since is not None]
        assert self.read.after == (min(sinces) if sinces else None)
        assert self.read.snapshot == (bool(sinces) or any(w.snapshot for w in wants))
        self.reading, self.waiting = self.waiting, []

    def execute(self) -> None:
        if self.read is None or self.history is not None:
            return
        self.history = self.feed.read(self.read, self.core.max_replay)
        self.barrier = self.published
        latest = self.feed.latest
        held = {seq for seq, _ in self.feed.log}
        for i in self.reading:
            since = self.clients[i][1].since
            if since is not None:
                self.covered[i] = (
                    None
                    if latest is None
                    else since >= latest
                    or (
                        latest - since <= self.core.max_replay
                        and all(p in held for p in range(since + 1, latest + 1))
                    )
                )

    def done(self) -> None:
        if self.history is None:
            return
        while self.pubsub and self.pubsub[0][0] < self.barrier:
            self.deliver()
        finish(self.core, self.read, self.history)
        self.read = self.history = None
        self.reading = []

    def lose(self) -> None:
        if self.down:
            return
        self.core.link_lost()
        self.down = True
        self.outages += 1
        self.pubsub.clear()  # what was on its way is gone
        if self.read is not None:
            self.stale.append((self.read, self.history))
            self.read = self.history = None
        self.waiting += self.reading
        self.reading = []

    def restore(self) -> None:
        if not self.down:
            return
        self.down = False
        flush(self.core)
        for i, (conn, _) in enumerate(self.clients):
            if not conn.positions():  # nothing tells the core the stream has positions
                self.gaps_allowed[i] = self.gaps_allowed.get(i, 0) + 1
        channels = self.core.wanted()
        self.core.link_restored(channels)
        for name in channels:
            self.core.upstream_confirmed(name)

    def late(self) -> None:
        """The oldest read the link loss overtook answers now."""
        if self.stale:
            read, history = self.stale.pop(0)
            if history is None:
                history = self.feed.read(read, self.core.max_replay)
            finish(self.core, read, history)

    def step(self, kind: str) -> None:
        {
            "pub": self.publish,
            "deliver": self.deliver,
            "start": self.start,
            "exec": self.execute,
            "done": self.done,
            "lose": self.lose,
            "restore": self.restore,
            "late": self.late,
        }[kind]()

    def drain(self) -> None:
        self.restore()
        for _ in range(3):
            while self.stale:
                self.late()
            self.done()
            self.start()
            self.execute()
            self.done()
        while self.pubsub:
            self.deliver()
        assert self.core.recovering == {}
        flush(self.core)


def check_run(run: Run) -> None:
    """Every client's frames: positions strictly rising by one from the first
    on, up to the last published; a gap notice exactly where the history did
    not cover a resume; exactly since+1..end where it did."""
    end = run.feed.latest
    for i, (conn, want) in enumerate(run.clients):
        labels = conn.labels()
        positions = conn.positions()
        assert (
            positions == list(range(positions[0], positions[0] + len(positions)))
            if positions
            else True
        ), (i, want, labels)
        if positions:
            assert positions[-1] == end, (i, want, labels)
        gaps = labels.count("gap")
        if want is not None and want.since is not None:
            if run.covered[i] is None:  # no positions at read time: plain
                assert gaps == 0, (i, want, labels)
            elif run.covered[i]:
                assert labels == list(range(want.since + 1, end + 1)), (i, want, labels)
            else:
                assert gaps == 1 and labels[0] == "gap", (i, want, labels)
        else:
            assert gaps == 0, (i, want, labels)
        snaps = [item for item in labels if isinstance(item, tuple)]
        assert snaps == [] or (snaps == labels[:1] or snaps == labels[1:2]), labels


def check_outage_run(run: Run) -> None:
    """With a history that covers everything: each client's positions rise
    by exactly one up to the last published, with no duplicate; no gap
    notice unless the client held no position yet when the link came back;
    a resume gets exactly since+1..end (or, on a stream that had no
    positions when it was read, everything)."""
    end = run.feed.latest
    for i, (conn, want) in enumerate(run.clients):
        labels = conn.labels()
        positions = conn.positions()
        where = (i, want, labels)
        assert len(set(positions)) == len(positions), where
        assert positions == sorted(positions), where
        assert labels.count("gap") <= run.gaps_allowed.get(i, 0), where
        segments: list[list[int]] = [[]]
        for item in labels:
            if item == "gap":
                segments.append([])
            else:
                segments[-1].append(item[1] if isinstance(item, tuple) else item)
        for segment in segments:
            assert (
                segment == list(range(segment[0], segment[0] + len(segment))) if segment else True
            ), where
        if positions:
            assert positions[-1] == end, where
        if end is None:
            assert positions == [], where
        elif want is not None and want.since is not None and "gap" not in labels:
            assert positions == list(range(want.since + 1, end + 1)) or (
                positions == list(range(run.feed.base, end + 1))
            ), where


def actions(since_low: int, outages: bool = False):
    """Strategies: a list of steps; a subscribe carries a Want drawn relative
    to the feed's position at that time (offset back from the latest)."""
    want = st.one_of(
        st.none(),
        st.builds(lambda back: ("since", back), st.integers(since_low, 40)),
        st.just(("snapshot", None)),
        st.builds(lambda back: ("both", back), st.integers(since_low, 40)),
    )
    kinds = ["pub", "pub", "deliver", "deliver", "start", "exec", "done"]
    if outages:
        kinds += ["lose", "restore", "late"]
    step = st.one_of(st.sampled_from(kinds), st.tuples(st.just("sub"), want))
    return st.lists(step, max_size=60)


def play(run: Run, steps: list, clamp_since: bool) -> None:
    for step in steps:
        if isinstance(step, tuple):
            spec = step[1]
            want = None
            if spec is not None:
                kind, back = spec
                latest = run.feed.latest
                since = None
                if kind in ("since", "both"):
                    top = latest if latest is not None else run.feed.base - 1
                    since = top - back
                    if clamp_since:
                        since = max(since, run.feed.base - 1)
                    since = max(since, 0)
                want = Want(since, kind in ("snapshot", "both"))
            run.subscribe(want)
        else:
            run.step(step)
    run.drain()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from([1, 1_700_000_000_000_000]),
    before=st.integers(0, 30),
    snapshot_every=st.one_of(st.none(), st.integers(1, 8)),
    steps=actions(0),
)
def test_property_resume_covered_by_the_history_is_exact(base, before, snapshot_every, steps):
    feed = Feed(base=base, snapshot_every=snapshot_every)
    for _ in range(before):
        feed.publish()
    run = Run(feed, max_replay=10_000)
    play(run, steps, clamp_since=True)
    assert all(run.covered.values()) or None in run.covered.values()
    check_run(run)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(
    base=1,
    before=10,
    history=3,
    max_replay=100,
    snapshot_every=None,
    steps=[("sub", ("since", 9)), "start", "exec", "done"],
)
@given(
    base=st.sampled_from([1, 1_700_000_000_000_000]),
    before=st.integers(0, 30),
    history=st.integers(0, 30),
    max_replay=st.integers(0, 30),
    snapshot_every=st.one_of(st.none(), st.integers(1, 8)),
    steps=actions(0),
)
def test_property_resume_never_repeats_or_reorders(
    base, before, history, max_replay, snapshot_every, steps
):
    feed = Feed(base=base, history=history, snapshot_every=snapshot_every)
    for _ in range(before):
        feed.publish()
    run = Run(feed, max_replay=max_replay)
    play(run, steps, clamp_since=False)
    check_run(run)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(
    base=1,
    before=5,
    snapshot_every=None,
    steps=[
        ("sub", ("since", 3)),
        "start",
        "exec",
        "done",
        "lose",
        "pub",
        "restore",
        "start",
        "exec",
        "done",
    ],
)
@given(
    base=st.sampled_from([1, 1_700_000_000_000_000]),
    before=st.integers(0, 20),
    snapshot_every=st.one_of(st.none(), st.integers(1, 8)),
    steps=actions(0, outages=True),
)
def test_property_link_outages_covered_by_the_history_lose_and_repeat_nothing(
    base, before, snapshot_every, steps
):
    feed = Feed(base=base, snapshot_every=snapshot_every)
    for _ in range(before):
        feed.publish()
    run = Run(feed, max_replay=10_000)
    play(run, steps, clamp_since=True)
    check_outage_run(run)
