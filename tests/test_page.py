"""The live market page in a real browser (headless Chromium from Debian,
driven by selenium) against real server and feed processes on a real Redis.

Each test saves a screenshot of the page (``page.png`` in its tmp_path).
"""

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from marketstream.client import BookGap, Client, OrderBook
from marketstream.testing import health_status, wait_until
from tests.checksums import crc_of
from tests.helpers import ROOT, ServerProcess, numsub

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(
        "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

MARKETS = "BTC_USDT,ETH_USDT,SOL_USDT,SOL_USDC"
DEPTH = "depth.BTC_USDT"
#: The ladder's update speed: the page asks for depth.<MARKET>@250ms first.
SPEED = "@250ms"


# -- processes ------------------------------------------------------------------


def start_server(redis_url, port=None):
    """A marketstream process on ``redis_url`` serving the page; ``port``
    reuses a port (a later --listen wins over ServerProcess's own)."""
    extra = ["--listen", "127.0.0.1:%d" % port] if port else []
    server = ServerProcess("--redis-url", redis_url, "--set", "server.demo_page=true", *extra)
    if port:
        server.port = port
    server.wait_healthy()
    return server


class Feed:
    """``marketstream-feed`` as a subprocess."""

    def __init__(self, redis_url, *args):
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "marketstream.demo.feed",
                "--redis-url",
                redis_url,
                "--markets",
                MARKETS,
                "--rate",
                "20",
                *args,
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def feed(redis_url, redis_client):
    # A new feed starts new books: drop the histories and snapshots an
    # earlier test's feed left, so that the page starts from this feed's.
    redis_client.flushdb()
    feed = Feed(redis_url)
    # Pages and reference clients that subscribe from now on get a snapshot.
    wait_until(
        lambda: (
            all(redis_client.exists("{depth.%s}:snap" % m) for m in MARKETS.split(","))
            or feed.proc.poll() is not None
        ),
        10,
        message="the feed's first snapshots",
    )
    assert feed.proc.poll() is None, "the feed exited"
    yield feed
    feed.stop()


@pytest.fixture
def server(redis_url):
    holder = {"server": start_server(redis_url)}
    yield holder
    holder["server"].stop()


# -- the browser ------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,800",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_script_timeout(10)
    yield browser
    browser.quit()


@pytest.fixture
def page(driver, tmp_path):
    """The browser; a screenshot of the page is saved when the test ends."""
    driver.get("about:blank")
    driver.get_log("browser")  # drop what earlier tests left
    yield driver
    driver.save_screenshot(str(tmp_path / "page.png"))


def open_page(driver, server, query=""):
    driver.get("http://127.0.0.1:%d/%s" % (server.port, query))


def js(driver, script, *args):
    return driver.execute_script(script, *args)


def ladder(driver):
    """Which stream the page's ladder shows: ``{stream, speed, refused}``
    (speed None and the server's reason in refused after a fallback)."""
    return js(driver, "return window.ladder")


def ladder_stream(driver):
    return ladder(driver)["stream"]


def book_of(driver, stream=None, with_u=False):
    """The page's book of ``stream`` (default: the ladder's) as
    ``{seq, bids, asks, status}``, or None."""
    stream = stream or ladder_stream(driver)
    book = js(
        driver,
        "return window.marketstream && window.marketstream.books[arguments[0]] || null",
        stream,
    )
    if book is None:
        return None
    return {
        "seq": book["seq"],
        "bids": book["bids"],
        "asks": book["asks"],
        "status": book["status"],
        **({"u": book["u"]} if with_u else {}),
    }


def rows(driver, selector):
    return len(driver.find_elements(By.CSS_SELECTOR, selector))


def panel_status(driver, panel_id):
    return driver.find_element(By.ID, panel_id).get_attribute("data-status")


def diagnostics(driver):
    """The page's stream states and event log, for failure messages."""
    return "streams: %s\nevents:\n%s" % (
        js(driver, "return window.marketstream && window.marketstream.streams"),
        driver.find_element(By.ID, "log").text,
    )


def wait_page(driver, predicate, timeout, message):
    """wait_until with the page's state in the failure message."""
    try:
        return wait_until(predicate, timeout, interval=0.05, message=message)
    except AssertionError as exc:
        raise AssertionError("%s\n%s" % (exc, diagnostics(driver))) from None


def publish_until(publish, arrived, driver, message, timeout=15, every=0.5):
    """``publish()`` now and every ``every`` s until ``arrived()``."""
    last = [0.0]

    def done():
        if arrived():
            return True
        if time.monotonic() - last[0] >= every:
            publish()
            last[0] = time.monotonic()
        return False

    wait_page(driver, done, timeout, message)


def errors(driver):
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


# -- the Python reference book ------------------------------------------------------


class ReferenceBook:
    """The order book of ``stream`` built by the Python client
    (``marketstream.client``) in a thread, remembered at every position."""

    def __init__(self, url, stream=DEPTH):
        self.url = url
        self.stream = stream
        self.states = {}
        self.loop = asyncio.new_event_loop()
        self.task = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.task = asyncio.run_coroutine_threadsafe(self._run(), self.loop)

    async def _run(self):
        self._task = asyncio.current_task()
        book = OrderBook()
        async with Client(self.url, [self.stream], snapshot=[self.stream]) as client:
            async for message in client:
                try:
                    book.apply_message(message)
                except BookGap:
                    continue
                if book.synced and message.seq is not None:
                    self.states[message.seq] = book.as_dict()

    def at(self, seq, timeout=5):
        """The reference book at position ``seq`` (waits for it)."""
        wait_until(
            lambda: seq in self.states or self.task.done(),
            timeout,
            message="reference book at seq %s" % seq,
        )
        if self.task.done():
            self.task.result()
        return self.states[seq]

    async def _stop(self):
        self._task.cancel()
        try:
            await self._task  # the client closes its connection
        except asyncio.CancelledError:
            pass

    def close(self):
        if not self.task.done():
            asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def assert_book_matches_reference(driver, reference, samples=3):
    """The page's book equals the Python reference at the same position,
    for a few positions in a row."""
    seen = set()

    stream = ladder_stream(driver)

    def new_book():
        book = book_of(driver, stream)
        if (
            book
            and book["status"] == "synced"
            and book["seq"] is not None
            and book["seq"] not in seen
            and reference.states
            and book["seq"] >= min(reference.states)
        ):
            return book
        return None

    for _ in range(samples):
        book = wait_until(
            new_book, timeout=10, interval=0.05, message="a new synced book on the page"
        )
        seen.add(book["seq"])
        expected = reference.at(book["seq"])
        assert {"seq": book["seq"], "bids": book["bids"], "asks": book["asks"]} == expected


def wait_live(driver, timeout=5):
    """Trades and a book of at least 10 levels a side on the page."""
    wait_until(
        lambda: (
            rows(driver, "#bids .row") >= 10
            and rows(driver, "#asks .row") >= 10
            and rows(driver, "#tape .row") >= 1
        ),
        timeout,
        interval=0.05,
        message="trades and a book of 10+ levels a side",
    )


# -- tests ---------------------------------------------------------------------------


def test_page_is_served_and_its_module_is_importable(server):
    import urllib.request

    port = server["server"].port
    with urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=5) as response:
        assert response.status == 200
        assert b'src="/static/app.js"' in response.read()
    with urllib.request.urlopen(
        "http://127.0.0.1:%d/static/marketstream.js" % port, timeout=5
    ) as response:
        assert "javascript" in response.headers["Content-Type"]
        assert b"export class MarketStream" in response.read()


