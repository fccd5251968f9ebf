"""Derived streams (marketstream.fanout.speeds), driven through a real
:class:`~marketstream.fanout.core.Core` with the recovery script's frames
and ticked as the shell's timers do: top-N books, merged diffs of a book
stream at an update speed, the latest message of a conflatable stream,
and book streams published without snapshots, whose derived streams are
refused.  Every frame is checked against the publisher's own book
(:mod:`tests.fanout.bookflow`)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marketstream.fanout.core import Want
from marketstream.wire.books import book_checksum
from marketstream.wire.deflate import Deflater
from tests.checksums import crc_of
from tests.fanout.bookflow import (
    BookFeed,
    booked,
    Ladder,
    book_core,
    frames,
    got,
    join,
    price,
    seeded,
    send,
    start_book,
)
from tests.fanout.doubles import T, Conn, Feed, flush, live
from tests.fanout.test_compressing import Conn as Deflating

D10 = "depth10.BTC_USDT"
D5 = "depth5.BTC_USDT"
D20 = "depth20.BTC_USDT"
FAST = T + "@100ms"
SLOW = T + "@1000ms"
TICKER = "ticker.BTC_USDT"
TICKER_1S = TICKER + "@1000ms"

FLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tick(core, interval: int = 100) -> bool:
    queued = core.derived.tick(interval)
    flush(core)
    return queued


def assert_top(feed: BookFeed, message: dict, depth: int) -> None:
    """A top-N frame is the publisher's top N at its position, with the
    checksum of the levels sent."""
    book = feed.books[message["seq"]]
    bids, asks = book.top(depth)
    data = message["data"]
    assert data == {"e": "depthTop", "s": "BTC_USDT", "u": data["u"], "b": bids, "a": asks}
    assert message["checksum"] == crc_of(bids, asks) == book_checksum(bids, asks)


# -- top-N books -------------------------------------------------------------------------


def test_a_top_n_stream_sends_the_top_when_it_changed_and_only_then():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    booked(core, feed, a, [D10])
    assert core.derived.intervals() == {100}
    assert tick(core)
    [first] = got(core, a, D10)
    assert_top(feed, first, 10)
    assert first["data"]["u"] == feed.u and first["seq"] == feed.latest
    assert not tick(core) and got(core, a, D10) == []  # nothing changed
    send(core, feed, feed.diff([[price(10), "4"]], [[price(390), "4"]]))  # under the top 10
    assert not tick(core) and got(core, a, D10) == []
    send(core, feed, feed.diff([[price(95), "8"]]))  # in the top 10
    send(core, feed, feed.diff([], [[price(300), "0"]]))
    assert tick(core)
    [changed] = got(core, a, D10)
    assert_top(feed, changed, 10)
    assert changed["seq"] == feed.latest and changed["data"]["u"] == feed.u
    assert a.got == [], "nothing of the book stream itself"


def test_a_top_n_checksum_is_of_the_levels_sent():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    booked(core, feed, a, [D5, D20])
    tick(core)
    [five], [twenty] = got(core, a, D5), got(core, a, D20)
    assert_top(feed, five, 5)
    assert_top(feed, twenty, 20)
    assert len(twenty["data"]["b"]) == 12  # the whole book: 12 levels a side
    assert five["checksum"] != feed.checksum(feed.latest)  # not the book's top 10
    assert twenty["checksum"] == feed.checksum(feed.latest)  # N >= 10: the book's own


def test_a_new_top_n_subscriber_gets_the_current_top_and_the_others_no_repeat():
    core, feed, a, b = book_core(), BookFeed(), Conn("a"), Conn("b")
    booked(core, feed, a, [D10])
    tick(core)
    got(core, a, D10)
    join(core, b, [D10])
    assert tick(core)
    [current] = got(core, b, D10)
    assert_top(feed, current, 10)
    assert got(core, a, D10) == [], "the top did not change: nothing for a"
    send(core, feed, feed.diff([[price(99), "0"]]))
    tick(core)
    assert got(core, a, D10) == got(core, b, D10) != []


def test_derived_frames_wait_for_the_book():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    seeded(core, feed)
    join(core, a, [D10, FAST])
    assert not tick(core) and a.got == []
    start_book(core, feed)
    assert tick(core) and {m["stream"] for m in a.got} == {D10, FAST}


def test_each_derived_frame_is_built_once_for_all_its_subscribers():
    core, feed = book_core(), BookFeed()
    conns = [Conn(str(i)) for i in range(5)]
    booked(core, feed, conns[0], [D10, FAST])
    for conn in conns[1:]:
        join(core, conn, [D10, FAST])
    tick(core)
    send(core, feed, feed.diff([[price(99), "3"]]))
    core.derived.tick(100)
    batch = core.take_batch()
    writes = {batch[conn] for conn in conns}
    assert len(writes) == 1  # the same bytes: the merged diff then the top


def test_compressing_subscribers_get_the_same_derived_frames():
    core = book_core(deflater=Deflater(16))
    feed, a, z = BookFeed(), Deflating("a"), Deflating("z")
    booked(core, feed, a, [D10])
    core.register(z, compressing=True)
    core.subscribe(z, [D10])
    assert core.derived.tick(100)
    for conn, data in core.take_batch().items():
        conn.writes.append(data)
    assert z.compressed() == [True] and a.compressed() == [False]
    [plain], [inflated] = a.messages(), z.messages()
    assert plain == inflated
    assert_top(feed, json.loads(plain), 10)


# -- merged diffs --------------------------------------------------------------------


def test_a_speed_sends_the_book_then_one_merged_diff_per_interval_with_changes():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    booked(core, feed, a, [FAST])
    tick(core)
    [state] = got(core, a, FAST)
    assert state["data"]["e"] == "depthSnapshot" and state["data"]["u"] == feed.u
    assert (state["data"]["b"], state["data"]["a"]) == feed.ladder.top()
    assert state["seq"] == feed.latest and state["checksum"] == feed.checksum(feed.latest)
    first = feed.u + 1
    send(core, feed, feed.diff([[price(99), "0"], [price(50), "1"]], [], ids=2))
    send(core, feed, feed.diff([[price(50), "2"]], [[price(305), "0"]]))
    last = send(core, feed, feed.diff([], [[price(290), "1.5"]]))
    assert tick(core)
    [merged] = got(core, a, FAST)
    data = merged["data"]
    assert (data["e"], data["U"], data["u"]) == ("depth", first, feed.u)
    assert data["b"] == [[price(99), "0"], [price(50), "2"]]
    assert data["a"] == [[price(290), "1.5"], [price(305), "0"]]
    assert merged["seq"] == last and merged["checksum"] == feed.checksum(last)
    assert not tick(core) and got(core, a, FAST) == []  # nothing changed
    assert not tick(core, 1000)  # another interval's timer: nothing of this one


def test_a_new_speed_subscriber_gets_the_book_and_the_others_the_change():
    core, feed, a, b = book_core(), BookFeed(), Conn("a"), Conn("b")
    booked(core, feed, a, [FAST])
    tick(core)
    got(core, a, FAST)
    seq = send(core, feed, feed.diff([[price(99), "7"]]))
    join(core, b, [FAST])
    tick(core)
    [change], [state] = got(core, a, FAST), got(core, b, FAST)
    assert change["data"]["e"] == "depth" and change["seq"] == seq
    assert state["data"]["e"] == "depthSnapshot" and state["seq"] == seq
    assert state["checksum"] == change["checksum"] == feed.checksum(seq)


def test_after_a_gap_upstream_every_speed_subscriber_gets_the_book_again():
    core, feed, a, b = book_core(), BookFeed(), Conn("a"), Conn("b")
    booked(core, feed, a, [FAST])
    join(core, b, [FAST])
    tick(core)
    send(core, feed, feed.diff([[price(98), "1"]]))
    seq = send(core, feed, feed.gap([[price(97), "1"]]))
    assert core.counters.book_resyncs == 1
    assert not tick(core)  # unsynced: nothing, not even the diff before the gap
    feed.store_snapshot(seq)
    send(core, feed, feed.diff([[price(96), "1"]]))
    start_book(core, feed)
    assert tick(core)
    for conn in (a, b):
        [state] = got(core, conn, FAST)[-1:]
        assert state["data"]["e"] == "depthSnapshot" and state["seq"] == feed.latest
        assert (state["data"]["b"], state["data"]["a"]) == feed.ladder.top()


STEPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("diff"),
            st.lists(st.tuples(st.integers(0, 120).map(price), st.sampled_from(["0", "1", "2.5"]))),
            st.lists(st.tuples(st.integers(200, 320).map(price), st.sampled_from(["0", "3"]))),
        ),
        st.tuples(st.sampled_from(["tick", "join", "gap"]), st.just([]), st.just([])),
    ),
    max_size=50,
)


class Client:
    """A client's book from a derived stream's frames, checked as it goes."""

    def __init__(self) -> None:
        self.ladder: Ladder | None = None
        self.u = 0

    def take(self, message: dict) -> None:
        data = message["data"]
        if data["e"] == "depthSnapshot":
            self.ladder = Ladder()
        else:
            assert self.ladder is not None and data["U"] == self.u + 1  # contiguous
        self.ladder.apply_data(data)
        self.u = data["u"]
        assert message["checksum"] == self.ladder.checksum()


@FLOW
@given(steps=STEPS)
def test_merged_diffs_of_a_random_flow_rebuild_the_publishers_book(steps):
    core, feed = book_core(), BookFeed()
    conns = [Conn("a")]
    booked(core, feed, conns[0], [FAST, D5, D20])
    clients = {conns[0]: Client()}
    tops: dict[tuple[Conn, str], tuple] = {}

    def ticked() -> None:
        tick(core)
        for conn, client in clients.items():
            for message in frames(conn, FAST):
                assert message["checksum"] == feed.checksum(message["seq"])
                client.take(message)
            for name, depth in ((D5, 5), (D20, 20)):
                for message in frames(conn, name):
                    assert_top(feed, message, depth)
                    top = (message["data"]["b"], message["data"]["a"])
                    assert tops.get((conn, name)) != top, "sent when the top changed only"
                    tops[conn, name] = top
            conn.got = []

    for kind, bids, asks in steps:
        if kind == "diff":
            send(core, feed, feed.diff(bids, asks))
        elif kind == "tick":
            ticked()
        elif kind == "join":
            conn = Conn(str(len(conns)))
            conns.append(conn)
            clients[conn] = Client()
            join(core, conn, [FAST, D5, D20])
        else:
            seq = send(core, feed, feed.gap(bids))
            feed.store_snapshot(seq)
            start_book(core, feed)
    ticked()
    for client in clients.values():
        assert client.ladder is not None
        assert client.ladder.top() == feed.ladder.top() and client.u == feed.u


# -- the latest message ----------------------------------------------------------------


def ticker(seq: int) -> bytes:
    return b'{"stream":"%s","data":{"e":"24hrTicker","c":"%d"},"seq":%d}' % (
        TICKER.encode(),
        seq,
        seq,
    )


def test_a_speed_of_a_ticker_sends_the_latest_message_of_the_interval_renamed():
    core, a = book_core(), Conn("a")
    feed = Feed(TICKER)
    feed.frame = ticker
    join(core, a, [TICKER_1S])
    assert core.derived.intervals() == {1000} and TICKER in core.wanted()
    assert not tick(core, 1000)  # nothing seen yet
    live(core, feed, 3)
    assert not tick(core, 100)
    assert tick(core, 1000)
    assert a.got == [{"stream": TICKER_1S, "data": {"e": "24hrTicker", "c": "3"}, "seq": 3}]
    a.got = []
    assert not tick(core, 1000) and a.got == []  # nothing new
    live(core, feed, 1)
    tick(core, 1000)
    assert [m["seq"] for m in a.got] == [4]


def test_a_ticker_speed_with_snapshot_gets_the_latest_seen_at_its_first_tick():
    core, a, b = book_core(), Conn("a"), Conn("b")
    feed = Feed(TICKER)
    feed.frame = ticker
    join(core, a, [TICKER_1S])
    live(core, feed, 2)
    tick(core, 1000)
    join(core, b, [TICKER_1S], {TICKER_1S: Want(snapshot=True)})
    assert tick(core, 1000)
    assert [m["seq"] for m in b.got] == [2] and [m["seq"] for m in a.got] == [2]
    c = Conn("c")
    join(core, c, [TICKER_1S])  # without snapshot: the next new message
    assert not tick(core, 1000) and c.got == []


def ticker_feed() -> Feed:
    """A ticker published with itself as the snapshot, 3 times, before anyone here read it."""
    feed = Feed(TICKER, snapshot_every=1)
    feed.frame = ticker
    for _ in range(3):
        feed.publish()
    return feed


def test_a_ticker_speeds_first_snapshot_subscriber_gets_the_streams_snapshot():
    """Nothing seen on the stream yet: its snapshot in Redis is read and
    sent at the first tick, as the latest message."""
    core, feed, a = book_core(), ticker_feed(), Conn("a")
    join(core, a, [TICKER_1S], {TICKER_1S: Want(snapshot=True)})
    [read] = core.start_reads()
    assert (read.stream, read.after, read.snapshot, read.token < 0) == (TICKER, None, True, True)
    assert core.reads_due is False  # one read, not one per tick
    assert core.read_done(TICKER, feed.read(read, core.max_replay), read.token) is False
    assert tick(core, 1000)
    # The stream's snapshot (the test feed's own shape), renamed.
    assert a.got == [{"stream": TICKER_1S, "data": {"e": "snap", "at": 3}, "seq": 3}]
    assert not tick(core, 1000)  # nothing new


def test_a_message_newer_than_the_snapshot_read_wins():
    core, feed, a = book_core(), ticker_feed(), Conn("a")
    join(core, a, [TICKER_1S], {TICKER_1S: Want(snapshot=True)})
    [read] = core.start_reads()
    history = feed.read(read, core.max_replay)
    live(core, feed, 1)  # 4 arrives live before the read's answer
    core.read_done(TICKER, history, read.token)
    tick(core, 1000)
    assert [m["seq"] for m in a.got] == [4]


def test_a_ticker_speed_without_snapshot_reads_nothing():
    core, a = book_core(), Conn("a")
    join(core, a, [TICKER_1S])
    assert core.start_reads() == [] and not core.reads_due


def test_a_failed_or_lost_snapshot_read_is_done_again_and_a_stale_one_ignored():
    core, feed, a = book_core(), ticker_feed(), Conn("a")
    join(core, a, [TICKER_1S], {TICKER_1S: Want(snapshot=True)})
    [read] = core.start_reads()
    core.read_failed(TICKER, read.token)
    [again] = core.start_reads()
    assert again.token != read.token
    core.read_done(TICKER, feed.read(read, core.max_replay), read.token)  # the failed one: late
    assert not tick(core, 1000)
    core.link_lost()
    core.link_restored({TICKER})
    core.upstream_confirmed(TICKER)
    [third] = core.start_reads()
    core.read_done(TICKER, feed.read(again, core.max_replay), again.token)  # void: the link went
    assert not tick(core, 1000)
    core.read_done(TICKER, feed.read(third, core.max_replay), third.token)
    assert tick(core, 1000) and [m["seq"] for m in a.got] == [3]


def test_a_snapshot_read_for_a_stream_nobody_wants_any_more_is_dropped():
    core, feed, a = book_core(), ticker_feed(), Conn("a")
    join(core, a, [TICKER_1S], {TICKER_1S: Want(snapshot=True)})
    [read] = core.start_reads()
    core.unsubscribe(a, [TICKER_1S])
    core.read_done(TICKER, feed.read(read, core.max_replay), read.token)
    assert core.derived.latest == {} and core.latest_taps.reading == {}
    assert core.start_reads() == []


def test_plain_and_publishers_own_envelopes_are_renamed_too():
    core, a = book_core(), Conn("a")
    join(core, a, [TICKER_1S])
    core.on_message(TICKER.encode(), b'{"stream":"%s","data":{"c":"1"}}' % TICKER.encode())
    tick(core, 1000)
    core.on_message(TICKER.encode(), b'{"data":{"c":"2"},"stream":"%s"}' % TICKER.encode())
    tick(core, 1000)
    assert a.got == [
        {"stream": TICKER_1S, "data": {"c": "1"}},
        {"stream": TICKER_1S, "data": {"c": "2"}},
    ]


def test_a_ticker_with_live_listeners_and_a_speed_serves_both():
    core, a, b = book_core(), Conn("a"), Conn("b")
    feed = Feed(TICKER)
    feed.frame = ticker
    join(core, a, [TICKER])
    join(core, b, [TICKER_1S])
    live(core, feed, 3)
    tick(core, 1000)
    assert [m["seq"] for m in a.got] == [1, 2, 3] and [m["seq"] for m in b.got] == [3]
    core.unsubscribe(b, [TICKER_1S])
    assert TICKER in core.wanted() and core.taps == {}
    core.unsubscribe(a, [TICKER])
    assert core.wanted() == set()


# -- book streams without snapshots ----------------------------------------------------


def test_derived_streams_of_a_book_stream_without_snapshots_are_refused():
    core, feed, a, b = book_core(), BookFeed(), Conn("a"), Conn("b")
    for i in range(3):
        feed.diff([[price(i), "1"]])  # positions, no snapshot
    join(core, a, [D10, FAST, TICKER_1S])
    join(core, b, [T])
    [read] = core.start_reads()
    assert core.read_done(T, feed.read(read, core.max_replay), read.token) is True
    flush(core)
    notices = {m["stream"]: m["data"] for m in a.got}
    assert set(notices) == {D10, FAST}
    for name, data in notices.items():
        assert data["e"] == "unsubscribed" and data["reason"] == "no_book"
        assert T in data["msg"] and name in data["msg"]
    assert core.subscriptions(a) == [TICKER_1S]
    assert core.counters.rejected_streams == 2 and core.counters.rejected["no_book"] == 2
    assert core.derived.bookless(D10) == T and core.derived.bookless(TICKER_1S) is None
    assert core.derived.intervals() == {1000}
    send(core, feed, feed.diff([[price(9), "1"]]))  # the stream itself: as it is
    [plain] = got(core, b, T)
    assert "checksum" not in plain and plain["seq"] == feed.latest
    core.unsubscribe(b, [T])
    assert core.books.streams == {} and T not in core.wanted()


def test_a_plain_publish_book_stream_has_no_book_and_its_only_derived_subscriber_leaves():
    core, a = book_core(), Conn("a")
    join(core, a, [D5])
    [read] = core.start_reads()
    core.on_message(T.encode(), b'{"stream":"%s","data":{"e":"depth"}}' % T.encode())
    core.read_done(T, Feed(T).read(read, core.max_replay), read.token)
    flush(core)
    assert [m["data"]["reason"] for m in a.got] == ["no_book"]
    assert core.subscriptions(a) == [] and core.books.streams == {}
    assert core.wanted() == set() and core.taps == {}
    assert core.derived.streams == {} and core.derived.intervals() == set()
