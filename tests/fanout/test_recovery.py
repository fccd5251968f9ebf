"""Recoveries (:mod:`marketstream.fanout.recovery`): who waits for which
history read, reads that fail, go stale or end after their readers left,
and properties of resumes and outages under random interleavings.
"""

from __future__ import annotations

from collections import deque

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from marketstream.fanout.core import Core, History, Read, Want
from marketstream.fanout.counters import Counters
from marketstream.fanout.batching import Batch
from marketstream.fanout.budgets import ReplayBudgets
from marketstream.fanout.dedupe import LivePositions
from marketstream.fanout.recovery import Recoveries
from tests.fanout.doubles import (
    T,
    Conn,
    Feed,
    S,
    T,
    Conn,
    flush,
    Feed,
    finish,
    asked,
    fail,
    make_core,
    live,
    subscribed,
    one_read,
)


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


# --- the recoveries, directly -----------------------------------------------------------


def recoveries(replay_bytes: int = 1000) -> tuple[Recoveries, list]:
    """Recoveries over a real batch and positions; the list gets what is dropped."""
    dropped: list = []
    counters = Counters()
    made = Recoveries(
        ReplayBudgets(replay_bytes), Batch(counters), LivePositions(), counters, 100,
        lambda *why: dropped.append(why),
    )  # fmt: skip
    return made, dropped


def test_one_read_per_stream_waits_for_its_confirmation_and_asks_for_the_largest_share():
    rec, _ = recoveries()
    a, b = Conn("a"), Conn("b")
    assert rec.hold(S, a, Want(since=5)) is True  # a new recovery: its channel is wanted
    assert rec.hold(S, b, Want(snapshot=True)) is False
    assert rec.hold(T, b, Want(since=9)) is True
    assert rec.start(confirmed=set()) == []  # no channel confirmed yet
    [read] = rec.start(confirmed={S}, most=5)
    assert read == Read(S, 5, True, 1, 1000)  # b's share: half, a's: all
    assert rec.streams[S].shares == {a: 1000, b: 500}
    assert rec.start(confirmed={S, T}) == [Read(T, 9, True, 2, 500)]
    assert rec.start(confirmed={S, T}) == []  # both in flight


def test_a_stale_or_failed_read_gives_the_shares_back():
    rec, _ = recoveries()
    a = Conn("a")
    rec.hold(S, a, Want(since=5))
    [read] = rec.start({S})
    assert rec.in_flight(S, read.token + 1) is None  # stale
    assert rec.failed(S, read.token + 1) is False
    rec.streams[S].buffer.append((6, b"live"))
    assert rec.failed(S, read.token) is True
    recovery = rec.streams[S]
    assert recovery.waiting == {a: Want(since=5)} and not recovery.in_flight
    # What was buffered is kept for the next read (a plain stream's
    # messages are in no history).
    assert recovery.buffer == [(6, b"live")] and rec.budgets.budgets[a] == [1000, 1, 0]
    assert rec.failed(S, None) is False  # none in flight
    [again] = rec.start({S})
    assert again.token == read.token + 1


def test_a_recovery_nobody_waits_for_is_forgotten():
    rec, _ = recoveries()
    a = Conn("a")
    rec.hold(S, a, Want(since=5))
    rec.start({S})
    rec.drop(S, a)
    assert a not in rec.budgets
    assert rec.forget_if_idle(S) is False  # its read is still in flight
    rec.link_lost()
    assert rec.forget_if_idle(S) is True and rec.streams == {}
    rec.drop(S, a)  # harmless
    assert rec.forget_if_idle(S) is False


def test_serving_a_read_queues_each_catch_up_once_built_and_makes_listeners():
    rec, dropped = recoveries()
    feed = Feed()
    for _ in range(5):
        feed.publish()
    a, b = Conn("a"), Conn("b")
    rec.hold(S, a, Want(since=2))
    rec.hold(S, b, Want(since=2))
    [read] = rec.start({S})
    recovery = rec.streams[S]
    recovery.buffer.append((5, feed.frame(5)))  # live, already in the history
    listeners: dict = {}
    history = feed.read(read, 100)
    history.entries[0] = (3, b"not a frame")
    assert rec.serve(S, recovery, history, listeners) is True
    assert list(listeners) == [a, b] and recovery.reading == {} and recovery.buffer == []
    assert dropped == [(S.encode(), b"not a frame", "malformed_payload")]
    batch = rec.batch.take()
    assert batch[a] is batch[b]  # one catch-up for both
    for conn, data in batch.items():
        conn.write_frames(data)
    assert a.positions() == [4, 5] and rec.counters.replayed == 4
    assert rec.positions.holding == {S: {a: 5, b: 5}} and rec.positions.delivered[S] == 5
    assert len(rec.budgets) == 0  # both done: their budgets go


def _plain(name: str, n: int) -> bytes:
    return b'{"stream":"%s","data":{"n":%d}}' % (name.encode(), n)


def test_a_plain_message_before_the_read_starts_reaches_the_waiting_connection():
    """Redis's confirmation and a message come in one read: the message is
    handled before the history read starts (scheduled for the next turn).
    A plain stream's messages are in no history: the connection that
    waits with ``snapshot`` still gets it, once."""
    name = "trade.P_Q"
    core = make_core()
    a = Conn("a")
    subscribed(core, a, name, Want(snapshot=True))
    core.on_message(name.encode(), _plain(name, 1))  # before start_reads
    read = one_read(core)
    core.on_message(name.encode(), _plain(name, 2))  # during the read
    finish(core, read, History(None, None, []))
    core.on_message(name.encode(), _plain(name, 3))  # live
    flush(core)
    assert [m["data"]["n"] for m in a.got] == [1, 2, 3]


def test_a_plain_message_during_a_read_reaches_those_waiting_for_the_next():
    name = "trade.P_Q"
    core = make_core()
    a, b = Conn("a"), Conn("b")
    subscribed(core, a, name, Want(snapshot=True))
    first = one_read(core)
    subscribed(core, b, name, Want(snapshot=True))  # waits for the next read
    core.on_message(name.encode(), _plain(name, 1))
    finish(core, first, History(None, None, []))
    core.on_message(name.encode(), _plain(name, 2))
    second = one_read(core)
    finish(core, second, History(None, None, []))
    core.on_message(name.encode(), _plain(name, 3))
    flush(core)
    assert [m["data"]["n"] for m in a.got] == [1, 2, 3]
    assert [m["data"]["n"] for m in b.got] == [1, 2, 3]


def test_what_waits_for_a_read_is_bounded():
    from marketstream.fanout.recovery import MAX_WAITING

    name = "trade.P_Q"
    core = make_core()
    a = Conn("a")
    subscribed(core, a, name, Want(snapshot=True))
    for n in range(MAX_WAITING + 50):
        core.on_message(name.encode(), _plain(name, n))
    assert len(core.recovering[name].buffer) == MAX_WAITING
