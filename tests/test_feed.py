"""The demo publisher: the simulator and scheduler without sockets, run_feed
against the real Redis (including an outage), and the marketstream-feed
command as a subprocess."""

import asyncio
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import mock
import pytest
import redis
import redis.asyncio
import ujson

from marketstream.embedded import free_port
from marketstream.history import split_position
from marketstream.feed import (DEFAULT_MARKETS, MAX_LAG, Feed, MarketSimulator, build_parser,
                               encode, envelope, main, market_spec, redact, run_feed)
from tests.helpers import async_wait_until, wait_until

REPO_ROOT = Path(__file__).resolve().parents[1]

DECIMALS = {"BTC_USDT": (2, 5), "ETH_USDT": (2, 4), "SOL_USDT": (3, 3), "SOL_USDC": (3, 3)}
START = {"BTC_USDT": 65000, "ETH_USDT": 3400, "SOL_USDT": 150, "SOL_USDC": 150}

TRADE_KEYS = {"e": str, "E": int, "s": str, "t": int, "p": str, "q": str, "b": int, "a": int,
              "m": bool, "T": int}
DEPTH_KEYS = {"e": str, "E": int, "s": str, "T": int, "U": int, "u": int, "b": list, "a": list}
TICKER_KEYS = {"e": str, "E": int, "s": str, "o": str, "c": str, "h": str, "l": str, "v": str,
               "V": str, "n": int}

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
            max(self.bids), min(self.asks))


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
    ticker = sim2.ticker(NOW_US + 10 ** 9)
    assert_shape(ticker, TICKER_KEYS)
    assert (ticker["e"], ticker["s"], ticker["E"]) == ("ticker", market, NOW_US + 10 ** 9)
    price_format = decimal_pattern(DECIMALS[market][0])
    for key in "ochlV":
        assert price_format.match(ticker[key]), (key, ticker[key])
    assert decimal_pattern(DECIMALS[market][1]).match(ticker["v"])
    o, c, h, l = (Decimal(ticker[key]) for key in "ochl")
    prices = [Decimal(trade["p"]) for trade in trades]
    assert ticker["n"] == len(trades)
    assert (o, c, h, l) == (prices[0], prices[-1], max(prices), min(prices))
    assert h >= max(o, c) and l <= min(o, c) and h > l
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
    assert ([m["p"] for m in run("SOL_USDC", 42) if m["e"] == "trade"]
            != [m["p"] for m in run("SOL_USDT", 42) if m["e"] == "trade"])
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
        "0.01")
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


