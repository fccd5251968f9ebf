#!/usr/bin/env python3
"""What one hostile client costs the server: channels, churn and resumes.

Starts a private redis-server and a marketstream server, runs one attack
from 127.0.0.1 and reports what it cost the server (CPU, memory) and Redis
(channels, bytes sent).  The attacks:

``channels``
    ``--connections`` connections each subscribe ``--per-conn`` distinct
    streams in one SUBSCRIBE (1024 is ``max_streams_per_connection``'s
    default).  Reports the handshakes refused (HTTP 429 past
    ``max_connections_per_ip``), the Redis channels subscribed in the end
    (``PUBSUB CHANNELS``), the seconds until they stopped growing and the
    server's RSS before and after.

``churn``
    ``--connections`` connections each send SUBSCRIBE and UNSUBSCRIBE of
    the same ``--per-conn`` streams in turn, ``--rate`` messages a second
    (within ``messages_per_second``), for ``--duration`` seconds after a
    second of warm-up.  Reports the server's CPU (in all and per
    connection) and the SUBSCRIBE/UNSUBSCRIBE calls Redis served.

``resume``
    Publishes ``--history`` messages of about ``--size`` bytes on each of
    ``--streams`` streams through the recovery script (``Publisher``, a
    history of ``--history``; with ``--snapshot-every N`` every N-th message
    is also the stream's snapshot), then ``--clients`` clients at once send
    one SUBSCRIBE with ``"since": 0`` for every stream and read everything
    they get.  Reports the bytes Redis sent (``total_net_output_bytes``),
    the server's CPU, RSS before, at its peak (``VmHWM``) and after, and per
    client the bytes and frames received, gap notices and whether (and how)
    the server closed it.

Standard runs (the figures in the README's Security section)::

    python scripts/bench_attacks.py channels --connections 98 --per-conn 1024
    python scripts/bench_attacks.py churn --connections 1
    python scripts/bench_attacks.py churn --connections 5
    python scripts/bench_attacks.py resume --clients 1
    python scripts/bench_attacks.py resume --clients 5

``--set section.key=value`` passes a setting to the server (repeatable),
e.g. ``--set server.max_connections_per_ip=0``; ``--json`` prints JSON.
Nothing is pinned: the server, Redis and the clients share the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

import psutil
import redis

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_fanout as fanout  # noqa: E402  (puts the project root on sys.path)
from bench_fanout import ROOT, log  # noqa: E402

from marketstream.testing import (  # noqa: E402
    RedisServer,
    close_reason,
    die_with_parent,
    free_port,
    handshake_request,
    health,
    masked_frame,
    raise_fd_limit,
    read_frames,
    server_command,
    stop_process,
    tree_cpu,
)
from marketstream.wire.frames import OP_CLOSE, OP_TEXT  # noqa: E402

HOST = "127.0.0.1"
GAP = b'"e":"gap"'


def stream(tag: str, c: int, j: int) -> str:
    """A stream name of its own for connection ``c``'s ``j``-th stream."""
    return "trade.%sC%dS%d_USDT" % (tag, c, j)


def frame_size(payload: bytes) -> int:
    """Bytes of a masked client frame for ``payload`` (up to 64 KiB)."""
    return len(payload) + (6 if len(payload) < 126 else 8)


