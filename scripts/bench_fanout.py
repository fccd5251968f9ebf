#!/usr/bin/env python3
"""Fan-out benchmark: how many deliveries per second, how fast, at what cost.

Starts a private redis-server and a server (marketstream, or the minimal
reference server ``scripts/reference_server.py``), or targets a running one;
opens N WebSocket connections, subscribes connection ``c`` to the S streams
``(c*S + j) % K`` of K streams, publishes R messages/s to Redis for D
seconds and reports deliveries/s offered and sustained, loss, latency
p50/p99/max, server CPU (also per million deliveries), RSS and connect time.
Where ``taskset`` exists the server is pinned to ``--server-cpu`` and the
load (this script, its receiver, the publisher and redis-server) to
``--load-cpu``.

The load costs far less than the server:

* the receiver is ``wsblast`` (``scripts/wsblast.c``, an epoll client built
  with the C compiler into a cache directory on first use), which counts a
  million frames a second on one core; without a C compiler, or with
  ``--receiver python``, an asyncio client counts frames from byte counts
  (every payload has one length) -- enough for light loads only;
* connections are opened one after the other with blocking handshakes, so
  ``connect_seconds`` times the server's handshakes;
* the publisher is a process of its own that sends pipelines of packed
  commands; every payload carries its publish time (``"E"``, ns) for the
  latency samples.

``sustained_deliveries_per_second`` counts what arrived while publishing
went on; ``drain_seconds`` is how long the rest took after it stopped.  A
server that keeps up has sustained = offered and a drain of milliseconds.
Publishing starts at the full rate at once, which is a transient of its own;
``latency_ms_p99_steady`` ("p99 steady") is the p99 of the samples after the
first ``--warmup`` seconds, beside the p99 of the whole run.

Standard runs::

    # the exchange shape: 5000 clients, 1000 streams, 10 per client (50 subscribers a stream)
    python scripts/bench_fanout.py --connections 5000 --streams 1000 --per-conn 10 --rate 15000
    # ... side by side with the reference server, medians of 3 runs each
    python scripts/bench_fanout.py --connections 5000 --streams 1000 --per-conn 10 --rate 30000 \\
        --compare --repeat 3
    # few streams, many subscribers each; memory of idle connections
    python scripts/bench_fanout.py --connections 1000 --streams 10 --rate 4000
    python scripts/bench_fanout.py --idle --connections 10000 --streams 100
    # two workers against one, the load sharing both cores
    python scripts/bench_fanout.py --connections 5000 --streams 1000 --per-conn 10 --rate 40000 \\
        --no-pin --processes 2
    # compressing clients (permessage-deflate; each message compressed once for all)
    python scripts/bench_fanout.py --connections 1000 --streams 10 --rate 4000 --compressing
    python scripts/bench_fanout.py --connections 1000 --streams 10 --rate 4000 --compressing \
        --set server.compression_min_bytes=0
    python scripts/bench_fanout.py --idle --connections 10000 --streams 100 --compressing
    # recoverable publishing (positions, history) against plain
    python scripts/bench_fanout.py --connections 5000 --streams 1000 --per-conn 10 --rate 15000 \\
        --compare --recoverable

``--json`` prints one JSON object (with ``--compare``: one per server and
the medians); ``--set section.key=value`` passes a setting to the
marketstream server it starts, e.g. ``--set server.fast_handshake=false``.

Order books (``--books``): a publisher process sends a realistic order flow
on ``depth.<--market>`` (the demo simulator's: levels added, changed and
removed near the top and deeper, ``U``/``u`` contiguous, prices and
quantities as strings) through ``marketstream.publisher.Publisher``, each
diff with the book after it as the stream's snapshot, at ``--rate`` diffs/s
(its first diff and snapshot before any client connects).  The
``--connections`` clients are split in three groups (client ``c`` in group
``c % 3``): the plain ``depth.<MARKET>``, its update speed
``depth.<MARKET>@<--speed>`` and its top N ``depth<--top>.<MARKET>``;
``--books --baseline`` puts every client on the plain stream instead.  The
clients are asyncio connections in ``--receiver-processes`` processes
subscribing with acknowledgements on: a refused subscription ends the run
at once with the server's reason (a server without its own order books
refuses the derived streams).  Each client counts the frames (by their
``"stream"`` field), bytes (WebSocket headers included) and gap notices it
receives; the report gives, per group, frames and bytes per client (and
per client per second), bytes per frame, gap notices and connections the
server closed, and the server's CPU per million deliveries of all groups
together (per group it can be told only apart: the baseline is the plain
group's).  ``--books --compare`` runs both, alternating ``--repeat``
times, and says the CPU per million deliveries against the baseline's
plain diff delivery, with the derived groups' part estimated as what the
variant run spent beyond its plain deliveries at the baseline's cost.
Against a server without server books the baseline is today's plain diff
delivery.

Standard order-book runs (1000 clients per group, 2000 diffs/s)::

    # 1000 on depth.X, 1000 on depth.X@100ms, 1000 on depth10.X; then 3000 on depth.X
    python scripts/bench_fanout.py --books --connections 3000 --rate 2000 --compare
    python scripts/bench_fanout.py --books --connections 3000 --rate 2000            # variants only
    python scripts/bench_fanout.py --books --baseline --connections 3000 --rate 2000 # baseline only
"""

import argparse
import asyncio
import collections
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import psutil
import redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from marketstream.testing import (  # noqa: E402
    RedisServer,
    die_with_parent,
    free_port,
    handshake,
    handshake_request,
    health,
    masked_frame,
    percentile,
    raise_fd_limit,
    read_frames,
    server_command,
    stop_process,
    tree_cpu,
    tree_rss,
)

HERE = os.path.dirname(os.path.abspath(__file__))
WSBLAST_SOURCE = os.path.join(HERE, "wsblast.c")
#: What --compressing clients offer (what browsers send).
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
REFERENCE_SERVER = os.path.join(HERE, "reference_server.py")

# Stream names and subscriptions as wsblast makes them.  Every payload of a
# run has one length (the "x" field pads short names), so the Python
# receiver counts frames from bytes; "E" is the publish time in ns.
SEQ_BASE = 10**9
TS_WIDTH = 19
PAYLOAD = (
    '{"stream":"%s","data":{"e":"trade","E":%d,"s":"%s","t":%d,'
    '"p":"101.50","q":"0.300","T":1727866324088,"x":"%s"}}'
)
RECOVERABLE_DATA = (
    '{"e":"trade","E":%d,"s":"%s","t":%d,"p":"101.50","q":"0.300","T":1727866324088,"x":"%s"}'
)
POSITION_DIGITS = 16  # positions start at Redis TIME in µs


