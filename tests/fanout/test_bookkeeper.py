"""The server books (marketstream.fanout.bookkeeper), driven through a real
:class:`~marketstream.fanout.core.Core` with the recovery script's frames:
a book starts from its snapshot read, then every frame of its stream
carries the checksum of the publisher's own book after it (computed here
on its own, :mod:`tests.checksums`); gaps and malformed data unsync it
and a new start read syncs it again; catch-ups carry checksums too; what
a book buffers or remembers is bounded."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marketstream.fanout import bookkeeper
from marketstream.fanout.bookkeeper import MAX_BUFFERED, RECENT
from marketstream.fanout.core import Want
from marketstream.wire.books import book_checksum
from tests.fanout.bookflow import (
    BookFeed,
    booked,
    book_core,
    got,
    join,
    price,
    seeded,
    send,
    start_book,
)
from tests.fanout.doubles import S, T, Conn, Feed, finish, flush, live

FLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_checksums(feed: BookFeed, messages: list[dict]) -> None:
    """Each message carries the checksum of the publisher's book after it."""
    for message in messages:
        book = feed.books[message["seq"]]
        assert message["checksum"] == book.checksum() == book_checksum(*book.top(10)), message


def test_a_book_starts_from_its_snapshot_then_entries_then_what_arrived_during_the_read():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    seeded(core, feed)  # position 1, and the snapshot after it
    for i in range(3):  # 2..4: only in the history
        feed.diff([[price(90 + i), "5"]], [[price(310 + i), "0"]])
    join(core, a, [T])
    [read] = core.start_reads()
    assert read.token < 0 and read.snapshot and read.after is None
    send(core, feed, feed.diff([[price(100), "0"]]))  # 5: live, and in the history read
    history = feed.read(read, core.max_replay)
    send(core, feed, feed.diff([], [[price(299), "3"]]))  # 6: live only
    assert got(core, a, T) == [], "held back until the book has started"

    finish(core, read, history)
    book = core.books.streams[T].book
    assert (book.bids(), book.asks()) == feed.ladder.top()  # each diff applied once
    assert book.u == feed.u and book.seq == 6
    held = got(core, a, T)
    assert [m["seq"] for m in held] == [5, 6]
    assert_checksums(feed, held)
    assert core.counters.books_started == 1 and core.counters.book_resyncs == 0
    for i in range(5):
        send(core, feed, feed.diff([[price(101 + i), "1.5"]], [[price(300 + i), "0"]]))
    sent = got(core, a, T)
    assert [m["seq"] for m in sent] == [7, 8, 9, 10, 11]
    assert_checksums(feed, sent)
    assert list(sent[0]) == ["stream", "data", "seq", "checksum"]  # right after "seq"


def test_frames_of_other_streams_are_left_as_they_are():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    trades = Feed(S)
    booked(core, feed, a, [T])
    join(core, a, [S])
    live(core, trades, 2)
    flush(core)
    assert a.got == [{"stream": S, "data": {"i": i}, "seq": i} for i in (1, 2)]


def test_frames_until_the_start_read_ends_are_held_back_then_carry_checksums():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    seeded(core, feed)
    core.register(a)
    core.subscribe(a, [T])
    assert core.start_reads() == []  # not before Redis confirmed the channel
    send(core, feed, feed.diff([[price(50), "1"]]))
    core.upstream_confirmed(T)
    [read] = core.start_reads()
    send(core, feed, feed.diff([[price(51), "1"]]))
    assert not core.books.synced(T)
    assert got(core, a, T) == []
    assert core.read_done(T, feed.read(read, core.max_replay), read.token)  # a flush is due
    send(core, feed, feed.diff([[price(52), "1"]]))
    sent = got(core, a, T)
    assert [m["seq"] for m in sent] == [2, 3, 4]  # in order, each once
    assert_checksums(feed, sent)


