"""The server's order books (marketstream.fanout.books), driven directly:
a random order flow against a naive model (a dict sorted every time, its
checksum written here with zlib.crc32), gaps, stale and malformed data,
the top N and merged diffs."""

import zlib
from decimal import Decimal

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marketstream.fanout.books import (
    APPLIED,
    GAP,
    MALFORMED,
    SNAPSHOT,
    STALE,
    Book,
    BookFields,
    DiffMerger,
    merge_diffs,
)
from marketstream.wire.books import with_checksum

FLOW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the naive model -----------------------------------------------------------


class Model:
    """A book as dicts of price string -> quantity string, sorted on every read."""

    def __init__(self):
        self.bids = {}
        self.asks = {}

    def apply(self, data):
        for side, levels in ((self.bids, data["b"]), (self.asks, data["a"])):
            for price, qty in levels:
                if Decimal(qty) == 0:
                    side.pop(price, None)
                else:
                    side[price] = qty

    def top(self, n):
        bids = sorted(self.bids.items(), key=lambda kv: Decimal(kv[0]), reverse=True)
        asks = sorted(self.asks.items(), key=lambda kv: Decimal(kv[0]))
        return [list(kv) for kv in bids[:n]], [list(kv) for kv in asks[:n]]

    def checksum(self):
        bids, asks = self.top(10)
        text = []
        for i in range(10):
            if i < len(bids):
                text += bids[i]
            if i < len(asks):
                text += asks[i]
        return zlib.crc32(":".join(text).encode())


