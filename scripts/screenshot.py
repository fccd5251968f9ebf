#!/usr/bin/env python3
"""Regenerate the README's screenshot of the live market page (docs/demo.png).

Starts ``marketstream --demo`` on a free port, opens its page in headless
Chromium (Debian's ``chromium`` and ``chromedriver``, driven by selenium),
waits until the page shows a full book, a trade tape and tickers, and saves
a screenshot::

    python scripts/screenshot.py                       # -> docs/demo.png, 1280x800
    python scripts/screenshot.py --output /tmp/page.png --width 1440 --height 900
    python scripts/screenshot.py --url http://127.0.0.1:4000/   # a server already running

It needs selenium, which comes with the test extra (``pip install -e
'.[test]'``), and Debian's ``chromium`` and ``chromium-driver`` packages.

Exit code 0 on success, 1 if the page did not show live data in time, 2 when
selenium, chromium or chromedriver is missing (the message says what to
install).
"""

import argparse
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from marketstream.testing import free_port, health_status, stop_process, wait_until  # noqa: E402

READY = """
const client = window.marketstream;
if (!client || !client.connected) return false;
const book = Object.values(client.books)[0];
const streams = Object.values(client.streams);
return Boolean(book && book.bids.length >= 15 && book.asks.length >= 15
  && document.querySelectorAll("#tape .row").length >= arguments[0]
  && streams.length >= 6 && streams.every((s) => s.status === "live" && s.rate > 0));
"""


def wait_for(predicate, timeout: float) -> bool:
    """Whether ``predicate`` became true within ``timeout`` seconds."""
    try:
        wait_until(predicate, timeout, interval=0.1)
    except AssertionError:
        return False
    return True


def start_demo(port: int) -> subprocess.Popen:
    """``python -m marketstream --demo`` on 127.0.0.1:``port``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "WS_STREAM_URL", "MARKETSTREAM_CONFIG")
    }
    return subprocess.Popen(
        [sys.executable, "-m", "marketstream", "--demo", "--listen", "127.0.0.1:%d" % port],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def browser(chromium: str, chromedriver: str, width: int, height: int):
    """A headless Chromium whose page area is exactly ``width`` x ``height``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=%d,%d" % (width, height),
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )
    return driver


def missing_tools(chromium: str, chromedriver: str) -> str | None:
    """What to install before a screenshot can be taken, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return (
            "selenium is not installed: pip install -e '.[test]' (the test extra; "
            "or pip install 'selenium>=4.20')"
        )
    for name, path, package in (
        ("chromium", chromium, "chromium"),
        ("chromedriver", chromedriver, "chromium-driver"),
    ):
        if not os.access(path, os.X_OK):
            return "%s not found at %s: apt-get install %s (or --%s PATH)" % (
                name,
                path,
                package,
                name,
            )
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output",
        default=os.path.join(ROOT, "docs", "demo.png"),
        help="where to save the PNG (default: docs/demo.png)",
    )
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--url", help="page of a running server (default: start the demo)")
    parser.add_argument(
        "--trades", type=int, default=28, help="trades on the tape before the shot (default: 28)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for data")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument(
        "--chromedriver", default=shutil.which("chromedriver") or "/usr/bin/chromedriver"
    )
    args = parser.parse_args(argv)
    missing = missing_tools(args.chromium, args.chromedriver)
    if missing:
        print("screenshot: %s" % missing, file=sys.stderr)
        return 2

    demo = None
    url = args.url
    if url is None:
        port = free_port()
        demo = start_demo(port)
        url = "http://127.0.0.1:%d/" % port
        if (
            not wait_for(lambda: demo.poll() is not None or health_status(port) == 200, 30)
            or demo.poll() is not None
        ):
            print("screenshot: the demo server did not start", file=sys.stderr)
            demo.kill()
            return 1
    driver = browser(args.chromium, args.chromedriver, args.width, args.height)
    try:
        driver.get(url)
        if not wait_for(lambda: driver.execute_script(READY, args.trades), args.timeout):
            print(
                "screenshot: no live data on %s within %gs" % (url, args.timeout), file=sys.stderr
            )
            return 1
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        driver.save_screenshot(args.output)
        print("saved %s (%dx%d) from %s" % (args.output, args.width, args.height, url))
        return 0
    finally:
        driver.quit()
        stop_process(demo, 15)


if __name__ == "__main__":
    sys.exit(main())
