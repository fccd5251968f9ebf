"""The demo market without I/O: trades, prices, depth diffs and full-book
snapshots, tickers, and the schedule (which messages carry snapshots)."""

import random
import re
from decimal import Decimal

import pytest
import ujson

from marketstream.demo.simulator import (
    DEFAULT_MARKETS,
    MAX_LAG,
    SNAPSHOT_INTERVAL,
    Feed,
    FeedEvent,
    MarketSimulator,
    encode,
    envelope,
    market_spec,
)

DECIMALS = {"BTC_USDT": (2, 5), "ETH_USDT": (2, 4), "SOL_USDT": (3, 3), "SOL_USDC": (3, 3)}
START = {"BTC_USDT": 65000, "ETH_USDT": 3400, "SOL_USDT": 150, "SOL_USDC": 150}

TRADE_KEYS = {
    "e": str,
    "E": int,
    "s": str,
    "t": int,
    "p": str,
    "q": str,
    "b": int,
    "a": int,
    "m": bool,
    "T": int,
}
DEPTH_KEYS = {"e": str, "E": int, "s": str, "T": int, "U": int, "u": int, "b": list, "a": list}
TICKER_KEYS = {
    "e": str,
    "E": int,
    "s": str,
    "o": str,
    "c": str,
    "h": str,
    "l": str,
    "v": str,
    "V": str,
    "n": int,
}

NOW_US = 1_718_000_000_000_000


def assert_shape(data, keys):
    assert set(data) == set(keys), data
    for key, kind in keys.items():
        assert type(data[key]) is kind, (key, data)


def decimal_pattern(decimals):
    return re.compile(r"^[0-9]+\.[0-9]{%d}$" % decimals if decimals else r"^[0-9]+$")


def simulate(market, count, seed=1, trade_share=0.5):
    """``count`` messages of one market: trades and depth diffs interleaved
    pseudo-randomly, tickers every 50 messages."""
    sim = MarketSimulator(market, seed=seed)
    order = random.Random(seed)
    messages = []
    for i in range(count):
        now = NOW_US + i * 1000
        messages.append(sim.trade(now) if order.random() < trade_share else sim.depth(now))
        if i % 50 == 49:
            messages.append(sim.ticker(now))
    return sim, messages


class Book:
    """A client's order book built only from the diffs."""

    def __init__(self):
        self.bids, self.asks = {}, {}
        self.removed = 0

    def apply(self, diff):
        for side, book in (("b", self.bids), ("a", self.asks)):
            prices = [price for price, _ in diff[side]]
            assert len(prices) == len(set(prices)), "a price twice on one side: %r" % diff
            for price, qty in diff[side]:
                if qty == "0":
                    assert Decimal(price) in book, "removes a level that does not exist: %s" % price
                    del book[Decimal(price)]
                    self.removed += 1
                else:
                    assert Decimal(qty) > 0
                    book[Decimal(price)] = Decimal(qty)

    def check(self):
        assert self.bids and self.asks, "a side of the book is empty"
        assert max(self.bids) < min(self.asks), "crossed book: %s >= %s" % (
            max(self.bids),
            min(self.asks),
        )


# -- the simulator ---------------------------------------------------------------


@pytest.mark.parametrize("market", DEFAULT_MARKETS)
def test_trades(market):
    sim = MarketSimulator(market, seed=3)
    price_format = decimal_pattern(DECIMALS[market][0])
    qty_format = decimal_pattern(DECIMALS[market][1])
    trades = [sim.trade(NOW_US + i) for i in range(1000)]
    assert [trade["t"] for trade in trades] == list(range(1, 1001))
    for i, trade in enumerate(trades):
        assert_shape(trade, TRADE_KEYS)
        assert (trade["e"], trade["s"]) == ("trade", market)
        assert trade["E"] == NOW_US + i and trade["T"] == (NOW_US + i) // 1000
        assert price_format.match(trade["p"]), trade["p"]
        assert qty_format.match(trade["q"]), trade["q"]
        assert Decimal(trade["p"]) > 0 and Decimal(trade["q"]) > 0
        assert trade["b"] != trade["a"] and trade["b"] > 0 and trade["a"] > 0
        # The maker's order is the older one.
        maker, taker = (trade["b"], trade["a"]) if trade["m"] else (trade["a"], trade["b"])
        assert maker < taker
    assert {trade["m"] for trade in trades} == {True, False}