def price(tick):
    """Prices of varying length (9.75 < 10.00 < 100.25) so that string
    order is not numeric order."""
    return "%d.%02d" % (tick // 4, 25 * (tick % 4))


QTYS = st.sampled_from(["0", "0", "0.000", "1", "2.50", "0.001", "7", "12.0"])
# Bids on ticks 0..199, asks on 200..399: levels land inside and outside
# the top 5, 10 and 20.
BID = st.tuples(st.integers(0, 199).map(price), QTYS)
ASK = st.tuples(st.integers(200, 399).map(price), QTYS)
DIFFS = st.lists(
    st.tuples(st.lists(BID, max_size=6), st.lists(ASK, max_size=6), st.integers(1, 3)),
    min_size=1,
    max_size=60,
)
SNAPSHOTS = st.tuples(
    st.dictionaries(st.integers(150, 199).map(price), st.sampled_from(["1", "3.5"]), max_size=30),
    st.dictionaries(st.integers(200, 250).map(price), st.sampled_from(["2", "0.25"]), max_size=30),
)


def snapshot_data(bids, asks, u=100):
    return {
        "e": "depthSnapshot",
        "s": "X_Y",
        "u": u,
        "b": [[p, q] for p, q in bids.items()],
        "a": [[p, q] for p, q in asks.items()],
    }


def diff_datas(diffs, u=100):
    """Contiguous diff data: each spans ``ids`` update ids after the last."""
    out = []
    for bids, asks, ids in diffs:
        out.append(
            {
                "e": "depth",
                "s": "X_Y",
                "U": u + 1,
                "u": u + ids,
                "b": [list(level) for level in bids],
                "a": [list(level) for level in asks],
            }
        )
        u += ids
    return out


@FLOW
@given(SNAPSHOTS, DIFFS)
def test_a_random_order_flow_keeps_the_naive_models_book_checksum_and_top(snapshot, diffs):
    book, model = Book("X_Y"), Model()
    assert book.apply(snapshot_data(*snapshot), seq=500) == SNAPSHOT
    model.apply(snapshot_data(*snapshot))
    assert book.checksum == model.checksum()
    taken = {n: None for n in (5, 10, 20)}
    for seq, data in enumerate(diff_datas(diffs), start=501):
        assert book.apply(data, seq) == APPLIED
        model.apply(data)
        assert (book.u, book.seq) == (data["u"], seq)
        assert book.checksum == model.checksum()
        assert (book.bids(), book.asks()) == model.top(None)
        for n in (5, 10, 20):
            top = book.take_top(n)
            if model.top(n) == taken[n]:
                assert top is None
            else:
                assert top == {
                    "e": "depthTop",
                    "s": "X_Y",
                    "u": data["u"],
                    "b": model.top(n)[0],
                    "a": model.top(n)[1],
                }
                taken[n] = model.top(n)


@FLOW
@given(SNAPSHOTS, DIFFS, st.lists(st.integers(1, 8), min_size=1))
def test_merged_diffs_rebuild_the_book_the_raw_diffs_build(snapshot, diffs, chunks):
    raw, merged = Book("X_Y"), Book("X_Y")
    raw.apply(snapshot_data(*snapshot), seq=500)
    merged.apply(snapshot_data(*snapshot), seq=500)
    merger = DiffMerger()
    frames = []
    sizes = iter(chunks * 60)
    size = next(sizes)
    datas = diff_datas(diffs)
    for seq, data in enumerate(datas, start=501):
        assert raw.apply(data, seq) == APPLIED
        merger.add(raw.last_diff, raw.seq, raw.checksum)
        size -= 1
        if size == 0 or seq == 500 + len(datas):
            frames.append(merger.take())
            size = next(sizes)
    assert merger.take() is None
    last_u = 100
    for frame in frames:
        assert frame.data["U"] == last_u + 1  # contiguous with the frame before
        last_u = frame.data["u"]
        assert merged.apply(frame.data, frame.seq) == APPLIED
        assert merged.checksum == frame.checksum  # the checksum of the last diff merged
    assert (merged.bids(), merged.asks(), merged.u, merged.seq) == (
        raw.bids(),
        raw.asks(),
        raw.u,
        raw.seq,
    )
    assert merged.checksum == raw.checksum


def test_a_diff_that_does_not_follow_is_a_gap_and_the_book_waits_for_a_snapshot():
    book = Book()
    assert book.apply({"e": "depth", "U": 1, "u": 1, "b": [], "a": []}) == GAP  # no snapshot yet
    book.apply({"e": "depthSnapshot", "u": 10, "b": [["1", "1"]], "a": []}, seq=5)
    assert book.apply({"e": "depth", "U": 12, "u": 12, "b": [["1", "9"]], "a": []}, 6) == GAP
    assert not book.synced and book.bids() == [["1", "1"]]  # not applied
    # Nothing applies until the next snapshot, even a diff that would follow.
    assert book.apply({"e": "depth", "U": 11, "u": 11, "b": [["1", "2"]], "a": []}, 6) == GAP
    assert book.apply({"e": "depthSnapshot", "u": 12, "b": [], "a": [["2", "1"]]}, 7) == SNAPSHOT
    assert book.synced and book.bids() == [] and book.asks() == [["2", "1"]]
    assert book.apply({"e": "depth", "U": 13, "u": 13, "b": [], "a": []}, 8) == APPLIED


def test_diffs_already_in_the_book_are_stale_and_skipped():
    book = Book()
    book.apply({"e": "depthSnapshot", "u": 10, "b": [["1", "1"]], "a": []}, seq=5)
    assert book.apply({"e": "depth", "U": 9, "u": 10, "b": [["1", "0"]], "a": []}, 5) == STALE
    assert book.apply({"e": "depth", "U": 11, "u": 11, "b": [["1", "0"]], "a": []}, 4) == STALE
    assert book.synced and book.bids() == [["1", "1"]]


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"e": "depth", "U": 11, "u": 11, "b": [["1"]], "a": []},
        {"e": "depth", "U": 11, "u": 11, "b": [[1, "1"]], "a": []},
        {"e": "depth", "U": 11, "u": 11, "b": [["x", "1"]], "a": []},
        {"e": "depth", "U": 11, "u": 11, "b": [["NaN", "1"]], "a": []},
        {"e": "depth", "U": 11, "u": 11, "b": [["1", "Infinity"]], "a": []},
        {"e": "depth", "U": 11, "u": 11, "b": [["1", "-1"]], "a": []},
        {"e": "depth", "U": 11, "u": 11, "b": "1", "a": []},
        {"e": "depth", "U": "11", "u": 11, "b": [], "a": []},
        {"e": "depth", "U": 11, "u": True, "b": [], "a": []},
        {"e": "depth", "U": 12, "u": 11, "b": [], "a": []},
        {"e": "depthSnapshot", "b": [], "a": []},
    ],
)
def test_malformed_data_is_not_applied_and_unsyncs_the_book(data):
    book = Book()
    book.apply({"e": "depthSnapshot", "u": 10, "b": [["1", "1"]], "a": []}, seq=5)
    assert book.apply(data, 6) == MALFORMED
    assert not book.synced and book.bids() == [["1", "1"]] and book.u == 10