def test_page_shows_live_market_without_console_errors(page, server, feed):
    open_page(page, server["server"])
    wait_live(page, timeout=5)
    assert page.find_element(By.ID, "connection").get_attribute("data-state") == "open"
    assert js(page, "return window.marketstream.connected") is True
    assert panel_status(page, "book") == "live"
    depth = ladder_stream(page)
    book, last_seq = js(
        page, "const c = window.marketstream; return [c.books[arguments[0]], c.lastSeq]", depth
    )
    assert len(book["bids"]) >= 10 and len(book["asks"]) >= 10
    assert float(book["bids"][0][0]) < float(book["asks"][0][0])
    assert book["seq"] == last_seq[depth]
    wait_until(
        lambda: (
            {depth, "trade.BTC_USDT", "ticker.BTC_USDT"}
            <= set(js(page, "return window.marketstream.lastSeq"))
        ),
        3,
        message="positions of the market's three streams",
    )
    # The ticker and the per-stream table are filled in.
    wait_until(
        lambda: page.find_element(By.ID, "last").text not in ("", "—"), 3, message="ticker shown"
    )
    wait_until(lambda: rows(page, "#streams tr") >= 6, 3, message="streams table")
    # Nothing missed on the way in: no gap on any stream (a snapshot asked
    # for while other catch-ups hold the connection's budget comes after a
    # gap notice), nothing red in the events list.
    streams = js(page, "return window.marketstream.streams")
    assert {name: s["gaps"] for name, s in streams.items() if s["gaps"]} == {}
    assert rows(page, "#log li.bad") == 0, page.find_element(By.ID, "log").text
    assert errors(page) == []


