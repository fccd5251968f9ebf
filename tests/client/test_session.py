"""The client's protocol without I/O (marketstream.client.session), driven
directly: the request on each (re)connection, what each frame means,
refusals, resyncs, the backoff, the states; hypothesis for the resume
bookkeeping and the backoff's bounds."""

import ast
import doctest
import inspect
import logging
import random

import pytest
import ujson
from hypothesis import given, settings
from hypothesis import strategies as st

import marketstream.client.session
from marketstream.client import GAP, MESSAGE, SNAPSHOT, ConnectionLost, StreamsRefused
from marketstream.client.session import Session, why_closed


def test_docstring_examples():
    result = doctest.testmod(marketstream.client.session)
    assert result.attempted > 10 and result.failed == 0


def frame(stream, data, seq=None):
    obj = {"stream": stream, "data": data}
    if seq is not None:
        obj["seq"] = seq
    return ujson.dumps(obj)


def connect(session):
    """One connection as the shell makes it: the request it sends, decoded."""
    session.next_delay()
    session.connecting()
    return ujson.loads(session.connected())


def drain(session):
    return list(session.events())


# --- requests -------------------------------------------------------------------


def test_the_first_request_resumes_given_positions_and_asks_snapshots_for_the_others():
    session = Session(
        ["trade.A_B", "depth.A_B", "depth.C_D"],
        snapshot=["depth.A_B", "depth.C_D"],
        since={"depth.A_B": 41},
    )
    assert connect(session) == {
        "method": "SUBSCRIBE",
        "params": ["trade.A_B", "depth.A_B", "depth.C_D"],
        "id": 1,
        "acks": True,
        "since": {"depth.A_B": 41},
        "snapshot": ["depth.C_D"],
    }
    assert (session.connects, session.reconnects, session.resumes) == (1, 0, 0)


def test_snapshot_true_means_every_stream_and_streams_are_deduplicated():
    session = Session(["trade.A_B", "depth.A_B", "trade.A_B"], snapshot=True)
    request = connect(session)
    assert request["params"] == ["trade.A_B", "depth.A_B"]
    assert request["snapshot"] == ["trade.A_B", "depth.A_B"]


def test_no_streams_is_an_error():
    with pytest.raises(ValueError):
        Session([])


def test_a_reconnection_resumes_positioned_streams_and_reports_plain_ones():
    session = Session(["trade.A_B", "ticker.A_B", "depth.A_B"], clock=lambda: 2.0)
    connect(session)
    session.receive(frame("trade.A_B", {"t": 1}, seq=10))
    session.receive(frame("ticker.A_B", {"c": "1"}))  # plain
    drain(session)
    session.connection_lost("connection lost (no close frame)")
    request = connect(session)
    assert request["id"] == 2 and request["since"] == {"trade.A_B": 10}
    assert "snapshot" not in request
    gaps = drain(session)
    # depth.A_B never delivered: nothing to report for it.
    assert [(m.stream, m.kind) for m in gaps] == [("ticker.A_B", GAP)]
    assert gaps[0].data == {
        "e": "gap",
        "s": "A_B",
        "E": 2_000_000,
        "reason": "reconnected",
        "msg": "reconnected; updates published meanwhile may have been missed",
    }
    assert ujson.loads(gaps[0].raw) == {"stream": "ticker.A_B", "data": gaps[0].data}
    assert (session.reconnects, session.resumes, session.gaps) == (1, 1, 1)


# --- frames ---------------------------------------------------------------------


def test_repeats_are_dropped_and_jumps_reported():
    session = Session(["trade.A_B"])
    connect(session)
    for seq in (1, 2, 2, 3, 6, 5, 7):
        session.receive(frame("trade.A_B", {"t": seq}, seq=seq))
    events = drain(session)
    assert [(m.kind, m.seq) for m in events] == [
        (MESSAGE, 1),
        (MESSAGE, 2),
        (MESSAGE, 3),
        (GAP, None),
        (MESSAGE, 6),
        (MESSAGE, 7),
    ]
    gap = events[3].data
    assert (gap["reason"], gap["from"], gap["to"]) == ("positions_missing", 4, 5)
    assert gap["msg"] == "positions 4 to 5 missing"
    assert (session.duplicates, session.gaps, session.last_seq) == (2, 1, {"trade.A_B": 7})


