"""The demo publisher ``marketstream-feed``: synthetic market data into Redis.

::

    marketstream-feed --redis-url redis://127.0.0.1:6379/0 --rate 50
    marketstream-feed --markets BTC_USDT,SOL_USDC --format data --duration 60 --seed 1
    python -m marketstream.feed --help

For every market it PUBLISHes three streams, the channel being the stream
name: ``trade.<MARKET>`` and ``depth.<MARKET>`` (together ``--rate`` events per
second and market, about half each) and ``ticker.<MARKET>`` (once a second)::

    {"stream":"trade.SOL_USDC","data":{"e":"trade","E":1718000000123456,
     "s":"SOL_USDC","t":17,"p":"150.012","q":"2.310","b":1000042,"a":1000039,
     "m":false,"T":1718000000123}}

With ``--format data`` only the data object is published (the server then
wraps it).  Prices follow a geometric random walk rounded to the market's
tick; each market keeps a real order book whose changes are published as
depth diffs (consecutive update ids ``U``..``u``, quantity ``"0"`` removes a
level), and the ticker reports statistics over the trades since start.

The simulator (:class:`MarketSimulator`) and the scheduler (:class:`Feed`) do
no I/O; :func:`run_feed` publishes with one Redis pipeline per scheduling
step and runs inside any asyncio event loop (``marketstream --demo`` runs it
beside the server).

Exit codes: 0 after ``--duration`` or on SIGINT/SIGTERM, 1 when Redis cannot
be reached at start-up, 2 for bad arguments.
"""

import argparse
import asyncio
import logging
import math
import os
import random
import signal
import sys
import time
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
import ujson
from redis.exceptions import RedisError

__all__ = ["DEFAULT_MARKETS", "FORMATS", "Feed", "MarketSimulator", "MarketSpec",
           "build_parser", "encode", "envelope", "main", "market_spec", "redact", "run_feed"]

log = logging.getLogger("marketstream.feed")

DEFAULT_MARKETS = ("BTC_USDT", "ETH_USDT", "SOL_USDT", "SOL_USDC")
FORMATS = ("envelope", "data")
KINDS = ("trade", "depth", "ticker")

SIGMA = 1e-4             # relative standard deviation of the price per trade
TICKER_INTERVAL = 1.0    # seconds between tickers of one market
SUMMARY_INTERVAL = 10.0  # seconds between summary log lines
RETRY_INTERVAL = 1.0     # seconds between attempts while Redis is unavailable
MIN_STEP = 0.005         # shortest sleep of the scheduler: batches high rates
MAX_LAG = 1.0            # a schedule further behind skips ahead instead of bursting


@dataclass(frozen=True)
class MarketSpec:
    """Start price, tick (``10 ** -price_decimals``) and lot size
    (``10 ** -qty_decimals``) of a market."""

    price: float
    price_decimals: int
    qty_decimals: int


_SPECS = {
    "BTC": MarketSpec(65000.0, 2, 5),
    "ETH": MarketSpec(3400.0, 2, 4),
    "SOL": MarketSpec(150.0, 3, 3),
}


def market_spec(market):
    """The spec of ``market`` (``BASE_QUOTE``): known base assets have
    realistic levels; any other market gets a deterministic price between
    50 and 150 with a 0.01 tick."""
    base = market.split("_", 1)[0].upper()
    if base in _SPECS:
        return _SPECS[base]
    crc = zlib.crc32(market.encode("utf-8"))
    return MarketSpec(50.0 + crc % 10000 / 100.0, 2, 3)


def _decimal(units, decimals):
    """``units * 10 ** -decimals`` as a fixed-point string (units >= 0)."""
    if decimals == 0:
        return str(units)
    digits = str(units).rjust(decimals + 1, "0")
    return digits[:-decimals] + "." + digits[-decimals:]


def envelope(stream, data):
    """The message clients receive: ``{"stream": ..., "data": ...}``."""
    return {"stream": stream, "data": data}


def encode(message):
    """Compact JSON text (no spaces, UTF-8 kept as is)."""
    return ujson.dumps(message, ensure_ascii=False, escape_forward_slashes=False)


