"""The catch-up merge (:mod:`marketstream.fanout.catchup`): the pure
function against a simple model (hypothesis), and what a resuming or
snapshot-asking connection receives through the core.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marketstream.fanout.catchup import catch_up, frame_history, gap_reason
from marketstream.fanout.core import History, Want
from marketstream.wire.frames import text_frame
from marketstream.wire.replies import GAP_REASONS
from tests.fanout.doubles import (
    S,
    Conn,
    flush,
    Feed,
    finish,
    asked,
    make_core,
    live,
    subscribed,
    one_read,
    outage,
)


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


# --- the pure function against a model of the stream ---------------------------------

REASONS = sorted(GAP_REASONS)


class Model:
    """A stream with positions 1..``latest``, as one example draws it:
    every frame is ``width`` bytes, ``E<pos>`` for a history entry,
    ``S<pos>`` for the snapshot, ``L<pos>`` for a live message buffered
    during the read, ``G<reason>`` for a gap notice, so that what
    :func:`catch_up` returns splits back into what a client would see."""

    def __init__(self, width: int) -> None:
        self.width = width

    def frame(self, kind: bytes, number: int) -> bytes:
        return (kind + b"%d" % number).ljust(self.width, b".")

    def gap(self, reason: str) -> bytes:
        return self.frame(b"G", REASONS.index(reason))

    def split(self, data: bytes) -> list[tuple[str, int]]:
        """(kind, position or reason index) of each frame of ``data``."""
        assert len(data) % self.width == 0
        out = []
        for at in range(0, len(data), self.width):
            frame = data[at : at + self.width].rstrip(b".")
            out.append((frame[:1].decode(), int(frame[1:])))
        return out


@st.composite
def examples(draw: st.DrawFn) -> tuple:
    """(model, want, history, live, share, max_replay): a stream whose
    history keeps positions ``first``..``latest``, a read that found the
    entries from ``low`` on (bounded by max_replay or bytes), maybe a
    snapshot, and the live messages that arrived from ``start`` on."""
    model = Model(draw(st.integers(4, 40)))
    latest = draw(st.integers(1, 40))
    first = draw(st.integers(1, latest + 1))  # the oldest kept (latest + 1: none)
    low = draw(st.integers(first, latest + 1))
    entries = [(seq, model.frame(b"E", seq)) for seq in range(low, latest + 1)]
    snapshot_at = draw(st.none() | st.integers(1, latest))
    snapshot = None if snapshot_at is None else (snapshot_at, model.frame(b"S", snapshot_at))
    since = draw(st.none() | st.integers(0, latest + 3))
    want = Want(since, draw(st.booleans()), draw(st.booleans()))
    oldest = None
    if since is not None and since < latest and not (entries and entries[0][0] <= since + 1):
        oldest = first if first <= latest else None
    skipped = snapshot is None and draw(st.booleans())
    history = History(latest, snapshot, entries, oldest, skipped)
    start = draw(st.integers(1, latest + 1))  # the first live message of the read
    live = [(seq, model.frame(b"L", seq)) for seq in range(start, start + draw(st.integers(0, 8)))]
    share = draw(st.none() | st.integers(0, model.width * 50))
    return model, want, history, live, share, draw(st.integers(0, 50))


@settings(max_examples=500, deadline=None)
@given(examples(), st.booleans())
def test_property_a_catch_up_sends_each_message_once_in_order_within_the_share(
    example, had_positions
):
    model, want, history, live, share, max_replay = example
    done = catch_up(
        want, history, live, share, max_replay=max_replay, had_positions=had_positions,
        gap=model.gap,
    )  # fmt: skip
    frames = model.split(done.data)
    kinds = [kind for kind, _ in frames]
    positions = [number for kind, number in frames if kind != "G"]
    # Every message at most once, in order; gap notices come first, then
    # the snapshot if any; a live frame is never beyond what it follows.
    assert positions == sorted(set(positions))
    assert kinds == sorted(kinds, key="GSEL".index)
    assert kinds.count("G") <= 1 and kinds.count("S") <= 1
    # The counts are the frames'.
    assert done.frames == len(frames)
    assert (done.replayed, done.snapshots, done.gap_notices) == (
        kinds.count("E"),
        kinds.count("S"),
        kinds.count("G"),
    )
    # Never beyond the byte share, but for a gap notice alone.
    history_part = len(frames) - kinds.count("L")
    assert done.size == history_part * model.width
    if share is not None and done.size > share:
        assert kinds[:history_part] == ["G"]
    # The position held is the last one sent (a catch-up that sent none
    # holds where it started, or nothing).
    if positions:
        assert done.position == positions[-1]
    latest = history.latest
    top = max([latest] + [seq for seq, _ in live])
    if "G" not in kinds and want.since is not None:
        # No gap notice: nothing after the position asked for is missing.
        assert positions == list(range(want.since + 1, top + 1))
    if "S" in kinds:
        # From the snapshot on, nothing is missing.
        at = positions[kinds.index("S") - kinds.count("G")]
        assert positions == list(range(at, top + 1))
    entries = history.entries
    covered = entries and entries[0][0] <= (want.since or 0) + 1
    if share is None and want.since is not None and want.since <= latest:
        # Unbounded, a resume the history covers is exact.
        assert ("G" in kinds) == (want.since < latest and not covered)


@given(examples())
def test_catch_up_is_pure(example):
    """Called twice on the same input, it returns the same and changes
    nothing of its input (the core builds one catch-up for many
    connections and counts what it returns)."""
    model, want, history, live, share, max_replay = example
    before = (list(history.entries), list(live))
    first = catch_up(want, history, live, share, max_replay=max_replay, had_positions=True,
                     gap=model.gap)  # fmt: skip
    again = catch_up(want, history, live, share, max_replay=max_replay, had_positions=True,
                     gap=model.gap)  # fmt: skip
    assert first == again
    assert (history.entries, live) == before


def test_a_history_with_no_position_is_lost_only_to_a_stream_that_had_positions():
    model = Model(8)
    lost = History(None, None, [])
    live = [(None, b"plain...")]
    for had, expected in ((True, [("G", REASONS.index("history_lost"))]), (False, [])):
        done = catch_up(Want(since=5), lost, [], None, max_replay=10, had_positions=had,
                        gap=model.gap)  # fmt: skip
        assert model.split(done.data) == expected
    done = catch_up(Want(snapshot=True), lost, live, None, max_replay=10, had_positions=True,
                    gap=model.gap)  # fmt: skip
    assert done.data == b"plain..." and done.position == 0 and done.frames == 1


def test_a_catch_up_that_does_not_fit_falls_back_to_the_snapshot_then_the_newest():
    model = Model(4)
    entries = [(seq, model.frame(b"E", seq)) for seq in range(1, 21)]
    history = History(20, (15, model.frame(b"S", 15)), entries)

    def sent(share: int | None) -> list[tuple[str, int]]:
        done = catch_up(Want(since=2), history, [], share, max_replay=100, had_positions=True,
                        gap=model.gap)  # fmt: skip
        return model.split(done.data)

    assert sent(None) == [("E", seq) for seq in range(3, 21)]  # 18 frames
    assert sent(18 * 4) == sent(None)
    reason = REASONS.index("replay_too_large")
    assert sent(18 * 4 - 1) == [("G", reason), ("S", 15)] + [("E", s) for s in range(16, 21)]
    assert sent(7 * 4 - 1) == [("G", reason)] + [("E", s) for s in range(16, 21)]  # 4 + 5 * 4
    assert sent(3) == [("G", reason)]  # the notice alone, however small the share


def test_gap_reasons():
    assert gap_reason(Want(since=9), 5, None, False, 100) == "since_ahead"
    assert gap_reason(Want(since=9, repair=True), 5, None, False, 100) == "lost_writes"
    assert gap_reason(Want(since=1), 500, 1, False, 100) == "max_replay"
    assert gap_reason(Want(since=1), 50, None, True, 100) == "replay_too_large"
    assert gap_reason(Want(since=1), 50, 10, False, 100) == "history_trimmed"


def test_frame_history_frames_the_stored_frames_and_reports_the_others():
    good = b'{"stream":"t.A_B","data":{},"seq":%d}'
    dropped: list[tuple[bytes, bytes, str]] = []
    history = History(3, (2, good % 2), [(2, good % 2), (3, b'{"stream":"t.C_D"}')])
    framed = frame_history(b"t.A_B", history, lambda *why: dropped.append(why))
    assert framed.snapshot == (2, text_frame(good % 2))
    assert framed.entries == [(2, text_frame(good % 2)), (3, b"")]
    assert dropped == [(b"t.A_B", b'{"stream":"t.C_D"}', "wrong_stream")]