class Client(asyncio.Protocol):
    """A minimal WebSocket client: sends its upgrade request, then counts
    what the server sends (frames, bytes, gap notices, the close code)."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.transport: Any = None
        loop = asyncio.get_running_loop()
        self.upgraded: asyncio.Future[int] = loop.create_future()  # the HTTP status
        self.lost: asyncio.Future[None] = loop.create_future()
        self.head = b""
        self.buffer = b""
        self.bytes = self.frames = self.gaps = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self.last_data = time.monotonic()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.last_data = time.monotonic()
        if not self.upgraded.done():
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            self.upgraded.set_result(int(head.split(b" ", 2)[1]))
        self.bytes += len(data)
        frames, self.buffer = read_frames(self.buffer + data)
        for opcode, payload in frames:
            if opcode == OP_CLOSE:
                code, reason = close_reason(payload)
                if code is not None:
                    self.close_code, self.close_reason = code, reason
            elif opcode == OP_TEXT:
                self.frames += 1
                if GAP in payload:
                    self.gaps += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_result(0)
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, text: str) -> None:
        self.transport.write(masked_frame(text))

    @property
    def closed(self) -> bool:
        return self.lost.done()


async def open_client(port: int, path: str = "/ws") -> Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: Client(handshake_request(port, path, host=HOST)), HOST, port
    )
    await asyncio.wait_for(client.upgraded, 10)
    return client


class Target:
    """A private redis-server and a marketstream server on it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.redis_server = RedisServer().start()
        self.redis = redis.Redis.from_url(self.redis_server.url)
        self.port = free_port()
        # Not clients=: the per-address limit stays as configured (the
        # channels attack reports its refusals).
        command = server_command(
            self.port,
            self.redis_server.url,
            ["server.max_connections=20000"] + args.set,
            host=HOST,
        )
        self.proc = subprocess.Popen(command, cwd=ROOT, preexec_fn=die_with_parent)
        self.ps = psutil.Process(self.proc.pid)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                health(self.port, HOST)
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                await asyncio.sleep(0.05)

    def rss_mb(self) -> float:
        return round(self.ps.memory_info().rss / 2**20, 1)

    def peak_rss_mb(self) -> float:
        """The server's RSS high-water mark (VmHWM)."""
        with open("/proc/%d/status" % self.proc.pid) as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        return 0.0

    def cpu(self) -> float:
        return tree_cpu(self.ps)

    def redis_sent(self) -> int:
        return int(self.redis.info("stats")["total_net_output_bytes"])

    def calls(self, *commands: str) -> dict[str, int]:
        stats = self.redis.info("commandstats")
        return {name: stats.get("cmdstat_" + name, {}).get("calls", 0) for name in commands}

    def channels(self, pattern: str) -> int:
        return len(self.redis.pubsub_channels(pattern))

    def redis_memory_mb(self) -> float:
        return round(int(self.redis.info("memory")["used_memory"]) / 2**20, 1)

    def metric(self, line_start: str) -> float:
        """The value of the first /metrics sample that starts with ``line_start``."""
        url = "http://%s:%d/metrics" % (HOST, self.port)
        with urllib.request.urlopen(url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(line_start):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def close(self) -> None:
        stop_process(self.proc)
        self.redis.close()
        self.redis_server.stop()


def subscribe_text(
    names: list[str], method: str = "SUBSCRIBE", request_id: int = 1, **extra: Any
) -> str:
    message: dict[str, Any] = {"method": method, "params": names, "id": request_id}
    message.update(extra)
    return json.dumps(message, separators=(",", ":"))


# --- the attacks -----------------------------------------------------------------


async def attack_channels(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    rss_before, redis_before = target.rss_mb(), target.redis_memory_mb()
    clients: list[Client] = []
    refused: dict[int, int] = {}
    for _ in range(args.connections):
        try:
            client = await open_client(target.port)
        except (OSError, asyncio.TimeoutError):
            refused[0] = refused.get(0, 0) + 1
            continue
        status = client.upgraded.result()
        if status != 101:
            refused[status] = refused.get(status, 0) + 1
            client.transport.close()
            continue
        clients.append(client)
    started = time.monotonic()
    for c, client in enumerate(clients):
        client.send(subscribe_text([stream("CH", c, j) for j in range(args.per_conn)]))
    # Wait until the channels stop growing for a second.
    count, still, last_change = -1, time.monotonic(), time.monotonic()
    while time.monotonic() - still < 1.0 and time.monotonic() - started < args.timeout:
        await asyncio.sleep(0.1)
        now = target.channels("trade.CH*")
        if now != count:
            count, still, last_change = now, time.monotonic(), time.monotonic()
    figures = {
        "attack": "channels",
        "connections": args.connections,
        "per_conn": args.per_conn,
        "accepted": len(clients),
        "refused_by_status": refused,
        "redis_channels": count,
        "seconds_until_settled": round(last_change - started, 2),
        "server_rss_mb_before": rss_before,
        "server_rss_mb_after": target.rss_mb(),
        "redis_memory_mb_before": redis_before,
        "redis_memory_mb_after": target.redis_memory_mb(),
        "closed_by_server": sum(1 for c in clients if c.closed),
    }
    for client in clients:
        client.transport.close()
    return figures


async def hold_channels(target: Target, count: int) -> list[Client]:
    """``count`` channels subscribed by idle connections (1024 each)."""
    held = []
    for c in range(0, count, 1024):
        client = await open_client(target.port)
        client.send(subscribe_text([stream("HD", c, j) for j in range(min(1024, count - c))]))
        held.append(client)
    deadline = time.monotonic() + 60
    while target.channels("trade.HD*") < count and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return held


async def attack_churn(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    held = await hold_channels(target, args.held)
    clients = [await open_client(target.port) for _ in range(args.connections)]
    texts = [
        (
            subscribe_text([stream("CU", c, j) for j in range(args.per_conn)]),
            subscribe_text([stream("CU", c, j) for j in range(args.per_conn)], "UNSUBSCRIBE"),
        )
        for c in range(args.connections)
    ]
    interval = 1.0 / args.rate
    stop = time.monotonic() + 1.0 + args.duration
    marks: dict[str, Any] = {}

    async def churn(c: int, client: Client) -> int:
        sent = 0
        due = time.monotonic() + c * interval / max(1, args.connections)
        while due < stop and not client.closed:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            client.send(texts[c][sent % 2])
            sent += 1
            due += interval
        return sent

    async def measure() -> None:
        await asyncio.sleep(1.0)  # warm-up
        marks["cpu0"], marks["t0"] = target.cpu(), time.monotonic()
        marks["calls0"] = target.calls("subscribe", "unsubscribe")
        await asyncio.sleep(args.duration)
        marks["cpu1"], marks["t1"] = target.cpu(), time.monotonic()
        marks["calls1"] = target.calls("subscribe", "unsubscribe")

    results = await asyncio.gather(measure(), *(churn(c, cl) for c, cl in enumerate(clients)))
    seconds = marks["t1"] - marks["t0"]
    cpu_percent = 100 * (marks["cpu1"] - marks["cpu0"]) / seconds
    calls = {k: marks["calls1"][k] - marks["calls0"][k] for k in marks["calls0"]}
    figures = {
        "attack": "churn",
        "connections": args.connections,
        "per_conn": args.per_conn,
        "held_channels": target.channels("trade.HD*"),
        "rate": args.rate,
        "duration": round(seconds, 2),
        "messages_sent": sum(results[1:]),
        "server_cpu_percent": round(cpu_percent, 1),
        "server_cpu_percent_per_connection": round(cpu_percent / args.connections, 1),
        "redis_subscribe_calls": calls["subscribe"],
        "redis_unsubscribe_calls": calls["unsubscribe"],
        "closed_by_server": sum(1 for c in clients if c.closed),
    }
    for client in clients + held:
        client.transport.close()
    return figures


def publish_history(url: str, args: argparse.Namespace, names: list[str]) -> None:
    from marketstream.publisher import Publisher

    pad = "x" * max(0, args.size - 60)
    with Publisher(url, history=args.history, ttl=3600) as pub:
        for i in range(args.history):
            snapshot = bool(args.snapshot_every) and (i + 1) % args.snapshot_every == 0
            pub.publish_many(
                [
                    (name, '{"e":"trade","t":%d,"x":"%s"}' % (i, pad), True if snapshot else None)
                    for name in names
                ]
            )


async def attack_resume(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    names = ["trade.RS%d_USDT" % k for k in range(args.streams)]
    started = time.monotonic()
    await asyncio.get_running_loop().run_in_executor(
        None, publish_history, target.redis_server.url, args, names
    )
    log(
        "published %d messages in %.1f s"
        % (args.streams * args.history, time.monotonic() - started)
    )
    clients = [await open_client(target.port) for _ in range(args.clients)]
    await asyncio.sleep(0.5)
    rss_before, peak_before = target.rss_mb(), target.peak_rss_mb()
    cpu_before, sent_before = target.cpu(), target.redis_sent()
    slow_before = target.metric('marketstream_dropped_total{cause="slow_consumer"}')
    request = subscribe_text(names, since={name: 0 for name in names})
    began = time.monotonic()
    for client in clients:
        client.send(request)
    # Done when every client is closed or has had nothing for a second.
    while time.monotonic() - began < args.timeout:
        await asyncio.sleep(0.1)
        now = time.monotonic()
        if all(c.closed or (c.bytes and now - c.last_data > 1.0) for c in clients):
            break
    figures = {
        "attack": "resume",
        "clients": args.clients,
        "streams": args.streams,
        "history": args.history,
        "size": args.size,
        "snapshot_every": args.snapshot_every,
        "request_bytes": frame_size(request.encode()),
        "redis_bytes_sent_mb": round((target.redis_sent() - sent_before) / 2**20, 1),
        "server_cpu_seconds": round(target.cpu() - cpu_before, 2),
        "server_rss_mb_before": rss_before,
        "server_rss_mb_peak": max(target.peak_rss_mb(), peak_before),
        "server_rss_mb_peak_before": peak_before,
        "server_rss_mb_after": target.rss_mb(),
        "client_mb_received": [round(c.bytes / 2**20, 2) for c in clients],
        "client_frames": [c.frames for c in clients],
        "client_gap_notices": [c.gaps for c in clients],
        "client_closed": [
            "%s %s" % (c.close_code, c.close_reason) if c.closed else None for c in clients
        ],
        "server_slow_consumer_closes": int(
            target.metric('marketstream_dropped_total{cause="slow_consumer"}') - slow_before
        ),
    }
    for client in clients:
        client.transport.close()
    return figures


ATTACKS = {"channels": attack_channels, "churn": attack_churn, "resume": attack_resume}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    target = Target(args)
    try:
        await target.wait_ready()
        return await ATTACKS[args.attack](target, args)
    finally:
        target.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="What one hostile client costs marketstream: channels, churn, resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("attack", choices=sorted(ATTACKS), help="which attack to run")
    parser.add_argument(
        "--connections", type=int, default=98, help="channels, churn: connections from 127.0.0.1"
    )
    parser.add_argument(
        "--per-conn",
        type=int,
        default=1024,
        help="channels, churn: streams per connection (one message)",
    )
    parser.add_argument(
        "--rate", type=float, default=9.0, help="churn: messages a second per connection"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="churn: seconds measured (after one of warm-up)",
    )
    parser.add_argument(
        "--held",
        type=int,
        default=0,
        help="churn: channels other (idle) connections hold meanwhile",
    )
    parser.add_argument("--streams", type=int, default=200, help="resume: streams")
    parser.add_argument(
        "--history", type=int, default=1000, help="resume: messages published (and kept) per stream"
    )
    parser.add_argument(
        "--size", type=int, default=380, help="resume: bytes of each message's data, about"
    )
    parser.add_argument(
        "--snapshot-every",
        type=int,
        default=0,
        help="resume: every N-th message is also the snapshot (0: none)",
    )
    parser.add_argument(
        "--clients", type=int, default=1, help="resume: clients resuming every stream at once"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the attack to settle"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a marketstream setting (repeatable), e.g. server.max_connections_per_ip=0",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # clean up: the server and redis-server

    signal.signal(signal.SIGTERM, interrupted)
    try:
        figures = asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    fanout.print_figures(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