def test_page_book_equals_python_reference(page, server, feed):
    srv = server["server"]
    reference = ReferenceBook("ws://127.0.0.1:%d/ws" % srv.port)
    try:
        open_page(page, srv)
        wait_live(page)
        assert_book_matches_reference(page, reference)
    finally:
        reference.close()


def test_market_selector_switches_streams(page, server, feed, redis_client):
    open_page(page, server["server"])
    wait_live(page)
    before = ladder_stream(page)
    page.find_element(By.CSS_SELECTOR, 'button[data-market="ETH_USDT"]').click()
    wait_until(
        lambda: (
            ladder_stream(page).startswith("depth.ETH_USDT")
            and (b := book_of(page))
            and b["status"] == "synced"
            and len(b["bids"]) >= 10
        ),
        5,
        message="ETH_USDT book",
    )
    assert ladder_stream(page) == before.replace("BTC_USDT", "ETH_USDT")
    assert book_of(page, before) is None
    wait_until(lambda: numsub(redis_client, DEPTH) == 0, 5, message="depth.BTC_USDT released")
    assert "market=ETH_USDT" in page.current_url
    wait_until(
        lambda: page.find_element(By.ID, "ticker-market").text == "ETH/USDT",
        2,
        message="ticker of the selected market",
    )


RECORDER = """
window.__seqs = {};
window.__states = [];
const client = window.marketstream;
client.addEventListener("message", (e) => {
  if (e.detail.seq !== undefined) (window.__seqs[e.detail.stream] ||= []).push(e.detail.seq);
});
client.addEventListener("state", (e) => window.__states.push(e.detail.state));
"""


def test_server_restart_resumes_without_gap(page, server, feed, redis_url):
    srv = server["server"]
    open_page(page, srv)
    wait_live(page)
    js(page, RECORDER)
    wait_until(
        lambda: js(page, "return Object.keys(window.__seqs).length") >= 3,
        5,
        message="messages recorded",
    )

    srv.stop()
    wait_until(
        lambda: (
            page.find_element(By.ID, "connection").get_attribute("data-state") == "reconnecting"
        ),
        5,
        interval=0.02,
        message="page shows reconnecting",
    )
    server["server"] = srv = start_server(redis_url, port=srv.port)

    wait_until(
        lambda: js(
            page, "return window.marketstream.connected && window.marketstream.resumes >= 3"
        ),
        15,
        message="page reconnected and resumed",
    )
    before = js(page, "return window.marketstream.lastSeq")
    depth = ladder_stream(page)
    wait_until(
        lambda: all(
            js(page, "return window.marketstream.lastSeq")[s] > before[s]
            for s in ("trade.BTC_USDT", depth)
        ),
        5,
        message="new messages after the restart",
    )
    assert js(page, "return window.marketstream.reconnects") >= 1
    assert "reconnecting" in js(page, "return window.__states")
    # Every position once, in order: no gap on any stream (an update
    # speed's merged diffs skip positions: theirs only go up).
    for stream, seqs in js(page, "return window.__seqs").items():
        expected = sorted(set(seqs)) if "@" in stream else list(range(seqs[0], seqs[0] + len(seqs)))
        assert seqs == expected, (
            stream,
            seqs,
            page.find_element(By.ID, "log").text,
        )
    assert {
        name: s["gaps"]
        for name, s in js(page, "return window.marketstream.streams").items()
        if s["gaps"]
    } == {}
    assert page.find_element(By.ID, "resumes").text != "0"
    reference = ReferenceBook("ws://127.0.0.1:%d/ws" % srv.port)
    try:
        assert_book_matches_reference(page, reference)
    finally:
        reference.close()


