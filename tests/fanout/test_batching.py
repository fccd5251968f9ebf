"""The batch (:mod:`marketstream.fanout.batching`): frames queued per
connection and joined into one write, directly and through the core.
"""

from __future__ import annotations


from marketstream.fanout.batching import MAX_BATCH_SIZES, Batch
from marketstream.fanout.core import Want
from marketstream.fanout.counters import Counters
from marketstream.wire.frames import text_frame
from marketstream.wire.positions import split_position
from tests.fanout.doubles import (
    S,
    T,
    Conn,
    flush,
    Feed,
    finish,
    make_core,
    live,
    subscribed,
    one_read,
)


def test_remove_drops_the_frames_queued_for_the_connection():
    core = make_core()
    a, b = Conn("a"), Conn("b")
    core.subscribe(a, [S])
    core.subscribe(b, [S])
    core.on_message(S.encode(), Feed().publish()[1])
    core.remove(a)
    assert list(core.take_batch()) == [b]


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


# --- the batch, directly ------------------------------------------------------------


def test_a_batch_joins_each_connections_frames_in_order_and_counts_them():
    counters = Counters()
    batch = Batch(counters)
    a, b = Conn("a"), Conn("b")
    batch.enqueue({a: None, b: None}, b"one")
    batch.queue(a, [b"two", b"three"], 2)
    batch.enqueue({b: None}, b"four")
    assert batch.take() == {a: b"onetwothree", b: b"onefour"}
    assert counters.deliveries == 5 and counters.bytes_sent == 18
    assert counters.batches == 1 and counters.batch_sizes == [2]  # two messages enqueued
    assert batch.take() == {} and batch.pending == {}  # the next batch starts empty
    assert counters.batch_sizes == [2, 0]


def test_a_single_frame_is_written_as_is():
    batch = Batch(Counters())
    a, b = Conn("a"), Conn("b")
    frame = text_frame(b'{"stream":"trade.SOL_USDC","data":{}}')
    batch.enqueue({a: None, b: None}, frame)
    taken = batch.take()
    assert taken[a] is frame and taken[b] is frame  # no copy per connection


def test_a_dropped_connection_gets_nothing_and_the_batch_sizes_stay_bounded():
    counters = Counters()
    batch = Batch(counters)
    a = Conn("a")
    batch.enqueue({a: None}, b"x")
    batch.drop(a)
    batch.drop(a)  # twice is harmless
    assert batch.take() == {}
    counters.batch_sizes.extend([1] * (MAX_BATCH_SIZES - 1))
    batch.take()
    batch.take()  # the exporter did not drain them: no growth past the bound
    assert len(counters.batch_sizes) == MAX_BATCH_SIZES


def test_a_notice_is_one_frame_for_every_listener_and_is_counted():
    counters = Counters()
    batch = Batch(counters)
    a, b = Conn("a"), Conn("b")
    batch.notice({a: None, b: None}, S, "link_outage")
    for conn, data in batch.take().items():
        conn.write_frames(data)
    assert a.reasons() == b.reasons() == ["link_outage"]
    assert counters.gap_notices == 2 and counters.deliveries == 2