def stream_name(k: int) -> str:
    return "trade.SYM%d_USDC" % k


def stream_names(streams: int) -> list[str]:
    return [stream_name(k) for k in range(streams)]


def padding(k: int, streams: int) -> str:
    return "_" * (2 * (len(stream_name(streams - 1)) - len(stream_name(k))))


def payload(k: int, seq: int, now_ns: int, streams: int) -> str:
    name = stream_name(k)
    return PAYLOAD % (name, now_ns, name.split(".", 1)[1], SEQ_BASE + seq, padding(k, streams))


def recoverable_data(k: int, seq: int, now_ns: int, streams: int) -> str:
    name = stream_name(k)
    return RECOVERABLE_DATA % (now_ns, name.split(".", 1)[1], SEQ_BASE + seq, padding(k, streams))


def connection_streams(c: int, per_conn: int, streams: int) -> list[int]:
    return [(c * per_conn + j) % streams for j in range(per_conn)]


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


# --- publisher ---------------------------------------------------------------


def paced(rate: float, duration: float, most: int = 5000) -> Iterator[tuple[int, int]]:
    """Messages ``sent`` to ``due`` (at most ``most`` at a time), as soon
    as they are due at ``rate`` messages/s for ``duration`` s from now."""
    total = int(duration * rate)
    start = time.monotonic()
    sent = 0
    while sent < total:
        due = min(int((time.monotonic() - start) * rate), total, sent + most)
        if due <= sent:
            time.sleep(0.001)
            continue
        yield sent, due
        sent = due


def publisher(
    url: str, rate: float, duration: float, streams: int, recoverable: bool, out: Any
) -> None:
    """Publish ``rate`` messages/s for ``duration`` s; send (sent, elapsed) to ``out``.

    Runs in a process of its own and writes pipelines of packed commands
    (or, ``recoverable``, pipelines of marketstream's Publisher), so the
    publisher is not what limits a heavy run.
    """
    client = redis.Redis.from_url(url)
    conn = client.connection_pool.get_connection()
    names = stream_names(streams)
    pub = None
    if recoverable:
        from marketstream.publisher import Publisher

        pub = Publisher(client, history=1000, ttl=600)
    start = time.monotonic()
    sent = 0
    for sent, due in paced(rate, duration):
        now_ns = time.time_ns()
        if pub is not None:
            pub.publish_many(
                [
                    (names[seq % streams], recoverable_data(seq % streams, seq, now_ns, streams))
                    for seq in range(sent, due)
                ]
            )
        else:
            commands = [
                ("PUBLISH", names[seq % streams], payload(seq % streams, seq, now_ns, streams))
                for seq in range(sent, due)
            ]
            conn.send_packed_command(conn.pack_commands(commands))
            for _ in commands:
                conn.read_response()
        sent = due
    out.send((sent, time.monotonic() - start))
    out.close()
    client.connection_pool.release(conn)
    client.close()


# --- receivers ---------------------------------------------------------------