def test_redis_outage_shows_stale_then_recovers(page, server, feed, redis_server, tmp_path):
    srv = server["server"]
    open_page(page, srv)
    wait_live(page)
    trades_before = js(page, "return window.marketstream.streams['trade.BTC_USDT'].count")

    redis_server.kill()
    try:
        wait_until(
            lambda: (
                panel_status(page, "book") in ("stale", "gapped")
                and panel_status(page, "tape-panel") in ("stale", "gapped")
            ),
            10,
            interval=0.05,
            message="page shows the data as stale",
        )
        page.save_screenshot(str(tmp_path / "stale.png"))
    finally:
        redis_server.restart()

    wait_until(lambda: health_status(srv.port) == 200, 15, message="server back on Redis")
    wait_page(
        page,
        lambda: (
            panel_status(page, "book") == "live"
            and panel_status(page, "tape-panel") == "live"
            and js(page, "return window.marketstream.streams['trade.BTC_USDT'].count")
            > trades_before + 2
        ),
        20,
        message="page recovered",
    )
    wait_live(page)
    reference = ReferenceBook("ws://127.0.0.1:%d/ws" % srv.port)
    try:
        assert_book_matches_reference(page, reference)
    finally:
        reference.close()


def test_plain_streams_build_a_partial_book_and_colour_trades(page, server, redis_client):
    """Streams published with plain PUBLISH (no positions, no snapshots): the
    book is built from diffs by their update ids and marked partial; a
    missing update is reported as a gap; trades are coloured by aggressor."""
    market = "PLAIN_TEST"
    depth = "depth." + market
    open_page(page, server["server"], "?markets=%s" % market)
    # No server book for a stream without snapshots: the ladder falls back
    # to the plain stream.
    wait_page(page, lambda: ladder_stream(page) == depth, 5, message="the ladder on " + depth)
    for stream in (depth, "trade." + market):
        wait_until(
            lambda stream=stream: numsub(redis_client, stream) == 1,
            5,
            message=stream + " subscribed",
        )

    def publish(stream, data):
        import ujson

        redis_client.publish(stream, ujson.dumps({"stream": stream, "data": data}))

    # The first diff until the page has it: the page asks for the snapshot
    # a depth stream may have, and the server holds its connection out of
    # the stream's listeners until it has looked (a diff it reads in the
    # same turn as Redis' subscribe confirmation is not delivered), and
    # asks again every 1.5 s while nothing comes.  Sent again, the diff is
    # stale to the page's book: applied once.
    first = {
        "e": "depth",
        "s": market,
        "U": 101,
        "u": 104,
        "b": [["10.01", "1.5"], ["10.00", "2"]],
        "a": [["10.03", "1"], ["10.05", "3"]],
    }
    publish_until(
        lambda: publish(depth, first),
        lambda: (book_of(page, depth, with_u=True) or {}).get("u") == 104,
        page,
        message="the first diff on the page",
    )
    publish(
        depth,
        {
            "e": "depth",
            "s": market,
            "U": 105,
            "u": 106,
            "b": [["10.00", "0"], ["9.99", "4"]],
            "a": [["10.02", "0.5"]],
        },
    )
    publish(
        "trade." + market,
        {"e": "trade", "s": market, "t": 1, "p": "10.02", "q": "0.5", "m": False, "T": 1},
    )
    publish(
        "trade." + market,
        {"e": "trade", "s": market, "t": 2, "p": "10.01", "q": "0.7", "m": True, "T": 2},
    )
    expected = {
        "seq": None,
        "status": "partial",
        "bids": [["10.01", "1.5"], ["9.99", "4"]],
        "asks": [["10.02", "0.5"], ["10.03", "1"], ["10.05", "3"]],
    }
    try:
        wait_until(lambda: book_of(page, depth) == expected, 10, message="partial book")
    except AssertionError:
        assert book_of(page, depth) == expected  # says what the page shows instead
    wait_until(lambda: rows(page, "#tape .row") == 2, 5, message="two trades")
    tape = page.find_elements(By.CSS_SELECTOR, "#tape .row")
    assert "sell" in tape[0].get_attribute("class")  # m true: the buyer was the maker
    assert "buy" in tape[1].get_attribute("class")
    assert rows(page, "#bids .row") == 2 and rows(page, "#asks .row") == 3
    assert panel_status(page, "book") == "partial"

    # Update 107 is missing: a gap, and the book goes on from the diff, partial.
    publish(depth, {"e": "depth", "s": market, "U": 108, "u": 108, "b": [], "a": [["10.05", "0"]]})
    wait_until(
        lambda: js(page, "return window.marketstream.streams[arguments[0]].gaps", depth) == 1,
        5,
        message="gap counted",
    )
    wait_until(
        lambda: book_of(page, depth)["asks"] == [["10.02", "0.5"], ["10.03", "1"]],
        5,
        message="diff after the gap applied",
    )
    assert js(page, "return window.marketstream.lastSeq") == {}
    assert errors(page) == []


