"""The demo publisher ``marketstream-feed``: synthetic market data into Redis.

::

    marketstream-feed --redis-url redis://127.0.0.1:6379/0 --rate 50
    marketstream-feed --markets BTC_USDT,SOL_USDC --history 5000 --ttl 600 --seed 1
    marketstream-feed --plain                 # plain PUBLISH, no positions
    marketstream-feed --format data --duration 60
    python -m marketstream.demo.feed --help

For every market it publishes three streams, the channel being the stream
name: ``trade.<MARKET>`` and ``depth.<MARKET>`` (together ``--rate`` events per
second and market, about half each) and ``ticker.<MARKET>`` (once a second).

By default it publishes recoverably, through
:class:`marketstream.upstream.publisher.AsyncPublisher`: every message gets a position,
Redis keeps the last ``--history`` messages of each stream, depth streams
store the full book as their snapshot at least every
:data:`~marketstream.demo.simulator.SNAPSHOT_INTERVAL` seconds and tickers are
their own snapshots.  Subscribers receive::

    @1718000000123457 {"stream":"trade.SOL_USDC","data":{"e":"trade","E":1718000000123456,
     "s":"SOL_USDC","t":17,"p":"150.012","q":"2.310","b":1000042,"a":1000039,
     "m":false,"T":1718000000123},"seq":1718000000123457}

``--plain`` PUBLISHes the ``{"stream","data"}`` envelope as before, and
``--format data`` (implies ``--plain``: a bare data object has no room for a
position) only the data object, which the server then wraps.

The market itself (prices, books, tickers, the schedule) is
:mod:`marketstream.demo.simulator`, which does no I/O; :func:`run_feed` publishes
with one Redis pipeline per scheduling step and runs inside any asyncio event
loop (``marketstream --demo`` runs it beside the server).

Exit codes: 0 after ``--duration`` or on SIGINT/SIGTERM, 1 when Redis cannot
be reached at start-up, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterable

import redis.asyncio
import redis.asyncio.cluster

from marketstream.upstream.publisher import AsyncPublisher
from marketstream.demo.simulator import (
    DEFAULT_MARKETS,
    FORMATS,
    KINDS,
    Feed,
    FeedEvent,
    MarketSimulator,
    MarketSpec,
    encode,
    envelope,
    market_spec,
)
from marketstream.upstream.clients import REDIS_ERRORS, async_client, check_redis
from marketstream.upstream.urls import redact_url

__all__ = [
    "DEFAULT_MARKETS",
    "FORMATS",
    "Feed",
    "MarketSimulator",
    "MarketSpec",
    "build_parser",
    "encode",
    "envelope",
    "main",
    "market_spec",
    "redact",
    "run_feed",
]

log = logging.getLogger(__name__)

SUMMARY_INTERVAL = 10.0  # seconds between summary log lines
RETRY_INTERVAL = 1.0  # seconds between attempts while Redis is unavailable
MIN_STEP = 0.005  # shortest sleep of the scheduler: batches high rates
DEFAULT_HISTORY = 1000  # messages kept per stream
DEFAULT_TTL = 3600  # seconds the keys of an idle stream live

redact = redact_url  # the name this module used to export

#: What :func:`~marketstream.upstream.clients.async_client` returns.
RedisClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster


async def _wait(stop: asyncio.Event, timeout: float) -> bool:
    """Sleep ``timeout`` seconds or until ``stop`` is set; True if set."""
    if timeout > 0 and not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout)
        except asyncio.TimeoutError:
            pass
    return stop.is_set()


def _cancel_requested() -> bool:
    """True once this task was asked to stop (Python 3.11+), even if a
    library on the way swallowed the CancelledError or turned it into a
    timeout, so that a cancelled feed never goes on publishing."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return bool(cancelling and cancelling())


