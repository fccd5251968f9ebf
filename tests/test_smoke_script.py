"""scripts/smoke_test.py against a real server process."""

import os
import subprocess
import sys

from tests.test_process import ROOT, ServerProcess
from marketstream.embedded import free_port

SCRIPT = os.path.join(ROOT, "scripts", "smoke_test.py")
STEPS = ["health", "connect", "subscribe", "deliver", "unsubscribe", "close"]


def run_smoke(*args, env=None):
    environ = {k: v for k, v in os.environ.items() if k not in ("WS_STREAM_URL", "REDIS_URL")}
    environ.update(env or {})
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=60, env=environ, cwd=ROOT)


def test_smoke_passes_against_a_running_server(redis_url, redis_client):
    server = ServerProcess("--redis-url", redis_url)
    try:
        server.wait_listening()
        result = run_smoke("--ws-url", "ws://127.0.0.1:%d/ws" % server.port, "--redis-url", redis_url)
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert [line.split(":")[0] for line in lines] == ["PASS " + step for step in STEPS]
        assert "byte-identical" in lines[3]
        # The same from the environment, in the deployment's host:port form.
        result = run_smoke(env={"WS_STREAM_URL": "0.0.0.0:%d" % server.port, "REDIS_URL": redis_url})
        assert result.returncode == 0, result.stdout + result.stderr
        assert not redis_client.pubsub_channels("trade.SMOKE*")  # nothing left subscribed
    finally:
        server.stop()


def test_smoke_fails_cleanly_without_a_server(redis_url):
    result = run_smoke("--ws-url", "ws://127.0.0.1:%d/ws" % free_port(), "--redis-url", redis_url,
                       "--timeout", "2")
    assert result.returncode == 1
    assert result.stdout.startswith("FAIL health:")
    assert "Traceback" not in result.stdout + result.stderr


def test_smoke_fails_when_delivery_breaks(redis_url, redis_server):
    # A server listening to another Redis: subscribe is never seen upstream.
    other = ServerProcess()  # embedded Redis of its own
    try:
        other.wait_listening()
        result = run_smoke("--ws-url", "ws://127.0.0.1:%d/ws" % other.port, "--redis-url", redis_url,
                           "--timeout", "1")
        assert result.returncode == 1
        assert result.stdout.splitlines()[-1].startswith("FAIL subscribe:")
    finally:
        other.stop()