def test_the_events_list_shows_close_codes_and_failed_attempts_count(page, server, feed, redis_url):
    srv = server["server"]
    open_page(page, srv)
    wait_live(page)
    srv.stop()  # SIGTERM: 1001 "server shutting down"
    wait_page(
        page,
        lambda: "1001 server shutting down" in page.find_element(By.ID, "log").text,
        5,
        message="the close code and reason in the events list",
    )
    # Nothing listens: each attempt fails, and the page counts them.
    wait_page(
        page,
        lambda: int(page.find_element(By.ID, "failures").text) >= 3,
        15,
        message="three failed attempts counted",
    )
    state = page.find_element(By.ID, "connection-state").text
    assert state.startswith("reconnecting (attempt "), state
    assert js(page, "return window.marketstream.failures") >= 3
    server["server"] = srv = start_server(redis_url, port=srv.port)
    wait_page(
        page,
        lambda: page.find_element(By.ID, "connection").get_attribute("data-state") == "open",
        15,
        message="reconnected",
    )
    assert page.find_element(By.ID, "reconnects").text == "1"
    assert page.find_element(By.ID, "connection-state").text == "open"
    # The browser reports each refused connection itself; nothing else failed.
    assert [e for e in errors(page) if e["source"] != "network"] == []


def disconnects(server):
    return [line for line in server.lines if " disconnect 127.0.0.1:" in line]


def test_close_sends_a_close_frame(page, server):
    """close() while the connection is still being made, and once it is
    open: the server sees a close frame (1000) either way."""
    srv = server["server"]
    open_page(page, srv, "?markets=CLOSE_TEST")
    wait_until(lambda: js(page, "return window.marketstream.connected"), 5, message="connected")
    page.execute_async_script("""
        const done = arguments[arguments.length - 1];
        import("/static/marketstream.js").then(({MarketStream}) => {
          const early = new MarketStream();
          early.connect(`ws://${location.host}/ws`);
          early.close();               // before the handshake is done
          done(early.state);
        });""")
    wait_until(lambda: disconnects(srv), 5, message="the early client's disconnect")
    assert " code=1000 " in disconnects(srv)[0], srv.output
    js(page, "window.marketstream.close()")
    wait_until(lambda: len(disconnects(srv)) == 2, 5, message="the page's disconnect")
    assert " code=1000 " in disconnects(srv)[1], srv.output
    assert js(page, "return window.marketstream.state") == "closed"


def test_refused_streams_are_reported_on_the_page(page, server):
    """The browser client asks for acks on its connection: a stream the
    server refuses is an event (shown in the events list), not silence."""
    open_page(page, server["server"], "?markets=BTC_USDT,btc_usdt&market=btc_usdt")
    wait_page(
        page,
        lambda: (
            "refused trade.btc_usdt: invalid market 'btc_usdt'"
            in page.find_element(By.ID, "log").text
        ),
        5,
        message="the refusal shown",
    )
    assert "trade.btc_usdt" not in js(page, "return window.marketstream.streams")
    wait_until(
        lambda: js(page, "return window.marketstream.refused")["depth.btc_usdt"].startswith(
            "invalid market"
        ),
        5,
        message="refusals kept",
    )
    assert errors(page) == []


