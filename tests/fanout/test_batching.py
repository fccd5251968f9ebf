"""The batch (:mod:`marketstream.fanout.batching`): frames queued per
connection and joined into one write, directly and through the core.
"""

from __future__ import annotations


from marketstream.fanout.core import Want
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