def test_apply_frame_reads_the_recovery_scripts_frame():
    book = Book()
    frame = b'{"stream":"depth.X_Y","data":{"e":"depthSnapshot","u":3,"b":[],"a":[]},"seq":9}'
    assert book.apply_frame(frame) == SNAPSHOT and book.seq == 9
    assert book.apply_frame(b"not json") == MALFORMED
    assert book.apply_frame(b"[1]") == MALFORMED


def test_the_same_price_spelled_twice_is_one_level_with_the_latest_strings():
    book = Book()
    book.apply({"e": "depthSnapshot", "u": 1, "b": [["100.0", "1"]], "a": []})
    book.apply({"e": "depth", "U": 2, "u": 2, "b": [["100.00", "2"]], "a": []})
    assert book.bids() == [["100.00", "2"]]
    book.apply({"e": "depth", "U": 3, "u": 3, "b": [["1E2", "0.0"]], "a": []})
    assert book.bids() == [] and book.checksum == zlib.crc32(b"")


def test_field_names_are_configurable():
    fields = BookFields(bids="bids", asks="asks", first_id="first", last_id="last", event="type")
    fields = fields._replace(snapshot="book")
    book = Book("X_Y", fields)
    book.apply({"type": "book", "last": 4, "bids": [["2", "1"]], "asks": [["3", "1"]]})
    book.apply({"type": "update", "first": 5, "last": 5, "bids": [["2.5", "1"]], "asks": []})
    assert book.top(5) == ([["2.5", "1"], ["2", "1"]], [["3", "1"]])
    assert book.checksum == zlib.crc32(b"2.5:1:3:1:2:1")
    merged = merge_diffs([{"first": 6, "last": 6, "bids": [["2", "0"]], "asks": []}], fields)
    assert merged == {"first": 6, "last": 6, "bids": [["2", "0"]], "asks": []}


def test_a_change_below_the_top_ten_keeps_the_checksum():
    book = Book()
    bids = [[str(100 - i), "1"] for i in range(30)]
    book.apply({"e": "depthSnapshot", "u": 1, "b": bids, "a": []})
    before = book.checksum
    book.apply({"e": "depth", "U": 2, "u": 2, "b": [["75", "9"], ["50.5", "1"]], "a": []})
    assert book.checksum == before
    book.apply({"e": "depth", "U": 3, "u": 3, "b": [["95", "0"]], "a": []})  # 11th moves up
    assert book.checksum != before and book.bids(10)[-1] == ["90", "1"]


def test_take_top_is_none_while_unsynced_and_after_an_unchanged_resync():
    book = Book("X_Y")
    assert book.take_top(5) is None
    snap = {"e": "depthSnapshot", "u": 1, "b": [["1", "1"]], "a": []}
    book.apply(snap)
    assert book.take_top(5)["b"] == [["1", "1"]]
    book.apply({"e": "depth", "U": 2, "u": 2, "b": [["0.5", "1"]], "a": []})
    assert book.take_top(1) is not None and book.take_top(1) is None
    assert book.take_top(5) is not None  # each depth is tracked on its own


def test_the_merger_refuses_a_diff_that_does_not_follow_and_resets():
    merger = DiffMerger()
    merger.add_data({"U": 1, "u": 2, "b": [], "a": []})
    with pytest.raises(ValueError, match="does not follow"):
        merger.add_data({"U": 4, "u": 4, "b": [], "a": []})
    assert merger.pending
    merger.reset()
    assert not merger.pending and merger.take() is None
    merger.add_data({"U": 9, "u": 9, "b": [], "a": [["1", "1"]]}, seq=3, checksum=7)
    taken = merger.take()
    assert (taken.data["U"], taken.seq, taken.checksum) == (9, 3, 7)
    assert merge_diffs([]) is None


def test_the_frame_with_its_checksum_is_the_frame_plus_one_key():
    book = Book()
    frame = (
        b'{"stream":"depth.X_Y","data":{"e":"depthSnapshot","u":3,"b":[["5","1"]],"a":[]},"seq":9}'
    )
    book.apply_frame(frame)
    out = orjson.loads(with_checksum(frame, book.checksum))
    assert list(out) == ["stream", "data", "seq", "checksum"]
    assert out["checksum"] == zlib.crc32(b"5:1")