def wsblast_binary() -> str | None:
    """The path of a wsblast built from scripts/wsblast.c (built once per
    source version into the user's cache directory), or None without a C
    compiler."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler or not os.path.exists(WSBLAST_SOURCE):
        return None
    with open(WSBLAST_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    cache = os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "marketstream-bench"
    )
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError:
        cache = tempfile.gettempdir()
    binary = os.path.join(cache, "wsblast-" + digest)
    if not os.path.exists(binary):
        partial = "%s.%d" % (binary, os.getpid())
        result = subprocess.run(
            [compiler, "-O2", "-o", partial, WSBLAST_SOURCE], capture_output=True, text=True
        )
        if result.returncode != 0:
            log("cannot build wsblast:\n" + result.stderr)
            return None
        os.replace(partial, binary)
    return binary


class Counter(asyncio.Protocol):
    """Counts bytes; samples latency from the first frame starting in each chunk."""

    frame_size = 0
    samples = None
    sampling = False

    def __init__(self) -> None:
        self.bytes = 0
        self.transport = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        start = self.bytes
        self.bytes += len(data)
        if not Counter.sampling:
            return
        first = -start % Counter.frame_size  # offset in this chunk where a frame begins
        at = data.find(b'"E":', first, first + Counter.frame_size)
        if at >= 0 and at + 4 + TS_WIDTH <= len(data):
            try:
                sent = int(data[at + 4 : at + 4 + TS_WIDTH])
            except ValueError:
                return
            Counter.samples.append((time.time_ns() - sent) / 1e6)


class PythonReceiver:
    """asyncio connections counting bytes (frames of one known size)."""

    name = "python"

    def __init__(self, frame_size: int) -> None:
        Counter.frame_size = frame_size
        Counter.samples = []
        self.clients = []

    async def connect(self, host: str, port: int, args: argparse.Namespace) -> None:
        plans = []
        for c in range(args.connections):
            names = [stream_name(k) for k in connection_streams(c, args.per_conn, args.streams)]
            plans.append(
                (
                    handshake_request(
                        port,
                        host=host,
                        headers={"Sec-WebSocket-Extensions": DEFLATE_OFFER}
                        if args.compressing
                        else None,
                    ),
                    masked_frame(
                        json.dumps(
                            {"method": "SUBSCRIBE", "params": names, "id": c + 1},
                            separators=(",", ":"),
                        )
                    ),
                )
            )
        sockets = []
        for request, subscribe in plans:
            sock = handshake((host, port), request)
            sock.sendall(subscribe)
            sockets.append(sock)
        loop = asyncio.get_running_loop()
        for sock in sockets:
            sock.setblocking(False)
            _, protocol = await loop.create_connection(Counter, sock=sock)
            self.clients.append(protocol)

    async def mark(self) -> None:
        for c in self.clients:
            c.bytes = 0
        Counter.samples = []
        Counter.sampling = True
        self.steady = 0

    async def steady_from_now(self) -> None:
        self.steady = len(Counter.samples)

    async def count(self) -> int:
        return sum(c.bytes for c in self.clients) // Counter.frame_size

    async def recent_p99(self) -> float | None:
        return percentile(Counter.samples[-2000:], 0.99)

    async def finish(self) -> dict[str, Any]:
        Counter.sampling = False
        received = await self.count()
        samples = Counter.samples
        for c in self.clients:
            c.transport.close()
        return {
            "received": received,
            "samples": len(samples),
            "p50": percentile(samples, 0.50),
            "p99": percentile(samples, 0.99),
            "max": max(samples) if samples else None,
            "p99_steady": percentile(samples[getattr(self, "steady", 0) :], 0.99),
        }


class BlastReceiver:
    """wsblast in a child process, driven through its standard input."""

    name = "wsblast"

    def __init__(self, binary: str, sampled: int) -> None:
        self.binary = binary
        self.sampled = sampled
        self.proc = None
        self.last_count = 0

    async def _line(self, timeout: float) -> str:
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError("wsblast exited (code %s)" % self.proc.returncode)
        return line.decode().strip()

    async def connect(self, host: str, port: int, args: argparse.Namespace) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.binary,
            host,
            str(port),
            "/ws",
            str(args.connections),
            str(args.streams),
            str(args.per_conn),
            str(min(self.sampled, args.connections)),
            "msg",
            *(["deflate"] if args.compressing else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        ready = await self._line(max(60, args.connections / 100))
        _, ok, failed = ready.split()
        if int(failed):
            raise RuntimeError("wsblast: %s of %d connections failed" % (failed, args.connections))

    async def _send(self, command: bytes) -> None:
        self.proc.stdin.write(command + b"\n")
        await self.proc.stdin.drain()

    async def mark(self) -> None:
        await self._send(b"M")

    async def steady_from_now(self) -> None:
        await self._send(b"S")

    async def count(self) -> int:
        await self._send(b"C")
        while True:
            line = await self._line(10)
            if line.startswith("COUNT "):
                self.last_count = int(line.split()[1])
                return self.last_count

    async def recent_p99(self) -> float | None:
        return None

    async def finish(self) -> dict[str, Any]:
        self.proc.stdin.close()
        while True:
            line = await self._line(30)
            if line.startswith("{"):
                break
        await self.proc.wait()
        result = json.loads(line)
        if result["closed_by_server"]:
            log("wsblast: %d connections closed by the server" % result["closed_by_server"])
        has = result["lat_samples"] > 0
        return {
            "received": result["received"],
            "samples": result["lat_samples"],
            "p50": result["lat_ms_p50"] if has else None,
            "p99": result["lat_ms_p99"] if has else None,
            "max": result["lat_ms_max"] if has else None,
            "p99_steady": (
                result["lat_ms_p99_steady"] if result.get("lat_samples_steady") else None
            ),
            "closed_by_server": result["closed_by_server"],
            "compressed": result.get("compressed", 0),
        }

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


# --- one run -----------------------------------------------------------------


def worker_connections(host: str, port: int, processes: int, tries: int = 200) -> list[int | None]:
    """Connections per worker (from /health, which any worker may answer)."""
    seen = {}
    for _ in range(tries):
        try:
            body = health(port, host)
        except OSError:
            continue
        seen[body["pid"]] = body.get("connections")
        if len(seen) >= processes:
            break
    return sorted(seen.values(), key=lambda n: -1 if n is None else n)


def start_server(
    kind: str, args: argparse.Namespace, host: str, port: int, redis_url: str, pin: bool
) -> subprocess.Popen[bytes]:
    if kind == "reference":
        command = [
            sys.executable,
            REFERENCE_SERVER,
            "--listen",
            "%s:%d" % (host, port),
            "--redis-url",
            redis_url,
            "--loop",
            args.reference_loop,
            "--max-buffer",
            str(args.reference_max_buffer),
        ]
        if pin:
            command = ["taskset", "-c", args.server_cpu] + command
    else:
        # The receivers answer no pings: keepalive would close them.
        command = server_command(
            port,
            redis_url,
            ["server.ping_interval=0"] + args.set,
            host=host,
            processes=args.processes,
            clients=args.connections,
            cpus=args.server_cpu if pin else None,
        )
    return subprocess.Popen(command, cwd=ROOT, preexec_fn=die_with_parent)


def prepare_load(args: argparse.Namespace) -> bool:
    """Raise the open-file limit and pin this process (the load) to
    ``--load-cpu``; whether CPUs are pinned."""
    hard = raise_fd_limit()
    if 2 * args.connections + 200 > hard:
        log("warning: open-file limit %d is low for %d connections" % (hard, args.connections))
    can_pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1
    if can_pin:
        os.sched_setaffinity(0, {int(c) for c in args.load_cpu.split(",")})
    return can_pin


class Target:
    """What a run's clients connect to: a server it starts (on a private
    redis-server unless ``--redis-url``), or a running one (``--target``)."""

    def __init__(self) -> None:
        self.redis_server: RedisServer | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.proc: psutil.Process | None = None  # the server's, to measure
        self.host, self.port, self.redis_url = "127.0.0.1", 0, ""

    async def start(self, args: argparse.Namespace, kind: str, pin: bool) -> str:
        """Start (or find) the server; ``kind``, or "target" for a running one."""
        if args.target:
            host, port = args.target.split("//")[-1].split("/")[0].rsplit(":", 1)
            self.host, self.port, self.redis_url = host, int(port), args.redis_url
            return "target"
        if args.redis_url:
            self.redis_url = args.redis_url
        else:
            self.redis_server = RedisServer().start()  # inherits this process's (load) CPUs
            self.redis_url = self.redis_server.url
        self.port = free_port()
        self.server = start_server(kind, args, self.host, self.port, self.redis_url, pin)
        self.proc = psutil.Process(self.server.pid)
        deadline = time.monotonic() + 20
        while True:
            try:
                health(self.port, self.host)
                break
            except OSError:
                if time.monotonic() > deadline or self.server.poll() is not None:
                    raise RuntimeError("%s server did not start" % kind) from None
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        return kind

    def stop(self) -> None:
        stop_process(self.server)
        if self.redis_server is not None:
            self.redis_server.stop()


async def run(
    args: argparse.Namespace, kind: str = "marketstream", recoverable: bool = False
) -> dict[str, Any]:
    """One benchmark run against ``kind`` (marketstream or reference); its figures."""
    can_pin = prepare_load(args)
    pin_server = can_pin and not args.target
    target = Target()
    receiver = None
    try:
        kind = await target.start(args, kind, pin_server)
        host, port, redis_url, proc = target.host, target.port, target.redis_url, target.proc
        figures = {
            "server": kind,
            "recoverable": recoverable,
            "connections": args.connections,
            "streams": args.streams,
            "per_conn": args.per_conn,
            "rate": args.rate,
            "duration": args.duration,
            "processes": args.processes if kind == "marketstream" else None,
            "server_cpus": args.server_cpu if pin_server else None,
            "load_cpus": args.load_cpu if can_pin else None,
            "server_settings": args.set if kind == "marketstream" else None,
        }
        rss_idle = tree_rss(proc) if proc else None

        subscribers = [0] * args.streams
        for c in range(args.connections):
            for k in connection_streams(c, args.per_conn, args.streams):
                subscribers[k] += 1
        wanted = [stream_name(k) for k in range(args.streams) if subscribers[k]]

        binary = wsblast_binary() if args.receiver in ("auto", "wsblast") else None
        if args.receiver == "wsblast" and binary is None:
            raise RuntimeError("--receiver wsblast needs a C compiler (cc)")
        if args.compressing and not binary and not args.idle:
            # It counts frames from byte counts, and compressed frames vary.
            raise RuntimeError("--compressing needs wsblast (a C compiler) unless --idle")
        figures["compressing"] = args.compressing
        if binary:
            receiver = BlastReceiver(binary, args.sampled)
        else:
            frame = payload(0, 0, time.time_ns(), args.streams).encode()
            size = len(frame)
            if recoverable:
                size += len(',"seq":') + POSITION_DIGITS
            receiver = PythonReceiver((2 if size < 126 else 4) + size)
        figures["receiver"] = receiver.name
        started = time.monotonic()
        await receiver.connect(host, port, args)
        connect_time = time.monotonic() - started
        figures["connect_seconds"] = round(connect_time, 3)
        figures["handshakes_per_second"] = round(args.connections / connect_time)
        log(
            "%s: connected %d in %.2fs (%.0f/s)"
            % (kind, args.connections, connect_time, args.connections / connect_time)
        )

        client = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 60
        while True:
            counts = {}
            for i in range(0, len(wanted), 500):
                counts.update(client.pubsub_numsub(*wanted[i : i + 500]))
            if all(counts.get(name.encode(), 0) >= 1 for name in wanted):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("streams not subscribed upstream")
            await asyncio.sleep(0.05)
        client.close()
        await asyncio.sleep(1.0)  # let the server settle after the handshakes
        if proc:
            rss_conn = tree_rss(proc)
            figures["rss_idle_mb"] = round(rss_idle / 2**20, 1)
            figures["rss_connected_mb"] = round(rss_conn / 2**20, 1)
            figures["rss_per_connection_kb"] = round(
                (rss_conn - rss_idle) / args.connections / 1024, 2
            )
        if kind == "marketstream" and args.processes > 1:
            figures["worker_connections"] = worker_connections(host, port, args.processes)
        if args.idle:
            return figures

        await receiver.mark()
        cpu_before = tree_cpu(proc) if proc else None
        pipe_out, pipe_in = multiprocessing.Pipe(duplex=False)
        publishing = multiprocessing.get_context("spawn").Process(
            target=publisher,
            args=(redis_url, args.rate, args.duration, args.streams, recoverable, pipe_in),
        )
        publishing.start()
        pipe_in.close()
        peak = 0
        t0 = next_report = time.monotonic()
        warming = args.warmup > 0
        while not pipe_out.poll() and publishing.is_alive():
            await asyncio.sleep(0.02)
            if warming and time.monotonic() - t0 >= args.warmup:
                warming = False
                await receiver.steady_from_now()
            if time.monotonic() < next_report + 1.0:
                continue
            next_report = time.monotonic()
            received = await receiver.count()
            if proc:
                peak = max(peak, tree_rss(proc))
            lag = await receiver.recent_p99()
            log(
                "t=%4.1fs received %9d deliveries%s"
                % (next_report - t0, received, "" if lag is None else "  p99 now %.1f ms" % lag)
            )
        published_at = time.monotonic()
        in_window = await receiver.count()
        if not pipe_out.poll():
            raise RuntimeError("the publisher failed")
        sent, elapsed = pipe_out.recv()
        publishing.join()
        expected = sum(subscribers[seq % args.streams] for seq in range(sent))
        # Drain: until everything arrived, or nothing more came for 2 s.
        last, last_change = -1, time.monotonic()
        while True:
            total = await receiver.count()
            now = time.monotonic()
            if total >= expected:
                break
            if total != last:
                last, last_change = total, now
            elif now - last_change > 2.0 or now - published_at > 60:
                break  # stalled: the rest is lost
            await asyncio.sleep(0.05)
        drain_seconds = time.monotonic() - published_at
        cpu_after = tree_cpu(proc) if proc else None
        result = await receiver.finish()
        received = result["received"]

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value, 2)

        figures.update(
            {
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
                "loss_percent": round(100.0 * (expected - received) / expected, 3)
                if expected
                else 0.0,
                "latency_ms_p50": ms(result["p50"]),
                "latency_ms_p99": ms(result["p99"]),
                "latency_ms_max": ms(result["max"]),
                "latency_samples": result["samples"],
                # After the first --warmup seconds: the load switched on at once
                # is a transient of its own (the table shows both).
                "latency_ms_p99_steady": None if warming else ms(result.get("p99_steady")),
            }
        )
        if result.get("closed_by_server"):
            figures["closed_by_server"] = result["closed_by_server"]
        if args.compressing:
            figures["compressed_deliveries"] = result.get("compressed", 0)
        if proc:
            figures["rss_peak_mb"] = round(max(peak, tree_rss(proc)) / 2**20, 1)
            cpu = cpu_after - cpu_before
            figures["server_cpu_seconds"] = round(cpu, 2)
            figures["server_cpu_percent_of_one_core"] = round(100 * cpu / (elapsed + drain_seconds))
            figures["server_cpu_seconds_per_million"] = (
                round(cpu / received * 1e6, 3) if received else None
            )
        return figures
    finally:
        if receiver is not None and isinstance(receiver, BlastReceiver):
            receiver.kill()
        target.stop()


# --- order books (--books) ---------------------------------------------------

#: Every frame has one "stream" field: the receivers count frames by it
#: (bytes.count runs at memory speed), and gap notices by their type.
FRAME_TOKEN = b'"stream"'
GAP_TOKEN = b'"e":"gap"'


def book_streams(args: argparse.Namespace, baseline: bool) -> list[str]:
    """The stream of each group of clients: the plain book stream, its
    update speed and its top N; the baseline has one group, the plain."""
    plain = "depth." + args.market
    if baseline:
        return [plain]
    return [plain, "%s@%s" % (plain, args.speed), "depth%d.%s" % (args.top, args.market)]


def seed_book(url: str, stream: str, market: str) -> Any:
    """A market simulator whose first diff is published with its book as
    the stream's snapshot (a server keeps a book from the snapshot on):
    the simulator to go on publishing from."""
    from marketstream.demo.simulator import MarketSimulator
    from marketstream.publisher import Publisher

    sim = MarketSimulator(market, seed=1)
    with Publisher(url, history=1000, ttl=600) as pub:
        pub.publish(stream, sim.depth(time.time_ns() // 1000), snapshot=sim.snapshot())
    return sim


def book_publisher(url: str, stream: str, sim: Any, rate: float, duration: float, out: Any) -> None:
    """Publish ``rate`` diffs/s of ``sim``'s order flow on ``stream`` for
    ``duration`` s, each with the book after it as the stream's snapshot
    (``Publisher``: positions, history); send (sent, elapsed) to ``out``."""
    from marketstream.publisher import Publisher

    pub = Publisher(url, history=1000, ttl=600)
    start = time.monotonic()
    sent = 0
    for sent, due in paced(rate, duration, most=500):
        now_us = time.time_ns() // 1000
        batch = []
        for _ in range(due - sent):
            diff = sim.depth(now_us)
            batch.append((stream, diff, sim.snapshot()))
        pub.publish_many(batch)
        sent = due
    out.send((sent, time.monotonic() - start))
    out.close()
    pub.close()


class Refused(RuntimeError):
    """The server refused a subscription of the run."""


def token_count(token: bytes, tail: bytes, data: bytes) -> int:
    """Occurrences of ``token`` in ``data``, and the one cut by the read
    that ended with ``tail`` (its last bytes)."""
    cut = len(token) - 1
    return data.count(token) + (tail[-cut:] + data[:cut]).count(token)


class BookCounter(asyncio.Protocol):
    """One client: frames, bytes and gap notices received, and whether
    the server closed it."""

    def __init__(self) -> None:
        self.frames = self.bytes = self.gaps = 0
        self.tail = b""
        self.closed = False
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        self.frames += token_count(FRAME_TOKEN, self.tail, data)
        self.gaps += token_count(GAP_TOKEN, self.tail, data)
        self.tail = data[-16:] if len(data) >= 16 else (self.tail + data)[-16:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def reset(self) -> None:
        self.frames = self.bytes = self.gaps = 0


def subscribed(sock: Any, stream: str, timeout: float = 10.0) -> None:
    """Read the reply to the SUBSCRIBE just sent on blocking ``sock``;
    :class:`Refused` (saying why) if it is an error."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            frames, _ = read_frames(data)
            for _, payload in frames:
                if payload.startswith(b'{"error"'):
                    reason = json.loads(payload)["error"].get("msg", payload.decode())
                    raise Refused("the server refused %s: %s" % (stream, reason))
                if payload.startswith(b'{"result"'):
                    return
            chunk = sock.recv(65536)
            if not chunk:
                raise Refused("the server closed the connection subscribing %s" % stream)
            data += chunk
    except TimeoutError:
        raise Refused("no reply to SUBSCRIBE %s in %.0f s" % (stream, timeout)) from None
    finally:
        sock.settimeout(None)


