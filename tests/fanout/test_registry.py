"""Subscriptions and what they hold (marketstream.fanout.registry), driven
through a real :class:`~marketstream.fanout.core.Core`: the Redis channel
of a stream read only by its book or derived streams, released with the
last of them; slow readers parked (their book and derived streams stop,
the rest flows) and unparked (a snapshot, then live frames); nothing left
behind by a connection that leaves."""

from __future__ import annotations

import pytest

from marketstream.fanout.core import Core
from tests.fanout.bookflow import (
    BookFeed,
    book_core,
    booked,
    got,
    join,
    price,
    seeded,
    send,
    start_book,
)
from tests.fanout.doubles import S, T, Conn, Feed, finish, flush, live

D10 = "depth10.BTC_USDT"
FAST = T + "@100ms"
TICKER_1S = "ticker.BTC_USDT@1000ms"


def assert_nothing_held(core: Core) -> None:
    """No subscription, listener, book, tap, recovery or channel is left."""
    assert core.connections == {} and core.streams == {}
    assert core.taps == {} and core.recovering == {}
    assert core.books.streams == {} and core.books.pending == {}
    assert core.derived.streams == {} and core.derived.by_interval == {}
    assert core.derived.latest == {} and core.registry.parked == {}
    assert core.wanted() == set()


# -- channels ------------------------------------------------------------------------


def test_a_stream_read_only_by_derived_streams_keeps_its_channel_until_the_last_leaves():
    core, feed, a, b = book_core(), BookFeed(), Conn("a"), Conn("b")
    booked(core, feed, a, [D10])
    join(core, b, [FAST, TICKER_1S])
    assert T not in core.streams and T in core.taps
    assert core.wanted() == {T, "ticker.BTC_USDT"}
    send(core, feed, feed.diff([[price(99), "3"]]))  # the book reads it
    assert core.books.streams[T].book.seq == feed.latest
    core.unsubscribe(a, [D10])
    assert T in core.wanted() and core.books.synced(T)
    core.unsubscribe(b, [FAST])
    assert core.wanted() == {"ticker.BTC_USDT"} and core.books.streams == {}
    core.remove(b)
    core.remove(a)
    assert_nothing_held(core)


def test_the_stream_itself_and_a_derived_stream_share_one_channel_and_one_book():
    core, feed, a, b = book_core(), BookFeed(), Conn("a"), Conn("b")
    booked(core, feed, a, [T])
    join(core, b, [D10])
    assert core.books.streams[T].users == 2 and core.start_reads() == []
    core.unsubscribe(a, [T])
    assert T in core.wanted() and core.books.synced(T)
    assert core.books.streams[T].users == 1
    send(core, feed, feed.diff([[price(99), "3"]]))
    assert core.counters.dropped_no_listener == 0
    core.unsubscribe(b, [D10])
    assert core.wanted() == set() and core.books.streams == {}


def test_a_plain_stream_releases_its_channel_as_before():
    core, a = book_core(), Conn("a")
    join(core, a, [S])
    assert core.books.streams == {} and core.taps == {}  # not a book stream
    core.unsubscribe(a, [S])
    core.remove(a)
    assert_nothing_held(core)


# -- slow readers --------------------------------------------------------------------


def test_a_parked_connection_gets_nothing_of_its_book_and_derived_streams_but_trades():
    core, feed, a, b = book_core(), BookFeed(), Conn("a"), Conn("b")
    trades = Feed(S)
    booked(core, feed, a, [T, D10, FAST, S])
    join(core, b, [T, D10])
    core.derived.tick(100)
    flush(core)
    a.got, b.got = [], []
    assert core.registry.park(a) == 3
    assert core.registry.park(a) == 0  # already parked
    send(core, feed, feed.diff([[price(99), "0"]]))
    live(core, trades, 2)
    core.derived.tick(100)
    flush(core)
    assert [m["stream"] for m in a.got] == [S, S]
    assert [m["stream"] for m in b.got] == [T, D10]
    assert core.subscriptions(a) == [T, D10, FAST, S]  # still subscribed


