"""Stream-name rules (marketstream.wire.streams): the defaults, the
allow-lists and the settings, against a model and fuzzed."""

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from marketstream.server.config import load_settings
from marketstream.wire import requests, streams
from marketstream.wire.streams import StreamRules
from tests.wire.strategies import FUZZ


DEFAULT_TYPES = ("depth", "trade", "ticker", "bookTicker", "kline")


@pytest.mark.parametrize(
    "name",
    [
        "trade.SOL_USDC",
        "depth.BTC_USDT",
        "ticker.ETH_USDT",
        "bookTicker.X1_Y2",
        "kline.1m.SOL_USDC",
        "depth.200ms.SOL_USDC",
        "kline.1m.extra.A_B",
        "trade." + "A" * 96 + "_" + "B" * 97,  # exactly 200 characters
    ],
)
def test_default_rules_accept(name):
    assert StreamRules().check(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "",
        "trade",
        "SOL_USDC",
        "trade.",
        ".SOL_USDC",
        "orders.SOL_USDC",
        "Trade.SOL_USDC",
        "trade.sol_usdc",
        "trade.Sol_Usdc",
        "trade.SOLUSDC",
        "trade.SOL_",
        "trade._USDC",
        "trade.SOL_USDC_X",
        "kline..SOL_USDC",
        "kline.1m..SOL_USDC",
        "kline.1-m.SOL_USDC",
        "trade.SOL_USDC.",
        "trade." + "A" * 97 + "_" + "B" * 97,  # 201 characters
        "trade." + "A" * 1000 + "_USDC",
        "trade.SOL USDC",
        "trade. SOL_USDC",
        " trade.SOL_USDC",
        "trade.SOL_USDC ",
        "trade .SOL_USDC",
        "trade.*",
        "*.SOL_USDC",
        "trade.SOL_*",
        "trade.?",
        "kline.*.SOL_USDC",
        "trade.SOL_USD\u0660",
        "trade.SOL_USDC\x00",
        "kline.\uff11m.SOL_USDC",
    ],
)
def test_default_rules_reject(name):
    reason = StreamRules().check(name)
    assert isinstance(reason, str) and reason


@pytest.mark.parametrize("name", ["trade.SOL_USDC\n", "kline.1m\n.SOL_USDC", "trade.SOL_USDC\r\n"])
def test_default_rules_reject_trailing_newlines(name):
    """A Python ``$`` also matches before a final newline: the market and
    middle-part checks must not accept "SOL_USDC\\n"."""
    assert StreamRules().check(name) is not None


def test_accepted_names_are_remembered_within_a_bound(monkeypatch):
    monkeypatch.setattr(streams, "ACCEPTED_CACHE", 100)
    rules = StreamRules()
    for i in range(250):
        assert rules.check("trade.M%d_USDT" % i) is None
        assert len(rules._accepted) <= 100
    assert rules.check("trade.M249_USDT") is None and "trade.M249_USDT" in rules._accepted
    assert rules.check("trade.bad") is not None and "trade.bad" not in rules._accepted


def test_markets_allow_list_restricts_markets():
    rules = StreamRules(markets=("SOL_USDC", "BTC_USDT"))
    assert rules.check("trade.SOL_USDC") is None
    assert rules.check("kline.1m.BTC_USDT") is None
    assert rules.check("trade.ETH_USDT") is not None
    assert rules.check("trade.sol_usdc") is not None
    assert rules.check("orders.SOL_USDC") is not None


def test_types_allow_list():
    rules = StreamRules(types=("trade",))
    assert rules.check("trade.SOL_USDC") is None
    assert rules.check("depth.SOL_USDC") is not None


def test_custom_market_pattern():
    rules = StreamRules(market_pattern=r"^[a-z]+-[a-z]+$")
    assert rules.check("trade.sol-usdc") is None
    assert rules.check("trade.SOL_USDC") is not None
    compiled = StreamRules(market_pattern=re.compile(r"^[A-Z]{3}$"))
    assert compiled.check("trade.SOL") is None
    assert compiled.check("trade.SOL_USDC") is not None


def test_from_settings_defaults():
    rules = StreamRules.from_settings(load_settings(environ={}).protocol)
    for name in ("trade.SOL_USDC", "bookTicker.X1_Y2", "depth.200ms.SOL_USDC"):
        assert rules.check(name) is None
    for name in ("trade.sol_usdc", "orders.SOL_USDC", "trade.*"):
        assert rules.check(name) is not None