def book_receiver_process(
    host: str, port: int, plans: list[tuple[int, str, bytes]], control: Any
) -> None:
    """One receiver process: connect ``plans`` (group, stream, handshake
    request) and subscribe each, then obey ``control``: ``mark``,
    ``count``, ``finish``."""
    raise_fd_limit()
    sockets = []
    try:
        for number, (group, stream, request) in enumerate(plans):
            sock = handshake((host, port), request)
            sockets.append((group, sock))
            message = {"method": "SUBSCRIBE", "params": [stream], "id": number + 1, "acks": True}
            sock.sendall(masked_frame(json.dumps(message, separators=(",", ":"))))
            subscribed(sock, stream)
    except Exception as exc:  # report, do not hang the parent
        why = "%s (a receiver's connection %d)" % (exc, len(sockets))
        control.send(("error", type(exc).__name__, why))
        return
    asyncio.run(_receive_books(sockets, control))


async def _receive_books(sockets: list[tuple[int, Any]], control: Any) -> None:
    loop = asyncio.get_running_loop()
    clients: list[tuple[int, BookCounter]] = []
    for group, sock in sockets:
        sock.setblocking(False)
        _, protocol = await loop.create_connection(BookCounter, sock=sock)
        clients.append((group, protocol))
    done = loop.create_future()

    def on_command() -> None:
        command = control.recv()
        if command == "mark":
            for _, client in clients:
                client.reset()
            control.send("ok")
        elif command == "count":
            counts: dict[int, int] = collections.Counter()
            for group, client in clients:
                counts[group] += client.frames
            control.send(dict(counts))
        elif command == "finish":
            control.send([(g, c.frames, c.bytes, c.gaps, c.closed) for g, c in clients])
            if not done.done():
                done.set_result(None)

    loop.add_reader(control.fileno(), on_command)
    control.send("ready")
    await done
    for _, client in clients:
        client.transport.close()


