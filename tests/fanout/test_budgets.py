"""Catch-up byte budgets (:mod:`marketstream.fanout.budgets`), directly and
through the core: a connection far behind is sent at most its budget.
"""

from __future__ import annotations


from marketstream.fanout.core import Want
from marketstream.fanout.budgets import ReplayBudgets
from tests.fanout.doubles import (
    S,
    T,
    Conn,
    flush,
    stored_size,
    finish,
    asked,
    fail,
    make_core,
    live,
    subscribed,
    one_read,
    big_feed,
)


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
    """Streams held one after the other (two SUBSCRIBEs in a row): the
    first read reserved the whole budget, so the connection's next stream
    waits for it (never a read with no share, which would end in a
    spurious gap); once the first is done, what it did not use serves the
    second.  Another client's wait on that stream does not wait."""
    core = make_core(replay_bytes=10_000)
    s, t = big_feed(S, 20), big_feed(T, 20)
    a, b = Conn("a"), Conn("b")
    subscribed(core, a, S, Want(since=15))
    first = one_read(core)
    assert first.max_bytes == 10_000
    subscribed(core, a, T, Want(since=15))
    subscribed(core, b, T, Want(since=15))
    second = one_read(core)  # b's only: a's budget is held by the first read
    assert second.max_bytes == 10_000 and second.token != first.token
    finish(core, second, t.read(second, core.max_replay))  # before the first
    assert core.start_reads() == []  # a still waits for the first read
    finish(core, first, s.read(first, core.max_replay))
    third = one_read(core)  # a's, with what the first did not use
    assert third.max_bytes > 0
    finish(core, third, t.read(third, core.max_replay))
    flush(core)
    assert a.labels(S) == [16, 17, 18, 19, 20] and a.labels(T) == [16, 17, 18, 19, 20]
    assert b.labels(T) == [16, 17, 18, 19, 20]
    assert all(m["data"].get("e") != "gap" for m in a.got + b.got)


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


# --- the budgets, directly ----------------------------------------------------------


def test_a_connections_budget_is_shared_evenly_among_its_waiting_streams():
    budgets = ReplayBudgets(900)
    for _ in range(3):
        budgets.waiting("a")
    assert [budgets.share("a") for _ in range(3)] == [300, 300, 300]
    assert budgets.budgets["a"] == [0, 0, 3]


def test_what_a_catch_up_did_not_use_goes_to_the_next_read_of_the_connection():
    budgets = ReplayBudgets(1000)
    budgets.waiting("a")
    budgets.waiting("a")
    share = budgets.share("a")
    assert share == 500 and budgets.allowed("a", share) == 1000
    budgets.moved("a", 0, -1, bytes_back=share - 100)  # it sent 100 bytes
    assert budgets.share("a") == 900


def test_a_catch_up_over_its_share_leaves_nothing_for_the_others():
    budgets = ReplayBudgets(1000)
    budgets.waiting("a")
    budgets.waiting("a")
    share = budgets.share("a")
    budgets.moved("a", 0, -1, bytes_back=share - 1100)  # a gap notice alone may exceed it
    assert budgets.share("a") == 0 and budgets.allowed("a", 0) == 0


def test_a_budget_is_forgotten_when_its_connection_has_nothing_in_progress():
    budgets = ReplayBudgets(1000)
    budgets.waiting("a")
    budgets.moved("a", -1, 0)  # it left before its read started
    assert "a" not in budgets and len(budgets) == 0
    budgets.moved("a", 0, -1)  # nothing to forget: harmless
    budgets.waiting("b")
    budgets.forget("b")
    assert len(budgets) == 0
    assert budgets.allowed("gone", 300) == 300
