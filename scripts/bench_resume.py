#!/usr/bin/env python3
"""Reconnect-storm benchmark: many clients resume at once while others stay live.

Starts a private redis-server and a marketstream server (pinned to
``--server-cpu``, the load to ``--load-cpu``, as ``scripts/bench_fanout.py``
does), publishes ``--rate`` recoverable messages/s on ``--streams`` streams
through :class:`marketstream.publisher.Publisher` and runs these phases:

1. ``--live`` live clients and ``--resuming`` resuming clients connect and
   subscribe (resuming clients to every stream, live ones to
   ``--live-per-conn`` streams each);
2. a baseline of ``--baseline`` seconds; in its last part the resuming
   clients parse every frame and track their last position per stream;
3. every resuming client is dropped at once (TCP reset); publishing goes on
   for ``--outage`` seconds;
4. all of them reconnect at once and resume with
   ``{"method":"SUBSCRIBE","params":[...],"since":{stream: last position}}``
   (or ``/stream?streams=...&since=...`` with ``--form url``).

It reports, per resuming client, the time from the start of the storm until
it has received every position it missed, in order, each once, and then a
message published after the storm began (``catch_up_ms`` p50/p99/max and
the time until the last client caught up); gap notices, duplicates and
missing positions; the live clients' latency (publish time in the payload
to receipt) before the drop, during the outage and during the storm; the
Redis history reads during the storm (``INFO commandstats`` deltas: a
history range read once per stream per read round and shared by every
client waiting, not once per client); the server's CPU per phase and the
time it waited for its CPU (other work on a shared machine); and the CPU
this script's own client processes used.

Standard runs (the issue's target: all catch up within 2 s, live p99 <= 50 ms)::

    python scripts/bench_resume.py --repeat 3            # 1000 + 1000 clients, 10 streams
    python scripts/bench_resume.py --verified 100        # only 100 resuming clients parse
    python scripts/bench_resume.py --form url --json     # resume through the URL form
    python scripts/bench_resume.py --py-spy storm.txt    # profile the server

Parsing every frame of a catch-up in Python costs the clients about as much
as the server spends sending it: with every resuming client verifying
(the default) on a single load core, the catch-up figures include the
clients' own delay (``resuming_clients_cpu_percent_storm`` near 100% minus
what the live clients, Redis and the publisher use).  ``--verified 100``
checks 100 clients spread over the reconnect order and lets the others
just read, so the figures are the server's.  With every client on every
stream, each publisher pipeline (``--tick``) is one write to each of the
2000 connections: that, not ``--rate``, sets the server's baseline cost.

The clients are asyncio protocols with a minimal WebSocket client (uvloop
when installed): live clients count frames and take one latency sample per
read (the oldest frame of the read, counted for every frame in it: an upper
bound); resuming clients parse every frame only while positions matter
(tracking before the drop, and from the reconnect until ``--verify``
seconds after they caught up).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

import psutil
import redis

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_fanout as fanout  # noqa: E402  (puts the project root on sys.path)
from bench_fanout import log, stream_name, stream_names  # noqa: E402

from marketstream.testing import (  # noqa: E402
    RedisServer,
    die_with_parent,
    free_port,
    handshake_request,
    health,
    masked_frame,
    percentile,
    raise_fd_limit,
    tree_cpu,
)

TOKEN = b'{"stream"'
E_KEY = b'"E":'
TS_WIDTH = fanout.TS_WIDTH
SEQ_KEY = b',"seq":'
GAP = b'"e":"gap"'
HISTORY_COMMANDS = ("xrange", "xrevrange", "get", "multi", "exec", "evalsha")


def set_loop(kind: str) -> str:
    """Install uvloop if asked (or ``auto`` and installed); the loop's name."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            return "uvloop"
    return "asyncio"


def weighted_percentile(pairs: list[tuple[float, int]], q: float) -> float | None:
    """The ``q`` quantile of values weighted by counts (``(value, count)`` pairs)."""
    pairs = [p for p in pairs if p[1] > 0]
    if not pairs:
        return None
    pairs.sort()
    total = sum(n for _, n in pairs)
    want = q * total
    seen = 0
    for value, n in pairs:
        seen += n
        if seen > want:
            return value
    return pairs[-1][0]


