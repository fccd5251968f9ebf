"""The real ``marketstream`` command as a child process: embedded Redis,
signals, exit codes."""

import asyncio
import collections
import re
import signal
import time

import psutil
import pytest
import tornado.websocket

from marketstream.testing import free_port, health, wait_until
from tests.helpers import ServerProcess


@pytest.fixture
def spawn():
    processes = []

    def start(*args, **kwargs):
        process = ServerProcess(*args, **kwargs)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.stop()


async def _connect_and_wait_close(port, count=3):
    clients = [
        await tornado.websocket.websocket_connect("ws://127.0.0.1:%d/ws" % port)
        for _ in range(count)
    ]
    return clients


def _run_clients_until_signal(server, sig):
    """Connect clients, signal the server, return the close codes they saw."""

    async def scenario():
        clients = await _connect_and_wait_close(server.port)
        await clients[0].write_message('{"method":"SUBSCRIBE","params":["trade.SOL_USDC"],"id":1}')
        server.proc.send_signal(sig)
        for ws in clients:
            assert await asyncio.wait_for(ws.read_message(), 10) is None
        return [ws.close_code for ws in clients]

    return asyncio.run(scenario())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_embedded_redis_lives_and_dies_with_the_server(spawn, sig):
    server = spawn()
    server.wait_listening()
    url = re.search(r"embedded redis-server at (redis://\S+)", server.output).group(1)
    children = server.redis_children()
    assert len(children) == 1
    import redis

    assert redis.Redis.from_url(url).ping()

    codes = _run_clients_until_signal(server, sig)
    assert codes == [1001, 1001, 1001]
    assert server.proc.wait(15) == 0, server.output
    psutil.wait_procs(children, timeout=5)
    assert not any(
        child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children
    )


def test_embedded_redis_dies_even_when_server_is_killed(spawn):
    server = spawn()
    server.wait_listening()
    children = server.redis_children()
    assert children
    server.proc.kill()
    server.proc.wait(10)
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, "orphan redis-server left behind"


def test_configured_redis_means_no_embedded_one(spawn, redis_url):
    server = spawn("--redis-url", redis_url)
    server.wait_listening()
    assert server.redis_children() == []
    assert "embedded" not in server.output
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0


def test_unreachable_redis_exits_1_after_the_startup_timeout(spawn):
    """[redis] startup_timeout: an operator who prefers to fail fast gets
    exit code 1, naming the setting and where the URL came from (password
    hidden).  (Without it the server waits: tests/test_startup.py.)"""
    port = free_port()
    server = spawn(
        "--set",
        "redis.startup_timeout=1",
        env={"REDIS_URL": "redis://:s3cret@127.0.0.1:%d/0" % port},
    )
    assert server.proc.wait(30) == 1, server.output
    assert (
        "cannot start: Redis at redis://:***@127.0.0.1:%d/0 (environment REDIS_URL) did "
        "not answer within [redis] startup_timeout = 1s" % port
    ) in server.output
    assert "s3cret" not in server.output and "Traceback" not in server.output


def test_demo_prints_url_and_streams_data(spawn):
    server = spawn("--demo")
    wait_until(
        lambda: "Subscribe:" in server.output or server.proc.poll() is not None,
        20,
        message="demo banner",
    )
    assert "ws://127.0.0.1:%d/ws" % server.port in server.output
    message = re.search(r"Subscribe: (\{.*\})", server.output).group(1)

    async def scenario():
        ws = await tornado.websocket.websocket_connect("ws://127.0.0.1:%d/ws" % server.port)
        await ws.write_message(message)
        kinds = set()
        deadline = time.monotonic() + 10
        while len(kinds) < 3 and time.monotonic() < deadline:
            frame = await asyncio.wait_for(ws.read_message(), 10)
            import ujson

            kinds.add(ujson.loads(frame)["data"]["e"])
        ws.close()
        return kinds

    assert {"trade", "depth", "ticker"} <= asyncio.run(scenario())
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0


