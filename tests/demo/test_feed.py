"""The demo publisher: run_feed against the real Redis (recoverable and plain,
including an outage), the depth snapshots and diffs rebuilding the
simulator's book, and the marketstream-feed command as a subprocess.  The
simulator itself is tested in test_simulator.py."""

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from decimal import Decimal

from unittest import mock
import pytest
import redis
import redis.asyncio
import ujson

from marketstream.testing import async_wait_until, free_port, wait_until
from marketstream.demo.feed import DEFAULT_MARKETS, Feed, build_parser, main, redact, run_feed
from marketstream.upstream.history import read_after, read_snapshot
from marketstream.publisher import Publisher
from marketstream.upstream.urls import redact_url
from marketstream.wire.positions import split_position
from tests.helpers import ROOT
from tests.demo.test_simulator import Book


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:secret@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://user@host/0", "redis://user@host/0"),
        ("rediss://u:p@ss:w@[::1]:6380/2", "rediss://u:***@[::1]:6380/2"),
        ("redis://host/0?password=secret&db=1", "redis://host/0?password=***&db=1"),
        (
            "redis+sentinel://:pw@s1:26379,s2:26379/mymaster/0",
            "redis+sentinel://:***@s1:26379,s2:26379/mymaster/0",
        ),
        ("redis+cluster://u:pw@n1:7000,n2:7001", "redis+cluster://u:***@n1:7000,n2:7001"),
        ("unix://:pw@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        ("redis://u:pw@[::1", "redis://u:***@[::1"),
    ],
)
def test_redact(url, shown):
    """One redaction for the whole package: the user stays, the password goes."""
    assert redact_url(url) == redact(url) == shown
    assert "secret" not in shown


# -- depth snapshots + diffs == the simulator's book --------------------------------------


def rebuild(snapshot_frame, frames):
    """A client's book: the snapshot, then the diffs after it (U/u checked)."""
    snapshot = ujson.loads(snapshot_frame)["data"]
    assert snapshot["e"] == "depthSnapshot"
    book = Book()
    book.apply(snapshot)
    last_u = snapshot["u"]
    for _, frame in frames:
        diff = ujson.loads(frame)["data"]
        assert diff["e"] == "depth" and diff["U"] == last_u + 1, (last_u, diff)
        book.apply(diff)
        last_u = diff["u"]
    return book, last_u


def as_book(snapshot):
    return (
        {Decimal(p): Decimal(q) for p, q in snapshot["b"]},
        {Decimal(p): Decimal(q) for p, q in snapshot["a"]},
    )


def test_snapshot_plus_diffs_equals_the_simulators_book_at_the_same_position(
    redis_client, redis_url
):
    """The feed's schedule published through the recovery script; at many
    moments a client starting from the stored snapshot and the history holds
    exactly the simulator's book at the latest position."""
    market = "SOL_USDC"
    stream = "depth." + market
    feed = Feed((market,), rate=400, seed=21, start=0.0)
    sim = feed.simulators[market]
    books = {}  # u -> the simulator's book right after the diff ending at u
    depth = sim.depth

    def recording_depth(now_us):
        diff = depth(now_us)
        books[diff["u"]] = sim.snapshot()
        return diff

    sim.depth = recording_depth
    publisher = Publisher(redis_client, history=100000)
    now, checks, snapshots_seen = 0.0, 0, set()

    async def client_view():
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            snapshot = await read_snapshot(client, stream)
            frames, covered = await read_after(client, stream, snapshot[0], 100000)
            return snapshot, frames, covered
        finally:
            await client.aclose()

    while now < 4.0:
        now += 0.05
        events = feed.events(now)
        publisher.publish_many(
            [(e.channel, e.data, e.snapshot) for e in events if e.kind == "depth"]
        )
        if not any(e.kind == "depth" for e in events):
            continue
        (snap_seq, snap_frame), frames, covered = asyncio.run(client_view())
        assert covered
        snapshots_seen.add(snap_seq)
        book, last_u = rebuild(snap_frame, frames)
        assert (book.bids, book.asks) == as_book(books[last_u])
        assert last_u == max(books)
        checks += 1
    assert checks > 50
    assert len(snapshots_seen) >= 4 / 0.5 - 1, "a full book at least every 0.5 s of schedule"