def ms(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


# --- WebSocket clients ---------------------------------------------------------


class WSClient(asyncio.Protocol):
    """A minimal WebSocket client: sends ``request`` (the handshake), then
    ``subscribe`` (a masked frame, may be empty) once the 101 arrived; the
    frame bytes go to :meth:`frames`."""

    def __init__(self, request: bytes, subscribe: bytes, linger0: bool = False) -> None:
        self.request = request
        self.subscribe = subscribe
        self.linger0 = linger0
        self.head = b""
        self.open = False
        self.transport: Any = None
        self.opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.linger0:  # close() sends a reset: the client "drops"
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.open:
            self.frames(data)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return
        if not self.head.startswith(b"HTTP/1.1 101"):
            if not self.opened.done():
                self.opened.set_exception(RuntimeError("handshake refused: %r" % self.head[:60]))
            self.transport.close()
            return
        rest = self.head[end + 4 :]
        self.head = b""
        self.open = True
        if self.subscribe:
            self.transport.write(self.subscribe)
        if not self.opened.done():
            self.opened.set_result(True)
        if rest:
            self.frames(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(RuntimeError("connection lost during the handshake"))

    def frames(self, data: bytes) -> None:
        raise NotImplementedError


# Live clients' samples: receipt time (ns), latency (ns) of the oldest frame
# of the read, frames in the read.
RECV = array.array("q")
LAT = array.array("q")
NFR = array.array("q")


class LiveClient(WSClient):
    """Counts frames (by their ``{"stream"`` token) and samples latency once
    per read; remembers the first and last ``"t"`` (global publish index)."""

    def __init__(self, request: bytes, subscribe: bytes) -> None:
        super().__init__(request, subscribe)
        self.count = 0
        self.tail = b""
        self.first_t: int | None = None

    def frames(self, data: bytes) -> None:
        now = time.time_ns()
        n = data.count(TOKEN)
        if self.tail:
            n += (self.tail[-8:] + data[:8]).count(TOKEN)  # a token split by the read
        self.count += n
        self.tail = data[-512:] if len(data) >= 512 else (self.tail + data)[-512:]
        at = data.find(E_KEY)
        if at >= 0 and at + 4 + TS_WIDTH <= len(data):
            try:
                sent = int(data[at + 4 : at + 4 + TS_WIDTH])
            except ValueError:
                return
            RECV.append(now)
            LAT.append(now - sent)
            NFR.append(max(n, 1))
            if self.first_t is None:
                self.first_t = _t_after(data, at)

    def last_t(self) -> int | None:
        at = self.tail.rfind(b'"t":')
        if at < 0:
            return None
        end = self.tail.find(b",", at)
        try:
            return int(self.tail[at + 4 : end])
        except ValueError:
            return None


def _t_after(data: bytes, at: int) -> int | None:
    t = data.find(b'"t":', at)
    end = data.find(b",", t)
    if t < 0 or end < 0:
        return None
    try:
        return int(data[t + 4 : end])
    except ValueError:
        return None


COUNT, PARSE = 0, 1


class ResumingClient(WSClient):
    """A client whose positions matter.  In COUNT mode it only counts bytes;
    in PARSE mode it parses every frame: stream, position, gap notices,
    continuity (duplicates, missing positions) and, after a resume, when it
    caught up on each stream."""

    def __init__(
        self,
        request: bytes,
        subscribe: bytes,
        state: ResumeState,
        linger0: bool = False,
        mode: int = COUNT,
    ) -> None:
        super().__init__(request, subscribe, linger0)
        self.state = state
        self.mode = mode
        self.buf = b""
        self.synced = mode == PARSE  # a fresh connection starts at a frame boundary
        self.bytes = 0

    def start_parsing(self) -> None:
        self.mode = PARSE
        self.buf = b""
        self.synced = False

    def frames(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.mode == COUNT:
            return
        now = time.time_ns()
        buf = self.buf + data if self.buf else data
        pos = 0
        if not self.synced:
            # Find the first whole frame: its header, then {"stream":
            at = buf.find(b'{"stream":"')
            while at >= 0:
                if at >= 4 and buf[at - 4] == 0x81 and buf[at - 3] == 126:
                    pos = at - 4
                    break
                if at >= 2 and buf[at - 2] == 0x81 and buf[at - 1] < 126:
                    pos = at - 2
                    break
                at = buf.find(b'{"stream":"', at + 1)
            if at < 0:
                self.buf = buf[-64:]
                return
            self.synced = True
        state = self.state
        size = len(buf)
        while size - pos >= 2:
            n = buf[pos + 1] & 127
            if n < 126:
                start = pos + 2
            elif n == 126:
                if size - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            else:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + n
            if end > size:
                break
            if buf[pos] & 15 == 1:
                state.frame(buf, start, end, now)
            pos = end
        self.buf = buf[pos:] if pos < size else b""


class ResumeState:
    """What one resuming client knows: last positions, and after the resume
    the continuity and catch-up figures.  Survives the reconnect."""

    __slots__ = (
        "last",
        "since",
        "resumed",
        "storm_ns",
        "caught",
        "caught_ns",
        "duplicates",
        "missing",
        "gap_notices",
        "pre_anomalies",
        "frames",
        "nstreams",
        "target",
        "replayed",
        "replayed_ns",
        "first_ns",
    )

    def __init__(self, nstreams: int) -> None:
        self.nstreams = nstreams
        self.last: dict[bytes, int] = {}
        self.since: dict[bytes, int] = {}
        self.resumed = False
        self.storm_ns = 0
        self.caught: dict[bytes, int] = {}
        self.caught_ns: int | None = None
        self.duplicates = 0
        self.missing = 0
        self.gap_notices = 0
        self.pre_anomalies = 0
        self.frames = 0
        self.target: dict[bytes, int] = {}  # the latest position when the storm began
        self.replayed: dict[bytes, int] = {}
        self.replayed_ns: int | None = None
        self.first_ns: int | None = None  # the first frame after the resume

    def frame(self, buf: bytes, start: int, end: int, now: int) -> None:
        self.frames += 1
        name = buf[start + 11 : buf.index(b'"', start + 11)]
        at = buf.rfind(SEQ_KEY, start, end)
        if at < 0:
            if buf.find(GAP, start, end) >= 0:
                self.gap_notices += 1
            return
        seq = int(buf[at + 7 : end - 1])
        if self.resumed and self.first_ns is None:
            self.first_ns = now
        last = self.last.get(name)
        if last is not None and seq != last + 1:
            if seq <= last:
                if self.resumed:
                    self.duplicates += 1
                else:
                    self.pre_anomalies += 1
                return  # an old position again: keep the newer one
            if self.resumed:
                self.missing += seq - last - 1
            else:
                self.pre_anomalies += 1
        self.last[name] = seq
        if self.resumed and name not in self.replayed and seq >= self.target.get(name, 0):
            self.replayed[name] = now
            if len(self.replayed) == self.nstreams:
                self.replayed_ns = now
        if self.resumed and name not in self.caught:
            e = buf.find(E_KEY, start, end)
            if e >= 0 and int(buf[e + 4 : e + 4 + TS_WIDTH]) >= self.storm_ns:
                self.caught[name] = now
                if len(self.caught) == self.nstreams:
                    self.caught_ns = now


# --- live clients in a process of their own -----------------------------------


def live_process(
    host: str, port: int, count: int, per_conn: int, streams: int, loop_kind: str, pipe: Any
) -> None:
    """Run ``count`` live clients; answer the parent's commands on ``pipe``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_loop(loop_kind)
    asyncio.run(_live_main(host, port, count, per_conn, streams, pipe))


async def _live_main(
    host: str, port: int, count: int, per_conn: int, streams: int, pipe: Any
) -> None:
    loop = asyncio.get_running_loop()
    clients: list[LiveClient] = []
    plans = []
    for c in range(count):
        names = [stream_name(k) for k in fanout.connection_streams(c, per_conn, streams)]
        plans.append(
            (
                handshake_request(port, host=host),
                masked_frame(
                    json.dumps(
                        {"method": "SUBSCRIBE", "params": names, "id": c + 1}, separators=(",", ":")
                    )
                ),
            )
        )
    cpu0 = time.process_time()
    started = time.monotonic()
    await _open_all(loop, host, port, plans, LiveClient, clients)
    pipe.send(("ready", time.monotonic() - started))
    commands: asyncio.Queue = asyncio.Queue()
    loop.add_reader(pipe.fileno(), lambda: commands.put_nowait(pipe.recv()))
    while True:
        command, arg = await commands.get()
        if command == "cpu":
            pipe.send(time.process_time() - cpu0)
        elif command == "count":
            pipe.send(sum(c.count for c in clients))
        elif command == "windows":
            pipe.send(_window_stats(arg))
        elif command == "finish":
            closed = sum(1 for c in clients if c.closed)
            result = {
                "received": sum(c.count for c in clients),
                "closed_by_server": closed,
                "expected": sum(_expected(c, i, per_conn, streams) for i, c in enumerate(clients)),
                "cpu_seconds": time.process_time() - cpu0,
            }
            for c in clients:
                c.transport.abort()
            pipe.send(result)
            return


def _expected(client: LiveClient, c: int, per_conn: int, streams: int) -> int:
    """Frames ``client`` should have received between its first and last
    publish index (the publisher sends message i on stream i % streams)."""
    first, last = client.first_t, client.last_t()
    if first is None or last is None:
        return client.count
    first -= fanout.SEQ_BASE
    last -= fanout.SEQ_BASE
    mine = set(fanout.connection_streams(c, per_conn, streams))
    total = 0
    for k in mine:
        # indices i in [first, last] with i % streams == k
        lo = first + ((k - first) % streams)
        if lo <= last:
            total += (last - lo) // streams + 1
    return total


def _window_stats(windows: list[tuple[str, int, int]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, lo, hi in windows:
        pairs = [(LAT[i] / 1e6, NFR[i]) for i in range(len(RECV)) if lo <= RECV[i] < hi]
        out[name] = {
            "latency_ms_p50": ms(weighted_percentile(pairs, 0.50), 2),
            "latency_ms_p99": ms(weighted_percentile(pairs, 0.99), 2),
            "latency_ms_max": ms(max((v for v, _ in pairs), default=None), 2),
            "frames": sum(n for _, n in pairs),
            "seconds": round((hi - lo) / 1e9, 3),
        }
    return out


async def _open_all(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    plans: list[tuple[bytes, bytes]],
    factory: Any,
    out: list,
    batch: int = 200,
    **kwargs: Any,
) -> None:
    """Open connections ``batch`` at a time (all at once with batch=0)."""
    step = batch or len(plans)
    for i in range(0, len(plans), step):
        opened = []
        for request, subscribe in plans[i : i + step]:
            opened.append(
                loop.create_connection(
                    lambda r=request, s=subscribe: factory(r, s, **kwargs), host, port
                )
            )
        pairs = await asyncio.gather(*opened)
        protocols = [p for _, p in pairs]
        await asyncio.gather(*(p.opened for p in protocols))
        out.extend(protocols)


# --- publisher -------------------------------------------------------------------


def publisher_process(
    url: str, rate: float, tick: float, streams: int, history: int, stop: Any, out: Any
) -> None:
    """Publish ``rate`` messages/s (``tick`` s apart, round robin over the
    streams) through marketstream's Publisher until ``stop`` is set; send
    the count, elapsed time and last position per stream to ``out``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from marketstream.publisher import Publisher

    client = redis.Redis.from_url(url)
    pub = Publisher(client, history=history, ttl=600)
    names = stream_names(streams)
    last: list[int | None] = [None] * streams
    start = time.monotonic()
    sent = 0
    next_tick = start
    while not stop.is_set():
        due = int((time.monotonic() - start) * rate)
        if due > sent:
            now_ns = time.time_ns()
            batch = [
                (names[i % streams], fanout.recoverable_data(i % streams, i, now_ns, streams))
                for i in range(sent, due)
            ]
            for i, position in zip(range(sent, due), pub.publish_many(batch)):
                last[i % streams] = position
            sent = due
        next_tick += tick or 0.001
        delay = next_tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_tick = time.monotonic()
    out.send({"sent": sent, "elapsed": time.monotonic() - start, "last": last})
    client.close()


# --- the run ------------------------------------------------------------------------


def run_delay(pid: int) -> float:
    """Seconds the threads of ``pid`` have waited on a run queue (for a CPU
    that something else held), from /proc/<pid>/task/*/schedstat; 0 where
    Linux does not tell."""
    total = 0
    try:
        for task in os.listdir("/proc/%d/task" % pid):
            try:
                with open("/proc/%d/task/%s/schedstat" % (pid, task)) as f:
                    total += int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                pass
    except OSError:
        return 0.0
    return total / 1e9


def commandstats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name: stats.get("cmdstat_" + name, {}).get("calls", 0) for name in HISTORY_COMMANDS}


def health_stats(host: str, port: int) -> dict[str, Any]:
    """The server's counters (``/health``), or {} if it does not answer."""
    try:
        return health(port, host)["stats"]
    except (OSError, KeyError, ValueError):
        return {}


def resume_request(
    host: str, port: int, form: str, names: list[str], since: dict[bytes, int], c: int
) -> tuple[bytes, bytes]:
    """(handshake, subscribe frame) of a resuming client."""
    if form == "url":
        query = "streams=%s&since=%s" % (
            "/".join(names),
            ",".join(
                "%s:%d" % (name, since[name.encode()]) for name in names if name.encode() in since
            ),
        )
        return handshake_request(port, "/stream?" + query, host=host), b""
    message = {
        "method": "SUBSCRIBE",
        "params": names,
        "id": c + 1,
        "since": {name: since[name.encode()] for name in names if name.encode() in since},
    }
    return handshake_request(port, host=host), masked_frame(
        json.dumps(message, separators=(",", ":"))
    )


class PySpy:
    """py-spy recording the server from :meth:`start` to :meth:`stop`."""

    def __init__(self, path: str, pid: int, rate: int) -> None:
        self.path = path
        self.pid = pid
        self.rate = rate
        self.proc: subprocess.Popen | None = None
        self.error: str | None = None

    def start(self) -> None:
        binary = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        fmt = {"svg": "flamegraph", "json": "speedscope"}.get(
            self.path.removesuffix(".before").rsplit(".", 1)[-1], "raw"
        )
        self.proc = subprocess.Popen(
            [
                binary,
                "record",
                "-p",
                str(self.pid),
                "-o",
                self.path,
                "-r",
                str(self.rate),
                "-f",
                fmt,
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )

    def stop(self) -> None:
        """Stop recording (py-spy writes its file); sets ``error`` if it failed."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.error = "py-spy did not stop"
            return
        if self.proc.returncode != 0 and not os.path.exists(self.path):
            self.error = err.decode(errors="replace")[-500:]


def summarize_profile(path: str, rate: int, seconds: float, top: int = 12) -> dict[str, Any]:
    """Where a raw (collapsed stacks) py-spy profile of ``seconds`` spent
    its samples: per function, self and total (inclusive) sampled seconds,
    and those of the recovery path (``_read``, ``read_done``, ``serve``, ``catch_up``)."""
    self_counts: dict[str, int] = {}
    total_counts: dict[str, int] = {}
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(n)
            total += count
            frames = [fr.split(" (")[0] for fr in stack.split(";")]
            self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
            for name in set(frames):
                total_counts[name] = total_counts.get(name, 0) + count

    def ranked(counts: dict[str, int], names: Any = None) -> list[tuple[str, float]]:
        items = counts.items() if names is None else ((n, counts.get(n, 0)) for n in names)
        chosen = sorted(items, key=lambda kv: -kv[1])[:top]
        return [(name, round(n / rate, 3)) for name, n in chosen]

    return {
        "window_seconds": round(seconds, 2),
        "sampled_seconds": round(total / rate, 2),
        "self_seconds": ranked(self_counts),
        "total_seconds": ranked(
            total_counts,
            [
                "ChannelManager._flush",
                "Batch.take",
                "StreamHandler.write_frames",
                "PubSubLink._read_loop",
                "ChannelManager.on_message",
                "Batch.enqueue",
                "ChannelManager._read",
                "Core.read_done",
                "Recoveries.serve",
                "catch_up",
                "text_frame",
                "StreamHandler.on_message",
                "ChannelManager.subscribe",
            ],
        ),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """One storm; its figures."""
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    raise_fd_limit()
    can_pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1
    if can_pin:
        os.sched_setaffinity(0, {int(c) for c in args.load_cpu.split(",")})
    figures: dict[str, Any] = {
        "resuming": args.resuming,
        "live": args.live,
        "streams": args.streams,
        "live_per_conn": args.live_per_conn,
        "rate": args.rate,
        "tick": args.tick,
        "outage": args.outage,
        "form": args.form,
        "client_loop": loop_name,
        "server_cpus": args.server_cpu if can_pin else None,
        "load_cpus": args.load_cpu if can_pin else None,
        "server_settings": args.set,
    }
    redis_server = RedisServer().start()
    server = live_proc = publishing = None
    stop = multiprocessing.get_context("spawn").Event()
    spies: dict[str, PySpy] = {}
    resumers: list[ResumingClient] = []
    try:
        host, port = "127.0.0.1", free_port()
        ns = argparse.Namespace(
            processes=1,
            set=args.set,
            server_cpu=args.server_cpu,
            connections=args.live + 2 * args.resuming,
        )
        server = fanout.start_server("marketstream", ns, host, port, redis_server.url, can_pin)
        proc = psutil.Process(server.pid)
        deadline = time.monotonic() + 20
        while True:
            try:
                health(port, host)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        names = stream_names(args.streams)
        rclient = redis.Redis.from_url(redis_server.url)

        # Phase 1: connect.  Live clients in a process of their own.
        ctx = multiprocessing.get_context("spawn")
        live_pipe, child_pipe = ctx.Pipe()
        live_proc = ctx.Process(
            target=live_process,
            args=(host, port, args.live, args.live_per_conn, args.streams, args.loop, child_pipe),
        )
        live_proc.start()
        states = [ResumeState(args.streams) for _ in range(args.resuming)]
        plans = [
            (
                handshake_request(port, host=host),
                masked_frame(
                    json.dumps(
                        {"method": "SUBSCRIBE", "params": names, "id": c + 1}, separators=(",", ":")
                    )
                ),
            )
            for c in range(args.resuming)
        ]
        started = time.monotonic()
        opened: list[ResumingClient] = []
        for i in range(0, len(plans), 200):
            batch = []
            for c in range(i, min(i + 200, len(plans))):
                batch.append(
                    loop.create_connection(
                        lambda r=plans[c][0], s=plans[c][1], st=states[c]: ResumingClient(
                            r, s, st, linger0=True
                        ),
                        host,
                        port,
                    )
                )
            protocols = [p for _, p in await asyncio.gather(*batch)]
            await asyncio.gather(*(p.opened for p in protocols))
            opened.extend(protocols)
        resumers = opened
        kind, live_connect = await asyncio.wait_for(loop.run_in_executor(None, live_pipe.recv), 120)
        figures["connect_seconds"] = round(time.monotonic() - started, 2)
        deadline = time.monotonic() + 30
        while True:
            subscribed = rclient.pubsub_numsub(*names)
            if all(n >= 1 for _, n in subscribed):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("streams not subscribed upstream")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        log(
            "connected %d live + %d resuming clients in %.1fs"
            % (args.live, args.resuming, figures["connect_seconds"])
        )

        # Phase 2: publish; baseline.
        pub_out, pub_in = ctx.Pipe(duplex=False)
        publishing = ctx.Process(
            target=publisher_process,
            args=(redis_server.url, args.rate, args.tick, args.streams, args.history, stop, pub_in),
        )
        publishing.start()
        await asyncio.sleep(args.warmup)
        # The warm-up lasts at least until the live clients receive: on a
        # busy machine the publisher process may take longer than it to start,
        # and a baseline without traffic measures nothing.
        deadline = time.monotonic() + 60
        while True:
            live_pipe.send(("count", None))
            if live_pipe.recv() > 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the live clients received nothing within 60 s")
            await asyncio.sleep(0.02)
        live_pipe.send(("cpu", None))
        live_cpu_base = live_pipe.recv()
        base_lo = time.time_ns()
        cpu = {"start": tree_cpu(proc)}
        waited = {"start": run_delay(server.pid)}
        own_cpu_base = time.process_time()
        spied = {"before": time.monotonic()}
        if args.py_spy:
            spies["before"] = PySpy(args.py_spy + ".before", server.pid, args.py_spy_rate)
            spies["before"].start()
        # Positions are tracked in the baseline's last part (at most 0.5 s,
        # longer if a client has not seen every stream yet); the live
        # latency "before" is measured before that, without the parsing.
        track = min(args.baseline / 2, 0.5)
        await asyncio.sleep(args.baseline - track)
        track_ns = time.time_ns()
        for r in resumers:
            r.start_parsing()
        deadline = time.monotonic() + max(track, 5.0)
        await asyncio.sleep(track)
        while sum(1 for s in states if len(s.last) < args.streams):
            if time.monotonic() > deadline:
                raise RuntimeError("resuming clients did not see every stream before the drop")
            await asyncio.sleep(0.02)

        # Phase 3: drop every resuming client at once.
        if "before" in spies:
            spied["before"] = time.monotonic() - spied["before"]
            spies["before"].stop()
        live_pipe.send(("cpu", None))
        live_cpu_drop = live_pipe.recv()
        own_cpu_drop = time.process_time()
        cpu["drop"] = tree_cpu(proc)
        waited["drop"] = run_delay(server.pid)
        drop_ns = time.time_ns()
        for r, state in zip(resumers, states):
            state.since = dict(state.last)
            r.transport.abort()  # SO_LINGER 0: a reset
        pre_anomalies = sum(s.pre_anomalies for s in states)
        if args.py_spy:
            await asyncio.sleep(max(0.0, args.outage - 0.5))
            spies["storm"] = PySpy(args.py_spy, server.pid, args.py_spy_rate)
            spies["storm"].start()  # attaches during the outage's last half second
            await asyncio.sleep(min(0.5, args.outage))
        else:
            await asyncio.sleep(args.outage)

        # Phase 4: the storm.  Everyone reconnects at once and resumes.
        latest = [int(v) for v in rclient.mget(["{%s}:seq" % name for name in names])]
        health_before = health_stats(host, port)
        live_pipe.send(("cpu", None))
        live_cpu_storm = live_pipe.recv()
        stats_before = commandstats(rclient)
        storm_ns = time.time_ns()
        cpu["storm"] = tree_cpu(proc)
        waited["storm"] = run_delay(server.pid)
        own_cpu_storm = time.process_time()
        target = {name.encode(): latest[k] for k, name in enumerate(names)}
        for state in states:
            state.resumed = True
            state.storm_ns = storm_ns
            state.target = target
        requests = [
            resume_request(host, port, args.form, names, s.since, c) for c, s in enumerate(states)
        ]
        # The verified clients are spread evenly over the reconnect order.
        every = args.resuming / min(args.verified or args.resuming, args.resuming)
        picked = {int(i * every) for i in range(round(args.resuming / every))}
        connecting = [
            loop.create_connection(
                lambda r=req, s=sub, st=state, m=(PARSE if c in picked else COUNT): ResumingClient(
                    r, s, st, mode=m
                ),
                host,
                port,
            )
            for c, ((req, sub), state) in enumerate(zip(requests, states))
        ]
        results = await asyncio.gather(*connecting, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        resumers = [p for t in results if not isinstance(t, BaseException) for p in [t[1]]]
        checked = [r for r in resumers if r.mode == PARSE]
        handshakes = await asyncio.gather(*(p.opened for p in resumers), return_exceptions=True)
        failed += [h for h in handshakes if isinstance(h, BaseException)]
        connected_ns = time.time_ns()
        if failed:
            log("%d reconnects failed: %s" % (len(failed), failed[0]))
        timeout_ns = storm_ns + int(args.timeout * 1e9)
        verify_ns = int(args.verify * 1e9)
        while True:
            now = time.time_ns()
            waiting = 0
            for r in checked:
                st = r.state
                if st.caught_ns is None:
                    waiting += 1
                elif r.mode == PARSE and now - st.caught_ns > verify_ns:
                    r.mode = COUNT  # verified long enough: stop parsing
            if not waiting or now > timeout_ns:
                break
            await asyncio.sleep(0.005)
        all_caught_ns = time.time_ns()
        log(
            "storm: %d of %d verified resuming clients caught up in %.0f ms"
            % (
                sum(1 for r in checked if r.state.caught_ns is not None),
                len(checked),
                (all_caught_ns - storm_ns) / 1e6,
            )
        )
        storm_end = max(all_caught_ns, storm_ns + int(args.storm_window * 1e9))
        while time.time_ns() < storm_end + verify_ns and any(r.mode == PARSE for r in checked):
            now = time.time_ns()
            for r in checked:
                if (
                    r.mode == PARSE
                    and r.state.caught_ns is not None
                    and now - r.state.caught_ns > verify_ns
                ):
                    r.mode = COUNT
            await asyncio.sleep(0.01)
        while time.time_ns() < storm_end:
            await asyncio.sleep(0.01)
        cpu["end"] = tree_cpu(proc)
        waited["end"] = run_delay(server.pid)
        own_cpu_end = time.process_time()
        stats_after = commandstats(rclient)
        health_after = health_stats(host, port)
        live_pipe.send(("cpu", None))
        live_cpu = live_pipe.recv()
        if "storm" in spies:
            spied["storm"] = (time.time_ns() - storm_ns) / 1e9 + min(0.5, args.outage)
            spies["storm"].stop()
            for window, spy in spies.items():
                if spy.error:
                    figures["py_spy_error"] = spy.error
                elif not args.py_spy.endswith((".svg", ".json")):
                    figures["py_spy_" + window] = summarize_profile(
                        spy.path, args.py_spy_rate, spied[window]
                    )

        # Stop publishing, let the live clients drain, collect.
        stop.set()
        published = pub_out.recv()
        publishing.join()
        last_count, still = -1, 0
        while still < 10:
            live_pipe.send(("count", None))
            count = live_pipe.recv()
            still = still + 1 if count == last_count else 0
            last_count = count
            await asyncio.sleep(0.05)
        live_pipe.send(
            (
                "windows",
                [
                    ("before", base_lo, track_ns),
                    ("outage", drop_ns, storm_ns),
                    ("storm", storm_ns, storm_end),
                ],
            )
        )
        windows = live_pipe.recv()
        live_pipe.send(("finish", None))
        live_result = live_pipe.recv()
        live_proc.join(10)

        checked_states = [r.state for r in checked]
        catch = [(s.caught_ns - storm_ns) / 1e6 for s in checked_states if s.caught_ns is not None]
        replay = [
            (s.replayed_ns - storm_ns) / 1e6 for s in checked_states if s.replayed_ns is not None
        ]
        first = [(s.first_ns - storm_ns) / 1e6 for s in checked_states if s.first_ns is not None]
        seconds = {
            "before": (track_ns - base_lo) / 1e9,
            "baseline": (drop_ns - base_lo) / 1e9,
            "outage": (storm_ns - drop_ns) / 1e9,
            "storm": (storm_end - storm_ns) / 1e9,
        }
        delta = {k: stats_after[k] - stats_before[k] for k in HISTORY_COMMANDS}
        reads = delta["xrange"] + delta["xrevrange"]
        figures.update(
            {
                "published": published["sent"],
                "published_per_second": round(published["sent"] / published["elapsed"]),
                "reconnect_failures": len(failed),
                "reconnect_handshakes_ms": round((connected_ns - storm_ns) / 1e6, 1),
                "verified_clients": len(checked),
                "caught_up": len(catch),
                "unverified_without_data": sum(
                    1 for r in resumers if r not in checked and r.bytes == 0
                ),
                "catch_up_ms_p50": ms(percentile(catch, 0.50)),
                "catch_up_ms_p99": ms(percentile(catch, 0.99)),
                "catch_up_ms_max": ms(max(catch) if catch else None),
                "all_caught_up_ms": ms((all_caught_ns - storm_ns) / 1e6)
                if len(catch) == len(checked)
                else None,
                "first_frame_ms_p50": ms(percentile(first, 0.50)),
                "first_frame_ms_max": ms(max(first) if first else None),
                # Until every position published before the storm began arrived
                # (no wait for the next live message).
                "replayed_ms_p50": ms(percentile(replay, 0.50)),
                "replayed_ms_p99": ms(percentile(replay, 0.99)),
                "replayed_ms_max": ms(max(replay) if replay else None),
                "missed_per_client": round(
                    statistics.mean(
                        sum(latest[k] - s.since[name.encode()] for k, name in enumerate(names))
                        for s in states
                    )
                ),
                "gap_notices": sum(s.gap_notices for s in states),
                "duplicates": sum(s.duplicates for s in states),
                "missing_positions": sum(s.missing for s in states),
                "tracking_anomalies": pre_anomalies,
                "live_latency_before": windows["before"],
                "live_latency_outage": windows["outage"],
                "live_latency_storm": windows["storm"],
                "live_expected": live_result["expected"],
                "live_received": live_result["received"],
                "live_closed_by_server": live_result["closed_by_server"],
                "redis_calls_storm": delta,
                "history_reads": reads,
                "history_reads_per_stream": round(reads / args.streams, 1),
                "history_reads_if_per_client": args.resuming * args.streams,
                "server_replayed": health_after.get("replayed", 0)
                - health_before.get("replayed", 0),
                "server_gap_notices": (
                    health_after.get("gap_notices", 0) - health_before.get("gap_notices", 0)
                ),
                "server_cpu_percent_before": round(
                    100 * (cpu["drop"] - cpu["start"]) / ((drop_ns - base_lo) / 1e9)
                ),
                "server_cpu_percent_outage": round(
                    100 * (cpu["storm"] - cpu["drop"]) / seconds["outage"]
                ),
                "server_cpu_seconds_storm": round(cpu["end"] - cpu["storm"], 2),
                "server_cpu_percent_storm": round(
                    100 * (cpu["end"] - cpu["storm"]) / seconds["storm"]
                ),
                "storm_window_seconds": round(seconds["storm"], 2),
                # Time the server was ready to run but waited for its CPU (other
                # work on a shared machine), per second of each phase.
                "server_cpu_wait_percent_before": round(
                    100 * (waited["drop"] - waited["start"]) / seconds["baseline"]
                ),
                "server_cpu_wait_percent_storm": round(
                    100 * (waited["end"] - waited["storm"]) / seconds["storm"]
                ),
                # The load core's clients: near 100% means they, not the server,
                # set the figures.
                "resuming_clients_cpu_percent_storm": round(
                    100 * (own_cpu_end - own_cpu_storm) / seconds["storm"]
                ),
                "live_clients_cpu_percent_storm": round(
                    100 * (live_cpu - live_cpu_storm) / seconds["storm"]
                ),
                "resuming_clients_cpu_percent_before": round(
                    100 * (own_cpu_drop - own_cpu_base) / seconds["baseline"]
                ),
                "live_clients_cpu_percent_before": round(
                    100 * (live_cpu_drop - live_cpu_base) / seconds["baseline"]
                ),
            }
        )
        return figures
    finally:
        stop.set()
        for r in resumers:
            if r.transport is not None:
                r.transport.abort()
        for child in (live_proc, publishing):
            if child is not None and child.is_alive():
                child.join(5)
                if child.is_alive():
                    child.kill()
        for spy in spies.values():
            if spy.proc is not None and spy.proc.poll() is None:
                spy.proc.kill()
        if server is not None:
            # The figures are taken: no graceful shutdown (it would wait for
            # the close handshakes of the clients just dropped).
            server.kill()
            server.wait()
        redis_server.stop()


# --- command line ----------------------------------------------------------------

SUMMARY = [
    ("all caught up ms", "all_caught_up_ms"),
    ("catch-up p50 ms", "catch_up_ms_p50"),
    ("catch-up p99 ms", "catch_up_ms_p99"),
    ("catch-up max ms", "catch_up_ms_max"),
    ("live p50 before ms", ("live_latency_before", "latency_ms_p50")),
    ("live p99 before ms", ("live_latency_before", "latency_ms_p99")),
    ("live p50 storm ms", ("live_latency_storm", "latency_ms_p50")),
    ("live p99 storm ms", ("live_latency_storm", "latency_ms_p99")),
    ("live p99 outage ms", ("live_latency_outage", "latency_ms_p99")),
    ("history reads", "history_reads"),
    ("gap notices", "gap_notices"),
    ("duplicates", "duplicates"),
    ("missing positions", "missing_positions"),
    ("server CPU % storm", "server_cpu_percent_storm"),
    ("server CPU s storm", "server_cpu_seconds_storm"),
    ("server CPU % before", "server_cpu_percent_before"),
]


def code_version() -> dict[str, Any]:
    """The commit measured, and the package's files that differ from it."""

    def git(*words: str) -> str:
        try:
            return subprocess.run(
                ["git", *words], cwd=fanout.ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "modified": git("diff", "--name-only", "HEAD", "--", "marketstream").split(),
    }


def pick(figures: dict[str, Any], key: Any) -> Any:
    if isinstance(key, tuple):
        return (figures.get(key[0]) or {}).get(key[1])
    return figures.get(key)


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    runs = [r for r in runs if "error" not in r]
    for label, key in SUMMARY:
        values = [pick(r, key) for r in runs]
        numbers = [v for v in values if isinstance(v, (int, float))]
        out[label] = statistics.median(numbers) if len(numbers) == len(values) and numbers else None
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Reconnect-storm benchmark for marketstream: resuming clients catch up "
        "from the history while live clients keep receiving.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--resuming",
        type=int,
        default=1000,
        help="clients dropped and resumed at once (each on every stream)",
    )
    load.add_argument("--live", type=int, default=1000, help="clients that stay connected")
    load.add_argument("--streams", type=int, default=10, help="recoverable streams")
    load.add_argument(
        "--live-per-conn",
        type=int,
        default=0,
        help="streams per live client (client c gets streams (c*S+j) %% K); 0: every stream",
    )
    load.add_argument("--rate", type=float, default=500, help="messages/s published in all")
    load.add_argument(
        "--tick",
        type=float,
        default=0.01,
        help="seconds between the publisher's pipelines (rate*tick messages each)",
    )
    load.add_argument("--history", type=int, default=1000, help="history kept per stream")
    load.add_argument(
        "--verified",
        type=int,
        default=0,
        help="resuming clients that parse and check every frame after the "
        "resume (the catch-up figures are theirs); the others only read "
        "and count bytes, so the clients cost less than the server; "
        "0: all",
    )
    load.add_argument(
        "--form",
        choices=("json", "url"),
        default="json",
        help="resume with SUBSCRIBE ... since (json) or /stream?...&since= (url)",
    )
    timing = parser.add_argument_group("phases (seconds)")
    timing.add_argument(
        "--warmup", type=float, default=1.0, help="publishing before the baseline starts"
    )
    timing.add_argument(
        "--baseline", type=float, default=3.0, help="live latency measured before the drop"
    )
    timing.add_argument(
        "--outage", type=float, default=1.0, help="time between the drop and the reconnect"
    )
    timing.add_argument(
        "--storm-window",
        type=float,
        default=2.0,
        help="live latency 'during the storm': from the reconnect until every "
        "client caught up, at least this long",
    )
    timing.add_argument(
        "--verify",
        type=float,
        default=0.5,
        help="a resuming client keeps checking positions this long after it caught up",
    )
    timing.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="give up waiting for clients to catch up after this long",
    )
    runs = parser.add_argument_group("runs")
    runs.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs one after the other; prints each and the medians",
    )
    runs.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="the clients' event loop (auto: uvloop when installed)",
    )
    runs.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a marketstream setting (repeatable), e.g. recovery.max_replay=500",
    )
    runs.add_argument(
        "--py-spy",
        metavar="FILE",
        help="record the server with py-spy during the baseline (FILE.before) "
        "and from the end of the outage to the end of the storm window "
        "(FILE); .txt: collapsed stacks, summarized in the output; .svg "
        "flame graph; .json speedscope",
    )
    runs.add_argument("--py-spy-rate", type=int, default=250, help="py-spy samples per second")
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
        help="CPU list for the clients, the publisher and redis",
    )
    pinning.add_argument(
        "--no-pin", action="store_true", help="pin nothing: everything shares every CPU"
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON (with --repeat: the runs and the medians)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line entry: ``python scripts/bench_resume.py --help``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.resuming < 1 or args.live < 0 or args.streams < 1:
        parser.error("--repeat, --resuming and --streams must be at least 1")
    if not 0 <= args.live_per_conn <= args.streams:
        parser.error("--live-per-conn must be between 0 (every stream) and --streams")
    args.live_per_conn = args.live_per_conn or args.streams

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    results = []
    try:
        for i in range(args.repeat):
            if args.repeat > 1:
                log("--- run %d/%d" % (i + 1, args.repeat))
            set_loop(args.loop)
            try:
                figures = asyncio.run(run(args))
            except Exception as exc:  # noqa: BLE001  (one failed run of several)
                if args.repeat == 1:
                    raise
                log("run %d failed: %r" % (i + 1, exc))
                figures = {"error": repr(exc)}
            figures["code"] = code_version()
            results.append(figures)
            if args.repeat > 1 and not args.json:
                print(json.dumps(results[-1]), flush=True)
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(
            json.dumps(
                results[0] if args.repeat == 1 else {"runs": results, "medians": medians(results)}
            )
        )
    elif args.repeat == 1:
        figures = results[0]
        width = max(len(key) for key in figures)
        for key, value in figures.items():
            print("%-*s  %s" % (width, key, value))
    else:
        print("medians of %d runs:" % args.repeat)
        for label, value in medians(results).items():
            print("  %-22s %s" % (label, value))
    return 0


if __name__ == "__main__":
    sys.exit(main())