def test_logging_format_and_level_from_config(spawn, redis_url):
    server = spawn("--redis-url", redis_url, "--set", "logging.format=MS|%(levelname)s|%(message)s")
    server.wait_listening()
    lines = [line for line in server.lines if line.strip()]
    assert lines and all(line.startswith("MS|") for line in lines), lines

    quiet = spawn("--redis-url", redis_url, "--log-level", "WARNING")
    wait_until(lambda: "listening" in "".join(quiet.lines) or _serving(quiet.port), 15)
    assert "INFO" not in quiet.output and "listening on" not in quiet.output


def test_logging_from_a_fileconfig(spawn, redis_url, tmp_path):
    log_file = tmp_path / "marketstream.log"
    config = tmp_path / "logging.ini"
    config.write_text(
        "[loggers]\nkeys=root\n[handlers]\nkeys=file\n[formatters]\nkeys=plain\n"
        "[logger_root]\nlevel=INFO\nhandlers=file\n"
        "[handler_file]\nclass=FileHandler\nformatter=plain\nargs=(%r,)\n"
        "[formatter_plain]\nformat=FILE %%(name)s %%(message)s\n" % str(log_file)
    )
    spawn("--redis-url", redis_url, "--set", "logging.config_file=%s" % config)
    wait_until(
        lambda: log_file.exists() and "listening on" in log_file.read_text(),
        15,
        message="log file written",
    )
    assert log_file.read_text().startswith("FILE marketstream.")


def _serving(port):
    import urllib.request

    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def test_workers_share_sequential_connections_evenly(spawn, redis_url):
    server = spawn("--redis-url", redis_url, "--processes", "2")
    server.wait_healthy()
    workers = {
        child.pid
        for child in psutil.Process(server.proc.pid).children()
        if "redis-server" not in child.name()
    }
    assert len(workers) == 2, server.output
    counts = collections.Counter(health(server.port)["pid"] for _ in range(1000))
    assert set(counts) == workers, (counts, server.output)
    assert min(counts.values()) >= 450, counts  # at most 55/45


def test_second_server_on_the_same_port_fails_naming_it(spawn, redis_url):
    first = spawn("--redis-url", redis_url, "--processes", "2")
    first.wait_healthy()
    second = spawn(
        "--redis-url", redis_url, "--processes", "2", "--listen", "127.0.0.1:%d" % first.port
    )
    assert second.proc.wait(15) == 1, second.output
    assert "cannot listen on 127.0.0.1:%d: address already in use" % first.port in second.output, (
        second.output
    )
    # The first server kept every connection.
    pids = {health(first.port)["pid"] for _ in range(50)}
    assert pids <= {child.pid for child in psutil.Process(first.proc.pid).children()}
    assert first.proc.poll() is None


def test_runs_on_uvloop(spawn, redis_url, redis_client):
    """[server] event_loop = uvloop: the same server, on uvloop."""
    server = spawn("--redis-url", redis_url, "--set", "server.event_loop=uvloop")
    server.wait_healthy()

    async def scenario():
        ws = await tornado.websocket.websocket_connect("ws://127.0.0.1:%d/ws" % server.port)
        await ws.write_message('{"method":"SUBSCRIBE","params":["trade.UVLOOP_TEST"],"id":1}')
        deadline = time.monotonic() + 10
        while redis_client.pubsub_numsub("trade.UVLOOP_TEST")[0][1] < 1:
            assert time.monotonic() < deadline, server.output
            await asyncio.sleep(0.01)
        payload = '{"stream":"trade.UVLOOP_TEST","data":{"e":"trade","t":1}}'
        redis_client.publish("trade.UVLOOP_TEST", payload)
        frame = await asyncio.wait_for(ws.read_message(), 10)
        ws.close()
        return frame

    assert asyncio.run(scenario()) == '{"stream":"trade.UVLOOP_TEST","data":{"e":"trade","t":1}}'
    assert any("uvloop" in m.path for m in psutil.Process(server.proc.pid).memory_maps())
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