def test_a_failed_start_read_keeps_holding_then_reads_that_back_off_let_frames_go_as_they_are():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    seeded(core, feed)
    join(core, a, [T])
    [read] = core.start_reads()
    send(core, feed, feed.diff([[price(50), "1"]]))
    core.read_failed(T, read.token)  # the first failure: read again at once
    assert got(core, a, T) == []
    [again] = core.start_reads()
    core.read_failed(T, again.token)  # again: the next read waits, frames go out
    sent = got(core, a, T)
    assert [m["seq"] for m in sent] == [2] and "checksum" not in sent[0]
    send(core, feed, feed.diff([[price(51), "1"]]))
    assert [("checksum" in m) for m in got(core, a, T)] == [False]


def test_a_gap_unsyncs_the_book_counts_a_resync_and_reads_the_snapshot_again():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    booked(core, feed, a, [T])
    send(core, feed, feed.diff([[price(60), "1"]]))
    seq = send(core, feed, feed.gap([[price(61), "1"]]))  # U does not follow
    feed.store_snapshot(seq)  # the publisher starts over
    send(core, feed, feed.diff([[price(62), "1"]]))
    sent = got(core, a, T)
    assert [("checksum" in m) for m in sent] == [True]  # then held back
    assert core.counters.book_resyncs == 1 and not core.books.synced(T)
    [read] = core.start_reads()  # a new start read is due
    assert read.token < 0 and read.snapshot
    finish(core, read, feed.read(read, core.max_replay))
    assert core.books.synced(T) and core.counters.books_started == 2
    send(core, feed, feed.diff([[price(63), "1"]]))
    sent = got(core, a, T)
    assert [m["seq"] for m in sent] == [seq, seq + 1, seq + 2]
    assert_checksums(feed, sent)


@pytest.mark.parametrize(
    "data",
    [
        b'{"e":"depth","U":"x","u":3,"b":[],"a":[]}',
        b'{"e":"depth","U":3,"u":2,"b":[],"a":[]}',
        b'{"e":"depth","U":@U,"u":@U,"b":[["1"]],"a":[]}',
        b'{"e":"depth","U":@U,"u":@U,"b":[[1, 2]],"a":[]}',
        b'{"e":"depth","U":@U,"u":@U,"b":[["x","1"]],"a":[]}',
        b'{"e":"depth","U":@U,"u":@U,"b":[["NaN","1"]],"a":[]}',
        b'{"e":"depth","U":@U,"u":@U,"b":[["1","-1"]],"a":[]}',
        b'{"e":"depth","U":@U,"u":@U,"b":{"1":"1"},"a":[]}',
        b'{"e":"depthSnapshot","u":"1","b":[],"a":[]}',
        b'{"e":"depth","U":true,"u":true,"b":[],"a":[]}',
    ],
)
def test_data_the_book_cannot_read_is_delivered_and_the_book_reads_again(data):
    core, feed, a = book_core(), BookFeed(), Conn("a")
    booked(core, feed, a, [T])
    data = data.replace(b"@U", b"%d" % (feed.u + 1))
    seq = (feed.latest or 0) + 1
    frame = b'{"stream":"%s","data":%s,"seq":%d}' % (T.encode(), data, seq)
    send(core, feed, feed.publish_data({}, frame))
    assert got(core, a, T) == []  # held back while the book reads its snapshot again
    assert core.counters.book_resyncs == 1 and T in core.books.pending
    feed.store_snapshot(seq)
    start_book(core, feed)
    send(core, feed, feed.diff([[price(70), "1"]]))
    sent = got(core, a, T)
    assert [m["seq"] for m in sent] == [seq, seq + 1]
    assert sent[0]["data"] == json.loads(data)  # as published, with the book's checksum there
    assert_checksums(feed, sent)


@pytest.mark.parametrize("data", [b'"text"', b"[1,2]", b"{", b"{}}"])
def test_a_frame_that_is_not_the_recovery_scripts_is_dropped_before_the_book(data):
    core, feed, a = book_core(), BookFeed(), Conn("a")
    booked(core, feed, a, [T])
    seq = (feed.latest or 0) + 1
    frame = b'{"stream":"%s","data":%s,"seq":%d}' % (T.encode(), data, seq)
    send(core, feed, feed.publish_data({}, frame))
    assert got(core, a, T) == [] and core.counters.dropped_malformed == 1
    assert core.books.synced(T) and core.counters.book_resyncs == 0