def test_unparked_a_connection_gets_a_snapshot_then_live_frames_and_derived_states():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    booked(core, feed, a, [T, D10, FAST])
    core.derived.tick(100)
    flush(core)
    core.registry.park(a)
    for i in range(3):
        send(core, feed, feed.diff([[price(90 + i), "2"]]))
    core.derived.tick(100)
    feed.store_snapshot(feed.latest)
    flush(core)
    a.got = []
    assert core.registry.unpark(a) == [T, D10, FAST]
    assert core.registry.parked == {}
    assert T in core.recovering and a not in core.streams.get(T, {})
    [read] = core.start_reads()
    assert (read.stream, read.after, read.snapshot) == (T, None, True) and read.token > 0
    history = feed.read(read, core.max_replay)
    during = send(core, feed, feed.diff([[price(80), "1"]]))
    finish(core, read, history)
    after = send(core, feed, feed.diff([[price(81), "1"]]))
    sent = got(core, a, T)
    assert sent[0]["data"]["e"] == "depthSnapshot" and sent[0]["seq"] == during - 1
    assert [m["seq"] for m in sent[1:]] == [during, after]
    for message in sent:
        assert message["checksum"] == feed.checksum(message["seq"])
    core.derived.tick(100)  # the derived ones: their state at the next tick
    flush(core)
    states = {m["stream"]: m for m in a.got}
    assert states[FAST]["data"]["e"] == "depthSnapshot" and states[FAST]["seq"] == after
    assert states[D10]["data"]["b"] == feed.ladder.top(10)[0]


def test_a_book_stream_whose_book_is_not_synced_is_not_parked():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    seeded(core, feed)
    join(core, a, [T, S])
    assert core.registry.park(a) == 0 and core.registry.parked == {}
    send(core, feed, feed.diff([[price(99), "1"]]))
    start_book(core, feed)
    assert len(got(core, a, T)) == 1


def test_removing_a_parked_connection_leaves_nothing_behind():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    booked(core, feed, a, [T, D10, FAST, TICKER_1S, S])
    assert core.registry.park(a) == 4
    core.remove(a)
    assert_nothing_held(core)
    send(core, feed, feed.diff([[price(99), "1"]]))
    core.derived.tick(100)
    assert core.take_batch() == {}


@pytest.mark.parametrize("name", [T, D10])
def test_a_stream_left_and_taken_again_while_parked_is_not_caught_up_twice(name):
    core, feed, a = book_core(), BookFeed(), Conn("a")
    booked(core, feed, a, [name])
    core.registry.park(a)
    core.unsubscribe(a, [name])
    join(core, a, [name])  # from now on, as any new subscriber
    assert core.registry.unpark(a) == []
    assert core.recovering == {}
    start_book(core, feed)  # its book went with the last subscription
    core.derived.tick(100)
    send(core, feed, feed.diff([[price(99), "1"]]))
    core.derived.tick(100)
    seqs = [m["seq"] for m in got(core, a, name)]
    assert seqs == sorted(set(seqs)) and seqs[-1] == feed.latest


def test_unsubscribing_a_parked_connection_lets_the_channel_and_book_go():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    booked(core, feed, a, [T, FAST])
    core.registry.park(a)
    core.unsubscribe(a, [T, FAST])
    assert core.wanted() == set() and core.books.streams == {} and core.taps == {}
    assert core.registry.unpark(a) == []
    core.remove(a)
    assert_nothing_held(core)


def test_every_subscriber_of_a_stream_parked_keeps_the_book_running():
    core, feed, a = book_core(), BookFeed(), Conn("a")
    booked(core, feed, a, [T])
    core.registry.park(a)
    assert T not in core.streams and T in core.wanted()
    send(core, feed, feed.diff([[price(99), "1"]]))
    assert core.books.streams[T].book.seq == feed.latest and core.take_batch() == {}
    core.registry.unpark(a)
    feed.store_snapshot(feed.latest)
    [read] = core.start_reads()
    finish(core, read, feed.read(read, core.max_replay))
    sent = got(core, a, T)
    assert [(m["data"]["e"], m["seq"]) for m in sent] == [("depthSnapshot", feed.latest)]


def test_a_parked_subscriber_of_a_stream_found_bookless_is_told_and_unsubscribed_too():
    core, feed, a, b = book_core(), BookFeed(), Conn("a"), Conn("b")
    feed.diff([[price(1), "1"]])  # positions, no snapshot
    join(core, a, [D10, S])
    join(core, b, [D10])
    assert core.registry.park(a) == 1
    [read] = core.start_reads()
    finish(core, read, feed.read(read, core.max_replay))
    flush(core)
    for conn in (a, b):
        assert [m["data"]["reason"] for m in conn.got] == ["no_book"]
    assert core.subscriptions(a) == [S] and core.subscriptions(b) == []
    assert core.counters.rejected["no_book"] == 2
    assert core.books.streams == {} and core.wanted() == {S}
