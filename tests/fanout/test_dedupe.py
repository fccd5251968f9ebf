"""Live dedupe (:mod:`marketstream.fanout.dedupe`): the positions streams
and connections hold, and the live messages a caught-up connection skips;
directly and through the core, across reads and outages.
"""

from __future__ import annotations


from marketstream.fanout.core import Want
from marketstream.fanout.dedupe import LivePositions
from tests.fanout.doubles import (
    T,
    S,
    Conn,
    flush,
    Feed,
    finish,
    make_core,
    live,
    subscribed,
    one_read,
)


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


# --- the positions, directly --------------------------------------------------------


def test_a_live_message_skips_the_connections_that_hold_its_position():
    positions = LivePositions()
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    listeners = {a: None, b: None, c: None}
    positions.hold(S, a, 10)
    positions.hold(S, b, 12)
    holding = positions.holding[S]
    assert list(positions.skip(S, holding, listeners, 10)) == [c]
    assert list(positions.skip(S, holding, listeners, 11)) == [a, c]  # a passed: forgotten
    assert positions.holding == {S: {b: 12}}
    assert positions.skip(S, holding, listeners, 13) is listeners  # everyone: no copy
    assert positions.holding == {}


def test_a_read_keeps_the_highest_position_for_repair_and_a_restart_for_the_live_stream():
    positions = LivePositions()
    positions.delivered[S] = 20
    positions.read_ended(S, 15)
    assert positions.delivered[S] == 20  # the live stream is further
    positions.read_ended(S, 25)
    assert positions.delivered[S] == 25
    positions.live[S] = 30
    positions.read_ended(S, 5)  # positions went back and the catch-up said so
    assert positions.live[S] == 5
    positions.read_ended(S, 0)  # a read that reached no position changes nothing
    assert positions.live[S] == 5 and positions.delivered[S] == 25


def test_positions_are_forgotten_with_their_stream_or_connection():
    positions = LivePositions()
    a = Conn("a")
    positions.hold(S, a, 3)
    positions.let_go(S, a)
    positions.let_go(T, a)  # nothing held there: harmless
    assert positions.holding == {S: {}}
    positions.drop_holdings(S)
    positions.delivered[S] = positions.live[S] = 3
    positions.forget(S)
    assert positions.holding == positions.delivered == positions.live == {}