class MarketSimulator:
    """One market: random-walk price, trades, an order book and statistics.

    Pure and socket-free; every method takes the event time in microseconds
    and returns the data object of one message::

        sim = MarketSimulator("SOL_USDC", seed=1)
        sim.trade(now_us)   # {"e": "trade", ...}
        sim.depth(now_us)   # {"e": "depth", ...}: the book's changes since the last diff
        sim.ticker(now_us)  # {"e": "ticker", ...}: statistics since start

    Internally prices are integers in ticks and quantities integers in lots,
    so formatting is exact.  The published book starts empty: the first diff
    fills it, applying every diff in order reproduces it.
    """

    MIN_LEVELS = 10      # refill a side that has fewer levels ...
    TARGET_LEVELS = 20   # ... up to this many
    MAX_LEVELS = 30      # trim the farthest levels beyond this
    MAX_DISTANCE = 80    # in grid steps from the touch; farther levels are cancelled

    def __init__(self, market, seed=None):
        self.market = market
        self.spec = market_spec(market)
        self.price_decimals = self.spec.price_decimals
        self.qty_decimals = self.spec.qty_decimals
        self._rng = random.Random(None if seed is None else "%s:%s" % (seed, market))
        self._tick_scale = 10 ** self.price_decimals
        self._lot_scale = 10 ** self.qty_decimals
        self._mid = self.spec.price * self._tick_scale   # float, in ticks
        # Book levels sit on offsets of a grid of about 0.002 % of the price.
        self._grid = max(1, round(self._mid * 2e-5))
        self._bids = {}   # price in ticks -> quantity in lots, as published
        self._asks = {}
        self._trade_id = 0
        self._update_id = 0
        self._order_id = self._rng.randrange(10 ** 9, 5 * 10 ** 9)
        self._open = self._high = self._low = self._last = None
        self._volume = 0         # lots
        self._quote_volume = 0   # ticks * lots
        self._trades = 0

    # -- prices and quantities -------------------------------------------

    def price(self, ticks):
        return _decimal(ticks, self.price_decimals)

    def qty(self, lots):
        return "0" if lots == 0 else _decimal(lots, self.qty_decimals)

    def _center(self):
        """The first ask price of the current mid; bids are below it."""
        return max(2, round(self._mid))

    def _lots(self, notional, sigma):
        """A log-normal quantity worth about ``notional`` in the quote asset."""
        value = self._rng.lognormvariate(math.log(notional), sigma)
        return max(1, round(value / self._mid * self._tick_scale * self._lot_scale))

    # -- messages ----------------------------------------------------------

    def trade(self, now_us):
        """The next trade: the price takes a random-walk step, then a taker
        buys at the ask (``m`` false) or sells at the bid (``m`` true)."""
        rng = self._rng
        self._mid = max(2.0, self._mid * math.exp(rng.gauss(0.0, SIGMA)))
        center = self._center()
        buyer_is_maker = rng.random() < 0.5
        price = center - 1 if buyer_is_maker else center
        lots = self._lots(300.0, 1.2)
        self._trade_id += 1
        self._order_id += rng.randint(1, 40)
        taker, maker = self._order_id, self._order_id - rng.randint(1, 50000)
        buyer, seller = (maker, taker) if buyer_is_maker else (taker, maker)

        if self._open is None:
            self._open = self._high = self._low = price
        self._high, self._low, self._last = max(self._high, price), min(self._low, price), price
        self._volume += lots
        self._quote_volume += price * lots
        self._trades += 1
        return {"e": "trade", "E": now_us, "s": self.market, "t": self._trade_id,
                "p": self.price(price), "q": self.qty(lots), "b": buyer, "a": seller,
                "m": buyer_is_maker, "T": now_us // 1000}

    def depth(self, now_us):
        """The order book's changes: levels the price moved through are
        removed, a few levels near the touch change, thin sides are refilled
        and far levels cancelled.  Bids stay below asks."""
        center = self._center()
        bids = {p: q for p, q in self._bids.items() if p < center}
        asks = {p: q for p, q in self._asks.items() if p >= center}
        for _ in range(1 + min(4, int(self._rng.expovariate(1.0)))):
            self._activity(bids, asks, center)
        for book, is_bid in ((bids, True), (asks, False)):
            if len(book) < self.MIN_LEVELS:
                for _ in range(3 * self.TARGET_LEVELS):
                    if len(book) >= self.TARGET_LEVELS:
                        break
                    self._add_level(book, is_bid, center, mean_offset=10.0)
            touch = center - 1 if is_bid else center
            limit = self.MAX_DISTANCE * self._grid
            for price in [p for p in book if abs(p - touch) > limit]:
                del book[price]
            for price in sorted(book, reverse=not is_bid)[:max(0, len(book) - self.MAX_LEVELS)]:
                del book[price]

        bid_changes = self._diff(self._bids, bids, reverse=True)
        ask_changes = self._diff(self._asks, asks, reverse=False)
        if not bid_changes and not ask_changes:
            # Nothing moved by chance: the best ask's quantity changes.
            best = min(asks)
            asks[best] += self._rng.randint(1, 5 * self._lot_scale)
            ask_changes = self._diff(self._asks, asks, reverse=False)
        self._bids, self._asks = bids, asks

        first = self._update_id + 1
        self._update_id += len(bid_changes) + len(ask_changes)
        return {"e": "depth", "E": now_us, "s": self.market, "T": now_us,
                "U": first, "u": self._update_id,
                "b": [[self.price(p), self.qty(q)] for p, q in bid_changes],
                "a": [[self.price(p), self.qty(q)] for p, q in ask_changes]}

    def ticker(self, now_us):
        """Statistics over the trades since start (before the first trade
        all prices are the current one)."""
        current = self._last if self._last is not None else self._center()
        open_, high, low = ((self._open, self._high, self._low) if self._open is not None
                            else (current, current, current))
        # Quote volume in ticks * lots, rounded half up to the tick.
        quote = (self._quote_volume + self._lot_scale // 2) // self._lot_scale
        return {"e": "ticker", "E": now_us, "s": self.market,
                "o": self.price(open_), "c": self.price(current),
                "h": self.price(high), "l": self.price(low),
                "v": _decimal(self._volume, self.qty_decimals),
                "V": _decimal(quote, self.price_decimals), "n": self._trades}

    # -- order book ----------------------------------------------------------

    def _near_top(self, book, is_bid):
        """A level price, usually one of the best few."""
        levels = sorted(book, reverse=is_bid)
        return levels[min(len(levels) - 1, int(self._rng.expovariate(0.5)))]

    def _add_level(self, book, is_bid, center, mean_offset=3.0):
        offset = int(self._rng.expovariate(1.0 / mean_offset)) * self._grid
        price = center - 1 - offset if is_bid else center + offset
        if price >= 1:
            book[price] = self._lots(5000.0, 1.0)

    def _activity(self, bids, asks, center):
        is_bid = self._rng.random() < 0.5
        book = bids if is_bid else asks
        action = self._rng.random()
        if book and action < 0.55:      # a level's quantity changes
            book[self._near_top(book, is_bid)] = self._lots(5000.0, 1.0)
        elif not book or action < 0.85:  # a new level
            self._add_level(book, is_bid, center)
        else:                            # a level is cancelled
            del book[self._near_top(book, is_bid)]

    @staticmethod
    def _diff(old, new, reverse):
        """[(price, qty)] turning ``old`` into ``new``; qty 0 removes."""
        changes = [(price, 0) for price in old if price not in new]
        changes += [(price, qty) for price, qty in new.items() if old.get(price) != qty]
        changes.sort(reverse=reverse)
        return changes


class Feed:
    """When to publish what, for several markets; does no I/O.

    Trades and depth diffs arrive as a Poisson process of ``rate`` events per
    second and market, each a trade or a diff with equal odds; tickers come
    every second.  ``due(now)`` returns the messages scheduled up to ``now``
    (a monotonic clock) as ``(kind, channel, payload)``; a schedule that
    fell more than a second behind (Redis was away, the loop was blocked)
    skips ahead rather than bursting.
    """

    def __init__(self, markets=DEFAULT_MARKETS, rate=10.0, fmt="envelope", seed=None,
                 start=0.0):
        if fmt not in FORMATS:
            raise ValueError("format must be one of %s, not %r" % (", ".join(FORMATS), fmt))
        if rate < 0:
            raise ValueError("rate must be >= 0, not %r" % (rate,))
        self.markets = list(dict.fromkeys(markets))
        if not self.markets:
            raise ValueError("no markets")
        self.rate = float(rate)
        self.fmt = fmt
        self.simulators = {market: MarketSimulator(market, seed) for market in self.markets}
        self._rng = random.Random(None if seed is None else "%s:schedule" % (seed,))
        self._next_event = {m: start + self._interval() for m in self.markets}
        self._next_ticker = {m: start + TICKER_INTERVAL for m in self.markets}
        self._last_us = dict.fromkeys(self.markets, 0)

    def _interval(self):
        return self._rng.expovariate(self.rate) if self.rate > 0 else math.inf

    def next_due(self):
        """The monotonic time of the next scheduled message."""
        return min(min(self._next_event.values()), min(self._next_ticker.values()))

    def _message(self, kind, market, data):
        channel = "%s.%s" % (kind, market)
        payload = envelope(channel, data) if self.fmt == "envelope" else data
        return kind, channel, encode(payload)

    def due(self, now, offset_us=0):
        """Messages due up to ``now``; an event scheduled at monotonic time
        ``at`` gets the event time ``at * 1e6 + offset_us`` microseconds."""
        messages = []
        for market in self.markets:
            sim = self.simulators[market]
            at = self._next_event[market]
            at_ticker = self._next_ticker[market]
            if at < now - MAX_LAG:
                at = now
            if at_ticker < now - MAX_LAG:
                at_ticker = now
            while at <= now or at_ticker <= now:
                if at <= at_ticker:
                    kind = "trade" if self._rng.random() < 0.5 else "depth"
                    method, when = getattr(sim, kind), at
                    at += self._interval()
                else:
                    kind, method, when = "ticker", sim.ticker, at_ticker
                    at_ticker += TICKER_INTERVAL
                # Event times never go back, even if the clocks' offset wobbles.
                now_us = self._last_us[market] = max(self._last_us[market],
                                                     int(when * 1e6 + offset_us))
                messages.append(self._message(kind, market, method(now_us)))
            self._next_event[market] = at
            self._next_ticker[market] = at_ticker
        return messages


def redact(url):
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc="%s:***@%s" % (user, netloc[2])))