def test_phone_width_shows_status_book_and_trades(page, server, feed, tmp_path):
    """At 420 px: the connection status uncut, the book and the trades one
    above the other, nothing off the side of the screen."""
    page.set_window_size(420, 900)
    try:
        open_page(page, server["server"])
        wait_live(page)
        width = js(page, "return window.innerWidth")
        assert 380 <= width <= 430, width
        assert js(page, "return document.documentElement.scrollWidth") <= width
        for element_id in ("connection", "book", "tape-panel", "ticker", "log"):
            box = js(
                page,
                "const r = document.getElementById(arguments[0])"
                ".getBoundingClientRect(); return [r.left, r.right, r.width, r.height]",
                element_id,
            )
            assert box[2] > 0 and box[3] > 0, (element_id, box)
            assert box[0] >= 0 and box[1] <= width + 0.5, (element_id, box, width)
        status = page.find_element(By.ID, "connection")
        assert js(page, "const e = arguments[0]; return e.scrollWidth <= e.clientWidth", status)
        assert "open" in status.text and "reconnects" in status.text
        book = page.find_element(By.ID, "book").rect
        tape = page.find_element(By.ID, "tape-panel").rect
        assert tape["y"] >= book["y"] + book["height"] - 1  # below it, not beside it, cut off
        assert tape["y"] + 100 < js(page, "return window.innerHeight")  # on the first screen
        # The best ask, the best bid, the last trade (re-rendered all the time: ask at once).
        for row in ("#asks .row:last-child", "#bids .row", "#tape .row"):
            assert js(
                page,
                "const r = document.querySelector(arguments[0]); "
                "const b = r && r.getBoundingClientRect(); "
                "return !!b && b.height > 0 && b.left >= 0 && b.right <= innerWidth",
                row,
            ), row
        page.save_screenshot(str(tmp_path / "phone.png"))
    finally:
        page.set_window_size(1280, 800)