class BookReceiver:
    """``--receiver-processes`` processes of asyncio clients, each client
    in a group (one stream), counting frames and bytes per client."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.children: list[tuple[Any, Any]] = []

    async def connect(self, host: str, port: int, streams: list[str], connections: int) -> None:
        """Client ``c`` subscribes ``streams[c % len(streams)]``."""
        plans: list[list[tuple[int, str, bytes]]] = [[] for _ in range(self.processes)]
        for c in range(connections):
            group = c % len(streams)
            request = handshake_request(port, host=host)
            plans[c % self.processes].append((group, streams[group], request))
        ctx = multiprocessing.get_context("fork")
        for part in plans:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=book_receiver_process, args=(host, port, part, child), daemon=True
            )
            proc.start()
            child.close()
            self.children.append((proc, parent))
        await self._all(None, max(60, connections / 50))

    async def _all(self, command: str | None, timeout: float = 30) -> list[Any]:
        """Send ``command`` to every process; their replies (an error
        reply from any of them, as soon as it comes, raises)."""
        if command is not None:
            for _, pipe in self.children:
                pipe.send(command)
        replies: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < len(self.children):
            for i, (proc, pipe) in enumerate(self.children):
                if i in replies:
                    continue
                if pipe.poll():
                    reply = pipe.recv()
                    if isinstance(reply, tuple) and reply[:1] == ("error",):
                        raise (Refused if reply[1] == "Refused" else RuntimeError)(reply[2])
                    replies[i] = reply
                elif not proc.is_alive() and not pipe.poll():
                    raise RuntimeError("a receiver process exited")
            if time.monotonic() > deadline:
                raise RuntimeError("a receiver process did not answer")
            await asyncio.sleep(0.005)
        return [replies[i] for i in range(len(self.children))]

    async def mark(self) -> None:
        await self._all("mark")

    async def counts(self) -> collections.Counter:
        """Frames received since the mark, per group."""
        total: collections.Counter = collections.Counter()
        for counts in await self._all("count"):
            total.update(counts)
        return total

    async def finish(self) -> list[tuple[int, int, int, int, bool]]:
        """(group, frames, bytes, gap notices, closed by the server) per client."""
        clients = [client for part in await self._all("finish") for client in part]
        for proc, _ in self.children:
            proc.join(10)
        return clients

    def kill(self) -> None:
        for proc, _ in self.children:
            if proc.is_alive():
                proc.kill()


def group_figures(
    stream: str, clients: list[tuple[int, int, int, int, bool]], elapsed: float
) -> dict[str, Any]:
    """One group's figures from its clients' (group, frames, bytes, gaps, closed)."""
    frames = [c[1] for c in clients]
    sizes = [c[2] for c in clients]
    n = len(clients) or 1
    return {
        "stream": stream,
        "clients": len(clients),
        "frames": sum(frames),
        "bytes": sum(sizes),
        "frames_per_client": round(sum(frames) / n, 1),
        "frames_per_client_min": min(frames, default=0),
        "frames_per_client_max": max(frames, default=0),
        "frames_per_client_per_second": round(sum(frames) / n / elapsed, 1),
        "bytes_per_client": round(sum(sizes) / n),
        "bytes_per_client_per_second": round(sum(sizes) / n / elapsed),
        "bytes_per_frame": round(sum(sizes) / sum(frames), 1) if sum(frames) else None,
        "gap_notices": sum(c[3] for c in clients),
        "closed_by_server": sum(1 for c in clients if c[4]),
    }


async def run_books(args: argparse.Namespace, baseline: bool) -> dict[str, Any]:
    """One order-book run (the variant groups, or the ``baseline``: every
    client on the plain book stream); its figures."""
    can_pin = prepare_load(args)
    target = Target()
    receiver = BookReceiver(args.receiver_processes)
    try:
        kind = await target.start(args, "marketstream", can_pin and not args.target)
        host, port, proc = target.host, target.port, target.proc
        streams = book_streams(args, baseline)
        plain = streams[0]
        figures: dict[str, Any] = {
            "server": kind,
            "run": "baseline" if baseline else "variants",
            "connections": args.connections,
            "rate": args.rate,
            "duration": args.duration,
            "processes": args.processes,
            "server_cpus": args.server_cpu if can_pin and not args.target else None,
            "load_cpus": args.load_cpu if can_pin else None,
            "server_settings": args.set,
        }
        sim = seed_book(target.redis_url, plain, args.market)
        started = time.monotonic()
        await receiver.connect(host, port, streams, args.connections)
        figures["connect_seconds"] = round(time.monotonic() - started, 3)
        log("%s: %d clients on %s" % (kind, args.connections, ", ".join(streams)))
        await asyncio.sleep(1.0)  # let the server settle after the handshakes

        await receiver.mark()
        cpu_before = tree_cpu(proc) if proc else None
        pipe_out, pipe_in = multiprocessing.Pipe(duplex=False)
        publishing = multiprocessing.get_context("spawn").Process(
            target=book_publisher,
            args=(target.redis_url, plain, sim, args.rate, args.duration, pipe_in),
        )
        publishing.start()
        pipe_in.close()
        t0 = time.monotonic()
        while not pipe_out.poll() and publishing.is_alive():
            await asyncio.sleep(1.0)
            counts = await receiver.counts()
            log(
                "t=%4.1fs frames: %s"
                % (
                    time.monotonic() - t0,
                    ", ".join("%s %d" % (s, counts[g]) for g, s in enumerate(streams)),
                )
            )
        published_at = time.monotonic()
        if not pipe_out.poll():
            raise RuntimeError("the publisher failed")
        sent, elapsed = pipe_out.recv()
        publishing.join()
        # Drain: until nothing came for 2 s (a variant sends its last frame
        # within an interval after the last diff).
        last, last_change = None, time.monotonic()
        while True:
            counts = await receiver.counts()
            now = time.monotonic()
            if counts != last:
                last, last_change = counts, now
            elif now - last_change > 2.0 or now - published_at > 60:
                break
            await asyncio.sleep(0.05)
        figures["drain_seconds"] = round(time.monotonic() - published_at, 2)
        cpu = tree_cpu(proc) - cpu_before if proc else None
        clients = await receiver.finish()
        figures["published"] = sent
        figures["published_per_second"] = round(sent / elapsed)
        figures["groups"] = [
            group_figures(stream, [c for c in clients if c[0] == g], elapsed)
            for g, stream in enumerate(streams)
        ]
        deliveries = sum(group["frames"] for group in figures["groups"])
        figures["deliveries"] = deliveries
        # Every diff to every plain client (each frame counted is one diff).
        expected = sent * figures["groups"][0]["clients"]
        figures["plain_loss_percent"] = (
            round(100.0 * (expected - figures["groups"][0]["frames"]) / expected, 3)
            if expected
            else 0.0
        )
        if cpu is not None:
            figures["server_cpu_seconds"] = round(cpu, 2)
            figures["server_cpu_seconds_per_million"] = (
                round(cpu / deliveries * 1e6, 3) if deliveries else None
            )
        return figures
    finally:
        receiver.kill()
        target.stop()


def books_compare(args: argparse.Namespace) -> dict[str, Any]:
    """The variant run and the baseline, ``--repeat`` times each
    (alternating); both runs' figures and the comparison of the medians."""
    runs: dict[str, list[dict[str, Any]]] = {"variants": [], "baseline": []}
    for repeat in range(args.repeat):
        order = ["variants", "baseline"] if repeat % 2 == 0 else ["baseline", "variants"]
        for name in order:
            log("--- run %d/%d: %s" % (repeat + 1, args.repeat, name))
            runs[name].append(asyncio.run(run_books(args, name == "baseline")))
    return {"runs": runs, "comparison": books_comparison(runs["variants"], runs["baseline"])}


