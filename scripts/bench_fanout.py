#!/usr/bin/env python3
"""Fan-out benchmark: how many deliveries per second, how fast, how much memory.

Starts a private redis-server and a marketstream server (or targets running
ones), opens N WebSocket connections, subscribes each to S of K streams,
publishes R messages/s to Redis for D seconds and reports deliveries/s,
loss, latency p50/p99/max, server RSS and CPU, and connect time.  Where
``taskset`` exists the server is pinned to one core and the load (this
script, its clients, the publisher and redis-server) to the other(s).

The load costs far less than the server:

* connections are opened by a sequential, blocking client whose requests
  are built beforehand, so ``connect_seconds`` times the server's handshakes;
* every payload has the same length, so a connection's frames are counted
  from its byte count, and the publish timestamp is read from one frame per
  received chunk;
* the publisher is a process of its own that sends pipelines of packed
  commands.

``sustained_deliveries_per_second`` counts what arrived while publishing
went on; ``drain_seconds`` is how long the rest took after it stopped.  A
server that keeps up has sustained = offered and a drain of milliseconds.

Standard runs (the README's performance table)::

    python scripts/bench_fanout.py --connections 1000 --streams 10 --rate 4000 --duration 10
    python scripts/bench_fanout.py --connections 1000 --streams 10 --rate 500 --duration 10
    python scripts/bench_fanout.py --idle --connections 10000 --streams 100
    python scripts/bench_fanout.py --connections 1000 --streams 1000 --rate 40000 --no-pin --processes 1
    python scripts/bench_fanout.py --connections 1000 --streams 1000 --rate 40000 --no-pin --processes 2

``--json`` prints one JSON object instead of the table; ``--set
section.key=value`` passes a setting to the server it starts, e.g.
``--set server.fast_handshake=false`` to time Tornado's own handshake path.
"""

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
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


def handshake_request(host, port, path="/ws"):
    key = base64.b64encode(os.urandom(16)).decode()
    return ("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (path, host, port, key)).encode()


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
    """Publish ``rate`` messages/s for ``duration`` s; send (sent, elapsed) to ``out``.

    Runs in a process of its own and writes pipelines of packed commands,
    so the publisher is not what limits a heavy run.
    """
    client = redis.Redis.from_url(url)
    conn = client.connection_pool.get_connection()
    names = [stream_name(k) for k in range(streams)]
    total = int(duration * rate)
    start = time.monotonic()
    sent = 0
    while sent < total:
        due = min(int((time.monotonic() - start) * rate), total, sent + 5000)
        if due <= sent:
            time.sleep(0.001)
            continue
        now_us = int(time.time() * 1e6)
        commands = [("PUBLISH", names[seq % streams], payload(seq % streams, seq, now_us))
                    for seq in range(sent, due)]
        conn.send_packed_command(conn.pack_commands(commands))
        for _ in commands:
            conn.read_response()
        sent = due
    out.send((sent, time.monotonic() - start))
    out.close()
    client.connection_pool.release(conn)
    client.close()


def handshake(address, request):
    """One blocking WebSocket handshake: the cheapest sequential client."""
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    sock.connect(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(request)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("connection closed during the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError("handshake refused: %r" % head[:60])
    return sock


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
            for item in args.set:
                command += ["--set", item]
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
                   "pinned": bool(pin), "server_settings": args.set}
        rss_idle = tree_rss(proc) if proc else None

        # Connect: one blocking handshake after the other (requests and
        # SUBSCRIBE frames are built beforehand), then hand the sockets to
        # asyncio for counting.
        subscriptions = {}
        plans = []
        for i in range(args.connections):
            names = [stream_name((i + j) % args.streams) for j in range(args.per_conn)]
            for name in names:
                subscriptions[name] = subscriptions.get(name, 0) + 1
            plans.append((handshake_request(host, port), masked_frame(json.dumps(
                {"method": "SUBSCRIBE", "params": names, "id": 1}, separators=(",", ":")))))
        sockets = []
        address = (host, port)
        started = time.monotonic()
        for request, subscribe in plans:
            sock = handshake(address, request)
            sock.sendall(subscribe)
            sockets.append(sock)
        connect_time = time.monotonic() - started
        figures["connect_seconds"] = round(connect_time, 3)
        figures["handshakes_per_second"] = round(args.connections / connect_time)
        log("connected %d in %.2fs (%.0f/s)" % (args.connections, connect_time, args.connections / connect_time))
        loop = asyncio.get_running_loop()
        clients = []
        for sock in sockets:
            sock.setblocking(False)
            _, protocol = await loop.create_connection(Counter, sock=sock)
            clients.append(protocol)
        del sockets

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
        receiver, sender = multiprocessing.Pipe(duplex=False)
        publishing = multiprocessing.get_context("spawn").Process(
            target=publisher, args=(redis_url, args.rate, args.duration, args.streams, sender))
        publishing.start()
        sender.close()
        peak = 0
        t0 = next_report = time.monotonic()
        while not receiver.poll() and publishing.is_alive():
            await asyncio.sleep(0.02)
            if time.monotonic() < next_report + 1.0:
                continue
            next_report = time.monotonic()
            received = sum(c.bytes for c in clients) // Counter.frame_size
            if proc:
                peak = max(peak, tree_rss(proc))
            lag = percentile(Counter.samples[-2000:], 0.99)
            log("t=%4.1fs received %9d deliveries  p99 now %s ms" % (
                next_report - t0, received, "%.1f" % (lag / 1000) if lag is not None else "-"))
        published_at = time.monotonic()
        in_window = sum(c.bytes for c in clients) // Counter.frame_size
        if not receiver.poll():
            raise RuntimeError("the publisher failed")
        sent, elapsed = receiver.recv()
        publishing.join()
        cpu_after = tree_cpu(proc) if proc else None
        per_stream_subscribers = [subscriptions.get(stream_name(k), 0) for k in range(args.streams)]
        expected = sum(per_stream_subscribers[seq % args.streams] for seq in range(sent))
        expected_bytes = expected * Counter.frame_size
        # Drain: until everything arrived, or nothing more came for 2 s.
        last, last_change = -1, time.monotonic()
        while True:
            total = sum(c.bytes for c in clients)
            now = time.monotonic()
            if total >= expected_bytes:
                break
            if total != last:
                last, last_change = total, now
            elif now - last_change > 2.0 or now - published_at > 60:
                break  # stalled: the rest is lost
            await asyncio.sleep(0.05)
        drain_seconds = now - published_at
        Counter.sampling = False
        received = sum(c.bytes for c in clients) // Counter.frame_size
        samples = Counter.samples
        figures.update({
            "published": sent,
            "published_per_second": round(sent / elapsed),
            "offered_deliveries_per_second": round(expected / elapsed),
            "expected_deliveries": expected,
            "received_deliveries": received,
            "delivered_per_second": round(received / elapsed),
            # What the server kept up with: received while publishing went
            # on, and how long the rest took to arrive after it stopped.
            "sustained_deliveries_per_second": round(in_window / elapsed),
            "drain_seconds": round(drain_seconds, 2),
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
            figures["server_cpu_percent_of_one_core"] = round(100 * cpu / elapsed)
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
    parser.add_argument("--target", help="ws://host:port of a running server (with --redis-url)")
    parser.add_argument("--redis-url")
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--load-cpu", default="1")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a server setting (repeatable), e.g. server.fast_handshake=false")
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