def test_chromium_negotiates_compression_and_reads_compressed_snapshots(page, server, feed):
    """Chromium always offers permessage-deflate: the server takes it, and
    the browser inflates the depth snapshots (compressed; the small diffs
    come plain on the same connection), so the page's book is whole."""
    import json

    from marketstream.testing import health

    srv = server["server"]
    open_page(page, srv)
    wait_live(page)
    extensions, first = page.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const ws = new WebSocket(`ws://${location.host}/stream?streams=${arguments[0]}&snapshot=1`);
        ws.onmessage = (event) => { done([ws.extensions, event.data]); ws.close(); };
        ws.onerror = () => done(["error", ""]);
        """,
        DEPTH,
    )
    assert extensions.startswith("permessage-deflate; server_no_context_takeover"), extensions
    snapshot = json.loads(first)
    assert snapshot["stream"] == DEPTH and snapshot["data"]["e"] == "depthSnapshot"
    assert len(snapshot["data"]["b"]) >= 10
    stats = health(srv.port)["stats"]
    assert stats["deflated_messages"] >= 2  # the page's snapshot and this one
    assert stats["deflate_bytes_out"] < stats["deflate_bytes_in"]
    assert errors(page) == []


# -- the ladder: update speed and checksums -------------------------------------------


def speed_refusal(port, stream):
    """None if the server at ``port`` serves ``stream``, else why not (the
    SUBSCRIBE reply's reason, with acknowledgements on)."""
    import json

    import tornado.websocket

    async def probe():
        ws = await tornado.websocket.websocket_connect("ws://127.0.0.1:%d/ws" % port)
        try:
            request = {"method": "SUBSCRIBE", "params": [stream], "id": 1, "acks": True}
            await ws.write_message(json.dumps(request))
            while True:
                text = await asyncio.wait_for(ws.read_message(), 5)
                assert text is not None, "the server closed the probe"
                reply = json.loads(text)
                if reply.get("id") == 1:
                    error = reply.get("error")
                    if error is None:
                        return None
                    return (error.get("refused") or {}).get(stream) or error.get("msg")
        finally:
            ws.close()

    return asyncio.run(probe())


def checksum_label(driver):
    label = driver.find_element(By.ID, "book-checksum")
    return label.get_attribute("data-state"), label.text


def test_ladder_falls_back_to_every_diff_when_the_speed_stream_is_refused(
    page, server, redis_client
):
    """A depth stream published without snapshots has no server book (and
    a server without update speeds has none at all): the server refuses
    depth.<MARKET>@250ms, and the ladder shows plain depth.<MARKET>, says
    so discreetly (a grey line, the ladder's feed label), not as an error."""
    market = "FALLBACK_TEST"
    depth = "depth." + market
    open_page(page, server["server"], "?markets=%s" % market)
    wait_page(page, lambda: ladder_stream(page) == depth, 5, message="the ladder on " + depth)
    state = ladder(page)
    assert state["speed"] is None and state["refused"], state
    streams = js(page, "return window.marketstream.streams")
    assert depth in streams and depth + SPEED not in streams
    wait_until(lambda: numsub(redis_client, depth) == 1, 5, message=depth + " subscribed")
    feed = page.find_element(By.ID, "book-feed")
    wait_until(lambda: feed.text == "every diff", 2, message="the feed label")
    assert "fallback" in feed.get_attribute("class")
    assert state["refused"] in feed.get_attribute("title")
    line = wait_until(
        lambda: [
            item
            for item in page.find_elements(By.CSS_SELECTOR, "#log li")
            if depth + SPEED + " not served" in item.text
        ],
        2,
        message="the fallback in the events list",
    )[0]
    assert line.get_attribute("class") == "", line.get_attribute("class")  # grey, not red
    assert "refused " + depth not in page.find_element(By.ID, "log").text

    # The plain stream's diffs build the ladder (a partial book: no checksums).
    import ujson

    diff = {"e": "depth", "s": market, "U": 7, "u": 7, "b": [["5.1", "1"]], "a": [["5.2", "2"]]}
    publish_until(
        lambda: redis_client.publish(depth, ujson.dumps({"stream": depth, "data": diff})),
        lambda: rows(page, "#bids .row") == 1 and rows(page, "#asks .row") == 1,
        page,
        message="the diff on the ladder",
    )
    assert panel_status(page, "book") == "partial"
    wait_until(lambda: checksum_label(page) == ("none", "no checksums"), 2, message="no checksums")
    assert errors(page) == []


def test_ladder_shows_the_checksum_state_of_the_feed(page, server, feed):
    """The ladder's checksum label says what the client counted on its
    stream: "checksum ✓ N checked" when frames carry checksums, else "no
    checksums" (a server without book checksums)."""
    open_page(page, server["server"])
    wait_live(page)
    depth = ladder_stream(page)

    def agrees():
        state, text = checksum_label(page)
        checked = js(
            page, "return window.marketstream.streams[arguments[0]].checksums.checked", depth
        )
        if checked:
            shown = text.startswith("checksum ✓ ") and text.endswith(" checked")
            return state == "ok" and shown and 0 < int(text.split()[2]) <= checked
        return (state, text) == ("none", "no checksums")

    wait_page(page, agrees, 5, message="the checksum label agrees with the client")
    assert (
        js(page, "return window.marketstream.streams[arguments[0]].checksums", depth)["mismatches"]
        == 0
    )


class CheckedBook:
    """A publisher's book that sends plain frames (``PUBLISH``, no
    positions) carrying the checksum a server with books adds: a
    ``depthSnapshot``, then diffs, each with the CRC-32 of the top 10
    after it (computed here, independently of the page's code)."""

    def __init__(self, redis_client, stream):
        self.redis = redis_client
        self.stream = stream
        self.u = 100
        self.bids = {"%.2f" % (100 - i * 0.01): str(i + 1) for i in range(12)}
        self.asks = {"%.2f" % (100.01 + i * 0.01): str(i + 2) for i in range(12)}

    def top(self):
        bids = sorted(self.bids.items(), key=lambda level: -float(level[0]))
        asks = sorted(self.asks.items(), key=lambda level: float(level[0]))
        return [list(level) for level in bids], [list(level) for level in asks]

    def checksum(self):
        return crc_of(*self.top())

    def _send(self, data, checksum):
        import ujson

        frame = {"stream": self.stream, "data": data, "checksum": checksum}
        self.redis.publish(self.stream, ujson.dumps(frame))

    def snapshot(self):
        bids, asks = self.top()
        data = {"e": "depthSnapshot", "u": self.u, "b": bids, "a": asks}
        self._send(data, self.checksum())

    def diff(self, step, wrong=False):
        """A diff that changes the best bid's size, adds an ask level and
        removes the worst one; ``wrong``: its checksum is off by one bit."""
        bids, asks = self.top()
        best = bids[0][0]
        self.bids[best] = str(step + 10)
        added = "%.2f" % (100.01 + (12 + step) * 0.01)
        self.asks[added] = "1"
        worst = asks[0][0]  # the best ask goes: the top 10 moves
        del self.asks[worst]
        self.u += 1
        data = {"e": "depth", "U": self.u, "u": self.u, "b": [[best, self.bids[best]]]}
        data["a"] = [[added, "1"], [worst, "0"]]
        self._send(data, self.checksum() ^ (1 if wrong else 0))


def test_ladder_counts_checksums_and_shows_a_mismatch_and_the_resync(page, server, redis_client):
    """Frames that carry checksums (as a server with books sends them): the
    ladder counts them checked; a frame whose checksum does not match the
    book shows the mismatch and "resyncing" until a new snapshot rebuilt
    the book, then "resynced"."""
    market = "CRC_TEST"
    depth = "depth." + market
    open_page(page, server["server"], "?markets=%s" % market)
    wait_page(page, lambda: ladder_stream(page) == depth, 5, message="the ladder on " + depth)
    wait_until(lambda: numsub(redis_client, depth) == 1, 5, message=depth + " subscribed")
    book = CheckedBook(redis_client, depth)

    def shown():
        on_page = book_of(page, depth)
        bids, asks = book.top()
        return (
            on_page is not None
            and on_page["status"] == "synced"
            and (on_page["bids"], on_page["asks"]) == (bids, asks)
        )

    # The snapshot until the page has it (see the partial-book test: the
    # server may not deliver a frame read together with its subscription).
    publish_until(book.snapshot, shown, page, message="the snapshot on the ladder")
    for step in range(1, 4):
        book.diff(step)
        wait_page(page, shown, 5, message="diff %d on the ladder" % step)
    wait_page(
        page,
        lambda: checksum_label(page)[0] == "ok" and int(checksum_label(page)[1].split()[2]) >= 4,
        5,
        message="four checksums checked",
    )
    assert checksum_label(page)[1].startswith("checksum ✓ ")
    assert panel_status(page, "book") == "live"

    book.diff(4, wrong=True)
    wait_page(
        page,
        lambda: (
            checksum_label(page)[0] == "mismatch"
            and "✗ 1 mismatch" in checksum_label(page)[1]
            and "resyncing" in checksum_label(page)[1]
        ),
        5,
        message="the mismatch on the ladder",
    )
    assert panel_status(page, "book") == "gapped"
    assert "gap on %s: checksum mismatch" % depth in page.find_element(By.ID, "log").text

    publish_until(book.snapshot, shown, page, message="the resync on the ladder")
    wait_page(
        page,
        lambda: "resynced" in checksum_label(page)[1] and panel_status(page, "book") == "live",
        5,
        message="resynced",
    )
    book.diff(5)
    wait_page(page, shown, 5, message="a diff after the resync")
    state, text = checksum_label(page)
    assert state == "mismatch" and text.startswith("checksum ✗ 1 mismatch (last "), text
    assert text.endswith(" checked") and int(text.split()[-2]) >= 5, text
    stats = js(page, "return window.marketstream.streams[arguments[0]].checksums", depth)
    assert stats["mismatches"] == 1
    assert errors(page) == []


def test_ladder_uses_the_speed_stream_the_server_serves(page, server, feed):
    """With a server that keeps books: the ladder shows depth.BTC_USDT@250ms
    (a snapshot of the server's book, then merged diffs), equal to the
    Python client's book of every diff at the same position, with every
    checksum checked; a book that went wrong (a level the server never
    sent) is caught by the next checksum and resynced on its own."""
    srv = server["server"]
    refusal = speed_refusal(srv.port, DEPTH + SPEED)
    if refusal is not None:
        pytest.skip("this server does not serve %s%s yet: %s" % (DEPTH, SPEED, refusal))
    reference = ReferenceBook("ws://127.0.0.1:%d/ws" % srv.port)
    try:
        open_page(page, srv)
        wait_live(page)
        assert ladder(page) == {"stream": DEPTH + SPEED, "speed": "250ms", "refused": None}
        # The plain stream, asked for as a standby, went once the speed stream was served.
        wait_until(
            lambda: DEPTH not in js(page, "return window.marketstream.streams"),
            5,
            message="the standby plain stream dropped",
        )
        assert page.find_element(By.ID, "book-feed").text == "merged every 250ms"
        assert_book_matches_reference(page, reference)
        wait_page(
            page,
            lambda: (
                checksum_label(page)[0] == "ok" and int(checksum_label(page)[1].split()[2]) >= 3
            ),
            5,
            message="checksums checked",
        )
        # A bid above the best one that the server never sent.
        js(
            page,
            "const book = window.marketstream.book(arguments[0]);"
            "const [[price]] = book.top('bids', 1); book.bids.set(price + '0000001', '1');",
            DEPTH + SPEED,
        )
        wait_page(
            page,
            lambda: (
                "✗ 1 mismatch" in checksum_label(page)[1] and "resynced" in checksum_label(page)[1]
            ),
            10,
            message="the mismatch caught and resynced",
        )
        assert_book_matches_reference(page, reference)
    finally:
        reference.close()
    assert errors(page) == []
