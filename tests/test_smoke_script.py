"""scripts/smoke_test.py against a real ``python -m marketstream`` process.

The server runs as a child process on the session's redis-server; the smoke
script runs as a child process too, exactly as a deployment would run it.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from marketstream.embedded import free_port
from tests.helpers import ROOT, ServerProcess, wait_until

SCRIPT = os.path.join(ROOT, "scripts", "smoke_test.py")
STEPS = ["health", "connect", "subscribe", "deliver", "unsubscribe", "close"]
ENV_KEYS = ("WS_STREAM_URL", "REDIS_URL", "MARKETSTREAM_CONFIG")


def _clean_env(**extra):
    environ = {key: value for key, value in os.environ.items() if key not in ENV_KEYS}
    environ.update(extra)
    return environ


def _health(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=2) as response:
        return json.loads(response.read())


@pytest.fixture
def start_server(redis_url):
    """Start marketstream processes on the test Redis; all are stopped
    (SIGTERM, then SIGKILL after a deadline) when the test ends."""
    servers = []

    def start(*args, redis=True):
        flags = ("--redis-url", redis_url) if redis else ()
        server = ServerProcess(*flags, *args)
        servers.append(server)
        server.wait_healthy()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server):
    return start_server()


def run_smoke(*args, env=None, timeout=60):
    started = time.monotonic()
    result = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=_clean_env(**(env or {})),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout)
    result.elapsed = time.monotonic() - started
    return result


def assert_all_pass(result):
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    lines = result.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["PASS " + step for step in STEPS], output
    assert "byte-identical" in lines[STEPS.index("deliver")]
    assert " ms" in lines[STEPS.index("deliver")]
    assert "Traceback" not in output
    return lines


def numsub(redis_client, channel):
    return redis_client.pubsub_numsub(channel)[0][1]


def test_all_steps_pass_with_flags(server, redis_url, redis_client):
    stream = "trade.SMOKE%s_TEST" % os.urandom(4).hex().upper()
    result = run_smoke("--ws-url", "ws://127.0.0.1:%d/ws" % server.port, "--redis-url", redis_url,
                       "--stream", stream, "--timeout", "5")
    lines = assert_all_pass(result)
    assert stream in lines[STEPS.index("subscribe")]
    # The script left nothing behind: the server released the Redis channel
    # and the WebSocket is gone.
    assert numsub(redis_client, stream) == 0
    wait_until(lambda: _health(server.port)["connections"] == 0,
               message="the smoke client disconnected")
    assert _health(server.port)["status"] == "ok"


def test_all_steps_pass_from_the_environment(server, redis_url, redis_client):
    # The deployment's bare host:port form of WS_STREAM_URL, and REDIS_URL.
    result = run_smoke(env={"WS_STREAM_URL": "127.0.0.1:%d" % server.port, "REDIS_URL": redis_url})
    assert_all_pass(result)
    assert "ws://127.0.0.1:%d/ws" % server.port in result.stdout
    assert not redis_client.pubsub_channels("trade.SMOKE*")  # random stream, released


def test_bind_address_in_the_environment_means_this_host(server, redis_url):
    result = run_smoke(env={"WS_STREAM_URL": "ws://0.0.0.0:%d/ws" % server.port,
                            "REDIS_URL": redis_url})
    assert_all_pass(result)


def test_all_steps_pass_with_acknowledgements_on(start_server, redis_url):
    server = start_server("--acks")
    result = run_smoke("--ws-url", "127.0.0.1:%d" % server.port, "--redis-url", redis_url)
    lines = assert_all_pass(result)
    assert "acknowledged" in lines[STEPS.index("subscribe")]


def test_invalid_stream_fails_at_subscribe(start_server, redis_url):
    server = start_server("--acks")  # the server says why
    result = run_smoke("--ws-url", "127.0.0.1:%d" % server.port, "--redis-url", redis_url,
                       "--stream", "trade.not_a_market", "--timeout", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["PASS health", "PASS connect",
                                                         "FAIL subscribe"]
    assert "invalid market" in lines[-1]
    assert "Traceback" not in result.stdout + result.stderr


def test_server_on_another_redis_fails_at_subscribe(start_server, redis_url):
    # A server on its own embedded Redis never subscribes in ours.
    server = start_server(redis=False)
    result = run_smoke("--ws-url", "127.0.0.1:%d" % server.port, "--redis-url", redis_url,
                       "--timeout", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith("FAIL subscribe: PUBSUB NUMSUB")
    assert "Traceback" not in result.stdout + result.stderr


def test_nothing_listening_fails_cleanly(redis_url):
    port = free_port()
    result = run_smoke("--ws-url", "ws://127.0.0.1:%d/ws" % port, "--redis-url", redis_url,
                       "--timeout", "2")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert result.stdout.splitlines() == [result.stdout.strip()]  # one line, then stop
    assert result.stdout.startswith("FAIL health: ")
    assert "Connection refused" in result.stdout or "refused" in result.stdout.lower()
    assert "Traceback" not in output
    assert result.elapsed < 30


def test_unreachable_redis_fails_cleanly(server):
    result = run_smoke("--ws-url", "127.0.0.1:%d" % server.port,
                       "--redis-url", "redis://127.0.0.1:%d/0" % free_port(), "--timeout", "2")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert result.stdout.splitlines()[-1].startswith("FAIL subscribe: Redis ")
    assert "Traceback" not in output


@pytest.fixture(scope="module")
def smoke_module():
    spec = importlib.util.spec_from_file_location("smoke_test_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:4000", "ws://127.0.0.1:4000/ws"),
    ("0.0.0.0:4000", "ws://127.0.0.1:4000/ws"),
    ("stream.example.com:80", "ws://stream.example.com:80/ws"),
    ("ws://0.0.0.0:4000/ws", "ws://127.0.0.1:4000/ws"),
    ("ws://10.0.0.5:4000/stream-ws", "ws://10.0.0.5:4000/stream-ws"),
    ("wss://stream.example.com/ws", "wss://stream.example.com/ws"),
    ("ws://[::]:4000/ws", "ws://[::1]:4000/ws"),
])
def test_ws_url_forms(smoke_module, value, expected):
    assert smoke_module.ws_url_from(value) == expected


@pytest.mark.parametrize("ws_url, expected", [
    ("ws://127.0.0.1:4000/ws", "http://127.0.0.1:4000/health"),
    ("wss://stream.example.com/ws", "https://stream.example.com/health"),
])
def test_health_url(smoke_module, ws_url, expected):
    assert smoke_module.health_url(ws_url) == expected