async def run_feed(
    redis_url: str,
    markets: Iterable[str] | str = DEFAULT_MARKETS,
    rate: float = 10.0,
    fmt: str = "envelope",
    duration: float | None = None,
    seed: int | None = None,
    stop: asyncio.Event | None = None,
    log: logging.Logger | None = None,
    recoverable: bool | None = None,
    history: int = DEFAULT_HISTORY,
    ttl: int = DEFAULT_TTL,
) -> dict[str, int]:
    """Publish synthetic market data to Redis until ``duration`` seconds
    have passed or the asyncio.Event ``stop`` is set (else forever, or
    until cancelled)::

        counts = await run_feed("redis://127.0.0.1:6379/0", markets="SOL_USDC", duration=10)

    ``markets`` is an iterable of market names (or one comma-separated
    string), ``rate`` trade + depth events per second and market, ``seed``
    makes the data reproducible and ``log`` replaces the
    ``marketstream.demo.feed`` logger.  ``recoverable`` (default: True for
    ``fmt="envelope"``) publishes through the recovery script with
    ``history`` and ``ttl``; False PUBLISHes
    plain payloads in format ``fmt`` (``"envelope"`` or ``"data"``).  While
    Redis is unavailable the feed logs a warning and retries every second.
    Returns the number of messages published per kind:
    ``{"trade": n, "depth": n, "ticker": n}``.
    """
    log = log or logging.getLogger(__name__)
    if recoverable is None:
        recoverable = fmt == "envelope"
    if recoverable and fmt != "envelope":
        raise ValueError(
            "recoverable publishing sends envelopes; fmt %r needs recoverable=False" % (fmt,)
        )
    if isinstance(markets, str):
        markets = [m.strip() for m in markets.split(",") if m.strip()]
    loop = asyncio.get_running_loop()
    start = loop.time()
    feed = Feed(markets, rate, fmt, seed, start)
    deadline: float | None = None if duration is None else start + duration
    url = redact_url(redis_url)
    client = async_client(redis_url, socket_connect_timeout=5, socket_timeout=5)
    sink: AsyncPublisher | _Plain = (
        AsyncPublisher(client, history=history, ttl=ttl) if recoverable else _Plain(client, feed)
    )
    log.info(
        "publishing %s (%s, %g trade+depth events/s per market, tickers every second) to %s",
        ", ".join(feed.markets),
        "recoverable, history %d, ttl %ds" % (history, ttl)
        if recoverable
        else "plain PUBLISH, format %s" % fmt,
        feed.rate,
        url,
    )
    publishing = _Publishing(feed, sink, client, stop or asyncio.Event(), deadline, log, url)
    try:
        await publishing.run()
    finally:
        await client.aclose()
    log.info(
        "feed stopped after %.1fs: published %s in total",
        loop.time() - start,
        _summary(publishing.counts),
    )
    return publishing.counts


class _Publishing:
    """The loop of :func:`run_feed`: take what the schedule says is due,
    publish it in one pipeline, wait for Redis while it is away, log a
    summary every ``SUMMARY_INTERVAL`` seconds, sleep until the next event."""

    def __init__(
        self,
        feed: Feed,
        sink: AsyncPublisher | _Plain,
        client: RedisClient,
        stop: asyncio.Event,
        deadline: float | None,
        log: logging.Logger,
        url: str,
    ) -> None:
        self.feed, self.sink, self.client = feed, sink, client
        self.stop, self.deadline, self.log, self.url = stop, deadline, log, url
        self.loop = asyncio.get_running_loop()
        self.counts = dict.fromkeys(KINDS, 0)
        self._reported, self._last_summary = dict(self.counts), self.loop.time()

    async def run(self) -> None:
        """Publish until the deadline or ``stop``; raises CancelledError when
        cancelled, even if a library swallowed the cancellation."""
        deadline = self.deadline
        while True:
            if _cancel_requested():
                raise asyncio.CancelledError()
            now = self.loop.time()
            finished = deadline is not None and now >= deadline
            offset_us = time.time() * 1e6 - now * 1e6
            batch = self.feed.events(
                deadline if finished and deadline is not None else now, offset_us
            )
            if batch and not await self._publish(batch):
                if not await _reconnect(self.client, self.stop, deadline, self.loop, self.log):
                    return
                self.log.warning("Redis at %s is back: publishing again", self.url)
                continue
            if finished or self.stop.is_set():
                return
            now = self.loop.time()
            if now - self._last_summary >= SUMMARY_INTERVAL:
                self._summarize(now)
            wake = self.feed.next_due()
            if deadline is not None:
                wake = min(wake, deadline)
            await _wait(self.stop, max(MIN_STEP, wake - now))

    async def _publish(self, batch: list[FeedEvent]) -> bool:
        """Publish ``batch`` and count it; False (and a warning) when Redis
        is unavailable: the batch is dropped."""
        try:
            await _publish(self.sink, batch)
        except REDIS_ERRORS as exc:
            if _cancel_requested():
                raise asyncio.CancelledError() from exc
            self.log.warning(
                "Redis at %s unavailable (%s): %d message(s) dropped; retrying every %gs",
                self.url,
                exc,
                len(batch),
                RETRY_INTERVAL,
            )
            return False
        for event in batch:
            self.counts[event.kind] += 1
            if event.kind == "ticker":
                self.log.debug("%s %s", event.channel, event.data)
        return True

    def _summarize(self, now: float) -> None:
        self.log.info(
            "published %s in the last %.0fs",
            _summary(self.counts, self._reported),
            now - self._last_summary,
        )
        self._reported, self._last_summary = dict(self.counts), now