def books_comparison(
    variants: list[dict[str, Any]], baseline: list[dict[str, Any]]
) -> dict[str, Any]:
    """CPU per million deliveries of the variant runs against the plain
    diff delivery of the baseline runs (medians), and the part the derived
    groups cost on top of their plain group, estimated at the baseline's
    cost per plain delivery."""

    def median(runs: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        return statistics.median(values) if values else None

    out: dict[str, Any] = {
        "variants_cpu_seconds_per_million": median(variants, "server_cpu_seconds_per_million"),
        "baseline_cpu_seconds_per_million": median(baseline, "server_cpu_seconds_per_million"),
    }
    v, b = out["variants_cpu_seconds_per_million"], out["baseline_cpu_seconds_per_million"]
    out["ratio"] = round(v / b, 3) if v and b else None
    derived = []
    for run in variants:
        plain, rest = run["groups"][0]["frames"], sum(g["frames"] for g in run["groups"][1:])
        if b and rest and run.get("server_cpu_seconds") is not None:
            derived.append((run["server_cpu_seconds"] - plain * b / 1e6) / rest * 1e6)
    out["derived_cpu_seconds_per_million_estimate"] = (
        round(statistics.median(derived), 3) if derived else None
    )
    return out


BOOK_COLUMNS = [
    ("clients", "clients", "{:,}"),
    ("frames/client", "frames_per_client", "{:,.1f}"),
    ("frames/s/client", "frames_per_client_per_second", "{:,.1f}"),
    ("bytes/client", "bytes_per_client", "{:,}"),
    ("bytes/s/client", "bytes_per_client_per_second", "{:,}"),
    ("bytes/frame", "bytes_per_frame", "{:,.1f}"),
    ("gaps", "gap_notices", "{:,}"),
    ("closed", "closed_by_server", "{:,}"),
]


def books_text(figures: dict[str, Any]) -> str:
    """A run's groups as a table, and its server CPU."""
    lines = [
        "%s run: %d clients, %g diffs/s for %gs (%d published), drain %.2fs"
        % (
            figures["run"],
            figures["connections"],
            figures["rate"],
            figures["duration"],
            figures["published"],
            figures["drain_seconds"],
        )
    ]
    groups = [(group["stream"], group) for group in figures["groups"]]
    lines.append(table(groups, BOOK_COLUMNS, "stream"))
    if figures.get("server_cpu_seconds") is not None:
        lines.append(
            "server CPU %.2fs for %d deliveries: %s s per million deliveries"
            % (
                figures["server_cpu_seconds"],
                figures["deliveries"],
                figures["server_cpu_seconds_per_million"],
            )
        )
    return "\n".join(lines)


def books_comparison_text(comparison: dict[str, Any]) -> str:
    def fmt(value: float | None) -> str:
        return "-" if value is None else "%.3f" % value

    return (
        "CPU per million deliveries: variants %s s against today's plain diff delivery %s s "
        "(x%s); the derived groups' deliveries, beyond their plain group's at the baseline's "
        "cost: %s s per million (estimate)"
        % (
            fmt(comparison["variants_cpu_seconds_per_million"]),
            fmt(comparison["baseline_cpu_seconds_per_million"]),
            fmt(comparison["ratio"]),
            fmt(comparison["derived_cpu_seconds_per_million_estimate"]),
        )
    )


# --- side by side ------------------------------------------------------------

COLUMNS = [
    ("offered/s", "offered_deliveries_per_second", "{:,.0f}"),
    ("sustained/s", "sustained_deliveries_per_second", "{:,.0f}"),
    ("loss %", "loss_percent", "{:.3f}"),
    ("p50 ms", "latency_ms_p50", "{:.1f}"),
    ("p99 ms", "latency_ms_p99", "{:.1f}"),
    ("p99 steady", "latency_ms_p99_steady", "{:.1f}"),
    ("drain s", "drain_seconds", "{:.2f}"),
    ("CPU s/M", "server_cpu_seconds_per_million", "{:.3f}"),
    ("CPU %", "server_cpu_percent_of_one_core", "{:.0f}"),
]


def variant_label(kind: str, recoverable: bool) -> str:
    return kind + (" (recoverable)" if recoverable else "")


def median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric column over ``runs`` (one dict per run)."""
    merged = {}
    for _, key, _ in COLUMNS:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        merged[key] = statistics.median(values) if values else None
    return merged


def table(
    rows: list[tuple[str, dict[str, Any]]],
    columns: list[tuple[str, str, str]] | None = None,
    first: str = "server",
) -> str:
    """rows: (label, figures) -> a text table of ``columns`` (title, key,
    format; default :data:`COLUMNS`) after the labels' column ``first``."""
    columns = COLUMNS if columns is None else columns
    head = [first] + [title for title, _, _ in columns]
    lines = [head]
    for label, figures in rows:
        line = [label]
        for _, key, fmt in columns:
            value = figures.get(key)
            line.append("-" if value is None else fmt.format(value))
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths))
        )
        for line in lines
    )