def test_a_snapshot_the_book_cannot_read_leaves_the_stream_served_as_it_is():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    data = b'{"e":"depthSnapshot","u":1,"b":[["x","1"]],"a":[]}'
    feed.publish_data({}, b'{"stream":"%s","data":%s,"seq":1}' % (T.encode(), data))
    feed.snapshot = feed.log[-1]
    join(core, a, [T])
    start_book(core, feed)
    assert not core.books.synced(T) and core.books.streams[T].bookless
    send(core, feed, feed.diff([[price(70), "1"]]))
    assert [("checksum" in m) for m in got(core, a, T)] == [False]


def test_a_stale_or_failed_start_read_is_read_again():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    seeded(core, feed)
    join(core, a, [T])
    [read] = core.start_reads()
    assert core.read_done(T, feed.read(read, 0), read.token - 1) is False  # not this read's
    assert not core.books.synced(T)
    core.read_failed(T, read.token)
    [again] = core.start_reads()
    assert again.token != read.token
    finish(core, read, feed.read(read, 0))  # the failed one answers late: ignored
    assert not core.books.synced(T)
    finish(core, again, feed.read(again, 0))
    assert core.books.synced(T)


def test_after_a_link_outage_every_book_reads_its_snapshot_again():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    booked(core, feed, a, [T])
    send(core, feed, feed.diff([[price(79), "1"]]))
    got(core, a, T)
    core.link_lost()
    assert core.start_reads() == [] and not core.books.synced(T)
    missed = feed.diff([[price(80), "1"]])[0]
    feed.store_snapshot(missed)
    core.link_restored({T})
    core.upstream_confirmed(T)
    reads = sorted(core.start_reads(), key=lambda read: read.token)
    assert [read.token < 0 for read in reads] == [True, False]  # the book's, a's repair
    for read in reads:
        finish(core, read, feed.read(read, core.max_replay))
    assert core.books.synced(T)
    send(core, feed, feed.diff([[price(81), "1"]]))
    sent = got(core, a, T)
    assert [m["seq"] for m in sent] == [missed, missed + 1]
    assert_checksums(feed, sent)


def test_a_catch_up_carries_checksums_from_the_reads_snapshot_on():
    core, feed, a, b = book_core(), BookFeed(), Conn("a"), Conn("b")
    booked(core, feed, a, [T])
    for i in range(4):
        send(core, feed, feed.diff([[price(20 + i), "2"]]))
    feed.store_snapshot(feed.latest)
    for i in range(3):
        send(core, feed, feed.diff([], [[price(320 + i), "2"]]))
    join(core, b, [T], {T: Want(snapshot=True)})
    [read] = core.start_reads()
    history = feed.read(read, core.max_replay)
    send(core, feed, feed.diff([[price(30), "9"]]))  # live during the read
    finish(core, read, history)
    send(core, feed, feed.diff([[price(31), "9"]]))
    sent = got(core, b, T)
    assert sent[0]["data"]["e"] == "depthSnapshot" and sent[0]["seq"] == 5
    assert [m["seq"] for m in sent] == list(range(5, 11))
    assert_checksums(feed, sent)


def test_catch_up_entries_older_than_the_snapshot_take_the_books_recent_checksums():
    core, feed, a, b = book_core(), BookFeed(), Conn("a"), Conn("b")
    booked(core, feed, a, [T])  # the snapshot at 1
    for i in range(6):
        send(core, feed, feed.diff([[price(20 + i), "2"]], [[price(301 + i), "0"]]))
    feed.store_snapshot(feed.latest)  # at 7
    send(core, feed, feed.diff([[price(40), "2"]]))
    join(core, b, [T], {T: Want(since=3)})
    [read] = core.start_reads()
    finish(core, read, feed.read(read, core.max_replay))
    sent = got(core, b, T)
    assert [m["seq"] for m in sent] == [4, 5, 6, 7, 8]
    assert_checksums(feed, sent)


