"""What a new user meets on a first run: the banner, the listen address,
the log and the metrics."""

import logging
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from marketstream.testing import async_wait_until, free_port, wait_until
from tests.helpers import ROOT, ServerProcess, abort, connect


@pytest.fixture
def spawn():
    servers = []

    def start(*args, **kwargs):
        server = ServerProcess(*args, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_demo_banner_gives_redis_url_page_and_a_smoke_test_that_passes(spawn):
    server = spawn("--demo")
    wait_until(
        lambda: "Check it:" in server.output or server.proc.poll() is not None,
        20,
        message="demo banner",
    )
    redis_url = re.search(r"Redis:\s+(redis://\S+)", server.output).group(1)
    assert "Page:      http://127.0.0.1:%d/" % server.port in server.output
    command = re.search(r"Check it:\s+(python .*)", server.output).group(1).split()
    assert command[:2] == ["python", "scripts/smoke_test.py"]
    assert redis_url in command
    # The line as printed runs as printed (from the project directory).
    done = subprocess.run(
        [sys.executable] + command[1:], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_port_0_logs_the_port_it_got(spawn, redis_url):
    server = spawn("--redis-url", redis_url, "--listen", "127.0.0.1:0")
    server.wait_listening()
    port = int(re.search(r"listening on ws://127\.0\.0\.1:(\d+)/", server.output).group(1))
    assert port != 0
    assert _get("http://127.0.0.1:%d/health" % port)[0] == 200


def test_banner_shows_the_configured_path(spawn, redis_url):
    port = free_port()
    server = spawn("--redis-url", redis_url, "--listen", "ws://127.0.0.1:%d/feed" % port)
    server.wait_listening()
    assert "listening on ws://127.0.0.1:%d/feed " % port in server.output


def test_port_in_use_is_named_before_any_redis_starts(spawn):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        server = spawn("--listen", "127.0.0.1:%d" % port)  # no Redis configured
        assert server.proc.wait(20) == 1, server.output
        assert "cannot listen on 127.0.0.1:%d: address already in use" % port in server.output
        assert "embedded" not in server.output  # refused before starting one
    finally:
        taken.close()


def test_plain_get_on_a_websocket_path_is_quiet(spawn, redis_url):
    server = spawn("--redis-url", redis_url)
    server.wait_listening()
    status, headers, body = _get("http://127.0.0.1:%d/" % server.port)
    assert status == 426 and headers.get("Upgrade") == "websocket"
    assert b"WebSocket" in body
    assert _get("http://127.0.0.1:%d/health" % server.port)[0] == 200  # a later request
    assert "WARNING" not in server.output, server.output


def test_demo_page_is_served_on_plain_get_when_enabled(spawn, redis_url):
    server = spawn("--redis-url", redis_url, "--set", "server.demo_page=true")
    server.wait_listening()
    status, headers, body = _get("http://127.0.0.1:%d/" % server.port)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"marketstream" in body
    status, headers, body = _get("http://127.0.0.1:%d/static/marketstream.js" % server.port)
    assert status == 200 and "javascript" in headers["Content-Type"]
    # /ws stays a WebSocket endpoint without the page.
    assert _get("http://127.0.0.1:%d/ws" % server.port)[0] == 426


@pytest.mark.gen_test
async def test_disconnect_without_close_frame_says_so(server, caplog):
    caplog.set_level(logging.INFO, logger="marketstream.server.handlers")
    ws = await connect(server)
    await async_wait_until(lambda: server.manager.connections, message="registered")
    abort(ws)
    await async_wait_until(lambda: "disconnect" in caplog.text, message="disconnect logged")
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("disconnect")][0]
    assert "no close frame" in line and "None" not in line


def test_metrics_have_no_created_series(spawn, redis_url):
    server = spawn("--redis-url", redis_url)
    server.wait_healthy()
    status, _, body = _get("http://127.0.0.1:%d/metrics" % server.port)
    assert status == 200 and b"marketstream_" in body
    assert b"_created" not in body
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