def test_redact():
    assert redact("redis://:secret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact("redis://user:secret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


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
        assert NOW_US <= message["data"]["E"] <= NOW_US + 10 ** 7
        last_e[market] = message["data"]["E"]
    for market in ("BTC_USDT", "SOL_USDC"):
        trades, depth = counts["trade." + market], counts["depth." + market]
        assert 850 <= trades + depth <= 1150, (trades, depth)
        assert 0.4 <= trades / (trades + depth) <= 0.6
        assert counts["ticker." + market] == 10


def test_feed_skips_ahead_instead_of_bursting():
    feed = Feed(("BTC_USDT",), rate=100, seed=1, start=0.0)
    feed.due(1.0)
    burst = feed.due(101.0)   # 100 s late, e.g. Redis was away
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


# -- run_feed against Redis ----------------------------------------------------------

def subscribe(client, *channels):
    pubsub = client.pubsub()
    pubsub.subscribe(*channels)
    confirmed = set()

    def all_confirmed():
        message = pubsub.get_message(timeout=0.05)
        if message and message["type"] == "subscribe":
            confirmed.add(message["channel"].decode())
        return confirmed == set(channels)

    wait_until(all_confirmed, message="subscriptions confirmed")
    return pubsub


def parse(payload):
    """A published payload as JSON: recoverable ones (``@<seq> <frame>``)
    must carry the same position in the frame."""
    seq, frame = split_position(payload)
    message = ujson.loads(frame)
    assert message.get("seq") == seq, payload
    return message


def collect(pubsub, count, timeout=5.0):
    """Exactly ``count`` messages as (channel, parsed payload)."""
    received = []

    def enough():
        message = pubsub.get_message(timeout=0.05)
        while message is not None:   # drain what has arrived
            if message["type"] == "message":
                received.append((message["channel"].decode(), parse(message["data"])))
            message = pubsub.get_message(timeout=0)
        return len(received) >= count

    wait_until(enough, timeout=timeout, message="%d messages" % count)
    assert pubsub.get_message(timeout=0.1) is None, "more messages than published"
    return received


def test_run_feed_publishes_envelopes(redis_client, redis_url):
    channels = ("trade.BTC_USDT", "depth.BTC_USDT", "ticker.BTC_USDT")
    pubsub = subscribe(redis_client, *channels)
    try:
        started = time.monotonic()
        counts = asyncio.run(run_feed(redis_url, markets=("BTC_USDT",), rate=200,
                                      duration=1.5, seed=7))
        assert 1.4 < time.monotonic() - started < 4
        assert counts["trade"] > 50 and counts["depth"] > 50 and counts["ticker"] == 1
        received = collect(pubsub, sum(counts.values()))
    finally:
        pubsub.close()

    by_kind = {}
    positions = {}
    for channel, message in received:
        assert list(message) == ["stream", "data", "seq"]
        assert message["stream"] == channel
        if channel in positions:
            assert message["seq"] == positions[channel] + 1
        positions[channel] = message["seq"]
        kind = channel.split(".")[0]
        assert message["data"]["e"] == kind and message["data"]["s"] == "BTC_USDT"
        by_kind.setdefault(kind, []).append(message["data"])
    assert {kind: len(items) for kind, items in by_kind.items()} == counts
    assert [trade["t"] for trade in by_kind["trade"]] == list(range(1, counts["trade"] + 1))
    book = Book()
    previous_u = 0
    for diff in by_kind["depth"]:
        assert diff["U"] == previous_u + 1 and diff["u"] >= diff["U"]
        previous_u = diff["u"]
        book.apply(diff)
        book.check()
    assert by_kind["ticker"][0]["n"] <= counts["trade"]
    # Event times are wall-clock microseconds.
    assert abs(by_kind["trade"][-1]["E"] / 1e6 - time.time()) < 10


def test_run_feed_data_format(redis_client, redis_url):
    pubsub = subscribe(redis_client, "trade.SOL_USDC", "depth.SOL_USDC", "trade.ETH_USDT")
    try:
        counts = asyncio.run(run_feed(redis_url, markets="SOL_USDC", rate=100,
                                      fmt="data", duration=0.5))
        assert counts["trade"] and counts["depth"]
        received = collect(pubsub, counts["trade"] + counts["depth"])
    finally:
        pubsub.close()
    for channel, data in received:
        assert "stream" not in data
        assert channel == "%s.SOL_USDC" % data["e"] and data["s"] == "SOL_USDC"


def test_run_feed_stops_on_event_and_closes_its_connection(redis_client, redis_url):
    baseline = len(redis_client.client_list())

    async def scenario():
        stop = asyncio.Event()
        task = asyncio.ensure_future(run_feed(redis_url, rate=50, stop=stop))
        await async_wait_until(lambda: len(redis_client.client_list()) > baseline,
                               message="the feed connected")
        started = time.monotonic()
        stop.set()
        counts = await asyncio.wait_for(task, 5)
        assert time.monotonic() - started < 1
        return counts

    counts = asyncio.run(scenario())
    assert set(counts) == {"trade", "depth", "ticker"}
    assert counts["trade"] + counts["depth"] > 0
    wait_until(lambda: len(redis_client.client_list()) == baseline,
               message="the feed's connection closed")


def test_run_feed_task_can_be_cancelled(redis_client, redis_url):
    baseline = len(redis_client.client_list())

    async def scenario():
        task = asyncio.ensure_future(run_feed(redis_url, markets=("SOL_USDC",), rate=50))
        await async_wait_until(lambda: len(redis_client.client_list()) > baseline,
                               message="the feed connected")
        task.cancel()
        done, _ = await asyncio.wait((task,), timeout=5)
        assert done and task.cancelled(), "the feed went on after cancel()"
        await async_wait_until(lambda: len(redis_client.client_list()) == baseline,
                               message="the feed's connection closed")

    asyncio.run(scenario())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() is Python 3.11+")
def test_run_feed_stops_even_if_a_publish_swallows_the_cancel(redis_url):
    """A cancel that lands in a Redis call which swallows it (a race in the
    client library: the cancel meets a socket timeout) still stops the feed."""
    entered = []

    async def swallowing_publish(client, batch):
        entered.append(1)
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            raise asyncio.TimeoutError() from None

    async def scenario():
        stop = asyncio.Event()  # ends the feed if the test fails
        with mock.patch("marketstream.feed._publish", swallowing_publish):
            task = asyncio.ensure_future(run_feed(redis_url, markets=("SOL_USDC",), rate=50,
                                                  stop=stop))
            try:
                await async_wait_until(lambda: entered, message="a publish started")
                task.cancel()
                done, _ = await asyncio.wait((task,), timeout=5)
                assert done and task.cancelled(), "the feed went on after cancel()"
            finally:
                stop.set()
                await asyncio.wait((task,), timeout=5)

    asyncio.run(scenario())


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, level=logging.WARNING):
        return [r.getMessage() for r in self.records if r.levelno >= level]