def test_catch_up_entries_the_book_never_saw_have_no_checksum():
    """3 and 4 are older than the snapshot the book started from: no book
    can give them a checksum (it cannot run backwards); the resume still
    gets every message it missed, the newer ones checked."""
    core, feed, a, b = book_core(), BookFeed(), Conn("a"), Conn("b")
    seeded(core, feed)
    for i in range(4):  # before the server kept the book
        feed.diff([[price(20 + i), "2"]])
    feed.store_snapshot(feed.latest)  # at 5
    send(core, feed, feed.diff([[price(40), "2"]]))
    join(core, a, [T])
    start_book(core, feed)
    send(core, feed, feed.diff([[price(41), "2"]]))
    join(core, b, [T], {T: Want(since=2)})
    [read] = core.start_reads()
    finish(core, read, feed.read(read, core.max_replay))
    sent = got(core, b, T)
    assert [m["seq"] for m in sent] == [3, 4, 5, 6, 7]
    assert [("checksum" in m) for m in sent] == [False, False, True, True, True]
    assert_checksums(feed, sent[2:])


def test_a_frame_older_than_a_snapshot_stored_during_the_start_read_has_no_checksum():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    seeded(core, feed)
    join(core, a, [T])
    [read] = core.start_reads()
    send(core, feed, feed.diff([[price(50), "1"]]))  # 2
    at = send(core, feed, feed.diff([[price(51), "1"]]))  # 3, then the publisher's snapshot
    feed.store_snapshot(at)
    history = feed.read(read, core.max_replay)
    send(core, feed, feed.diff([[price(52), "1"]]))  # 4
    finish(core, read, history)
    sent = got(core, a, T)
    assert [m["seq"] for m in sent] == [2, 3, 4]  # every frame, in order
    assert "checksum" not in sent[0]
    assert_checksums(feed, sent[1:])


def test_the_recent_checksums_are_bounded():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    booked(core, feed, a, [T])
    for i in range(RECENT + 50):
        send(core, feed, feed.diff([[price(i % 80), str(i % 7)]]))
    core.take_batch()
    recent = core.books.streams[T].recent
    assert len(recent) == RECENT
    assert min(recent) == (feed.latest or 0) - RECENT + 1


def test_the_buffer_during_a_start_read_is_bounded_and_then_the_read_is_done_again():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    seeded(core, feed)
    join(core, a, [T])
    [read] = core.start_reads()
    history = feed.read(read, core.max_replay)
    kept = core.books.streams[T]
    for i in range(MAX_BUFFERED + 5):
        send(core, feed, feed.diff([[price(i % 80), str(i % 5)]]))
        assert kept.buffer is None or len(kept.buffer) <= MAX_BUFFERED
    assert kept.buffer is None  # past the bound: nothing more kept
    sent = got(core, a, T)  # what was held went out as it is, in order, then the rest
    assert [m["seq"] for m in sent] == list(range(2, MAX_BUFFERED + 7))
    assert not any("checksum" in m for m in sent)
    finish(core, read, history)
    assert not core.books.synced(T) and core.counters.books_started == 0
    seq = send(core, feed, feed.diff([[price(90), "1"]]))
    assert got(core, a, T) == []  # held again for the read done again
    feed.store_snapshot(seq)
    start_book(core, feed)
    send(core, feed, feed.diff([[price(91), "1"]]))
    sent = got(core, a, T)
    assert [m["seq"] for m in sent] == [seq, seq + 1]
    assert_checksums(feed, sent)


def test_the_buffer_bound_is_the_modules(monkeypatch):
    """The bound is read where it applies (a smaller one is honoured)."""
    monkeypatch.setattr(bookkeeper, "MAX_BUFFERED", 3)
    core, feed, a = book_core(), BookFeed(), Conn("a")
    seeded(core, feed)
    join(core, a, [T])
    core.start_reads()
    for i in range(3):
        send(core, feed, feed.diff([[price(i), "1"]]))
    assert len(core.books.streams[T].buffer) == 3
    send(core, feed, feed.diff([[price(9), "1"]]))
    assert core.books.streams[T].buffer is None


