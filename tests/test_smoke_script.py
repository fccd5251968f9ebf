"""scripts/smoke_test.py against a real ``python -m marketstream`` process.

The server runs as a child process on the session's redis-server; the smoke
script runs as a child process too, exactly as a deployment would run it.
"""

import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest
import redis

from marketstream.testing import free_port, health, wait_until
from tests.helpers import ROOT, ServerProcess
from tests.redis_topology import cluster, redis_cluster  # noqa: F401

SCRIPT = os.path.join(ROOT, "scripts", "smoke_test.py")
STEPS = ["health", "connect", "subscribe", "deliver", "unsubscribe", "close", "positions"]
ENV_KEYS = ("WS_STREAM_URL", "REDIS_URL", "MARKETSTREAM_CONFIG")


def _clean_env(**extra):
    environ = {key: value for key, value in os.environ.items() if key not in ENV_KEYS}
    environ.update(extra)
    return environ


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
    result = subprocess.run(
        [sys.executable, SCRIPT, *args],
        cwd=ROOT,
        env=_clean_env(**(env or {})),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    result.elapsed = time.monotonic() - started
    return result


def assert_all_pass(result, forced=False):
    """Every step passed; with ``forced`` (a live stream given with
    --force) the positions step is skipped and says why."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    lines = result.stdout.splitlines()
    expected = ["PASS " + step for step in STEPS]
    if forced:
        expected[-1] = "SKIP positions"
    assert [line.split(":", 1)[0] for line in lines] == expected, output
    assert "byte-identical" in lines[STEPS.index("deliver")]
    assert " ms" in lines[STEPS.index("deliver")]
    if not forced:
        assert re.fullmatch(
            r"PASS positions: 5 messages with positions (\d+)\.\.(\d+), rising by 1; after a "
            r"disconnect the 3 missed \((\d+)\.\.(\d+)\) arrived exactly once on resume with "
            r"since=\d+, then live (\d+)",
            lines[-1],
        ), lines[-1]
    assert "Traceback" not in output
    return lines


def history_keys(redis_client):
    return sorted(redis_client.keys("{trade.SMOKETEST_*"))


def numsub(redis_client, channel):
    return redis_client.pubsub_numsub(channel)[0][1]


def test_all_steps_pass_with_flags(server, redis_url, redis_client):
    stream = "trade.SMOKETEST_%s" % os.urandom(4).hex().upper()
    result = run_smoke(
        "--ws-url",
        "ws://127.0.0.1:%d/ws" % server.port,
        "--redis-url",
        redis_url,
        "--stream",
        stream,
        "--timeout",
        "5",
    )
    lines = assert_all_pass(result)
    assert stream in lines[STEPS.index("subscribe")]
    # The script left nothing behind: the server released the Redis channel
    # (a channel nobody listens to lingers for up to a second) and the
    # WebSocket is gone.
    wait_until(lambda: numsub(redis_client, stream) == 0, 10, message="channel released")
    wait_until(
        lambda: health(server.port)["connections"] == 0, message="the smoke client disconnected"
    )
    assert health(server.port)["status"] == "ok"


def test_all_steps_pass_from_the_environment(server, redis_url, redis_client):
    # The deployment's bare host:port form of WS_STREAM_URL, and REDIS_URL.
    result = run_smoke(env={"WS_STREAM_URL": "127.0.0.1:%d" % server.port, "REDIS_URL": redis_url})
    lines = assert_all_pass(result)
    assert "ws://127.0.0.1:%d/ws" % server.port in result.stdout
    # The probe went to a random stream of its own, released at the end.
    assert re.search(r"trade\.SMOKETEST_[0-9A-F]{8} subscribed", lines[STEPS.index("subscribe")])
    wait_until(
        lambda: not redis_client.pubsub_channels("trade.SMOKETEST_*"),
        10,
        message="channel released",
    )
    assert history_keys(redis_client) == []  # the positions check leaves no keys


def test_bind_address_in_the_environment_means_this_host(server, redis_url):
    result = run_smoke(
        env={"WS_STREAM_URL": "ws://0.0.0.0:%d/ws" % server.port, "REDIS_URL": redis_url}
    )
    assert_all_pass(result)


def test_all_steps_pass_with_acknowledgements_on(start_server, redis_url):
    server = start_server("--acks")
    result = run_smoke("--ws-url", "127.0.0.1:%d" % server.port, "--redis-url", redis_url)
    lines = assert_all_pass(result)
    assert "acknowledged" in lines[STEPS.index("subscribe")]


def test_a_server_that_cannot_resume_fails_at_positions(start_server, redis_url):
    # It replays at most 2 messages: the 3 missed ones come as a gap notice.
    server = start_server("--set", "recovery.max_replay=2")
    result = run_smoke(
        "--ws-url", "127.0.0.1:%d" % server.port, "--redis-url", redis_url, "--timeout", "2"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    lines = result.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == (
        ["PASS " + step for step in STEPS[:-1]] + ["FAIL positions"]
    ), output
    assert "resumed with since=" in lines[-1] and "gap notice" in lines[-1], output
    assert "Traceback" not in output


def test_invalid_stream_fails_at_subscribe(start_server, redis_url):
    server = start_server("--acks")  # the server says why
    result = run_smoke(
        "--ws-url",
        "127.0.0.1:%d" % server.port,
        "--redis-url",
        redis_url,
        "--stream",
        "trade.SMOKETEST_lower",
        "--timeout",
        "2",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == [
        "PASS health",
        "PASS connect",
        "FAIL subscribe",
    ]
    assert "invalid market" in lines[-1]
    assert "Traceback" not in result.stdout + result.stderr


def test_server_on_another_redis_fails_at_subscribe(start_server, redis_url):
    # A server on its own embedded Redis never subscribes in ours.
    server = start_server(redis=False)
    result = run_smoke(
        "--ws-url", "127.0.0.1:%d" % server.port, "--redis-url", redis_url, "--timeout", "1"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith("FAIL subscribe: PUBSUB NUMSUB")
    assert "Traceback" not in result.stdout + result.stderr


def test_nothing_listening_fails_cleanly(redis_url):
    port = free_port()
    result = run_smoke(
        "--ws-url", "ws://127.0.0.1:%d/ws" % port, "--redis-url", redis_url, "--timeout", "2"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert result.stdout.splitlines() == [result.stdout.strip()]  # one line, then stop
    assert result.stdout.startswith("FAIL health: ")
    assert "Connection refused" in result.stdout or "refused" in result.stdout.lower()
    assert "Traceback" not in output
    assert result.elapsed < 30


def test_unreachable_redis_fails_cleanly(server):
    result = run_smoke(
        "--ws-url",
        "127.0.0.1:%d" % server.port,
        "--redis-url",
        "redis://127.0.0.1:%d/0" % free_port(),
        "--timeout",
        "2",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert result.stdout.splitlines()[-1].startswith("FAIL subscribe: Redis ")
    assert "Traceback" not in output


def test_no_redis_url_is_a_usage_error(server):
    # No default: a run that would test some unrelated Redis stops at once.
    result = run_smoke("--ws-url", "127.0.0.1:%d" % server.port)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert "--redis-url" in result.stderr and "REDIS_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert health(server.port)["connections"] == 0  # it did not even connect


def _published_during(redis_url, channel, action):
    """Messages PUBLISHed on ``channel`` while ``action()`` ran: a marker
    published afterwards bounds the wait."""
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(channel)
        wait_until(lambda: numsub(client, channel) >= 1, message="watcher subscribed")
        result = action()
        marker = b"end-" + os.urandom(4).hex().encode()
        client.publish(channel, marker)
        seen = []
        deadline = time.monotonic() + 5
        while marker not in seen:
            assert time.monotonic() < deadline, "the marker never arrived"
            message = pubsub.get_message(timeout=0.5)
            if message is not None:
                seen.append(message["data"])
        return result, seen[:-1]
    finally:
        pubsub.close()
        client.close()


def test_live_looking_stream_is_refused_without_force(server, redis_url):
    result, published = _published_during(
        redis_url,
        "trade.SOL_USDC",
        lambda: run_smoke(
            "--ws-url",
            "127.0.0.1:%d" % server.port,
            "--redis-url",
            redis_url,
            "--stream",
            "trade.SOL_USDC",
        ),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "trade.SOL_USDC looks like a live stream" in result.stderr
    assert "--force" in result.stderr and "SMOKETEST" in result.stderr
    assert result.stdout == ""
    assert published == []  # nothing reached the market's subscribers


def test_live_looking_stream_with_force(server, redis_url, redis_client):
    stream = "trade.SMOKEFORCED_USDC"
    result, published = _published_during(
        redis_url,
        stream,
        lambda: run_smoke(
            "--ws-url",
            "127.0.0.1:%d" % server.port,
            "--redis-url",
            redis_url,
            "--stream",
            stream,
            "--force",
        ),
    )
    lines = assert_all_pass(result, forced=True)
    assert "a live stream (--force)" in lines[-1]
    # Only the one plain probe went into it: no positions, no history keys.
    assert len(published) == 1 and b'"e":"smoke"' in published[0]
    assert redis_client.keys("{%s}*" % stream) == []


def test_redis_password_is_redacted(server, redis_url):
    port = free_port()
    result = run_smoke(
        "--ws-url",
        "127.0.0.1:%d" % server.port,
        "--redis-url",
        "redis://smoke:s3cret@127.0.0.1:%d/0" % port,
        "--timeout",
        "2",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "smoke:***@127.0.0.1:%d" % port in result.stdout.splitlines()[-1]
    assert "s3cret" not in output


@pytest.fixture(scope="module")
def smoke_module():
    spec = importlib.util.spec_from_file_location("smoke_test_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "value, expected",
    [
        ("127.0.0.1:4000", "ws://127.0.0.1:4000/ws"),
        ("0.0.0.0:4000", "ws://127.0.0.1:4000/ws"),
        ("stream.example.com:80", "ws://stream.example.com:80/ws"),
        ("ws://0.0.0.0:4000/ws", "ws://127.0.0.1:4000/ws"),
        ("ws://10.0.0.5:4000/stream-ws", "ws://10.0.0.5:4000/stream-ws"),
        ("wss://stream.example.com/ws", "wss://stream.example.com/ws"),
        ("ws://[::]:4000/ws", "ws://[::1]:4000/ws"),
    ],
)
def test_ws_url_forms(smoke_module, value, expected):
    assert smoke_module.ws_url_from(value) == expected


@pytest.mark.parametrize(
    "ws_url, expected",
    [
        ("ws://127.0.0.1:4000/ws", "http://127.0.0.1:4000/health"),
        ("wss://stream.example.com/ws", "https://stream.example.com/health"),
    ],
)
def test_health_url(smoke_module, ws_url, expected):
    assert smoke_module.health_url(ws_url) == expected


@pytest.mark.parametrize(
    "name, smoke",
    [
        ("trade.SMOKETEST_1A2B3C4D", True),
        ("kline.1m.SMOKETEST_PROBE", True),
        ("trade.SOL_USDC", False),
        ("trade.SMOKE_TEST", False),
        ("trade.SMOKE1A2B_TEST", False),
    ],
)
def test_smoke_stream_marker(smoke_module, name, smoke):
    assert smoke_module.is_smoke_stream(name) is smoke


def test_default_stream_passes_the_servers_default_rules(smoke_module):
    from marketstream.wire.requests import StreamRules

    names = {smoke_module.default_stream() for _ in range(20)}
    assert len(names) == 20
    for name in names:
        assert smoke_module.is_smoke_stream(name)
        assert StreamRules().check(name) is None, name


def test_all_steps_pass_on_redis_cluster(cluster):
    # A redis+cluster:// URL: the server and the probes use sharded pub/sub.
    server = ServerProcess("--redis-url", cluster.url)
    try:
        server.wait_healthy()
        result = run_smoke("--ws-url", "127.0.0.1:%d" % server.port, "--redis-url", cluster.url)
        lines = assert_all_pass(result)
        assert "PUBSUB SHARDNUMSUB 0 -> 1" in lines[STEPS.index("subscribe")]
    finally:
        server.stop()


def test_docstring_examples(smoke_module):
    import doctest

    result = doctest.testmod(smoke_module)
    assert result.attempted >= 5 and result.failed == 0
