"""The fan-out core (:mod:`marketstream.fanout.core`), driven directly:
the registry, delivery of live messages and the checks of payloads, and
what the Redis link reports (outages, interruptions, confirmations).

No sockets, no Redis, no event loop: connections are plain objects (see
:mod:`tests.fanout.doubles`), Redis messages are fed to
:meth:`Core.on_message`, and history reads are answered by a model.
"""

from __future__ import annotations


import pytest

from marketstream.fanout.core import Core, Want
from marketstream.fanout.counters import Counters
from marketstream.wire.frames import text_frame
from marketstream.wire.replies import GAP_REASONS
from tests.fanout.doubles import (
    S,
    T,
    Conn,
    split_frames,
    flush,
    Feed,
    finish,
    asked,
    make_core,
    live,
    subscribed,
    one_read,
)


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