def test_a_server_gap_notice_starts_positions_over():
    session = Session(["trade.A_B"])
    connect(session)
    session.receive(frame("trade.A_B", {"t": 1}, seq=100))
    notice = frame("trade.A_B", {"e": "gap", "reason": "history_trimmed", "msg": "..."})
    session.receive(notice)
    session.receive(frame("trade.A_B", {"t": 2}, seq=5))  # lower, and not a repeat
    session.receive(frame("trade.A_B", {"t": 3}, seq=9))  # a jump: reported again
    events = drain(session)
    assert [(m.kind, m.seq) for m in events] == [
        (MESSAGE, 100),
        (GAP, None),
        (MESSAGE, 5),
        (GAP, None),
        (MESSAGE, 9),
    ]
    assert events[1].raw == notice and session.gaps == 2


def test_a_snapshot_is_a_new_base():
    session = Session(["depth.A_B"], snapshot=True)
    connect(session)
    session.receive(frame("depth.A_B", {"e": "depth", "U": 1, "u": 1}, seq=3))
    session.receive(frame("depth.A_B", {"e": "depthSnapshot", "u": 9}, seq=20))
    session.receive(frame("depth.A_B", {"e": "depth", "U": 10, "u": 10}, seq=21))
    assert [(m.kind, m.seq) for m in drain(session)] == [
        (MESSAGE, 3),
        (SNAPSHOT, 20),
        (MESSAGE, 21),
    ]
    assert session.gaps == 0


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        '{"result": null, "id": 1}',
        '{"stream": 5, "data": {}}',
        frame("trade.A_B", {"t": 1}, seq=True),  # a bool is no position: a plain frame
    ],
)
def test_frames_without_news_are_ignored_and_odd_ones_kept_plain(text, caplog):
    session = Session(["trade.A_B"])
    connect(session)
    session.receive(text)
    events = drain(session)
    if text.startswith('{"stream":"trade'):
        assert [(m.kind, m.seq) for m in events] == [(MESSAGE, None)]
    else:
        assert events == []
    if text == "not json":
        assert "ignoring a frame that is not JSON" in caplog.text


def test_refusals_come_first_once_and_the_streams_go():
    session = Session(["trade.A_B", "trades.A_B", "trade.a_b"])
    connect(session)
    session.receive(frame("trade.A_B", {"t": 1}))
    session.receive(
        ujson.dumps(
            {
                "error": {
                    "code": 2,
                    "msg": "refused",
                    "refused": {"trades.A_B": "unknown stream type", "trade.a_b": "bad market"},
                },
                "id": 1,
            }
        )
    )
    refusal = session.next_event()
    assert isinstance(refusal, StreamsRefused)
    assert (
        refusal.refused
        == session.refused
        == {
            "trades.A_B": "unknown stream type",
            "trade.a_b": "bad market",
        }
    )
    assert session.next_event().data == {"t": 1}  # then the queued message
    assert session.next_event() is None
    assert connect(session)["params"] == ["trade.A_B"]  # never asked again


def test_a_stream_the_server_ends_is_refused_and_not_asked_again():
    session = Session(["depth.A_B", "depth10.A_B"])
    connect(session)
    notice = {"e": "unsubscribed", "reason": "no_book", "msg": "depth.A_B has no snapshots"}
    session.receive(ujson.dumps({"stream": "depth10.A_B", "data": notice}))
    refusal = session.next_event()
    assert isinstance(refusal, StreamsRefused)
    assert refusal.refused == {"depth10.A_B": "depth.A_B has no snapshots"}
    assert session.next_event() is None
    assert connect(session)["params"] == ["depth.A_B"]


def test_other_error_replies_are_logged(caplog):
    session = Session(["trade.A_B"])
    connect(session)
    with caplog.at_level(logging.WARNING, logger="marketstream.client.session"):
        session.receive('{"error": {"code": 3, "msg": "invalid JSON"}, "id": null}')
        session.receive('{"error": {"refused": {"x.Y_Z": "no"}, "refused_more": 7}, "id": 1}')
    assert "the server answered: invalid JSON" in caplog.text
    assert "the server refused 7 more streams" in caplog.text