def test_run_feed_stores_snapshots_and_history(redis_client, redis_url):
    """End to end: the stored depth snapshot equals the book built from all
    diffs in the history up to its position; tickers are their own
    snapshots; the keys get the feed's TTL."""
    for kind in ("trade", "depth", "ticker"):
        redis_client.delete(*("{%s.BTC_USDT}:%s" % (kind, key) for key in ("seq", "log", "snap")))
    counts = asyncio.run(
        run_feed(
            redis_url,
            markets=("BTC_USDT",),
            rate=300,
            duration=1.5,
            seed=5,
            history=100000,
            ttl=120,
        )
    )
    assert counts["depth"] > 50

    async def read(stream):
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await read_snapshot(client, stream), await read_after(client, stream, 0, 100000)
        finally:
            await client.aclose()

    (snap_seq, snap_frame), (frames, covered) = asyncio.run(read("depth.BTC_USDT"))
    assert not covered  # position 0 is long before this stream's first position
    assert len(frames) == counts["depth"]
    assert [s for s, _ in frames] == list(range(frames[0][0], frames[0][0] + len(frames)))
    up_to = [(s, f) for s, f in frames if s <= snap_seq]
    book = Book()
    for _, frame in up_to:
        book.apply(ujson.loads(frame)["data"])
    snapshot = ujson.loads(snap_frame)["data"]
    assert snapshot["u"] == ujson.loads(up_to[-1][1])["data"]["u"]
    assert (book.bids, book.asks) == as_book(snapshot)
    # Best levels first.
    assert [Decimal(p) for p, _ in snapshot["b"]] == sorted(book.bids, reverse=True)
    assert [Decimal(p) for p, _ in snapshot["a"]] == sorted(book.asks)

    (tick_seq, tick_frame), (tickers, _) = asyncio.run(read("ticker.BTC_USDT"))
    assert tick_seq == tickers[-1][0] and tick_frame == tickers[-1][1]
    assert ujson.loads(tick_frame)["data"]["e"] == "ticker"
    for key in ("{depth.BTC_USDT}:seq", "{depth.BTC_USDT}:log", "{depth.BTC_USDT}:snap"):
        assert 0 < redis_client.ttl(key) <= 120


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
        while message is not None:  # drain what has arrived
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
        counts = asyncio.run(
            run_feed(redis_url, markets=("BTC_USDT",), rate=200, duration=1.5, seed=7)
        )
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


def test_run_feed_logs_what_it_published_in_each_interval(redis_url, caplog):
    """The summary lines every SUMMARY_INTERVAL (shortened here) count what
    was published since the last one: together, the total returned."""
    log = logging.getLogger("test.feed.summary")
    with (
        mock.patch("marketstream.demo.feed.SUMMARY_INTERVAL", 0.2),
        caplog.at_level(logging.INFO, logger=log.name),
    ):
        counts = asyncio.run(
            run_feed(redis_url, markets="SOL_USDC", rate=100, duration=1.5, log=log, seed=3)
        )
    pattern = r"published (\d+) trades, (\d+) depth diffs, (\d+) tickers in the last \d+s"
    lines = [re.fullmatch(pattern, r.getMessage()) for r in caplog.records]
    summaries = [[int(n) for n in match.groups()] for match in lines if match]
    assert len(summaries) >= 2, [r.getMessage() for r in caplog.records]
    # What the last interval published before the deadline is in the total only.
    totals = [sum(column) for column in zip(*summaries)]
    assert all(0 < total <= counts[kind] for total, kind in zip(totals[:2], ("trade", "depth")))
    assert totals[2] <= counts["ticker"]
    final = caplog.records[-1].getMessage()
    assert final.startswith("feed stopped after ") and final.endswith(
        "published %d trades, %d depth diffs, %d tickers in total"
        % (counts["trade"], counts["depth"], counts["ticker"])
    )


def test_run_feed_data_format(redis_client, redis_url):
    pubsub = subscribe(redis_client, "trade.SOL_USDC", "depth.SOL_USDC", "trade.ETH_USDT")
    try:
        counts = asyncio.run(
            run_feed(redis_url, markets="SOL_USDC", rate=100, fmt="data", duration=0.5)
        )
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
        await async_wait_until(
            lambda: len(redis_client.client_list()) > baseline, message="the feed connected"
        )
        started = time.monotonic()
        stop.set()
        counts = await asyncio.wait_for(task, 5)
        assert time.monotonic() - started < 1
        return counts

    counts = asyncio.run(scenario())
    assert set(counts) == {"trade", "depth", "ticker"}
    assert counts["trade"] + counts["depth"] > 0
    wait_until(
        lambda: len(redis_client.client_list()) == baseline, message="the feed's connection closed"
    )


