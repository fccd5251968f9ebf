"""The order book (marketstream.client.book): snapshots, diffs, continuity
by update id and by position, gaps."""

import doctest

import pytest

import marketstream.client.book
from marketstream.client import GAP, SNAPSHOT, BookGap, Message, OrderBook


def test_docstring_examples():
    result = doctest.testmod(marketstream.client.book)
    assert result.attempted > 5 and result.failed == 0


def snapshot(u, bids=(), asks=()):
    return {
        "e": "depthSnapshot",
        "s": "X_Y",
        "u": u,
        "b": [list(level) for level in bids],
        "a": [list(level) for level in asks],
    }


def diff(first, last, bids=(), asks=()):
    return {
        "e": "depth",
        "s": "X_Y",
        "U": first,
        "u": last,
        "b": [list(level) for level in bids],
        "a": [list(level) for level in asks],
    }


def test_book_orders_by_decimal_value_and_keeps_strings():
    book = OrderBook()
    book.apply_snapshot(
        snapshot(
            1,
            bids=[("9.5", "1"), ("10.00", "2.50"), ("100", "3")],
            asks=[("1000.1", "1"), ("101", "1"), ("99.999", "0.001")],
        )
    )
    assert book.bids() == [["100", "3"], ["10.00", "2.50"], ["9.5", "1"]]
    assert book.asks() == [["99.999", "0.001"], ["101", "1"], ["1000.1", "1"]]
    assert book.bids(1) == [["100", "3"]]
    assert book.synced and book.u == 1


def test_book_applies_diffs_and_removes_levels():
    book = OrderBook()
    book.apply_snapshot(snapshot(10, bids=[("100", "1"), ("99", "2")], asks=[("101", "1")]))
    assert book.apply(diff(11, 13, bids=[("100", "0"), ("98", "5")], asks=[("101", "0.000")]))
    assert book.bids() == [["99", "2"], ["98", "5"]]
    assert book.asks() == []
    # Removing a level that is not there is harmless; the same price in another spelling is the same level.
    assert book.apply(diff(14, 14, bids=[("97", "0"), ("99.0", "7")]))
    assert book.bids() == [["99.0", "7"], ["98", "5"]]


def test_book_first_diff_may_straddle_the_snapshot():
    book = OrderBook()
    book.apply_snapshot(snapshot(10, bids=[("1", "1")]))
    assert book.apply(diff(3, 9, bids=[("1", "9")])) is False  # already in the snapshot
    assert book.bids() == [["1", "1"]]
    assert book.apply(diff(8, 12, bids=[("2", "1")]))  # U <= 11 <= u
    assert book.apply(diff(13, 13, bids=[("3", "1")]))
    assert [p for p, _ in book.bids()] == ["3", "2", "1"] and book.u == 13


@pytest.mark.parametrize("first", [12, 20])
def test_book_gap_after_snapshot(first):
    book = OrderBook()
    book.apply_snapshot(snapshot(10))
    with pytest.raises(BookGap):
        book.apply(diff(first, first + 2))
    assert not book.synced
    with pytest.raises(BookGap):  # unusable until the next snapshot
        book.apply(diff(11, 11))
    book.apply_snapshot(snapshot(30, bids=[("5", "1")]))
    assert book.apply(diff(31, 31, bids=[("6", "1")])) and book.synced


def test_book_gap_between_diffs():
    book = OrderBook()
    book.apply_snapshot(snapshot(10))
    book.apply(diff(11, 15))
    with pytest.raises(BookGap, match="expected update 16, got 17..18"):
        book.apply(diff(17, 18))
    assert not book.synced


def test_book_needs_a_snapshot_first():
    with pytest.raises(BookGap):
        OrderBook().apply(diff(1, 1))


def test_book_continuity_by_seq():
    book = OrderBook()
    book.apply_message(Message("depth.X_Y", snapshot(10, asks=[("2", "1")]), 500, SNAPSHOT, ""))
    assert book.seq == 500
    assert book.apply(diff(11, 11, asks=[("3", "1")]), seq=501)
    assert book.apply(diff(12, 12), seq=501) is False  # a repeated position
    with pytest.raises(BookGap, match="expected position 502, got 503"):
        book.apply(diff(12, 12), seq=503)  # update ids fine, a position missing
    assert not book.synced


def test_book_gap_message_unsyncs():
    book = OrderBook.empty()
    book.apply(diff(1, 1, bids=[("1", "1")]))
    gap = Message("depth.X_Y", {"e": "gap"}, None, GAP, "")
    assert book.apply_message(gap) is False
    assert not book.synced


def test_book_as_dict():
    book = OrderBook()
    book.apply_snapshot(snapshot(1, bids=[("1.0", "2")], asks=[("1.5", "3")]), seq=7)
    assert book.as_dict() == {"seq": 7, "bids": [["1.0", "2"]], "asks": [["1.5", "3"]]}