def test_resync_starts_one_stream_over_on_the_open_connection():
    session = Session(["depth.A_B", "trade.A_B", "ticker.A_B"])
    connect(session)
    session.receive(frame("depth.A_B", {"e": "depth"}, seq=5))
    session.receive(frame("trade.A_B", {"t": 1}, seq=8))
    session.receive(frame("ticker.A_B", {"c": "1"}))
    assert session.resync("ticker.A_B") is None  # plain: nothing to start over from
    requests = [ujson.loads(text) for text in session.resync("depth.A_B")]
    assert requests == [
        {"method": "UNSUBSCRIBE", "params": ["depth.A_B"], "id": 2},
        {"method": "SUBSCRIBE", "params": ["depth.A_B"], "id": 3, "snapshot": ["depth.A_B"]},
    ]
    assert [m.stream for m in drain(session)] == ["trade.A_B", "ticker.A_B"]
    # In flight before the snapshot: dropped, no gap; the other streams go on.
    session.receive(frame("depth.A_B", {"e": "depth"}, seq=6))
    session.receive(frame("trade.A_B", {"t": 2}, seq=9))
    session.receive(frame("depth.A_B", {"e": "depthSnapshot"}, seq=11))
    session.receive(frame("depth.A_B", {"e": "depth"}, seq=12))
    got = [(m.stream, m.kind, m.seq) for m in drain(session)]
    assert got == [
        ("trade.A_B", MESSAGE, 9),
        ("depth.A_B", SNAPSHOT, 11),
        ("depth.A_B", MESSAGE, 12),
    ]
    assert session.gaps == 0 and session.connects == 1


def test_a_resync_while_disconnected_asks_the_snapshot_on_the_next_connection():
    session = Session(["depth.A_B", "trade.A_B"])
    connect(session)
    session.receive(frame("depth.A_B", {"e": "depth"}, seq=5))
    session.receive(frame("trade.A_B", {"t": 1}, seq=8))
    session.connection_lost("gone")
    assert session.resync("depth.A_B") == []  # nothing to send: no connection
    request = connect(session)
    assert request["since"] == {"trade.A_B": 8} and request["snapshot"] == ["depth.A_B"]


def test_a_new_connection_ends_the_resyncs_of_the_last():
    session = Session(["depth.A_B"])
    connect(session)
    session.receive(frame("depth.A_B", {"e": "depth"}, seq=5))
    assert session.resync("depth.A_B")
    session.connection_lost("gone")
    request = connect(session)
    assert request["snapshot"] == ["depth.A_B"] and request["id"] == 4
    drain(session)
    session.receive(frame("depth.A_B", {"e": "depth"}, seq=6))  # not dropped any more
    assert [(m.kind, m.seq) for m in drain(session)] == [(MESSAGE, 6)]


def test_positions_of_derived_streams_skip_without_a_gap():
    session = Session(["depth10.A_B", "depth.A_B@100ms", "depth.A_B"])
    connect(session)
    for seq in (5, 9):
        for stream in ("depth10.A_B", "depth.A_B@100ms", "depth.A_B"):
            session.receive(frame(stream, {"e": "depth"}, seq=seq))
    gaps = [m.stream for m in drain(session) if m.kind == GAP]
    assert gaps == ["depth.A_B"] and session.gaps == 1


# --- backoff, states, closing -----------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    low=st.floats(0.001, 10),
    factor=st.floats(1, 100),
    attempt=st.integers(0, 100_000),
    seed=st.integers(0, 2**32),
)
def test_the_backoff_doubles_up_to_its_ceiling_with_jitter(low, factor, attempt, seed):
    session = Session(["trade.A_B"], backoff=(low, low * factor), rng=random.Random(seed))
    full = min(low * factor, low * 2.0 ** min(attempt, 100))
    assert full * 0.5 <= session.delay(attempt) <= full


def test_next_delay_follows_failures_and_losses():
    session = Session(["trade.A_B"], backoff=(1.0, 3.0), rng=random.Random(3))
    assert session.next_delay() is None
    for attempts, ceiling in ((1, 2.0), (2, 3.0), (3, 3.0)):
        assert session.connect_failed(OSError("refused")) is True
        assert session.attempts == attempts
        assert ceiling / 2 <= session.next_delay() <= ceiling
    assert session.disconnect_reason == "cannot connect: refused"
    session.connect_failed(TimeoutError())  # no message: its type says it
    assert session.disconnect_reason == "cannot connect: TimeoutError"
    session.connected()
    assert session.attempts == 0
    session.connection_lost("gone")
    assert 0.5 <= session.next_delay() <= 1.0