# -- a random order flow -------------------------------------------------------------

QTYS = st.sampled_from(["0", "0", "0.000", "1", "2.50", "0.001", "7", "12.0"])
BID = st.tuples(st.integers(0, 120).map(price), QTYS)
ASK = st.tuples(st.integers(200, 320).map(price), QTYS)
STEP = st.one_of(
    st.tuples(st.just("diff"), st.lists(BID, max_size=5), st.lists(ASK, max_size=5)),
    st.tuples(st.just("snapshot"), st.just([]), st.just([])),
)


@FLOW
@given(
    before=st.lists(STEP, max_size=20),
    during=st.lists(STEP, max_size=10),
    split=st.integers(0, 10),
    after=st.lists(STEP, min_size=1, max_size=40),
    since=st.integers(0, 60),
)
def test_every_frame_of_a_random_flow_carries_the_publishers_checksum(
    before, during, split, after, since
):
    """History before the book starts, frames during its read (some also in
    the history), then live frames and a catch-up: every frame with a
    checksum has the publisher's, and every frame after the read has one."""
    core, feed, a, b = book_core(), BookFeed(), Conn("a"), Conn("b")
    seeded(core, feed)

    def step(kind, bids, asks, deliver):
        if kind == "snapshot":
            feed.store_snapshot(feed.latest)
        elif deliver:
            send(core, feed, feed.diff(bids, asks))
        else:
            feed.diff(bids, asks)

    for kind, bids, asks in before:
        step(kind, bids, asks, False)
    join(core, a, [T])
    [read] = core.start_reads()
    history = None
    for i, (kind, bids, asks) in enumerate(during):
        if i == split:
            history = feed.read(read, core.max_replay)
        step(kind, bids, asks, True)
    history = history or feed.read(read, core.max_replay)
    finish(core, read, history)
    held = got(core, a, T)  # held back during the read, released once it ended
    assert history.snapshot is not None
    # Only a frame older than a snapshot stored during the read has none.
    assert all("checksum" in m for m in held if m["seq"] >= history.snapshot[0])
    assert_checksums(feed, [m for m in held if "checksum" in m])
    assert [m["seq"] for m in held] == sorted({m["seq"] for m in held})
    during_read = len(held)
    assert core.books.synced(T)
    for kind, bids, asks in after:
        step(kind, bids, asks, True)
    sent = got(core, a, T)
    assert all("checksum" in m for m in sent)
    assert_checksums(feed, sent)
    assert during_read == sum(kind == "diff" for kind, _, _ in during)

    join(core, b, [T], {T: Want(since=min(since, feed.latest or 0))})
    [read] = core.start_reads()
    finish(core, read, feed.read(read, core.max_replay))
    caught_up = got(core, b, T)
    assert_checksums(feed, [m for m in caught_up if "checksum" in m])
    snapshot_at = feed.snapshot[0] if feed.snapshot else None
    for message in caught_up:  # from the snapshot on, all are known
        if snapshot_at is not None and message["seq"] >= snapshot_at:
            assert "checksum" in message


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_start_reads_that_keep_failing_back_off_and_a_sync_resets_them():
    """A stored history with a hole after its snapshot fails every start
    read: they are done again at once, then ever further apart (at most
    RETRY_MAX), not back to back."""
    core, feed, a, clock = book_core(), BookFeed(), Conn("a"), Clock()
    core.books.clock = clock
    seeded(core, feed)
    seq = send(core, feed, feed.gap([[price(61), "1"]]))  # stored, with a hole before it
    join(core, a, [T])
    delays = []
    for _ in range(8):
        reads = [read for read in core.start_reads() if read.token < 0]
        if not reads:  # not yet: how long until it is
            before = clock.now
            while not reads:
                clock.now += 0.01
                reads = [read for read in core.start_reads() if read.token < 0]
            delays.append(round(clock.now - before, 2))
        finish(core, reads[0], feed.read(reads[0], core.max_replay))
        assert not core.books.synced(T)
    assert delays == sorted(delays) and delays[0] <= 0.06 and delays[-1] <= bookkeeper.RETRY_MAX
    assert delays[-1] > 1.0  # backed off
    feed.store_snapshot(seq)  # the publisher stores a snapshot after the hole
    clock.now += bookkeeper.RETRY_MAX
    start_book(core, feed)
    assert core.books.synced(T) and core.streams[T]
    assert core.books.streams[T].failures == 0


