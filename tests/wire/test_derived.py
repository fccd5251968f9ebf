"""Derived stream names (marketstream.wire.derived): top-N books, update
speeds, and the refusals, with their reasons."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketstream.wire.derived import (
    INTERVALS,
    LATEST,
    MERGED,
    TOP,
    Derived,
    DerivedRules,
    Refused,
)
from marketstream.wire.requests import StreamRules
from tests.wire.strategies import FUZZ

RULES = DerivedRules()
MARKETS = st.from_regex(r"\A[A-Z0-9]{1,6}_[A-Z0-9]{1,6}\Z")


@given(MARKETS, st.sampled_from([5, 10, 20]), st.sampled_from([None, *INTERVALS]))
def test_top_n_streams_of_a_book_stream(market, depth, speed):
    name = "depth%d.%s" % (depth, market) + ("@" + speed if speed else "")
    assert RULES.parse(name) == Derived(
        name, "depth." + market, TOP, INTERVALS[speed] if speed else 100, depth
    )


@given(MARKETS, st.sampled_from(list(INTERVALS)))
def test_update_speeds_merge_books_and_keep_the_latest_ticker(market, speed):
    interval = INTERVALS[speed]
    assert RULES.parse("depth.%s@%s" % (market, speed)) == Derived(
        "depth.%s@%s" % (market, speed), "depth." + market, MERGED, interval, None
    )
    for kind in ("ticker", "bookTicker", "kline.1m"):
        derived = RULES.parse("%s.%s@%s" % (kind, market, speed))
        assert derived.kind == LATEST and derived.base == "%s.%s" % (kind, market)
        assert derived.interval_ms == interval


@pytest.mark.parametrize(
    "name, cause, words",
    [
        ("trade.BTC_USDT@100ms", "no_speed", "every trade matters"),
        ("trade.BTC_USDT@1000ms", "no_speed", "every trade matters"),
        ("depth.BTC_USDT@200ms", "unknown_speed", "allowed: 100ms, 250ms, 500ms, 1000ms"),
        ("depth.BTC_USDT@1s", "unknown_speed", "'1s'"),
        ("depth.BTC_USDT@", "unknown_speed", "''"),
        ("depth.BTC_USDT@100ms@100ms", "invalid_name", "at most one update speed"),
        ("@100ms", "invalid_name", "at most one update speed"),
        ("depth15.BTC_USDT", "invalid_name", "depth5, depth10 and depth20"),
        ("depth0010.BTC_USDT", "invalid_name", "depth5, depth10 and depth20"),
        ("depth10.BTC_USDT@50ms", "unknown_speed", "'50ms'"),
        ("funding.BTC_USDT@100ms", "no_speed", "funding.BTC_USDT has no update speeds"),
    ],
)
def test_refusals_say_why(name, cause, words):
    refused = RULES.parse(name)
    assert isinstance(refused, Refused) and refused.cause == cause
    assert words in refused.reason
    assert refused.cause in DerivedRules.CAUSES


@pytest.mark.parametrize("name", ["trade.BTC_USDT", "depth.BTC_USDT", "ticker.A_B", "x", ""])
def test_names_that_are_not_derived(name):
    assert RULES.parse(name) is None


def test_the_book_streams_are_configured_patterns():
    rules = DerivedRules(book_streams=["book.*", "depth.BTC_*"])
    assert rules.parse("book.ETH_USDT@100ms").kind == MERGED
    assert rules.parse("depth5.BTC_USDT").base == "depth.BTC_USDT"
    refused = rules.parse("depth5.ETH_USDT")
    assert refused.cause == "not_a_book" and "depth.ETH_USDT is not a book stream" in refused.reason
    # A stream type that is neither a book nor conflatable has no speeds.
    assert rules.parse("depth.ETH_USDT@100ms").cause == "no_speed"


@FUZZ
@given(st.text(max_size=40))
def test_any_name_is_derived_refused_or_not_derived_never_an_error(name):
    parsed = RULES.parse(name)
    assert parsed is None or isinstance(parsed, (Derived, Refused))
    if isinstance(parsed, Derived):
        assert "@" not in parsed.base and parsed.kind in (MERGED, LATEST, TOP)
        assert parsed.interval_ms in INTERVALS.values()


@given(MARKETS, st.sampled_from(["depth5.%s", "depth.%s@100ms", "ticker.%s@500ms"]))
def test_the_base_of_a_derived_name_passes_the_stream_rules(market, form):
    derived = RULES.parse(form % market)
    assert StreamRules().check(derived.base) is None


def test_a_long_depth_number_is_refused_without_reading_it_as_an_integer():
    # int() refuses more than 4300 digits: the name is compared, not converted.
    assert RULES.parse("depth%s.BTC_USDT" % ("9" * 5000)).cause == "invalid_name"
