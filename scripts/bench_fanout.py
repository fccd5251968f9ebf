#!/usr/bin/env python3
"""Fan-out benchmark: how many deliveries per second, how fast, how much memory.

Starts a private redis-server and a marketstream server (or targets running
ones), opens N WebSocket connections, subscribes each to S of K streams,
publishes R messages/s to Redis for D seconds and reports deliveries/s,
loss, latency p50/p99/max, server RSS and CPU, and connect time.  Where
``taskset`` exists the server is pinned to one core and the load (this
script, its clients, the publisher and redis-server) to the other(s).

The client costs far less than the server: every payload has the same
length, so a connection's frames are counted from its byte count, and the
publish timestamp is read from one frame per received chunk.

Standard runs (the README's performance table)::

    python scripts/bench_fanout.py --connections 1000 --streams 10 --rate 4000 --duration 10
    python scripts/bench_fanout.py --connections 1000 --streams 10 --rate 500 --duration 10
    python scripts/bench_fanout.py --idle --connections 10000 --streams 100
    python scripts/bench_fanout.py --connections 1000 --streams 10 --rate 4000 --processes 2

``--json`` prints one JSON object instead of the table.
"""

import argparse
import asyncio
import base64
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import redis

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from marketstream.embedded import RedisServer, free_port  # noqa: E402

# Every payload has one length, so the client counts frames from bytes: the
# sequence number is offset to ten digits and the publish time in µs has
# sixteen (JSON forbids zero-padding).
TS_WIDTH = 16
SEQ_BASE = 10 ** 9
PAYLOAD = ('{"stream":"%s","data":{"e":"trade","s":"%s","t":%d,'
           '"p":"101.50","q":"0.300","T":1727866324088,"P":%d}}')


def stream_name(k):
    return "trade.BENCH%03d_USDT" % k


def payload(k, seq, now_us):
    name = stream_name(k)
    return PAYLOAD % (name, name.split(".", 1)[1], SEQ_BASE + seq, now_us)


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def masked_frame(text):
    data = text.encode()
    mask = os.urandom(4)
    head = struct.pack("!BB", 0x81, 0x80 | len(data)) if len(data) < 126 else \
        struct.pack("!BBH", 0x81, 0x80 | 126, len(data))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


class Counter(asyncio.Protocol):
    """Counts bytes; samples latency from the first frame starting in each chunk."""

    frame_size = 0
    ts_offset = 0
    samples = None
    sampling = False

    def __init__(self):
        self.bytes = 0
        self.transport = None
        self.streams = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        start = self.bytes
        self.bytes += len(data)
        if not Counter.sampling:
            return
        size = Counter.frame_size
        first = -start % size  # offset in this chunk where a frame begins
        if first + Counter.ts_offset + TS_WIDTH <= len(data):
            at = first + Counter.ts_offset
            try:
                sent = int(data[at:at + TS_WIDTH])
            except ValueError:
                return
            Counter.samples.append(time.time() * 1e6 - sent)


async def open_connection(host, port, path="/ws"):
    reader, writer = await asyncio.open_connection(host, port, limit=2 ** 16)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                  % (path, host, port, key)).encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError("handshake refused: %r" % head[:60])
    protocol = Counter()
    transport = writer.transport
    transport.set_protocol(protocol)
    protocol.transport = transport
    protocol.streams = (reader, writer)  # a collected StreamWriter closes its transport
    return protocol


def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def tree_rss(proc):
    procs = [proc] + proc.children(recursive=True)
    return sum(p.memory_info().rss for p in procs if p.is_running())


def tree_cpu(proc):
    total = 0.0
    for p in [proc] + proc.children(recursive=True):
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def publisher(url, rate, duration, streams, out):
    client = redis.Redis.from_url(url)
    start = time.monotonic()
    sent = 0
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= duration:
            break
        due = min(int(elapsed * rate), int(duration * rate))
        if due > sent:
            pipe = client.pipeline(transaction=False)
            now_us = int(time.time() * 1e6)
            for seq in range(sent, due):
                k = seq % streams
                pipe.publish(stream_name(k), payload(k, seq, now_us))
            pipe.execute()
            sent = due
        time.sleep(0.002)
    out["sent"] = sent
    out["elapsed"] = time.monotonic() - start
    client.close()


