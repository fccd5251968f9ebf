"""marketstream-tail as a user runs it: a subprocess against a real server
process and a real Redis."""

import os
import subprocess
import sys
import threading

import pytest
import ujson

from marketstream.publisher import Publisher
from marketstream.testing import wait_until
from tests.helpers import ROOT, ServerProcess, numsub


TAIL = os.path.join(os.path.dirname(sys.executable), "marketstream-tail")


class Tail:
    """``marketstream-tail ARGS`` with stdout lines and stderr collected."""

    def __init__(self, *args, module=False):
        command = [sys.executable, "-m", "marketstream.client.tail"] if module else [TAIL]
        self.proc = subprocess.Popen(
            command + list(args),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines = []
        self.errors = []
        self._threads = [
            threading.Thread(target=self._read, args=(pipe, store), daemon=True)
            for pipe, store in ((self.proc.stdout, self.lines), (self.proc.stderr, self.errors))
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _read(pipe, store):
        for line in pipe:
            store.append(line)

    def wait(self, timeout=15):
        code = self.proc.wait(timeout)
        for thread in self._threads:
            thread.join(5)
        return code

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()

    @property
    def stderr(self):
        return "".join(self.errors)


@pytest.fixture
def server_process(redis_url):
    server = ServerProcess("--redis-url", redis_url)
    server.wait_listening()
    yield server
    server.stop()


@pytest.fixture
def tails():
    started = []

    def start(*args, **kwargs):
        tail = Tail(*args, **kwargs)
        started.append(tail)
        return tail

    yield start
    for tail in started:
        tail.stop()


def url(server):
    return "ws://127.0.0.1:%d/ws" % server.port


def trade(stream, t):
    return ujson.dumps({"stream": stream, "data": {"e": "trade", "t": t}})


def test_prints_frames_as_json_lines(server_process, redis_client, tails):
    tail = tails(
        "trade.SOL_USDC",
        "ticker.ETH_USDT",
        "--url",
        url(server_process),
        "--count",
        "3",
        "--timeout",
        "15",
    )
    wait_until(
        lambda: numsub(redis_client, "ticker.ETH_USDT") == 1 or tail.proc.poll() is not None,
        10,
        message="tail subscribed",
    )
    sent = [
        trade("trade.SOL_USDC", 1),
        '{"stream":"ticker.ETH_USDT","data":{"e":"ticker","c":"3400.10"}}',
        trade("trade.SOL_USDC", 2),
    ]
    for payload in sent:
        redis_client.publish(ujson.loads(payload)["stream"], payload)
    assert tail.wait() == 0, tail.stderr
    assert tail.lines == [payload + "\n" for payload in sent]
    assert "connected " + url(server_process) in tail.stderr
    # It said goodbye: a close frame, not a dropped connection.
    wait_until(
        lambda: "disconnect 127.0.0.1:" in server_process.output,
        10,
        message="the server logged the disconnect",
    )
    assert " code=1000 " in server_process.output, server_process.output


@pytest.mark.parametrize(
    "name, reason",
    [
        (
            "trades.BTC_USDT",
            "unknown stream type 'trades' (allowed: depth, trade, ticker, bookTicker, kline)",
        ),
        ("trade.btc_usdt", "invalid market 'btc_usdt' (must match ^[A-Z0-9]+_[A-Z0-9]+$)"),
        ("btcusdt@trade", "stream name must be <type>.<MARKET>, e.g. trade.BTC_USDT"),
    ],
)
def test_a_refused_stream_exits_2_with_the_servers_reason(server_process, tails, name, reason):
    """The server's acks are off (the default): tail asks for them on its
    own connection, says what the server refused and why, and stops."""
    tail = tails(
        name, "trade.BTC_USDT", "--url", url(server_process), "--count", "1", "--timeout", "60"
    )
    assert tail.wait(30) == 2, tail.stderr
    assert "marketstream-tail: the server refused %s: %s\n" % (name, reason) in tail.stderr
    assert tail.lines == []
    wait_until(
        lambda: "refused stream %r" % name in server_process.output,
        10,
        message="the server logged the refusal",
    )


def test_says_why_it_cannot_connect(tails):
    from marketstream.testing import free_port

    tail = tails("trade.SOL_USDC", "--url", "ws://127.0.0.1:%d/ws" % free_port(), "--timeout", "1")
    assert tail.wait() == 0
    assert "disconnected ws://127.0.0.1:" in tail.stderr
    assert ": cannot connect: [Errno 111] Connection refused" in tail.stderr, tail.stderr


def test_timeout(server_process, tails):
    counted = tails(
        "trade.SOL_USDC", "--url", url(server_process), "--count", "1", "--timeout", "0.5", "-q"
    )
    uncounted = tails("trade.SOL_USDC", "--url", url(server_process), "--timeout", "0.5")
    assert counted.wait() == 1 and counted.lines == [] and counted.stderr == ""
    assert uncounted.wait() == 0


@pytest.mark.parametrize("args", [["--since", "trade.SOL_USDC"], ["--count", "0"], []])
def test_bad_arguments(tails, args):
    tail = tails(*args)
    assert tail.wait() == 2
    assert "usage: marketstream-tail" in tail.stderr


def test_runs_as_module(tails):
    tail = tails("--help", module=True)
    assert tail.wait() == 0
    assert "--snapshot" in "".join(tail.lines)


def test_reconnects_after_server_restart(server_process, redis_url, redis_client, tails):
    """A plain stream cannot be replayed: after the restart tail prints a
    gap notice for it, then the new messages."""
    tail = tails("trade.SOL_USDC", "--url", url(server_process), "--count", "3", "--timeout", "30")
    wait_until(lambda: numsub(redis_client, "trade.SOL_USDC") == 1, 10, message="subscribed")
    redis_client.publish("trade.SOL_USDC", trade("trade.SOL_USDC", 1))
    wait_until(lambda: len(tail.lines) == 1, message="first line")
    server_process.stop()
    second = ServerProcess(
        "--redis-url", redis_url, "--listen", "127.0.0.1:%d" % server_process.port
    )
    try:
        second.wait_listening()
        wait_until(
            lambda: numsub(redis_client, "trade.SOL_USDC") == 1, 15, message="subscribed again"
        )
        redis_client.publish("trade.SOL_USDC", trade("trade.SOL_USDC", 2))
        assert tail.wait(20) == 0, tail.stderr
    finally:
        second.stop()
    gap = ujson.loads(tail.lines[1])
    assert gap["stream"] == "trade.SOL_USDC" and gap["data"]["e"] == "gap"
    assert tail.lines[2] == trade("trade.SOL_USDC", 2) + "\n"
    assert tail.stderr.count("tail: connected " + url(server_process)) == 2
    assert (
        "disconnected %s: closed by the server: 1001 server shutting down\n" % url(server_process)
    ) in tail.stderr, tail.stderr


def test_since_and_snapshot(server_process, redis_client, tails):
    with Publisher(redis_client, history=100) as pub:
        seqs = [pub.publish("trade.SOL_USDC", {"e": "trade", "t": t}) for t in range(5)]
        snap = pub.publish("ticker.SOL_USDC", {"e": "ticker", "c": "150.1"}, snapshot=True)
    tail = tails(
        "trade.SOL_USDC",
        "ticker.SOL_USDC",
        "--url",
        url(server_process),
        "--snapshot",
        "--since",
        "trade.SOL_USDC:%d" % seqs[1],
        "--count",
        "4",
        "--timeout",
        "5",
    )
    assert tail.wait() == 0, tail.stderr
    frames = [ujson.loads(line) for line in tail.lines]
    assert sorted((f["stream"], f["seq"]) for f in frames) == sorted(
        [("trade.SOL_USDC", s) for s in seqs[2:]] + [("ticker.SOL_USDC", snap)]
    )
    assert [f["seq"] for f in frames if f["stream"] == "trade.SOL_USDC"] == seqs[2:]


def test_compression_prints_the_compressed_snapshot_as_received(
    server_process, redis_client, tails
):
    """With --compression the snapshot (over compression_min_bytes) comes
    compressed and is printed inflated, exactly as published."""
    from marketstream.testing import health

    book = {"e": "depthSnapshot", "b": [["%d.5" % i, "1.000"] for i in range(100)]}
    with Publisher(redis_client, history=100) as pub:
        seq = pub.publish("depth.SOL_USDC", book, snapshot=True)
    tail = tails(
        "depth.SOL_USDC",
        "--url",
        url(server_process),
        "--snapshot",
        "--compression",
        "--count",
        "1",
        "--timeout",
        "10",
    )
    assert tail.wait() == 0, tail.stderr
    frame = ujson.loads(tail.lines[0])
    assert frame["data"] == book and frame["seq"] == seq
    assert health(server_process.port)["stats"]["deflated_messages"] == 1