class _Plain:
    """Plain PUBLISH of the feed's payloads (no positions)."""

    def __init__(self, client: RedisClient, feed: Feed) -> None:
        self.client, self.feed = client, feed

    async def publish_many(self, batch: list[FeedEvent]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for event in batch:
            pipe.publish(event.channel, self.feed.encode(event))
        await pipe.execute()


async def _publish(sink: AsyncPublisher | _Plain, batch: list[FeedEvent]) -> None:
    """One pipeline: recoverable (AsyncPublisher) or plain."""
    if isinstance(sink, _Plain):
        await sink.publish_many(batch)
        return
    await sink.publish_many(
        [
            (
                event.channel,
                encode(event.data),
                event.snapshot
                if event.snapshot is None or event.snapshot is True
                else encode(event.snapshot),
            )
            for event in batch
        ]
    )


async def _reconnect(
    client: RedisClient,
    stop: asyncio.Event,
    deadline: float | None,
    loop: asyncio.AbstractEventLoop,
    log: logging.Logger,
) -> bool:
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
        except REDIS_ERRORS as exc:
            log.debug("Redis still unavailable: %s", exc)


def _summary(counts: dict[str, int], since: dict[str, int] | None = None) -> str:
    since = since or dict.fromkeys(KINDS, 0)
    trades, depth, tickers = (counts[kind] - since[kind] for kind in KINDS)
    return "%d trades, %d depth diffs, %d tickers" % (trades, depth, tickers)


# -- command line -------------------------------------------------------------


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError("must be a positive number, not %r" % text)
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError("must be a number >= 0, not %r" % text)
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError("must be an integer >= 0, not %r" % text)
    return value


def _markets(text: str) -> tuple[str, ...]:
    markets = [market.strip() for market in text.split(",") if market.strip()]
    if not markets:
        raise argparse.ArgumentTypeError("expected comma-separated market names")
    return tuple(dict.fromkeys(markets))


def build_parser() -> argparse.ArgumentParser:
    """The ``marketstream-feed`` command line."""
    parser = argparse.ArgumentParser(
        prog="marketstream-feed",
        description="Publish realistic synthetic trades, depth diffs and tickers to Redis "
        "pub/sub (channels trade.<MARKET>, depth.<MARKET>, ticker.<MARKET>).",
    )
    parser.add_argument(
        "--redis-url",
        metavar="URL",
        default=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
        help="Redis to publish to (default: $REDIS_URL, else %(default)s)",
    )
    parser.add_argument(
        "--markets",
        type=_markets,
        default=DEFAULT_MARKETS,
        metavar="LIST",
        help="comma-separated markets (default: %s)" % ",".join(DEFAULT_MARKETS),
    )
    parser.add_argument(
        "--rate",
        type=_non_negative,
        default=10.0,
        metavar="N",
        help="trade + depth events per second and market (default: 10); "
        "tickers come once a second regardless",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="envelope",
        dest="fmt",
        help="publish {stream, data} envelopes or bare data objects "
        "(default: envelope; data implies --plain)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="PUBLISH plain payloads without positions, history or snapshots "
        "(default: recoverable publishing)",
    )
    parser.add_argument(
        "--history",
        type=_count,
        default=DEFAULT_HISTORY,
        metavar="N",
        help="messages Redis keeps per stream for resuming clients (default: %(default)s)",
    )
    parser.add_argument(
        "--ttl",
        type=_count,
        default=DEFAULT_TTL,
        metavar="SECONDS",
        help="seconds an idle stream's history and snapshot live, 0 = forever "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--duration",
        type=_positive,
        metavar="SECONDS",
        help="stop after this many seconds (default: run until interrupted)",
    )
    parser.add_argument("--seed", type=int, help="random seed for reproducible data")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return parser


async def _main(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not on this platform / not in the main thread
    try:
        try:
            await asyncio.to_thread(check_redis, args.redis_url)
        except ValueError as exc:
            log.error("invalid --redis-url %r: %s", redact_url(args.redis_url), exc)
            return 2
        except REDIS_ERRORS as exc:
            log.error("cannot reach Redis at %s: %s", redact_url(args.redis_url), exc)
            return 1
        await run_feed(
            args.redis_url,
            markets=args.markets,
            rate=args.rate,
            fmt=args.fmt,
            duration=args.duration,
            seed=args.seed,
            stop=stop,
            recoverable=not args.plain and args.fmt == "envelope",
            history=args.history,
            ttl=args.ttl,
        )
        return 0
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> None:
    """The ``marketstream-feed`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.verbose:
        log.setLevel(logging.DEBUG)
    try:
        code = asyncio.run(_main(args))
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop ran
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