async def run(args):
    hard = raise_fd_limit()
    if 2 * args.connections + 200 > hard:
        log("warning: open-file limit %d is low for %d connections" % (hard, args.connections))
    pin = not args.no_pin and shutil.which("taskset") and os.cpu_count() > 1
    if pin:
        os.sched_setaffinity(0, {int(c) for c in args.load_cpu.split(",")})
    redis_server = None
    server = None
    try:
        if args.target:
            host, port = args.target.split("//")[-1].split("/")[0].rsplit(":", 1)
            port = int(port)
            redis_url = args.redis_url
            proc = None
        else:
            redis_server = RedisServer().start()  # inherits this process's (load) CPUs
            redis_url = redis_server.url
            host, port = "127.0.0.1", free_port()
            command = [sys.executable, "-m", "marketstream", "--listen", "%s:%d" % (host, port),
                       "--redis-url", redis_url, "--log-level", "WARNING",
                       "--processes", str(args.processes),
                       "--set", "server.max_connections=%d" % (args.connections + 100)]
            if pin:
                command = ["taskset", "-c", args.server_cpu] + command
            server = subprocess.Popen(command, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            proc = psutil.Process(server.pid)
            deadline = time.monotonic() + 20
            while True:
                try:
                    urllib.request.urlopen("http://%s:%d/health" % (host, port), timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("server did not start")
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
        figures = {"connections": args.connections, "streams": args.streams, "per_conn": args.per_conn,
                   "rate": args.rate, "duration": args.duration, "processes": args.processes,
                   "pinned": bool(pin)}
        rss_idle = tree_rss(proc) if proc else None

        # Connect (sequential client unless --connect-concurrency > 1).
        clients = []
        subscriptions = {}
        started = time.monotonic()
        sem = asyncio.Semaphore(args.connect_concurrency)

        async def one(i):
            async with sem:
                protocol = await open_connection(host, port)
                names = [stream_name((i + j) % args.streams) for j in range(args.per_conn)]
                protocol.transport.write(masked_frame(json.dumps(
                    {"method": "SUBSCRIBE", "params": names, "id": 1}, separators=(",", ":"))))
                for name in names:
                    subscriptions[name] = subscriptions.get(name, 0) + 1
                clients.append(protocol)

        await asyncio.gather(*(one(i) for i in range(args.connections)))
        connect_time = time.monotonic() - started
        figures["connect_seconds"] = round(connect_time, 3)
        figures["handshakes_per_second"] = round(args.connections / connect_time)
        log("connected %d in %.2fs (%.0f/s)" % (args.connections, connect_time, args.connections / connect_time))

        client = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 30
        while True:
            counts = dict(client.pubsub_numsub(*subscriptions)) if subscriptions else {}
            if all(counts.get(name.encode(), 0) >= 1 for name in subscriptions):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("streams not subscribed upstream")
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # let the server settle after the handshakes
        if proc:
            rss_conn = tree_rss(proc)
            figures["rss_idle_mb"] = round(rss_idle / 2 ** 20, 1)
            figures["rss_connected_mb"] = round(rss_conn / 2 ** 20, 1)
            figures["rss_per_connection_kb"] = round((rss_conn - rss_idle) / args.connections / 1024, 2)
        if args.idle:
            return figures

        sample = payload(0, 0, int(time.time() * 1e6)).encode()
        header = 2 if len(sample) < 126 else 4
        Counter.frame_size = header + len(sample)
        Counter.ts_offset = header + sample.index(b'"P":') + 4
        Counter.samples = []
        for c in clients:
            c.bytes = 0
        Counter.sampling = True
        cpu_before = tree_cpu(proc) if proc else None
        out = {}
        thread = threading.Thread(target=publisher,
                                  args=(redis_url, args.rate, args.duration, args.streams, out))
        thread.start()
        peak = 0
        t0 = time.monotonic()
        while thread.is_alive():
            await asyncio.sleep(1.0)
            received = sum(c.bytes for c in clients) // Counter.frame_size
            if proc:
                peak = max(peak, tree_rss(proc))
            lag = percentile(Counter.samples[-2000:], 0.99)
            log("t=%4.1fs received %9d deliveries  p99 now %s ms" % (
                time.monotonic() - t0, received, "%.1f" % (lag / 1000) if lag is not None else "-"))
        thread.join()
        cpu_after = tree_cpu(proc) if proc else None
        # Drain: until the byte count stops growing for a second.
        last = -1
        drain_deadline = time.monotonic() + 30
        while time.monotonic() < drain_deadline:
            total = sum(c.bytes for c in clients)
            if total == last:
                break
            last = total
            await asyncio.sleep(1.0)
        Counter.sampling = False
        received = sum(c.bytes for c in clients) // Counter.frame_size
        per_stream_subscribers = [subscriptions.get(stream_name(k), 0) for k in range(args.streams)]
        expected = sum(per_stream_subscribers[seq % args.streams] for seq in range(out["sent"]))
        samples = Counter.samples
        figures.update({
            "published": out["sent"],
            "offered_deliveries_per_second": round(expected / out["elapsed"]),
            "expected_deliveries": expected,
            "received_deliveries": received,
            "delivered_per_second": round(received / out["elapsed"]),
            "loss_percent": round(100.0 * (expected - received) / expected, 3) if expected else 0.0,
            "latency_ms_p50": round(percentile(samples, 0.50) / 1000, 2) if samples else None,
            "latency_ms_p99": round(percentile(samples, 0.99) / 1000, 2) if samples else None,
            "latency_ms_max": round(max(samples) / 1000, 2) if samples else None,
            "latency_samples": len(samples),
        })
        if proc:
            figures["rss_peak_mb"] = round(max(peak, tree_rss(proc)) / 2 ** 20, 1)
            cpu = cpu_after - cpu_before
            figures["server_cpu_seconds"] = round(cpu, 2)
            figures["server_cpu_percent_of_one_core"] = round(100 * cpu / out["elapsed"])
        figures["client_cpu_percent"] = round(100 * (time.process_time()) / max(1e-9, time.monotonic() - started))
        return figures
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
        if redis_server is not None:
            redis_server.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description="marketstream fan-out benchmark")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=10, help="K streams in all")
    parser.add_argument("--per-conn", type=int, default=1, help="S streams per connection")
    parser.add_argument("--rate", type=float, default=4000, help="messages/s published in all")
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--processes", type=int, default=1, help="server worker processes")
    parser.add_argument("--idle", action="store_true", help="connect and measure memory only")
    parser.add_argument("--connect-concurrency", type=int, default=1)
    parser.add_argument("--target", help="ws://host:port of a running server (with --redis-url)")
    parser.add_argument("--redis-url")
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--load-cpu", default="1")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.target and not args.redis_url:
        parser.error("--target needs --redis-url")
    try:
        figures = asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(figures))
    else:
        width = max(len(key) for key in figures)
        for key, value in figures.items():
            print("%-*s  %s" % (width, key, value))
    return 0


if __name__ == "__main__":
    sys.exit(main())