def test_from_settings_with_overrides():
    settings_ = load_settings(
        environ={},
        overrides={"protocol.stream_types": "trade, depth", "protocol.markets": "SOL_USDC"},
    )
    rules = StreamRules.from_settings(settings_.protocol)
    assert rules.check("trade.SOL_USDC") is None
    assert rules.check("depth.SOL_USDC") is None
    assert rules.check("ticker.SOL_USDC") is not None
    assert rules.check("trade.BTC_USDT") is not None
    pattern = load_settings(environ={}, overrides={"protocol.market_pattern": "^[a-z]+$"})
    rules = StreamRules.from_settings(pattern.protocol)
    assert rules.check("trade.sol") is None and rules.check("trade.SOL_USDC") is not None


MARKET_RULE = re.compile(r"[A-Z0-9]+_[A-Z0-9]+", re.ASCII)
MIDDLE_RULE = re.compile(r"[A-Za-z0-9]+", re.ASCII)


def model_accepts(name):
    if not name or len(name) > 200:
        return False
    parts = name.split(".")
    return (
        len(parts) >= 2
        and parts[0] in DEFAULT_TYPES
        and MARKET_RULE.fullmatch(parts[-1]) is not None
        and all(MIDDLE_RULE.fullmatch(p) for p in parts[1:-1])
    )


PART = (
    st.sampled_from(
        DEFAULT_TYPES + ("SOL_USDC", "BTC_USDT", "X1_Y2", "1m", "200ms", "", "*", "sol_usdc")
    )
    | st.text(max_size=8)
    | st.builds(
        lambda base, junk: base + junk,
        st.sampled_from(["SOL_USDC", "1m", "trade"]),
        st.text(max_size=2),
    )
)
NAMES = st.lists(PART, min_size=1, max_size=5).map(".".join) | st.text()


@FUZZ
@given(NAMES)
@example("trade.SOL_USDC\n")
def test_fuzz_stream_rules(name):
    reason = StreamRules().check(name)
    assert reason is None or (isinstance(reason, str) and reason)
    assert (reason is None) == model_accepts(name), (name, reason)


@FUZZ
@given(st.text())
def test_fuzz_stream_rules_on_arbitrary_text(name):
    reason = StreamRules().check(name)
    if reason is None:
        assert model_accepts(name), name


def test_requests_still_exports_the_rules():
    assert requests.StreamRules is StreamRules
    assert requests.MAX_STREAM_NAME == streams.MAX_STREAM_NAME == 200


# --- derived names ([books]) ---------------------------------------------------------


def derived_rules(**protocol):
    from marketstream.wire.derived import DerivedRules

    return StreamRules(derived=DerivedRules(), **protocol)


@pytest.mark.parametrize(
    "name",
    [
        "depth5.BTC_USDT",
        "depth10.BTC_USDT",
        "depth20.BTC_USDT",
        "depth.BTC_USDT@100ms",
        "depth.BTC_USDT@1000ms",
        "depth10.BTC_USDT@1000ms",
        "ticker.BTC_USDT@250ms",
        "bookTicker.BTC_USDT@500ms",
        "kline.1m.BTC_USDT@1000ms",
    ],
)
def test_derived_names_are_accepted_when_their_base_is(name):
    assert derived_rules().refusal(name) is None
    assert derived_rules().refusal(name) is None  # and again, from the cache


@pytest.mark.parametrize(
    "name, cause",
    [
        ("trade.BTC_USDT@100ms", "no_speed"),
        ("depth.BTC_USDT@200ms", "unknown_speed"),
        ("depth.BTC_USDT@100ms@100ms", "invalid_name"),
        ("depth7.BTC_USDT", "invalid_name"),
        ("depth.btc_usdt@100ms", "unknown_market"),
        ("depth10.btc", "unknown_market"),
        ("btcusdt@trade", "invalid_name"),  # Binance's form: told the form it must have
    ],
)
def test_derived_names_are_refused_with_a_cause(name, cause):
    refusal = derived_rules().refusal(name)
    assert refusal is not None and refusal[0] == cause, refusal


def test_derived_names_follow_the_allow_lists():
    rules = derived_rules(markets=("SOL_USDC",))
    assert rules.refusal("depth10.SOL_USDC") is None
    assert rules.refusal("depth10.BTC_USDT")[0] == "unknown_market"
    assert rules.refusal("depth.BTC_USDT@100ms")[0] == "unknown_market"


def test_without_books_derived_names_are_plain_names():
    assert StreamRules().refusal("depth.BTC_USDT@100ms")[0] == "unknown_market"
    assert StreamRules().refusal("depth10.BTC_USDT")[0] == "unknown_type"