@pytest.mark.parametrize("market", DEFAULT_MARKETS)
def test_prices_random_walk_from_realistic_levels(market):
    sim = MarketSimulator(market, seed=5)
    prices = [Decimal(sim.trade(NOW_US)["p"]) for _ in range(5000)]
    start = START[market]
    assert abs(prices[0] - start) / start < Decimal("0.01")
    assert all(abs(price - start) / start < Decimal("0.15") for price in prices)
    # Small steps (sigma 1e-4 per trade), but it does move.
    steps = [abs(b - a) / a for a, b in zip(prices, prices[1:])]
    assert max(steps) < Decimal("0.001")
    assert len(set(prices)) > 100


@pytest.mark.parametrize("market", ["BTC_USDT", "SOL_USDC"])
def test_depth_diffs_build_a_consistent_book(market):
    sim, messages = simulate(market, 4000, seed=11)
    diffs = [m for m in messages if m["e"] == "depth"]
    assert len(diffs) > 1500
    price_format = decimal_pattern(DECIMALS[market][0])
    qty_format = decimal_pattern(DECIMALS[market][1])
    book = Book()
    previous_u = 0
    changed = 0
    distances = []
    last_price = None
    for message in messages:
        if message["e"] == "trade":
            last_price = Decimal(message["p"])
        if message["e"] != "depth":
            continue
        assert_shape(message, DEPTH_KEYS)
        assert message["s"] == market and message["T"] == message["E"]
        assert message["U"] == previous_u + 1
        assert message["u"] - message["U"] + 1 == len(message["b"]) + len(message["a"]) >= 1
        previous_u = message["u"]
        for side, reverse in (("b", True), ("a", False)):
            prices = [Decimal(price) for price, _ in message[side]]
            assert prices == sorted(prices, reverse=reverse)
            for price, qty in message[side]:
                assert price_format.match(price), price
                assert qty == "0" or qty_format.match(qty), qty
                if last_price is not None:
                    distances.append(abs(Decimal(price) - last_price) / last_price)
        changed += len(message["b"]) + len(message["a"])
        book.apply(message)
        book.check()
    assert book.removed > 100, "levels are removed with quantity 0"
    assert len(book.bids) >= 5 and len(book.asks) >= 5
    # Most changes are near the price.
    distances.sort()
    assert distances[len(distances) // 2] < Decimal("0.001")
    assert changed < 10 * len(diffs), "diffs are small"


def test_first_depth_diff_fills_an_empty_book():
    sim = MarketSimulator("ETH_USDT", seed=2)
    first = sim.depth(NOW_US)
    assert first["U"] == 1 and first["u"] == len(first["b"]) + len(first["a"])
    assert len(first["b"]) >= 10 and len(first["a"]) >= 10
    assert all(qty != "0" for _, qty in first["b"] + first["a"])
    book = Book()
    book.apply(first)
    book.check()


@pytest.mark.parametrize("market", ["BTC_USDT", "SOL_USDT"])
def test_ticker_statistics(market):
    sim = MarketSimulator(market, seed=4)
    before = sim.ticker(NOW_US)
    assert_shape(before, TICKER_KEYS)
    assert before["n"] == 0 and Decimal(before["v"]) == 0 and Decimal(before["V"]) == 0
    assert before["o"] == before["c"] == before["h"] == before["l"]

    sim2, messages = simulate(market, 3000, seed=4, trade_share=0.7)
    trades = [m for m in messages if m["e"] == "trade"]
    ticker = sim2.ticker(NOW_US + 10**9)
    assert_shape(ticker, TICKER_KEYS)
    assert (ticker["e"], ticker["s"], ticker["E"]) == ("ticker", market, NOW_US + 10**9)
    price_format = decimal_pattern(DECIMALS[market][0])
    for key in "ochlV":
        assert price_format.match(ticker[key]), (key, ticker[key])
    assert decimal_pattern(DECIMALS[market][1]).match(ticker["v"])
    o, c, h, low = (Decimal(ticker[key]) for key in "ochl")
    prices = [Decimal(trade["p"]) for trade in trades]
    assert ticker["n"] == len(trades)
    assert (o, c, h, low) == (prices[0], prices[-1], max(prices), min(prices))
    assert h >= max(o, c) and low <= min(o, c) and h > low
    assert Decimal(ticker["v"]) == sum(Decimal(trade["q"]) for trade in trades)
    quote = sum(Decimal(trade["p"]) * Decimal(trade["q"]) for trade in trades)
    assert abs(Decimal(ticker["V"]) - quote) <= Decimal(10) ** -DECIMALS[market][0]
    # Tickers in between counted the trades so far.
    for i, message in enumerate(messages):
        if message["e"] == "ticker":
            assert message["n"] == sum(1 for m in messages[:i] if m["e"] == "trade")


def test_seed_reproducibility():
    def run(market, seed):
        _, messages = simulate(market, 500, seed=seed)
        return messages

    assert run("SOL_USDC", 42) == run("SOL_USDC", 42)
    assert run("SOL_USDC", 42) != run("SOL_USDC", 43)
    # One seed for several markets still gives each its own walk.
    assert [m["p"] for m in run("SOL_USDC", 42) if m["e"] == "trade"] != [
        m["p"] for m in run("SOL_USDT", 42) if m["e"] == "trade"
    ]
    # Without a seed, runs differ.
    a, b = MarketSimulator("BTC_USDT"), MarketSimulator("BTC_USDT")
    assert [a.trade(0)["p"] for _ in range(20)] != [b.trade(0)["p"] for _ in range(20)]


def test_unknown_market_gets_a_deterministic_plausible_start():
    spec = market_spec("DOGE_EUR")
    assert spec == market_spec("DOGE_EUR")
    assert 1 <= spec.price <= 1000
    assert market_spec("BTC_EUR").price == 65000
    sim = MarketSimulator("DOGE_EUR", seed=1)
    trade = sim.trade(NOW_US)
    assert decimal_pattern(spec.price_decimals).match(trade["p"])
    assert abs(Decimal(trade["p"]) - Decimal(str(spec.price))) / Decimal(str(spec.price)) < Decimal(
        "0.01"
    )
    book = Book()
    for _ in range(500):
        sim.trade(NOW_US)
        book.apply(sim.depth(NOW_US))
        book.check()


def test_envelope_and_compact_encoding():
    data = {"e": "trade", "s": "SOL_USDC", "p": "1.5", "x": "é"}
    message = envelope("trade.SOL_USDC", data)
    assert message == {"stream": "trade.SOL_USDC", "data": data}
    text = encode(message)
    assert " " not in text and "é" in text
    assert ujson.loads(text) == message


# -- the scheduler -----------------------------------------------------------------


def test_feed_schedule_rate_split_and_tickers():
    feed = Feed(("BTC_USDT", "SOL_USDC"), rate=100, seed=9, start=0.0)
    messages = []
    now = 0.0
    while now < 10.0:
        now = min(10.0, now + 0.01)
        batch = feed.due(now, offset_us=NOW_US)
        messages += batch
        assert feed.next_due() > now
    counts = {}
    last_e = {}
    for kind, channel, payload in messages:
        counts[channel] = counts.get(channel, 0) + 1
        message = ujson.loads(payload)
        assert message["stream"] == channel and message["data"]["e"] == kind
        market = channel.split(".", 1)[1]
        assert message["data"]["E"] >= last_e.get(market, 0)
        assert NOW_US <= message["data"]["E"] <= NOW_US + 10**7
        last_e[market] = message["data"]["E"]
    for market in ("BTC_USDT", "SOL_USDC"):
        trades, depth = counts["trade." + market], counts["depth." + market]
        assert 850 <= trades + depth <= 1150, (trades, depth)
        assert 0.4 <= trades / (trades + depth) <= 0.6
        assert counts["ticker." + market] == 10


def test_feed_skips_ahead_instead_of_bursting():
    feed = Feed(("BTC_USDT",), rate=100, seed=1, start=0.0)
    feed.due(1.0)
    burst = feed.due(101.0)  # 100 s late, e.g. Redis was away
    assert len(burst) < 100 * (MAX_LAG + 0.5) + 5


def test_feed_data_format_and_validation():
    feed = Feed(("SOL_USDC",), rate=1000, fmt="data", seed=1)
    kind, channel, payload = feed.due(1.0)[0]
    data = ujson.loads(payload)
    assert "stream" not in data and data["e"] == kind and channel == "%s.SOL_USDC" % kind
    with pytest.raises(ValueError):
        Feed(("SOL_USDC",), fmt="xml")
    with pytest.raises(ValueError):
        Feed(("SOL_USDC",), rate=-1)
    with pytest.raises(ValueError):
        Feed(())


# -- full-book snapshots ------------------------------------------------------------------


def test_snapshot_is_the_book_built_from_every_diff_so_far():
    sim = MarketSimulator("BTC_USDT", seed=8)
    empty = sim.snapshot()
    assert empty == {"e": "depthSnapshot", "s": "BTC_USDT", "u": 0, "b": [], "a": []}
    book = Book()
    order = random.Random(8)
    for i in range(1500):
        if order.random() < 0.5:
            sim.trade(NOW_US + i)
            continue
        diff = sim.depth(NOW_US + i)
        book.apply(diff)
        snapshot = sim.snapshot()
        assert set(snapshot) == {"e", "s", "u", "b", "a"} and snapshot["u"] == diff["u"]
        assert {Decimal(p): Decimal(q) for p, q in snapshot["b"]} == book.bids
        assert {Decimal(p): Decimal(q) for p, q in snapshot["a"]} == book.asks
        bids = [Decimal(p) for p, _ in snapshot["b"]]
        asks = [Decimal(p) for p, _ in snapshot["a"]]
        assert bids == sorted(bids, reverse=True) and asks == sorted(asks), "best first"
        assert len(bids) <= MarketSimulator.MAX_LEVELS and len(asks) <= MarketSimulator.MAX_LEVELS
    # A client starting from the snapshot continues with U = u + 1.
    assert sim.depth(NOW_US + 2000)["U"] == snapshot["u"] + 1


def test_snapshot_does_not_change_the_simulation():
    a, b = MarketSimulator("SOL_USDC", seed=3), MarketSimulator("SOL_USDC", seed=3)
    for i in range(200):
        a.snapshot()
        assert a.depth(NOW_US + i) == b.depth(NOW_US + i)
        assert a.trade(NOW_US + i) == b.trade(NOW_US + i)


def test_feed_events_carry_snapshots():
    feed = Feed(("BTC_USDT", "SOL_USDC"), rate=100, seed=4, start=0.0)
    events, now, stamps = [], 0.0, {}
    while now < 10.0:
        now = round(now + 0.01, 2)
        for event in feed.events(now):
            events.append(event)
            stamps.setdefault(event.channel, []).append(now)
    assert all(isinstance(e, FeedEvent) for e in events)
    for market in ("BTC_USDT", "SOL_USDC"):
        depth = list(
            zip([e for e in events if e.channel == "depth." + market], stamps["depth." + market])
        )
        assert isinstance(depth[0][0].snapshot, dict), "the first diff carries the book"
        with_snapshot = [t for e, t in depth if e.snapshot is not None]
        gaps = [b - a for a, b in zip(with_snapshot, with_snapshot[1:])]
        assert max(gaps) <= SNAPSHOT_INTERVAL + 0.2
        assert len(with_snapshot) < len(depth) / 3, "most diffs carry no snapshot"
        for event, _ in depth:
            if event.snapshot is not None:
                assert event.snapshot["e"] == "depthSnapshot"
                assert event.snapshot["u"] == event.data["u"]
        assert all(e.snapshot is None for e in events if e.channel == "trade." + market)
        assert all(e.snapshot is True for e in events if e.channel == "ticker." + market)


def test_due_is_events_encoded_for_plain_publish():
    a = Feed(("SOL_USDC",), rate=200, seed=6, start=0.0)
    b = Feed(("SOL_USDC",), rate=200, seed=6, start=0.0)
    for step in range(1, 200):
        now = step * 0.01
        events = b.events(now, offset_us=NOW_US)
        assert a.due(now, offset_us=NOW_US) == [
            (e.kind, e.channel, encode(envelope(e.channel, e.data))) for e in events
        ]