async def _wait(stop, timeout):
    """Sleep ``timeout`` seconds or until ``stop`` is set; True if set."""
    if timeout > 0 and not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout)
        except asyncio.TimeoutError:
            pass
    return stop.is_set()


_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


def _cancel_requested():
    """True once this task was asked to stop (Python 3.11+), even if a
    library on the way swallowed the CancelledError or turned it into a
    timeout, so that a cancelled feed never goes on publishing."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return bool(cancelling and cancelling())


async def run_feed(redis_url, markets=DEFAULT_MARKETS, rate=10.0, fmt="envelope",
                   duration=None, seed=None, stop=None, log=None):
    """Publish synthetic market data to Redis until ``duration`` seconds
    have passed or the asyncio.Event ``stop`` is set (else forever, or
    until cancelled).

    ``markets`` is an iterable of market names (or one comma-separated
    string), ``rate`` trade + depth events per second and market, ``fmt``
    ``"envelope"`` or ``"data"``, ``seed`` makes the data reproducible and
    ``log`` replaces the ``marketstream.feed`` logger.  While Redis is
    unavailable the feed logs a warning and retries every second.  Returns
    the number of messages published per kind:
    ``{"trade": n, "depth": n, "ticker": n}``.
    """
    log = log or logging.getLogger("marketstream.feed")
    if isinstance(markets, str):
        markets = [m.strip() for m in markets.split(",") if m.strip()]
    loop = asyncio.get_running_loop()
    start = loop.time()
    feed = Feed(markets, rate, fmt, seed, start)
    if stop is None:
        stop = asyncio.Event()
    deadline = None if duration is None else start + duration
    counts = dict.fromkeys(KINDS, 0)
    reported, last_summary = dict(counts), start
    url = redact(redis_url)
    client = redis.asyncio.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5)
    log.info("publishing %s (format %s, %g trade+depth events/s per market, tickers every "
             "second) to %s", ", ".join(feed.markets), fmt, feed.rate, url)
    try:
        while True:
            if _cancel_requested():
                raise asyncio.CancelledError()
            now = loop.time()
            finished = deadline is not None and now >= deadline
            offset_us = time.time() * 1e6 - now * 1e6
            batch = feed.due(deadline if finished else now, offset_us)
            if batch:
                try:
                    await _publish(client, batch)
                except _ERRORS as exc:
                    if _cancel_requested():
                        raise asyncio.CancelledError() from exc
                    log.warning("Redis at %s unavailable (%s): %d message(s) dropped; "
                                "retrying every %gs", url, exc, len(batch), RETRY_INTERVAL)
                    if not await _reconnect(client, stop, deadline, loop, log):
                        break
                    log.warning("Redis at %s is back: publishing again", url)
                    continue
                for kind, channel, payload in batch:
                    counts[kind] += 1
                    if kind == "ticker":
                        log.debug("%s %s", channel, payload)
            if finished or stop.is_set():
                break
            now = loop.time()
            if now - last_summary >= SUMMARY_INTERVAL:
                log.info("published %s in the last %.0fs", _summary(counts, reported),
                         now - last_summary)
                reported, last_summary = dict(counts), now
            wake = feed.next_due() if deadline is None else min(feed.next_due(), deadline)
            await _wait(stop, max(MIN_STEP, wake - now))
    finally:
        await client.aclose()
    log.info("feed stopped after %.1fs: published %s in total",
             loop.time() - start, _summary(counts))
    return counts


async def _publish(client, batch):
    pipe = client.pipeline(transaction=False)
    for _, channel, payload in batch:
        pipe.publish(channel, payload)
    await pipe.execute()


async def _reconnect(client, stop, deadline, loop, log):
    """PING every second until Redis answers (True) or the feed is to stop."""
    while True:
        timeout = RETRY_INTERVAL
        if deadline is not None:
            timeout = min(timeout, deadline - loop.time())
        if await _wait(stop, timeout) or (deadline is not None and loop.time() >= deadline):
            return False
        try:
            await client.ping()
            return True
        except _ERRORS as exc:
            log.debug("Redis still unavailable: %s", exc)


def _summary(counts, since=None):
    since = since or dict.fromkeys(KINDS, 0)
    trades, depth, tickers = (counts[kind] - since[kind] for kind in KINDS)
    return "%d trades, %d depth diffs, %d tickers" % (trades, depth, tickers)


# -- command line -------------------------------------------------------------

def _positive(text):
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError("must be a positive number, not %r" % text)
    return value


def _non_negative(text):
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError("must be a number >= 0, not %r" % text)
    return value


def _markets(text):
    markets = [market.strip() for market in text.split(",") if market.strip()]
    if not markets:
        raise argparse.ArgumentTypeError("expected comma-separated market names")
    return tuple(dict.fromkeys(markets))


def build_parser():
    parser = argparse.ArgumentParser(
        prog="marketstream-feed",
        description="Publish realistic synthetic trades, depth diffs and tickers to Redis "
                    "pub/sub (channels trade.<MARKET>, depth.<MARKET>, ticker.<MARKET>).")
    parser.add_argument("--redis-url", metavar="URL",
                        default=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
                        help="Redis to publish to (default: $REDIS_URL, else %(default)s)")
    parser.add_argument("--markets", type=_markets, default=DEFAULT_MARKETS, metavar="LIST",
                        help="comma-separated markets (default: %s)" % ",".join(DEFAULT_MARKETS))
    parser.add_argument("--rate", type=_non_negative, default=10.0, metavar="N",
                        help="trade + depth events per second and market (default: 10); "
                             "tickers come once a second regardless")
    parser.add_argument("--format", choices=FORMATS, default="envelope", dest="fmt",
                        help="publish {stream, data} envelopes or bare data objects "
                             "(default: envelope)")
    parser.add_argument("--duration", type=_positive, metavar="SECONDS",
                        help="stop after this many seconds (default: run until interrupted)")
    parser.add_argument("--seed", type=int, help="random seed for reproducible data")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return parser


async def _check_redis(url):
    client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        await client.ping()
    finally:
        await client.aclose()


async def _main(args):
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass   # not on this platform / not in the main thread
    try:
        try:
            await _check_redis(args.redis_url)
        except ValueError as exc:
            log.error("invalid --redis-url %r: %s", redact(args.redis_url), exc)
            return 2
        except _ERRORS as exc:
            log.error("cannot reach Redis at %s: %s", redact(args.redis_url), exc)
            return 1
        await run_feed(args.redis_url, markets=args.markets, rate=args.rate, fmt=args.fmt,
                       duration=args.duration, seed=args.seed, stop=stop)
        return 0
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


def main(argv=None):
    """The ``marketstream-feed`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose:
        log.setLevel(logging.DEBUG)
    try:
        code = asyncio.run(_main(args))
    except KeyboardInterrupt:   # a second Ctrl-C, or one before the loop ran
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