def test_run_feed_task_can_be_cancelled(redis_client, redis_url):
    baseline = len(redis_client.client_list())

    async def scenario():
        task = asyncio.ensure_future(run_feed(redis_url, markets=("SOL_USDC",), rate=50))
        await async_wait_until(
            lambda: len(redis_client.client_list()) > baseline, message="the feed connected"
        )
        task.cancel()
        done, _ = await asyncio.wait((task,), timeout=5)
        assert done and task.cancelled(), "the feed went on after cancel()"
        await async_wait_until(
            lambda: len(redis_client.client_list()) == baseline,
            message="the feed's connection closed",
        )

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
        with mock.patch("marketstream.demo.feed._publish", swallowing_publish):
            task = asyncio.ensure_future(
                run_feed(redis_url, markets=("SOL_USDC",), rate=50, stop=stop)
            )
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
        task = asyncio.ensure_future(
            run_feed(redis_url, markets=("BTC_USDT",), rate=100, stop=stop, log=logger)
        )
        client = redis.asyncio.Redis.from_url(redis_url)
        pubsub = client.pubsub()
        await pubsub.subscribe("trade.BTC_USDT")
        await next_message(pubsub)
        await pubsub.aclose()
        await client.aclose()

        redis_server.kill()
        # redis-py retries a command itself (with backoff) before it gives
        # up: allow for that on a busy machine.
        await async_wait_until(
            lambda: any("unavailable" in m for m in records.messages()),
            20,
            message="a warning about Redis",
        )
        await async_wait_until(
            lambda: any("still unavailable" in m for m in records.messages(logging.DEBUG)),
            20,
            message="a retry",
        )
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
    return [sys.executable, "-m", "marketstream.demo.feed", *args]


def feed_env():
    env = dict(os.environ)
    env.pop("REDIS_URL", None)
    return env


def test_cli_publishes_for_a_duration(redis_client, redis_url):
    pubsub = subscribe(redis_client, "trade.SOL_USDC", "depth.SOL_USDC", "trade.BTC_USDT")
    try:
        started = time.monotonic()
        result = subprocess.run(
            feed_command(
                "--redis-url", redis_url, "--duration", "1", "--rate", "20", "--markets", "SOL_USDC"
            ),
            cwd=ROOT,
            env=feed_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
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
    assert all(
        channel.endswith(".SOL_USDC") and message["stream"] == channel
        for channel, message in received
    )


def test_cli_unreachable_redis_exits_1():
    url = "redis://127.0.0.1:%d/0" % free_port()
    result = subprocess.run(
        feed_command("--redis-url", url, "--duration", "1"),
        cwd=ROOT,
        env=feed_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "cannot reach Redis at %s" % url in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_exits_0_on_signal(redis_client, redis_url, sig):
    pubsub = subscribe(redis_client, "trade.ETH_USDT", "depth.ETH_USDT")
    process = subprocess.Popen(
        feed_command("--redis-url", redis_url, "--rate", "50", "--markets", "ETH_USDT"),
        cwd=ROOT,
        env=feed_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05),
            timeout=15,
            message="a message from the feed",
        )
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=10)
    finally:
        pubsub.close()
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "feed stopped after" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--rate", "-1"],
        ["--format", "xml"],
        ["--markets", " , "],
        ["--duration", "0"],
        ["--seed", "x"],
    ],
)
def test_cli_rejects_bad_arguments(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "marketstream-feed: error" in capsys.readouterr().err


def test_cli_defaults(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://10.0.0.5:6380/1")
    args = build_parser().parse_args([])
    assert args.redis_url == "redis://10.0.0.5:6380/1"
    assert (args.markets, args.rate, args.fmt, args.duration) == (
        DEFAULT_MARKETS,
        10.0,
        "envelope",
        None,
    )
    monkeypatch.delenv("REDIS_URL")
    assert build_parser().parse_args([]).redis_url == "redis://127.0.0.1:6379/0"
    args = build_parser().parse_args(["--markets", "BTC_USDT, SOL_USDC,BTC_USDT", "-v"])
    assert args.markets == ("BTC_USDT", "SOL_USDC") and args.verbose


def test_cli_plain_publishes_envelopes_without_positions(redis_client, redis_url):
    pubsub = subscribe(redis_client, "trade.ETH_USDT")
    try:
        result = subprocess.run(
            feed_command(
                "--redis-url",
                redis_url,
                "--duration",
                "1",
                "--rate",
                "40",
                "--markets",
                "ETH_USDT",
                "--plain",
                "--seed",
                "1",
            ),
            cwd=ROOT,
            env=feed_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        message = wait_until(
            lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05),
            message="a trade",
        )
    finally:
        pubsub.close()
    assert message["data"].startswith(b'{"stream":"trade.ETH_USDT","data":{')
    assert "plain PUBLISH" in result.stderr


def test_cli_history_and_ttl(redis_client, redis_url):
    redis_client.delete("{trade.DOT_USDT}:log")
    result = subprocess.run(
        feed_command(
            "--redis-url",
            redis_url,
            "--duration",
            "1",
            "--rate",
            "200",
            "--markets",
            "DOT_USDT",
            "--history",
            "7",
            "--ttl",
            "90",
        ),
        cwd=ROOT,
        env=feed_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert redis_client.xlen("{trade.DOT_USDT}:log") == 7
    assert 0 < redis_client.ttl("{trade.DOT_USDT}:log") <= 90
    assert "recoverable, history 7, ttl 90s" in result.stderr


@pytest.mark.parametrize("args", [["--history", "-1"], ["--ttl", "x"], ["--history", "1.5"]])
def test_cli_rejects_bad_recovery_arguments(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
