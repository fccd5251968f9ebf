"""The demo market, without I/O: prices, trades, order books, tickers, and
the schedule saying when each market publishes what.

With a seed every run produces the same data:

>>> sim = MarketSimulator("SOL_USDC", seed=1)
>>> now_us = 1_718_000_000_000_000
>>> trade = sim.trade(now_us)
>>> trade["e"], trade["s"], trade["p"], trade["q"]
('trade', 'SOL_USDC', '150.009', '13.264')
>>> depth = sim.depth(now_us)              # the book's changes: "U", "u", "b", "a"
>>> depth["e"], depth["U"], depth["u"]
('depth', 1, 40)
>>> sim.snapshot()["u"] == depth["u"]      # the whole book after the last diff
True
>>> sim.ticker(now_us)["n"]                # statistics: one trade so far
1

A :class:`Feed` schedules several markets on a monotonic clock and returns
:class:`FeedEvent` tuples (``kind``, ``channel``, ``data``, ``snapshot``):

>>> feed = Feed(["SOL_USDC", "BTC_USDT"], rate=10, seed=1, start=0.0)
>>> events = feed.events(1.0, offset_us=now_us)   # what is due up to t = 1.0 s
>>> sorted({event.channel for event in events})   # doctest: +NORMALIZE_WHITESPACE
['depth.BTC_USDT', 'depth.SOL_USDC', 'ticker.BTC_USDT', 'ticker.SOL_USDC',
 'trade.BTC_USDT', 'trade.SOL_USDC']

Nothing here touches a socket or a clock; :mod:`marketstream.demo.feed`
publishes what this produces.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import ujson

__all__ = [
    "DEFAULT_MARKETS",
    "Data",
    "FORMATS",
    "KINDS",
    "Feed",
    "FeedEvent",
    "MarketSimulator",
    "MarketSpec",
    "SNAPSHOT_INTERVAL",
    "encode",
    "envelope",
    "market_spec",
]

#: A message's data object (``{"e": "trade", "p": "150.009", ...}``): JSON
#: values of several types, as the simulator makes them.
Data = dict[str, object]

DEFAULT_MARKETS = ("BTC_USDT", "ETH_USDT", "SOL_USDT", "SOL_USDC")
FORMATS = ("envelope", "data")
KINDS = ("trade", "depth", "ticker")

SIGMA = 1e-4  # relative standard deviation of the price per trade
TICKER_INTERVAL = 1.0  # seconds between tickers of one market
SNAPSHOT_INTERVAL = 0.5  # a depth diff carries the full book at least this often
MAX_LAG = 1.0  # a schedule further behind skips ahead instead of bursting


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


def market_spec(market: str) -> MarketSpec:
    """The spec of ``market`` (``BASE_QUOTE``): known base assets have
    realistic levels; any other market gets a deterministic price between
    50 and 150 with a 0.01 tick."""
    base = market.split("_", 1)[0].upper()
    if base in _SPECS:
        return _SPECS[base]
    crc = zlib.crc32(market.encode("utf-8"))
    return MarketSpec(50.0 + crc % 10000 / 100.0, 2, 3)


def _decimal(units: int, decimals: int) -> str:
    """``units * 10 ** -decimals`` as a fixed-point string (units >= 0)."""
    if decimals == 0:
        return str(units)
    digits = str(units).rjust(decimals + 1, "0")
    return digits[:-decimals] + "." + digits[-decimals:]


def envelope(stream: str, data: object) -> dict[str, object]:
    """The message clients receive: ``{"stream": ..., "data": ...}``."""
    return {"stream": stream, "data": data}


def encode(message: object) -> str:
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
        sim.snapshot()      # {"e": "depthSnapshot", ...}: the whole book now

    Internally prices are integers in ticks and quantities integers in lots,
    so formatting is exact.  The published book starts empty: the first diff
    fills it, applying every diff in order reproduces it.
    """

    MIN_LEVELS = 10  # refill a side that has fewer levels ...
    TARGET_LEVELS = 20  # ... up to this many
    MAX_LEVELS = 30  # trim the farthest levels beyond this
    MAX_DISTANCE = 80  # in grid steps from the touch; farther levels are cancelled

    def __init__(self, market: str, seed: int | None = None) -> None:
        self.market = market
        self.spec = market_spec(market)
        self.price_decimals = self.spec.price_decimals
        self.qty_decimals = self.spec.qty_decimals
        self._rng = random.Random(None if seed is None else "%s:%s" % (seed, market))
        self._tick_scale: int = 10**self.price_decimals
        self._lot_scale: int = 10**self.qty_decimals
        self._mid: float = self.spec.price * self._tick_scale  # in ticks
        # Book levels sit on offsets of a grid of about 0.002 % of the price.
        self._grid = max(1, round(self._mid * 2e-5))
        self._bids: dict[int, int] = {}  # price in ticks -> quantity in lots, as published
        self._asks: dict[int, int] = {}
        self._trade_id = 0
        self._update_id = 0
        self._order_id = self._rng.randrange(10**9, 5 * 10**9)
        self._open: int | None = None
        self._high: int | None = None
        self._low: int | None = None
        self._last: int | None = None
        self._volume = 0  # lots
        self._quote_volume = 0  # ticks * lots
        self._trades = 0

    # -- prices and quantities -------------------------------------------

    def price(self, ticks: int) -> str:
        return _decimal(ticks, self.price_decimals)

    def qty(self, lots: int) -> str:
        return "0" if lots == 0 else _decimal(lots, self.qty_decimals)

    def _center(self) -> int:
        """The first ask price of the current mid; bids are below it."""
        return max(2, round(self._mid))

    def _lots(self, notional: float, sigma: float) -> int:
        """A log-normal quantity worth about ``notional`` in the quote asset."""
        value = self._rng.lognormvariate(math.log(notional), sigma)
        return max(1, round(value / self._mid * self._tick_scale * self._lot_scale))

    # -- messages ----------------------------------------------------------

    def trade(self, now_us: int) -> Data:
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
            self._open = price
        self._high = price if self._high is None else max(self._high, price)
        self._low = price if self._low is None else min(self._low, price)
        self._last = price
        self._volume += lots
        self._quote_volume += price * lots
        self._trades += 1
        return {
            "e": "trade",
            "E": now_us,
            "s": self.market,
            "t": self._trade_id,
            "p": self.price(price),
            "q": self.qty(lots),
            "b": buyer,
            "a": seller,
            "m": buyer_is_maker,
            "T": now_us // 1000,
        }

    def depth(self, now_us: int) -> Data:
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
            for price in sorted(book, reverse=not is_bid)[: max(0, len(book) - self.MAX_LEVELS)]:
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
        return {
            "e": "depth",
            "E": now_us,
            "s": self.market,
            "T": now_us,
            "U": first,
            "u": self._update_id,
            "b": [[self.price(p), self.qty(q)] for p, q in bid_changes],
            "a": [[self.price(p), self.qty(q)] for p, q in ask_changes],
        }

    def ticker(self, now_us: int) -> Data:
        """Statistics over the trades since start (before the first trade
        all prices are the current one)."""
        current = self._last if self._last is not None else self._center()
        if self._open is None or self._high is None or self._low is None:
            open_ = high = low = current
        else:
            open_, high, low = self._open, self._high, self._low
        # Quote volume in ticks * lots, rounded half up to the tick.
        quote = (self._quote_volume + self._lot_scale // 2) // self._lot_scale
        return {
            "e": "ticker",
            "E": now_us,
            "s": self.market,
            "o": self.price(open_),
            "c": self.price(current),
            "h": self.price(high),
            "l": self.price(low),
            "v": _decimal(self._volume, self.qty_decimals),
            "V": _decimal(quote, self.price_decimals),
            "n": self._trades,
        }

    def snapshot(self) -> Data:
        """The whole book as published so far, best levels first: the state
        after the last :meth:`depth` diff, whose ``u`` it carries (the next
        diff has ``U = u + 1``)::

            {"e": "depthSnapshot", "s": "SOL_USDC", "u": 1003,
             "b": [["149.990", "3.100"], ...], "a": [["150.000", "0.750"], ...]}
        """
        return {
            "e": "depthSnapshot",
            "s": self.market,
            "u": self._update_id,
            "b": [
                [self.price(p), self.qty(self._bids[p])] for p in sorted(self._bids, reverse=True)
            ],
            "a": [[self.price(p), self.qty(self._asks[p])] for p in sorted(self._asks)],
        }

    # -- order book ----------------------------------------------------------

    def _near_top(self, book: dict[int, int], is_bid: bool) -> int:
        """A level price, usually one of the best few."""
        levels = sorted(book, reverse=is_bid)
        return levels[min(len(levels) - 1, int(self._rng.expovariate(0.5)))]

    def _add_level(
        self, book: dict[int, int], is_bid: bool, center: int, mean_offset: float = 3.0
    ) -> None:
        offset = int(self._rng.expovariate(1.0 / mean_offset)) * self._grid
        price = center - 1 - offset if is_bid else center + offset
        if price >= 1:
            book[price] = self._lots(5000.0, 1.0)

    def _activity(self, bids: dict[int, int], asks: dict[int, int], center: int) -> None:
        is_bid = self._rng.random() < 0.5
        book = bids if is_bid else asks
        action = self._rng.random()
        if book and action < 0.55:  # a level's quantity changes
            book[self._near_top(book, is_bid)] = self._lots(5000.0, 1.0)
        elif not book or action < 0.85:  # a new level
            self._add_level(book, is_bid, center)
        else:  # a level is cancelled
            del book[self._near_top(book, is_bid)]

    @staticmethod
    def _diff(old: dict[int, int], new: dict[int, int], reverse: bool) -> list[tuple[int, int]]:
        """[(price, qty)] turning ``old`` into ``new``; qty 0 removes."""
        changes = [(price, 0) for price in old if price not in new]
        changes += [(price, qty) for price, qty in new.items() if old.get(price) != qty]
        changes.sort(reverse=reverse)
        return changes


class FeedEvent(NamedTuple):
    """One scheduled message: ``data`` is the data object; ``snapshot`` is
    None, True (the message is its stream's state: tickers) or the stream's
    state after this message (the full book on some depth diffs)."""

    kind: str
    channel: str
    data: Data
    snapshot: Data | bool | None


class Feed:
    """When to publish what, for several markets; does no I/O.

    Trades and depth diffs arrive as a Poisson process of ``rate`` events per
    second and market, each a trade or a diff with equal odds; tickers come
    every second.  ``events(now)`` returns the messages scheduled up to
    ``now`` (a monotonic clock) as :class:`FeedEvent`; ``due(now)`` the same
    encoded as ``(kind, channel, payload)`` in format ``fmt`` for plain
    PUBLISH.  A schedule that fell more than a second behind (Redis was
    away, the loop was blocked) skips ahead rather than bursting.

    A market's first depth diff, and then the first one at least
    ``SNAPSHOT_INTERVAL`` seconds (schedule time) after the last snapshot,
    carry the full book after them as ``snapshot``; tickers are their own
    snapshot (``True``).
    """

    def __init__(
        self,
        markets: Iterable[str] = DEFAULT_MARKETS,
        rate: float = 10.0,
        fmt: str = "envelope",
        seed: int | None = None,
        start: float = 0.0,
        snapshot_interval: float = SNAPSHOT_INTERVAL,
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError("format must be one of %s, not %r" % (", ".join(FORMATS), fmt))
        if rate < 0:
            raise ValueError("rate must be >= 0, not %r" % (rate,))
        self.markets = list(dict.fromkeys(markets))
        if not self.markets:
            raise ValueError("no markets")
        self.rate = float(rate)
        self.fmt = fmt
        self.snapshot_interval = snapshot_interval
        self.simulators = {market: MarketSimulator(market, seed) for market in self.markets}
        self._rng = random.Random(None if seed is None else "%s:schedule" % (seed,))
        self._next_event = {m: start + self._interval() for m in self.markets}
        self._next_ticker = {m: start + TICKER_INTERVAL for m in self.markets}
        self._last_us = dict.fromkeys(self.markets, 0)
        self._last_snapshot: dict[str, float] = {}

    def _interval(self) -> float:
        return self._rng.expovariate(self.rate) if self.rate > 0 else math.inf

    def next_due(self) -> float:
        """The monotonic time of the next scheduled message."""
        return min(min(self._next_event.values()), min(self._next_ticker.values()))

    def encode(self, event: FeedEvent) -> str:
        """``event`` as a plain payload in this feed's format."""
        return encode(envelope(event.channel, event.data) if self.fmt == "envelope" else event.data)

    def due(self, now: float, offset_us: float = 0) -> list[tuple[str, str, str]]:
        """Messages due up to ``now`` as ``(kind, channel, payload)``."""
        return [(e.kind, e.channel, self.encode(e)) for e in self.events(now, offset_us)]

    def events(self, now: float, offset_us: float = 0) -> list[FeedEvent]:
        """Messages due up to ``now``; an event scheduled at monotonic time
        ``at`` gets the event time ``at * 1e6 + offset_us`` microseconds."""
        events = []
        for market in self.markets:
            at = self._next_event[market]
            at_ticker = self._next_ticker[market]
            if at < now - MAX_LAG:
                at = now
            if at_ticker < now - MAX_LAG:
                at_ticker = now
            while at <= now or at_ticker <= now:
                if at <= at_ticker:
                    kind = "trade" if self._rng.random() < 0.5 else "depth"
                    when = at
                    at += self._interval()
                else:
                    kind, when = "ticker", at_ticker
                    at_ticker += TICKER_INTERVAL
                events.append(self._event(market, kind, when, offset_us))
            self._next_event[market] = at
            self._next_ticker[market] = at_ticker
        return events

    def _event(self, market: str, kind: str, when: float, offset_us: float) -> FeedEvent:
        """The message of ``kind`` scheduled at ``when`` for ``market``, with
        the snapshot it carries (the book, at most every
        ``snapshot_interval``; a ticker is its own)."""
        sim = self.simulators[market]
        # Event times never go back, even if the clocks' offset wobbles.
        now_us = self._last_us[market] = max(self._last_us[market], int(when * 1e6 + offset_us))
        snapshot: Data | bool | None = None
        if kind == "trade":
            data = sim.trade(now_us)
        elif kind == "depth":
            data = sim.depth(now_us)
            last = self._last_snapshot.get(market)
            if last is None or when - last >= self.snapshot_interval:
                snapshot = sim.snapshot()
                self._last_snapshot[market] = when
        else:
            data = sim.ticker(now_us)
            snapshot = True
        return FeedEvent(kind, "%s.%s" % (kind, market), data, snapshot)