def test_without_reconnect_a_failure_is_raised_and_a_loss_ends_it():
    session = Session(["trade.A_B"], reconnect=False, url="ws://example/ws")
    assert session.connect_failed(OSError("refused")) is False
    assert session.disconnect_reason is None and session.state == "idle"
    session.connected()
    session.connection_lost("gone")
    with pytest.raises(ConnectionLost, match="connection to ws://example/ws lost"):
        session.next_delay()


def test_states_reach_the_callback_and_a_faulty_one_is_only_logged(caplog):
    states = []
    session = Session(["trade.A_B"], on_state=states.append)
    session.connecting()
    session.connect_failed(OSError())
    session.connecting()
    session.connected()
    session.connection_lost("gone")
    session.close()
    session.connection_lost("after close")  # not a disconnection the user sees
    session.finish_close()
    assert states == ["connecting", "disconnected", "connecting", "connected", "disconnected"] + [
        "closed"
    ]
    assert session.disconnect_reason == "gone" and session.closed

    def broken(state):
        raise RuntimeError("callback bug")

    session = Session(["trade.A_B"], on_state=broken)
    session.connecting()
    assert session.state == "connecting" and "state callback failed" in caplog.text


def test_why_closed():
    assert why_closed(1001, "kicked", None) == "closed by the server: 1001 kicked"
    assert why_closed(1006, None, None) == "closed by the server: 1006 "
    assert why_closed(None, None, OSError("Stream is closed")) == (
        "connection failed: Stream is closed"
    )
    assert why_closed(None, None, TimeoutError()) == "connection failed: TimeoutError"
    assert why_closed(None, None, None) == "connection lost (no close frame)"


# --- resume bookkeeping, for any order of frames ----------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("frame"), st.integers(1, 30)),
        st.tuples(st.just("notice"), st.just(0)),
        st.tuples(st.just("reconnect"), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=OPS)
def test_each_position_is_yielded_once_in_order_and_every_jump_is_a_gap(ops):
    """Whatever the server sends (repeats, reordering, its gap notices,
    reconnections), the session yields positions in increasing order
    between notices, drops or yields every frame, reports each jump with
    its range, and resumes from the last position it yielded."""
    session = Session(["trade.A_B"])
    connect(session)
    yielded = []  # (kind, seq, data) in order
    frames = 0
    for op, seq in ops:
        if op == "frame":
            frames += 1
            session.receive(frame("trade.A_B", {"t": seq}, seq=seq))
        elif op == "notice":
            session.receive(frame("trade.A_B", {"e": "gap", "reason": "history_trimmed"}))
        else:
            session.connection_lost("gone")
            request = connect(session)
            assert request.get("since", {}).get("trade.A_B") == session.last_seq.get("trade.A_B")
        yielded += [(m.kind, m.seq, m.data) for m in session.events()]
    messages = [item for item in yielded if item[0] == MESSAGE]
    assert len(messages) + session.duplicates == frames
    last = None  # the last position yielded since the last server notice
    for index, (kind, seq, data) in enumerate(yielded):
        if kind == GAP and data.get("reason") == "history_trimmed":
            last = None
        elif kind == GAP and data["reason"] == "reconnected":
            assert last is None  # nothing to resume from: what came meanwhile is lost
        elif kind == GAP:
            assert data["reason"] == "positions_missing"
            assert last is not None and data["from"] == last + 1
        elif last is not None:
            assert seq > last
            if seq != last + 1:  # a jump: the message right before is its gap
                previous = yielded[index - 1]
                assert previous[0] == GAP and previous[2]["to"] == seq - 1
            last = seq
        else:
            last = seq
    if last is not None:
        assert session.last_seq["trade.A_B"] == last


def test_the_session_imports_no_event_loop_library():
    """Sans-I/O: the module imports neither Tornado nor asyncio (nor a
    socket); the package's Client does."""
    tree = ast.parse(inspect.getsource(marketstream.client.session))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported, "no imports found"
    assert not imported & {"tornado", "asyncio", "socket", "select"}, imported