def test_a_stream_found_without_snapshots_is_looked_at_again_later():
    core, feed, a, b, clock = book_core(), BookFeed(), Conn("a"), Conn("b"), Clock()
    core.books.clock = clock
    feed.diff([[price(1), "1"]])  # positions, no snapshot
    join(core, a, [T])
    start_book(core, feed)
    assert core.books.bookless(T) and core.derived.bookless("depth10.BTC_USDT") == T
    clock.now += bookkeeper.BOOKLESS_FOR
    assert not core.books.bookless(T)  # a while ago: a new subscriber makes it look again
    seeded(core, feed)  # the publisher stores snapshots now
    join(core, b, ["depth10.BTC_USDT"])
    start_book(core, feed)
    assert core.books.synced(T)
    core.derived.tick(100)
    [top] = got(core, b, "depth10.BTC_USDT")
    assert top["data"]["e"] == "depthTop" and top["data"]["b"]


def test_a_diff_sent_again_at_a_new_position_carries_the_books_checksum():
    """The publisher repeats a diff the book has (its ``u`` not past the
    book's) under a new position: the book is as it was, and so is its
    checksum, live and in a catch-up."""
    core, feed, a, b = book_core(), BookFeed(), Conn("a"), Conn("b")
    booked(core, feed, a, [T])
    first = send(core, feed, feed.diff([[price(60), "1"]]))
    again = send(core, feed, feed.publish_data(json.loads(dict(feed.log)[first])["data"]))
    send(core, feed, feed.diff([[price(61), "1"]]))
    sent = got(core, a, T)
    assert [m["seq"] for m in sent] == [first, again, again + 1] and again == first + 1
    assert [m["checksum"] for m in sent[:2]] == [feed.checksum(first)] * 2
    assert_checksums(feed, sent)
    join(core, b, [T], {T: Want(since=first - 1)})
    [read] = core.start_reads()
    finish(core, read, feed.read(read, core.max_replay))
    assert [m.get("checksum") for m in got(core, b, T)] == [m["checksum"] for m in sent]


def test_a_stream_without_snapshots_gets_what_was_held_back_as_it_is_and_a_flush():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    feed.diff([[price(1), "1"]])  # positions, no snapshot
    join(core, a, [T])
    [read] = core.start_reads()
    send(core, feed, feed.diff([[price(2), "1"]]))
    assert got(core, a, T) == []
    assert core.read_done(T, feed.read(read, core.max_replay), read.token) is True
    sent = got(core, a, T)
    assert [m["seq"] for m in sent] == [2] and "checksum" not in sent[0]
    assert core.books.streams[T].bookless
    send(core, feed, feed.diff([[price(3), "1"]]))  # from now on: at once
    assert [m["seq"] for m in got(core, a, T)] == [3]


def test_more_frames_held_back_than_the_book_remembers_all_get_their_checksums():
    """A start read during a burst: more frames held back than the book's
    RECENT positions, and one older than a snapshot stored meanwhile."""
    core, feed, a = book_core(), BookFeed(), Conn("a")
    seeded(core, feed)
    join(core, a, [T])
    [read] = core.start_reads()
    send(core, feed, feed.diff([[price(50), "1"]]))  # 2
    at = send(core, feed, feed.diff([[price(51), "1"]]))  # 3, and the snapshot
    feed.store_snapshot(at)
    history = feed.read(read, core.max_replay)
    for i in range(RECENT + 100):
        send(core, feed, feed.diff([[price(i % 90), str(1 + i % 4)]]))
    finish(core, read, history)
    sent = got(core, a, T)
    assert [m["seq"] for m in sent] == list(range(2, feed.latest + 1))
    assert "checksum" not in sent[0]  # older than the snapshot
    assert_checksums(feed, sent[1:])
