#!/usr/bin/env python3
"""Connect-storm benchmark: thousands of clients connect and subscribe at once.

What an instance restart behind nginx looks like to the instance: every
client it had comes back in the same moment.  This script starts a private
redis-server, a server (marketstream with ``--processes`` workers, or the
minimal reference server ``scripts/reference_server.py`` with
``--reference``), optionally a real nginx in front of it (``--nginx``: the
shipped ``conf/nginx.conf`` site with only the upstream and listen address
changed), and a publisher that sends one message on every stream each
``--tick`` seconds.  Then ``--client-processes`` client processes open
``--connections`` connections at the same instant (asyncio, uvloop when
installed, prebuilt handshake requests): each sends its upgrade request,
on the 101 sends ``{"method":"SUBSCRIBE","params":[...]}`` for
``--per-conn`` of ``--streams`` streams, and waits for its first message.

It reports:

* ``served_seconds_max`` (and p50/p99): from the start of the storm until
  every client has received its subscription's first live message; this
  includes the wait for the next message, up to ``--tick``;
  ``upgraded_seconds_*``: until the 101; ``connected_seconds_*``: until
  TCP connected (a SYN dropped by a full listen queue is retried after 1 s:
  ``connects_after_1s`` counts them from the client side);
* ``refused`` (an HTTP status other than 101, by status) and ``failed``
  (connection errors, closed before served, not served in ``--timeout``);
* ``TcpExt`` counters of ``/proc/net/netstat`` over the storm
  (``ListenOverflows``, ``ListenDrops``, ``TCPReqQFullDrop``,
  ``TCPReqQFullDoCookies``, ``SyncookiesSent``): they are the whole
  machine's, so other work on it may add to them;
* the server's log lines at WARNING and above (``server_error_lines``
  counts ERROR/CRITICAL and tracebacks) and nginx's error log by level;
* the server's CPU during the storm and the client processes' (so a
  saturated client side shows);
* ``live_delay_ms_*``: how late live messages reached the clients already
  served while the others still connected (from publishing to the client;
  the oldest message of each read), ``live_reads_during_storm`` of them;
* idle memory: the server's RSS (all its processes) after the storm, with
  publishing stopped for ``--idle-wait`` seconds, less its RSS before the
  storm, per connection (and nginx's, with ``--nginx``);
* clients connected, upgraded and served in each second of the storm: a
  client whose packet a full listen queue dropped comes back only after its
  retransmission timeout, which doubles with each drop.

The clients close with a reset, so they leave no socket in TIME_WAIT.  nginx
closes its upstream connections itself and leaves one per client; since each
holds a local port for a minute, and connect() slows down when most ports are
held, a run first waits (up to 75 s) until fewer than ``--time-wait-limit``
remain on the machine.

The server is pinned to ``--server-cpu``; the clients, Redis, the publisher
and nginx to ``--load-cpu`` (``--no-pin``: nothing is pinned).

Standard runs (the target: all 10,000 served within 3 s, none refused, no
error logs, idle memory <= 6.5 KB per connection)::

    python scripts/bench_storm.py                        # 10,000 clients straight to the server
    python scripts/bench_storm.py --nginx                # ... through nginx (conf/nginx.conf)
    python scripts/bench_storm.py --nginx --nginx-backlog 0   # ... with nginx's own backlog
    python scripts/bench_storm.py --reference            # the minimal asyncio server
    python scripts/bench_storm.py --compare --repeat 3   # both, alternately; medians
    python scripts/bench_storm.py --processes 2 --no-pin
    python scripts/bench_storm.py --py-spy storm.txt     # profile the server during the storm
    python scripts/bench_storm.py --py-spy storm.json    # ... and where each second went
    python scripts/bench_storm.py --token                # every client presents a JWT (HS256)
    python scripts/bench_storm.py --token-compare --repeat 3  # anonymous and tokens, alternately

``--token``: the server runs with ``[auth] jwt_key`` (an HS256 secret) and
every client sends ``Authorization: Bearer <jwt>`` (a token of its own,
``sub`` = its number, made before the storm) in its upgrade request;
``--token-compare`` runs anonymous and token storms alternately (the target:
10,000 authenticated connects within 1.3x the time of anonymous ones) and
adds the token runs' medians over the anonymous runs' (``token_over_anonymous``).
The server's CPU during a storm includes live delivery to the clients
already served (each gets a message per ``--tick``), so a storm that takes
longer also costs more delivery: compare the times, and see the profile
(``--py-spy``) for what each handshake costs.

``--repeat N`` runs N times and adds the medians; ``--compare`` runs
marketstream and the reference server alternately, N times each (the fairest
comparison on a shared machine); ``--json`` prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import multiprocessing
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil
import redis

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_fanout as fanout  # noqa: E402  (puts the project root on sys.path)

from marketstream.testing import (  # noqa: E402
    RedisServer,
    die_with_parent,
    free_port,
    handshake_request,
    health,
    masked_frame,
    percentile,
    raise_fd_limit,
    stop_process,
    tree_cpu,
    tree_rss,
)
from marketstream.testing import server_command as marketstream_command  # noqa: E402

ROOT = fanout.ROOT
log = fanout.log
NETSTAT_KEYS = (
    "ListenOverflows",
    "ListenDrops",
    "TCPReqQFullDrop",
    "TCPReqQFullDoCookies",
    "SyncookiesSent",
    "SyncookiesFailed",
)
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)


# --- machine counters ----------------------------------------------------------


def netstat() -> dict[str, int]:
    """The ``TcpExt`` counters of ``/proc/net/netstat`` named in NETSTAT_KEYS."""
    values: dict[str, int] = {}
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return values
    for head, body in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            for key, value in zip(head.split()[1:], body.split()[1:]):
                if key in NETSTAT_KEYS:
                    values[key] = int(value)
    return values


def sockstat(field: str) -> int:
    """A ``TCP:`` field of ``/proc/net/sockstat`` (the whole machine's):
    ``inuse`` (open TCP sockets), ``tw`` (in TIME_WAIT), ``mem`` (pages)."""
    try:
        with open("/proc/net/sockstat") as f:
            for line in f:
                if line.startswith("TCP:"):
                    fields = line.split()
                    return int(fields[fields.index(field) + 1])
    except (OSError, ValueError):
        pass
    return 0


def time_wait() -> int:
    """Sockets in TIME_WAIT on the machine."""
    return sockstat("tw")


def wait_time_wait(limit: int, timeout: float) -> int:
    """Wait (up to ``timeout`` s) until fewer than ``limit`` sockets are in
    TIME_WAIT; each holds a local port, and when most ephemeral ports are
    held, every connect() searches long for a free one.  Returns the count."""
    deadline = time.monotonic() + timeout
    count = time_wait()
    if count >= limit:
        log("waiting for %d sockets in TIME_WAIT to expire" % count)
    while count >= limit and time.monotonic() < deadline:
        time.sleep(1.0)
        count = time_wait()
    return count


def log_lines(path: str) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except OSError:
        return []


# --- publisher -----------------------------------------------------------------


def publisher(url: str, streams: int, tick: float, stop: Any, out: Any) -> None:
    """One message on every stream each ``tick`` s until ``stop`` is set;
    sends the number published to ``out``."""
    client = redis.Redis.from_url(url)
    conn = client.connection_pool.get_connection()
    names = fanout.stream_names(streams)
    seq = 0
    next_tick = time.monotonic()
    while not stop.is_set():
        now_ns = time.time_ns()
        commands = [
            ("PUBLISH", names[k], fanout.payload(k, seq + k, now_ns, streams))
            for k in range(streams)
        ]
        conn.send_packed_command(conn.pack_commands(commands))
        for _ in commands:
            conn.read_response()
        seq += streams
        next_tick += tick
        delay = next_tick - time.monotonic()
        if delay > 0:
            stop.wait(delay)
        else:
            next_tick = time.monotonic()
    out.send(seq)
    out.close()
    client.connection_pool.release(conn)
    client.close()


# --- clients -------------------------------------------------------------------

WAITING, UPGRADED, SERVED, FAILED = 0, 1, 2, 3


class StormClient(asyncio.Protocol):
    """One client: upgrade request, on the 101 the subscribe frame, then
    waits for the first message.  Times are ``time.monotonic()`` (the same
    clock in every process)."""

    __slots__ = (
        "request",
        "subscribe",
        "transport",
        "head",
        "state",
        "t_connected",
        "t_upgraded",
        "t_served",
        "status",
        "error",
        "done",
        "delays",
    )

    def __init__(
        self, request: bytes, subscribe: bytes, done: Any, delays: collections.Counter
    ) -> None:
        self.request = request
        self.subscribe = subscribe
        self.transport: Any = None
        self.head = b""
        self.state = WAITING
        self.t_connected = self.t_upgraded = self.t_served = None
        self.status: int | None = None
        self.error: str | None = None
        self.done = done
        self.delays = delays

    def connection_made(self, transport: Any) -> None:
        self.t_connected = time.monotonic()
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.state == SERVED:
            # A served client's live delivery during the storm: the age of
            # the oldest message of this read (its publisher's "E"), in ms.
            at = data.find(b'"E":')
            if at >= 0:
                try:
                    sent = int(data[at + 4 : at + 23])
                except ValueError:
                    return
                self.delays[(time.time_ns() - sent) // 1_000_000] += 1
            return
        if self.state == WAITING:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            try:
                self.status = int(self.head[9:12])
            except ValueError:
                self.status = -1
            if self.status != 101:
                self._finish(FAILED, "refused")
                self.transport.close()
                return
            self.t_upgraded = time.monotonic()
            self.state = UPGRADED
            self.transport.write(self.subscribe)
            data = self.head[end + 4 :]
            self.head = b""
            if not data:
                return
        if self.state == UPGRADED and b'"stream"' in data:
            self.t_served = time.monotonic()
            self._finish(SERVED)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state in (WAITING, UPGRADED):
            self._finish(FAILED, "closed before served: %s" % (exc or "by the server"))

    def _finish(self, state: int, error: str | None = None) -> None:
        self.state = state
        self.error = error
        self.done()


def client_process(
    host: str, port: int, plans: list[tuple[bytes, bytes]], timeout: float, control: Any
) -> None:
    """Open every planned connection when told to, report per-client times,
    hold the connections until told to close them."""
    raise_fd_limit()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_clients(host, port, plans, timeout, control))


async def _clients(
    host: str, port: int, plans: list[tuple[bytes, bytes]], timeout: float, control: Any
) -> None:
    loop = asyncio.get_running_loop()
    remaining = len(plans)
    all_done = loop.create_future()

    def done() -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0 and not all_done.done():
            all_done.set_result(None)

    delays: collections.Counter = collections.Counter()
    clients = [StormClient(request, subscribe, done, delays) for request, subscribe in plans]
    if not clients:
        all_done.set_result(None)

    async def connect(client: StormClient) -> None:
        try:
            await loop.create_connection(lambda: client, host, port)
        except (OSError, asyncio.CancelledError) as exc:
            if client.state == WAITING:
                client._finish(FAILED, "connect: %s" % (exc.__class__.__name__,))

    commands: asyncio.Queue[str] = asyncio.Queue()
    loop.add_reader(control.fileno(), lambda: commands.put_nowait(control.recv()))
    control.send("ready")
    await commands.get()  # "go"
    start = time.monotonic()
    tasks = [loop.create_task(connect(client)) for client in clients]
    try:
        await asyncio.wait_for(asyncio.shield(all_done), timeout)
    except asyncio.TimeoutError:
        pass
    for task in tasks:
        if not task.done():
            task.cancel()
    for client in clients:
        if client.state in (WAITING, UPGRADED):
            client.state = FAILED
            client.error = "not served within %gs" % timeout
    control.send(
        (
            start,
            [(c.t_connected, c.t_upgraded, c.t_served, c.status, c.error) for c in clients],
            dict(delays),
        )
    )
    await commands.get()  # "close"
    linger = struct.pack("ii", 1, 0)
    for client in clients:
        if client.transport is not None:
            # A reset leaves no TIME_WAIT behind: 10,000 of those would hold
            # a third of the ephemeral ports for a minute and slow down the
            # connects of the next run.
            sock = client.transport.get_extra_info("socket")
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            except (OSError, AttributeError):
                pass
            client.transport.close()
    await asyncio.sleep(0.1)
    control.send("closed")


class Clients:
    """The client processes and their control pipes."""

    def __init__(self, host: str, port: int, args: argparse.Namespace) -> None:
        plans: list[list[tuple[bytes, bytes]]] = [[] for _ in range(args.client_processes)]
        request = handshake_request(port, args.path, host=host)
        for c in range(args.connections):
            if args.token:
                request = handshake_request(
                    port, args.path, host=host, headers={"Authorization": "Bearer " + _token(c)}
                )
            names = [
                fanout.stream_name(k)
                for k in fanout.connection_streams(c, args.per_conn, args.streams)
            ]
            subscribe = masked_frame(
                json.dumps(
                    {"method": "SUBSCRIBE", "params": names, "id": c + 1}, separators=(",", ":")
                )
            )
            plans[c % args.client_processes].append((request, subscribe))
        ctx = multiprocessing.get_context("fork")
        self.children: list[tuple[Any, Any]] = []
        for part in plans:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=client_process, args=(host, port, part, args.timeout, child), daemon=True
            )
            proc.start()
            child.close()
            self.children.append((proc, parent))
        for _, pipe in self.children:
            if not pipe.poll(30) or pipe.recv() != "ready":
                raise RuntimeError("a client process did not start")

    def cpu(self) -> float:
        total = 0.0
        for proc, _ in self.children:
            try:
                times = psutil.Process(proc.pid).cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def go(self) -> None:
        for _, pipe in self.children:
            pipe.send("go")

    def results(self, timeout: float) -> list[tuple[float, list[tuple], dict[int, int]]]:
        out = []
        for _, pipe in self.children:
            if not pipe.poll(timeout + 30):
                raise RuntimeError("a client process did not report")
            out.append(pipe.recv())
        return out

    def close(self) -> None:
        for _, pipe in self.children:
            pipe.send("close")
        for proc, pipe in self.children:
            pipe.poll(30)
            proc.join(10)

    def kill(self) -> None:
        for proc, _ in self.children:
            if proc.is_alive():
                proc.kill()


# --- servers -------------------------------------------------------------------


def server_command(args: argparse.Namespace, host: str, port: int, redis_url: str) -> list[str]:
    if args.reference:
        return [
            sys.executable,
            fanout.REFERENCE_SERVER,
            "--listen",
            "%s:%d" % (host, port),
            "--redis-url",
            redis_url,
            "--backlog",
            str(args.reference_backlog),
        ]
    token = ["auth.jwt_key=" + TOKEN_SECRET] if args.token else []
    return marketstream_command(
        port,
        redis_url,
        args.set + token,
        host=host,
        processes=args.processes,
        clients=args.connections,  # every client has one address
    )


#: The HS256 secret of ``--token`` runs.
TOKEN_SECRET = "bench-storm-secret-of-at-least-32-bytes"


def _token(number: int) -> str:
    """Client ``number``'s token: ``sub`` its number, valid for an hour."""
    import jwt

    return jwt.encode(
        {"sub": str(number), "exp": int(time.time()) + 3600}, TOKEN_SECRET, algorithm="HS256"
    )


def shipped_nginx_backlog() -> int | None:
    """The listen backlog conf/nginx.conf ships (None: nginx's default)."""
    with open(os.path.join(ROOT, "conf", "nginx.conf")) as f:
        found = re.search(r"^    listen 80 default_server backlog=(\d+);$", f.read(), re.M)
    return int(found.group(1)) if found else None


def nginx_site(upstream_port: int, listen_port: int, backlog: int | None) -> str:
    """The shipped site (conf/nginx.conf) with this run's upstream and listen
    address, and ``backlog`` if given (0: none, nginx's default)."""
    with open(os.path.join(ROOT, "conf", "nginx.conf")) as f:
        site = f.read()
    site, count = re.subn(
        r"(    server 127\.0\.0\.1:\d+;\n)+", "    server 127.0.0.1:%d;\n" % upstream_port, site
    )
    if count != 1:
        raise RuntimeError("conf/nginx.conf: no upstream server lines found")

    def listen(match: re.Match) -> str:
        shipped = match.group(1) or ""
        option = shipped if backlog is None else " backlog=%d" % backlog if backlog else ""
        return "    listen 127.0.0.1:%d default_server%s;" % (listen_port, option)

    site, count = re.subn(
        r"^    listen 80 default_server( backlog=\d+)?;$", listen, site, flags=re.M
    )
    if count != 1:
        raise RuntimeError("conf/nginx.conf: no 'listen 80 default_server;' line found")
    return site


def start_nginx(
    args: argparse.Namespace, upstream_port: int, pin: bool
) -> tuple[subprocess.Popen, int, str]:
    """nginx in a private prefix; ``(process, port, error log path)``."""
    if NGINX is None:
        raise RuntimeError("--nginx: nginx is not installed")
    prefix = tempfile.mkdtemp(prefix="marketstream-storm-nginx-")
    for sub in ("logs", "tmp"):
        os.makedirs(os.path.join(prefix, sub), exist_ok=True)
    port = free_port()
    # Each client holds two descriptors in nginx (its own and the upstream
    # one); a worker may hold no more than the open-file hard limit, which
    # nginx cannot raise without the privilege to.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    per_worker = hard - 100 if hard != resource.RLIM_INFINITY else 4 * args.connections
    needed = -(-(2 * args.connections + 200) // per_worker)
    workers = max(args.nginx_workers, needed)
    if workers > args.nginx_workers:
        log("nginx: %d workers (%d descriptors each at most)" % (workers, per_worker))
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        if os.geteuid() == 0:
            f.write("user root;\n")
        f.write(
            "worker_processes %d;\nworker_rlimit_nofile %d;\npid %s/nginx.pid;\n"
            "error_log %s/logs/error.log warn;\nevents { worker_connections %d; }\nhttp {\n"
            "  access_log off;\n  client_body_temp_path %s/tmp;\n  proxy_temp_path %s/tmp;\n"
            % (workers, per_worker + 50, prefix, prefix, per_worker, prefix, prefix)
        )
        f.write(nginx_site(upstream_port, port, args.nginx_backlog))
        f.write("\n}\n")
    command = [NGINX, "-p", prefix, "-c", conf, "-g", "daemon off;"]
    if pin:
        command = ["taskset", "-c", args.load_cpu] + command
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
    )
    return proc, port, os.path.join(prefix, "logs", "error.log")


def _wait_health(host: str, port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            health(port, host)
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("%s did not start" % what) from None
            time.sleep(0.05)


# --- profile ---------------------------------------------------------------------


def profile_summary(path: str, top: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Top functions of a py-spy ``--format raw`` file: by own samples
    (``self``) and by samples with the function on the stack (``total``),
    as percentages of all samples."""
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    samples = 0
    with open(path, errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            samples += n
            frames = [re.sub(r" \(.*?/([^/]+:\d+)\)$", r" (\1)", fr) for fr in stack.split(";")]
            names = [re.sub(r":\d+\)$", ")", fr) for fr in frames]
            own[names[-1]] += n
            for name in set(names):
                total[name] += n
    if not samples:
        return {"self": [], "total": []}
    return {
        "samples": samples,
        "self": [(name, round(100.0 * n / samples, 1)) for name, n in own.most_common(top)],
        "total": [(name, round(100.0 * n / samples, 1)) for name, n in total.most_common(top)],
    }


#: What the server's samples were doing, by the frames on their stack (the
#: first kind that matches, in this order): token checks and session
#: bookkeeping, handshakes (accepting, reading the request, the 101),
#: clients' frames (their SUBSCRIBEs), live delivery (Redis to the sockets).
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("auth", ("auth.py:", "tokens.py:", "api_jwt.py:", "api_jws.py:")),
    ("handshake", ("accept.py:", "upgrade.py:", "handshake.py:")),
    ("client_frames", ("websocket.py:WebSocketProtocol13._receive_frame_loop",)),
    (
        "delivery",
        (
            "channels.py:ChannelManager._flush",
            "delivery.py:",
            "link.py:",
            "core.py:Core.on_message",
        ),
    ),
)


def _phase(stack: list[str]) -> str:
    for name, prefixes in PHASES:
        for frame in stack:
            if frame.startswith(prefixes):
                return name
    return "other"


def phases_per_second(path: str, offset: float) -> dict[str, Any]:
    """Per second of the storm, the share of it the server spent in each of
    :data:`PHASES` (percent; ``busy`` is their sum), from a py-spy
    ``chrometrace`` file whose clock started ``offset`` seconds before the
    storm; and the seconds of each over the storm."""
    with open(path) as f:
        events = json.load(f)
    per: collections.defaultdict[int, collections.Counter] = collections.defaultdict(
        collections.Counter
    )
    stack: list[str] = []
    previous: float | None = None
    for ts, group in itertools.groupby(events, key=lambda event: event["ts"]):
        if previous is not None and stack:
            at = previous / 1e6 - offset
            if at >= 0:  # each sample's stack lasts until the next (at most 0.1 s)
                per[int(at)][_phase(stack)] += min(ts - previous, 100_000) / 1e6
        for event in group:
            if event["ph"] == "B":
                name = os.path.basename(event["args"].get("filename", "")) + ":" + event["name"]
                stack.append(name)
            elif stack:
                stack.pop()
        previous = ts
    names = [name for name, _ in PHASES] + ["other"]
    rows = []
    total: collections.Counter = collections.Counter()
    for second in sorted(per):
        spent = per[second]
        total.update(spent)
        row: dict[str, Any] = {"second": second, "busy": round(100 * sum(spent.values()))}
        row.update((name, round(100 * spent[name])) for name in names)
        rows.append(row)
    return {"per_second_percent": rows, "seconds": {n: round(total[n], 2) for n in names}}


# --- one run -----------------------------------------------------------------------


def histogram_quantile(counts: collections.Counter, q: float) -> int | None:
    """The ``q`` quantile (0..1) of a histogram {value: count}; None if empty."""
    total = sum(counts.values())
    if not total:
        return None
    rank = min(total - 1, int(q * total))
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        if seen > rank:
            return value
    return None


def per_second(times: list[float]) -> list[int]:
    """How many of ``times`` (seconds) fall in each second from 0."""
    counts = [0] * (int(max(times, default=0)) + 1)
    for t in times:
        counts[int(t)] += 1
    return counts


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One storm; its figures."""
    hard = raise_fd_limit()
    if args.connections + 1000 > hard:
        log("warning: open-file limit %d is low for %d connections" % (hard, args.connections))
    can_pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1
    if can_pin:
        os.sched_setaffinity(0, {int(c) for c in args.load_cpu.split(",")})
    redis_server = server = nginx = publishing = clients = spy = None
    stop = multiprocessing.get_context("spawn").Event()
    workdir = tempfile.mkdtemp(prefix="marketstream-storm-")
    server_log = os.path.join(workdir, "server.log")
    try:
        tw_at_start = wait_time_wait(args.time_wait_limit, 75.0)
        machine = {
            "load_average_1min": round(os.getloadavg()[0], 2),
            "tcp_sockets_in_use": sockstat("inuse"),
        }
        redis_server = RedisServer().start()
        host, port = "127.0.0.1", free_port()
        command = server_command(args, host, port, redis_server.url)
        if can_pin:
            command = ["taskset", "-c", args.server_cpu] + command
        with open(server_log, "wb") as out:
            server = subprocess.Popen(
                command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )
        _wait_health(host, port, server, "the server")
        target_port, nginx_log = port, None
        if args.nginx:
            nginx, target_port, nginx_log = start_nginx(args, port, can_pin)
            _wait_health(host, target_port, nginx, "nginx")
        proc = psutil.Process(server.pid)
        nginx_proc = psutil.Process(nginx.pid) if nginx else None

        pipe_out, pipe_in = multiprocessing.Pipe(duplex=False)
        publishing = multiprocessing.get_context("spawn").Process(
            target=publisher, args=(redis_server.url, args.streams, args.tick, stop, pipe_in)
        )
        publishing.start()
        pipe_in.close()

        clients = Clients(host, target_port, args)
        time.sleep(args.settle)
        rss_before = tree_rss(proc)
        nginx_rss_before = tree_rss(nginx_proc) if nginx_proc else None
        if args.py_spy:
            spy = subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "--pid",
                    str(server.pid),
                    "--rate",
                    "250",
                    "--format",
                    "chrometrace" if args.py_spy.endswith(".json") else "raw",
                    "--nonblocking",
                    "--subprocesses",
                    "-o",
                    args.py_spy,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            spy_started = time.monotonic()
            time.sleep(1.0)  # attached
        counters_before = netstat()
        cpu_before = tree_cpu(proc)
        clients_cpu_before = clients.cpu()
        nginx_cpu_before = tree_cpu(nginx_proc) if nginx_proc else None
        log("storm: %d clients from %d processes" % (args.connections, args.client_processes))
        clients.go()
        reports = clients.results(args.timeout)
        storm_end = time.monotonic()
        cpu_storm = tree_cpu(proc) - cpu_before
        clients_cpu = clients.cpu() - clients_cpu_before
        nginx_cpu = tree_cpu(nginx_proc) - nginx_cpu_before if nginx_proc else None
        counters_after = netstat()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()

        start = min(report[0] for report in reports)
        connected, upgraded, served = [], [], []
        statuses: collections.Counter = collections.Counter()
        errors: collections.Counter = collections.Counter()
        late_connects = 0
        delays: collections.Counter = collections.Counter()
        for t0, rows, delayed in reports:
            delays.update(delayed)
            for t_conn, t_up, t_served, status, error in rows:
                if t_conn is not None:
                    connected.append(t_conn - start)
                    late_connects += t_conn - t0 >= 1.0
                if t_up is not None:
                    upgraded.append(t_up - start)
                if t_served is not None:
                    served.append(t_served - start)
                if status is not None:
                    statuses[status] += 1
                if error and error != "refused":
                    errors[error] += 1
        refused = sum(n for status, n in statuses.items() if status != 101)

        stop.set()
        published = pipe_out.recv() if pipe_out.poll(10) else None
        publishing.join(10)
        time.sleep(args.idle_wait)
        rss_after = tree_rss(proc)
        nginx_rss_after = tree_rss(nginx_proc) if nginx_proc else None
        # A loaded machine may take a while to answer (the default is 2 s).
        health_body = health(port, host, timeout=30) if not args.reference else {}
        open_now = health_body.get("connections")
        if args.processes > 1 and not args.reference:
            open_now = fanout.worker_connections(host, port, args.processes)

        lines = log_lines(server_log)
        error_lines = [line for line in lines if re.search(r"\b(ERROR|CRITICAL)\b|Traceback", line)]
        nginx_levels: collections.Counter = collections.Counter()
        nginx_lines = log_lines(nginx_log) if nginx_log else []
        for line in nginx_lines:
            match = re.search(r"\[(\w+)\]", line)
            nginx_levels[match.group(1) if match else "?"] += 1

        def secs(values: list[float], q: float | None = None) -> float | None:
            if not values:
                return None
            return round(max(values) if q is None else percentile(values, q), 3)

        n = args.connections
        figures: dict[str, Any] = {
            "server": "reference" if args.reference else "marketstream",
            "processes": None if args.reference else args.processes,
            "nginx": bool(args.nginx),
            "nginx_backlog": (
                None
                if not args.nginx
                else args.nginx_backlog
                if args.nginx_backlog is not None
                else shipped_nginx_backlog()
            ),
            "connections": n,
            "streams": args.streams,
            "per_conn": args.per_conn,
            "tick": args.tick,
            "client_processes": args.client_processes,
            "server_cpus": args.server_cpu if can_pin else None,
            "load_cpus": args.load_cpu if can_pin else None,
            "server_settings": None if args.reference else args.set,
            "token": bool(args.token),
            "served": len(served),
            "served_within_target": sum(1 for t in served if t <= args.target),
            "served_seconds_p50": secs(served, 0.5),
            "served_seconds_p99": secs(served, 0.99),
            "served_seconds_max": secs(served),
            # Live messages to the clients already served, while the others
            # still connect: milliseconds from publishing to the client.
            "live_reads_during_storm": sum(delays.values()),
            "live_delay_ms_p50": histogram_quantile(delays, 0.5),
            "live_delay_ms_p99": histogram_quantile(delays, 0.99),
            "live_delay_ms_max": max(delays, default=None),
            "upgraded_seconds_p50": secs(upgraded, 0.5),
            "upgraded_seconds_p99": secs(upgraded, 0.99),
            "upgraded_seconds_max": secs(upgraded),
            "connected_seconds_p50": secs(connected, 0.5),
            "connected_seconds_p99": secs(connected, 0.99),
            "connected_seconds_max": secs(connected),
            "connects_after_1s": late_connects,
            "refused": refused,
            "refused_by_status": {str(k): v for k, v in statuses.items() if k != 101},
            "failed": sum(errors.values()),
            "failures": dict(errors.most_common(5)),
            "netstat": {
                key: counters_after.get(key, 0) - counters_before.get(key, 0)
                for key in NETSTAT_KEYS
                if key in counters_after
            },
            "server_log_lines": len(lines),
            "server_error_lines": len(error_lines),
            "server_log_sample": lines[:5],
            "nginx_error_log": dict(nginx_levels) if args.nginx else None,
            "nginx_error_log_sample": nginx_lines[:5] if args.nginx else None,
            "storm_seconds": round(storm_end - start, 3),
            "time_wait_at_start": tw_at_start,
            "machine_at_start": machine,
            # Clients per second of the storm (TCP connected, 101 received,
            # served): the waves of retransmissions show here.
            "connected_per_second": per_second(connected),
            "upgraded_per_second": per_second(upgraded),
            "served_per_second": per_second(served),
            "server_cpu_seconds_storm": round(cpu_storm, 2),
            "clients_cpu_seconds_storm": round(clients_cpu, 2),
            "nginx_cpu_seconds_storm": round(nginx_cpu, 2) if nginx_cpu is not None else None,
            "published": published,
            "open_connections_after": open_now,
            "rss_before_mb": round(rss_before / 2**20, 1),
            "rss_idle_after_mb": round(rss_after / 2**20, 1),
            "rss_per_connection_kb": round((rss_after - rss_before) / n / 1024, 2),
        }
        if nginx_proc:
            figures["nginx_rss_per_connection_kb"] = round(
                (nginx_rss_after - nginx_rss_before) / n / 1024, 2
            )
        if args.py_spy and args.py_spy.endswith(".json"):
            figures["phases"] = phases_per_second(args.py_spy, start - spy_started)
        elif args.py_spy:
            figures["profile"] = profile_summary(args.py_spy)
        clients.close()
        clients = None
        return figures
    finally:
        stop.set()
        if spy is not None and spy.poll() is None:
            spy.kill()
        if clients is not None:
            clients.kill()
        if publishing is not None and publishing.is_alive():
            publishing.join(5)
            if publishing.is_alive():
                publishing.kill()
        stop_process(nginx)
        stop_process(server)
        if redis_server is not None:
            redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --- output ------------------------------------------------------------------------

MEDIAN_KEYS = (
    "served",
    "served_seconds_p50",
    "served_seconds_p99",
    "served_seconds_max",
    "live_delay_ms_p99",
    "live_delay_ms_max",
    "upgraded_seconds_max",
    "connected_seconds_max",
    "connects_after_1s",
    "refused",
    "failed",
    "server_error_lines",
    "server_cpu_seconds_storm",
    "clients_cpu_seconds_storm",
    "nginx_cpu_seconds_storm",
    "rss_per_connection_kb",
    "nginx_rss_per_connection_kb",
)


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure of MEDIAN_KEYS and of each netstat counter."""
    out: dict[str, Any] = {}
    for key in MEDIAN_KEYS:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        out[key] = round(statistics.median(values), 3) if values else None
    out["netstat"] = {
        key: round(statistics.median(r["netstat"].get(key, 0) for r in runs), 1)
        for key in runs[0]["netstat"]
    }
    return out


#: The figures ``--token-compare`` divides, token run over anonymous run.
RATIO_KEYS = (
    "served_seconds_max",
    "upgraded_seconds_max",
    "server_cpu_seconds_storm",
    "clients_cpu_seconds_storm",
)


def token_ratios(anonymous: dict[str, Any], token: dict[str, Any]) -> dict[str, float | None]:
    """Each figure of RATIO_KEYS of the token runs' medians over the
    anonymous runs' (None where either is missing or zero)."""
    out: dict[str, float | None] = {}
    for key in RATIO_KEYS:
        a, t = anonymous.get(key), token.get(key)
        out[key] = round(t / a, 2) if a and t is not None else None
    return out


def text(figures: dict[str, Any]) -> str:
    width = max(len(key) for key in figures)
    return "\n".join("%-*s  %s" % (width, key, value) for key, value in figures.items())


def build_parser() -> argparse.ArgumentParser:
    """The command line (every option shows its default in ``--help``)."""
    parser = argparse.ArgumentParser(
        description="Connect-storm benchmark: N clients connect and subscribe at once.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    load = parser.add_argument_group("load")
    load.add_argument("--connections", type=int, default=10000, help="clients that connect at once")
    load.add_argument("--streams", type=int, default=100, help="K streams in all")
    load.add_argument(
        "--per-conn",
        type=int,
        default=1,
        help="S streams per client (client c gets streams (c*S+j) %% K)",
    )
    load.add_argument(
        "--tick",
        type=float,
        default=0.1,
        help="seconds between two messages on each stream (what a served "
        "client may wait for its first message)",
    )
    load.add_argument(
        "--client-processes",
        type=int,
        default=4,
        help="client processes (asyncio each) sharing the connections",
    )
    load.add_argument("--path", default="/ws", help="WebSocket path")
    load.add_argument(
        "--target",
        type=float,
        default=3.0,
        help="seconds: served_within_target counts the clients served by then",
    )
    load.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds after which an unserved client counts as failed",
    )
    load.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds between starting the clients' processes and the storm",
    )
    load.add_argument(
        "--idle-wait",
        type=float,
        default=2.0,
        help="seconds without publishing before the idle memory is measured",
    )
    load.add_argument(
        "--time-wait-limit",
        type=int,
        default=2000,
        help="before a run, wait (up to 75 s) until fewer sockets than this are "
        "in TIME_WAIT on the machine (a run through nginx leaves one per "
        "client)",
    )
    servers = parser.add_argument_group("server")
    servers.add_argument("--processes", type=int, default=1, help="marketstream worker processes")
    servers.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a marketstream setting (repeatable)",
    )
    servers.add_argument(
        "--reference",
        action="store_true",
        help="run scripts/reference_server.py instead of marketstream",
    )
    servers.add_argument(
        "--compare",
        action="store_true",
        help="run marketstream and the reference server alternately, "
        "--repeat times each, and give the medians of each",
    )
    servers.add_argument(
        "--token",
        action="store_true",
        help="the server checks JWTs ([auth] jwt_key, HS256); every client sends one",
    )
    servers.add_argument(
        "--token-compare",
        action="store_true",
        help="run anonymous and --token storms alternately, --repeat times each, "
        "and give the medians of each",
    )
    servers.add_argument(
        "--reference-backlog",
        type=int,
        default=65535,
        help="the reference server's listen backlog (the kernel caps it at net.core.somaxconn)",
    )
    servers.add_argument(
        "--nginx",
        action="store_true",
        help="put nginx (the conf/nginx.conf site) in front of the server",
    )
    servers.add_argument(
        "--nginx-workers",
        type=int,
        default=1,
        help="nginx worker_processes (more when one worker's open-file "
        "limit cannot hold two descriptors per client)",
    )
    servers.add_argument(
        "--nginx-backlog",
        type=int,
        default=None,
        help="nginx's listen backlog (default: the shipped conf/nginx.conf's; "
        "0: nginx's own default, 511 on Linux)",
    )
    servers.add_argument(
        "--py-spy",
        metavar="FILE",
        help="record the server with py-spy during the storm and add a summary "
        "of where its time went (FILE ending in .json: a chrometrace, and "
        "the share of each second spent on tokens, handshakes, clients' "
        "frames and delivery)",
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
        help="CPU list for the clients, Redis, the publisher and nginx",
    )
    pinning.add_argument("--no-pin", action="store_true", help="pin nothing")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs; with more than one, the medians are added"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the storm ``--repeat`` times; print the figures (and medians)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.connections, args.streams, args.per_conn, args.client_processes, args.repeat) < 1:
        parser.error(
            "--connections, --streams, --per-conn, --client-processes and --repeat "
            "must be at least 1"
        )
    if args.reference and args.processes != 1:
        parser.error("--processes is marketstream's: not with --reference")
    if args.reference and args.compare:
        parser.error("--compare runs both servers: not with --reference")
    if args.token_compare and (args.compare or args.reference):
        parser.error("--token-compare runs marketstream twice: not with --compare or --reference")

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # clean up: servers, nginx, clients, redis-server

    signal.signal(signal.SIGTERM, interrupted)
    variants = (
        [("marketstream", False), ("reference", True)]
        if args.compare
        else [("reference" if args.reference else "marketstream", args.reference)]
    )
    if args.token_compare:
        variants = [("anonymous", False), ("token", False)]
    by_variant: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in variants}
    try:
        for i in range(args.repeat):
            # Alternate the order so a drift of the machine hits both alike.
            for label, reference in variants if i % 2 == 0 else variants[::-1]:
                log("--- run %d/%d: %s" % (i + 1, args.repeat, label))
                token = args.token or label == "token"
                figures = run(
                    argparse.Namespace(**dict(vars(args), reference=reference, token=token))
                )
                log(
                    "served %d/%d, last after %ss, refused %d, failed %d"
                    % (
                        figures["served"],
                        args.connections,
                        figures["served_seconds_max"],
                        figures["refused"],
                        figures["failed"],
                    )
                )
                by_variant[label].append(figures)
    except KeyboardInterrupt:
        return 130
    if args.compare or args.token_compare:
        output: dict[str, Any] = {
            label: {"runs": found, "medians": medians(found)} for label, found in by_variant.items()
        }
        ratios = (
            token_ratios(output["anonymous"]["medians"], output["token"]["medians"])
            if args.token_compare
            else None
        )
        if args.json:
            if ratios is not None:
                output["token_over_anonymous"] = ratios
            print(json.dumps(output))
        else:
            for label, found in output.items():
                print(
                    "=== %s: medians of %d runs\n%s" % (label, args.repeat, text(found["medians"]))
                )
            if ratios is not None:
                print("=== token / anonymous (medians; the target: served_seconds_max <= 1.3)")
                print(text(ratios))
        return 0
    runs = by_variant[variants[0][0]]
    if args.repeat == 1:
        print(json.dumps(runs[0]) if args.json else text(runs[0]))
    else:
        output = {"runs": runs, "medians": medians(runs)}
        if args.json:
            print(json.dumps(output))
        else:
            for i, figures in enumerate(runs):
                print("--- run %d\n%s" % (i + 1, text(figures)))
            print("--- medians of %d runs\n%s" % (args.repeat, text(output["medians"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