def test_run_feed_survives_a_redis_outage(redis_server, redis_url):
    records = Records()
    logger = logging.getLogger("tests.feed.outage")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(records)

    async def next_message(pubsub, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message:
                return message
        raise AssertionError("no message within %ss" % timeout)

    async def scenario():
        stop = asyncio.Event()
        task = asyncio.ensure_future(run_feed(redis_url, markets=("BTC_USDT",), rate=100,
                                              stop=stop, log=logger))
        client = redis.asyncio.Redis.from_url(redis_url)
        pubsub = client.pubsub()
        await pubsub.subscribe("trade.BTC_USDT")
        await next_message(pubsub)
        await pubsub.aclose()
        await client.aclose()

        redis_server.kill()
        await async_wait_until(lambda: any("unavailable" in m for m in records.messages()),
                               message="a warning about Redis")
        await async_wait_until(
            lambda: any("still unavailable" in m for m in records.messages(logging.DEBUG)),
            message="a retry")
        assert not task.done()

        # Not in a worker thread: redis-server is told to die with the thread
        # that started it.  The feed waits meanwhile, which it must survive too.
        redis_server.restart()
        client = redis.asyncio.Redis.from_url(redis_url)
        pubsub = client.pubsub()
        await pubsub.subscribe("trade.BTC_USDT")
        message = await next_message(pubsub)
        assert parse(message["data"])["data"]["e"] == "trade"
        await pubsub.aclose()
        await client.aclose()
        assert any("is back" in m for m in records.messages())
        stop.set()
        return await asyncio.wait_for(task, 5)

    try:
        counts = asyncio.run(scenario())
    finally:
        logger.removeHandler(records)
        if not redis_server.running:
            redis_server.restart()
    assert counts["trade"] > 0
    assert len([m for m in records.messages() if "unavailable" in m]) == 1, records.messages()


# -- the command line -------------------------------------------------------------------

def feed_command(*args):
    return [sys.executable, "-m", "marketstream.feed", *args]


def feed_env():
    env = dict(os.environ)
    env.pop("REDIS_URL", None)
    return env


def test_cli_publishes_for_a_duration(redis_client, redis_url):
    pubsub = subscribe(redis_client, "trade.SOL_USDC", "depth.SOL_USDC", "trade.BTC_USDT")
    try:
        started = time.monotonic()
        result = subprocess.run(
            feed_command("--redis-url", redis_url, "--duration", "1", "--rate", "20",
                         "--markets", "SOL_USDC"),
            cwd=REPO_ROOT, env=feed_env(), capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 15
        summary = re.search(r"published (\d+) trades, (\d+) depth diffs", result.stderr)
        assert summary, result.stderr
        trades, depth = int(summary.group(1)), int(summary.group(2))
        assert trades + depth > 5
        received = collect(pubsub, trades + depth)
    finally:
        pubsub.close()
    assert "publishing SOL_USDC" in result.stderr and redis_url in result.stderr
    assert all(channel.endswith(".SOL_USDC") and message["stream"] == channel
               for channel, message in received)


def test_cli_unreachable_redis_exits_1():
    url = "redis://127.0.0.1:%d/0" % free_port()
    result = subprocess.run(feed_command("--redis-url", url, "--duration", "1"),
                            cwd=REPO_ROOT, env=feed_env(), capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1
    assert "cannot reach Redis at %s" % url in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_exits_0_on_signal(redis_client, redis_url, sig):
    pubsub = subscribe(redis_client, "trade.ETH_USDT", "depth.ETH_USDT")
    process = subprocess.Popen(
        feed_command("--redis-url", redis_url, "--rate", "50", "--markets", "ETH_USDT"),
        cwd=REPO_ROOT, env=feed_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    try:
        wait_until(lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05),
                   timeout=15, message="a message from the feed")
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=10)
    finally:
        pubsub.close()
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "feed stopped after" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("args", [["--rate", "-1"], ["--format", "xml"], ["--markets", " , "],
                                  ["--duration", "0"], ["--seed", "x"]])
def test_cli_rejects_bad_arguments(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "marketstream-feed: error" in capsys.readouterr().err


def test_cli_defaults(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://10.0.0.5:6380/1")
    args = build_parser().parse_args([])
    assert args.redis_url == "redis://10.0.0.5:6380/1"
    assert (args.markets, args.rate, args.fmt, args.duration) == (DEFAULT_MARKETS, 10.0,
                                                                 "envelope", None)
    monkeypatch.delenv("REDIS_URL")
    assert build_parser().parse_args([]).redis_url == "redis://127.0.0.1:6379/0"
    args = build_parser().parse_args(["--markets", "BTC_USDT, SOL_USDC,BTC_USDT", "-v"])
    assert args.markets == ("BTC_USDT", "SOL_USDC") and args.verbose