def compare(
    args: argparse.Namespace,
) -> tuple[dict[tuple[str, bool], list[dict[str, Any]]], dict[tuple[str, bool], dict[str, Any]]]:
    variants = [("marketstream", False), ("reference", False)]
    if args.recoverable:
        variants.append(("marketstream", True))
    runs = {variant: [] for variant in variants}
    for repeat in range(args.repeat):
        # Alternate the order so a drift of the machine hits both alike.
        order = variants if repeat % 2 == 0 else variants[::-1]
        for kind, recoverable in order:
            log("--- run %d/%d: %s" % (repeat + 1, args.repeat, variant_label(kind, recoverable)))
            runs[(kind, recoverable)].append(asyncio.run(run(args, kind, recoverable)))
    medians = {variant: median_figures(found) for variant, found in runs.items()}
    return runs, medians


# --- command line ------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fan-out benchmark for marketstream (and the reference server).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    load = parser.add_argument_group("load")
    load.add_argument("--connections", type=int, default=1000, help="WebSocket connections")
    load.add_argument("--streams", type=int, default=10, help="K streams in all")
    load.add_argument(
        "--per-conn",
        type=int,
        default=1,
        help="S streams per connection (connection c gets streams (c*S+j) %% K)",
    )
    load.add_argument("--rate", type=float, default=4000, help="messages/s published in all")
    load.add_argument("--duration", type=float, default=10, help="seconds of publishing")
    load.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="seconds of publishing after which latency samples also count "
        "for the steady-state p99 ('p99 steady'; 0: none)",
    )
    load.add_argument(
        "--recoverable",
        action="store_true",
        help="publish through marketstream.publisher.Publisher (positions, "
        "history); with --compare, also run marketstream with plain publishing",
    )
    load.add_argument(
        "--idle", action="store_true", help="connect and measure memory only, publish nothing"
    )
    load.add_argument(
        "--compressing",
        action="store_true",
        help="every client offers permessage-deflate (messages over [server] "
        "compression_min_bytes then come compressed; latency is sampled from plain frames)",
    )
    load.add_argument(
        "--receiver",
        choices=("auto", "wsblast", "python"),
        default="auto",
        help="wsblast: the C receiver (built with cc on first use); python: an "
        "asyncio client (light loads only); auto: wsblast when cc exists",
    )
    load.add_argument(
        "--sampled",
        type=int,
        default=100,
        help="wsblast connections that parse frames for latency samples",
    )
    books = parser.add_argument_group("order books (--books)")
    books.add_argument(
        "--books",
        action="store_true",
        help="the order-book run: a realistic order flow on depth.MARKET through "
        "Publisher (positions, the book as snapshot), --rate diffs/s; the "
        "--connections clients in three groups: depth.MARKET, depth.MARKET@SPEED "
        "and depthTOP.MARKET; frames and bytes per client of each group; with "
        "--compare, the baseline run too",
    )
    books.add_argument(
        "--baseline",
        action="store_true",
        help="with --books: every client on the plain depth.MARKET (today's diff delivery)",
    )
    books.add_argument("--market", default="BTC_USDT", help="the book's market")
    books.add_argument(
        "--speed",
        choices=("100ms", "250ms", "500ms", "1000ms"),
        default="100ms",
        help="the update speed of the second group",
    )
    books.add_argument(
        "--top", type=int, choices=(5, 10, 20), default=10, help="the depth-N of the third group"
    )
    books.add_argument(
        "--receiver-processes",
        type=int,
        default=2,
        help="processes of the --books receiver (asyncio clients counting frames and bytes)",
    )
    servers = parser.add_argument_group("server")
    servers.add_argument(
        "--reference",
        action="store_true",
        help="run against scripts/reference_server.py instead of marketstream",
    )
    servers.add_argument(
        "--compare",
        action="store_true",
        help="run marketstream and the reference server back to back, print a table side by side",
    )
    servers.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="with --compare: runs per server (alternating); the table shows medians",
    )
    servers.add_argument("--processes", type=int, default=1, help="marketstream worker processes")
    servers.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a marketstream setting (repeatable), e.g. server.fast_handshake=false",
    )
    servers.add_argument(
        "--reference-loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="the reference server's event loop",
    )
    servers.add_argument(
        "--reference-max-buffer",
        type=int,
        default=1048576,
        metavar="BYTES",
        help="the reference server drops a client with more unsent "
        "(marketstream's limits.max_buffer_bytes default)",
    )
    servers.add_argument(
        "--target",
        metavar="URL",
        help="ws://host:port of a running server instead of starting one "
        "(needs --redis-url; server CPU and memory are not measured)",
    )
    servers.add_argument(
        "--redis-url",
        metavar="URL",
        help="Redis to publish to (default: a private redis-server started for the run)",
    )
    pinning = parser.add_argument_group("CPU pinning (taskset)")
    pinning.add_argument(
        "--server-cpu",
        default="0",
        metavar="CPUS",
        help="CPU list for the server (taskset -c syntax)",
    )
    pinning.add_argument(
        "--load-cpu",
        default="1",
        metavar="CPUS",
        help="CPU list for this script, the receiver, the publisher and redis",
    )
    pinning.add_argument(
        "--no-pin", action="store_true", help="pin nothing: everything shares every CPU"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.target and not args.redis_url:
        parser.error("--target needs --redis-url")
    if args.target and (args.compare or args.reference):
        parser.error("--target measures a running server: not with --compare or --reference")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.baseline and not args.books:
        parser.error("--baseline is a --books run")
    if args.books:
        for option in ("reference", "recoverable", "idle", "compressing"):
            if getattr(args, option):
                parser.error("--books: not with --%s" % option)
        if args.baseline and args.compare:
            parser.error("--books --compare runs the baseline itself: not with --baseline")
        if args.receiver_processes < 1:
            parser.error("--receiver-processes must be at least 1")
    if args.recoverable:
        try:
            import marketstream.publisher  # noqa: F401
        except ImportError as exc:
            parser.error("--recoverable needs marketstream.publisher (%s)" % exc)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # clean up: servers, receiver, redis-server

    signal.signal(signal.SIGTERM, interrupted)
    if args.books:
        return main_books(args)
    try:
        if args.compare:
            runs, medians = compare(args)
        else:
            kind = "reference" if args.reference else "marketstream"
            figures = asyncio.run(run(args, kind, args.recoverable))
    except KeyboardInterrupt:
        return 130
    if args.compare:
        rows = [(variant_label(*variant), figures) for variant, figures in medians.items()]
        if args.json:
            print(
                json.dumps(
                    {
                        "runs": {variant_label(*v): r for v, r in runs.items()},
                        "medians": {label: f for label, f in rows},
                    }
                )
            )
        else:
            print(
                "%d connections, %d streams, %d per connection, %g msg/s for %gs%s"
                % (
                    args.connections,
                    args.streams,
                    args.per_conn,
                    args.rate,
                    args.duration,
                    "; medians of %d runs each" % args.repeat if args.repeat > 1 else "",
                )
            )
            print(table(rows))
    else:
        print_figures(figures, args.json)
    return 0


def main_books(args: argparse.Namespace) -> int:
    """The --books runs: the figures, or why the server refused."""
    try:
        if args.compare:
            output = books_compare(args)
        else:
            output = asyncio.run(run_books(args, args.baseline))
    except KeyboardInterrupt:
        return 130
    except Refused as exc:
        log(
            "bench_fanout: %s\n(a server without its own order books refuses the derived "
            "streams: --books --baseline runs the plain stream alone)" % exc
        )
        return 2
    if args.json:
        print(json.dumps(output))
    elif args.compare:
        for runs in output["runs"].values():
            for figures in runs:
                print(books_text(figures) + "\n")
        print(books_comparison_text(output["comparison"]))
    else:
        print(books_text(output))
    return 0


def print_figures(figures: dict[str, Any], as_json: bool) -> None:
    """One JSON object, or one aligned line per figure."""
    if as_json:
        print(json.dumps(figures))
    else:
        width = max(len(key) for key in figures)
        for key, value in figures.items():
            print("%-*s  %s" % (width, key, value))


if __name__ == "__main__":
    sys.exit(main())
