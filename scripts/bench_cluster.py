#!/usr/bin/env python3
"""Fan-out benchmark on a Redis Cluster: how the load spreads over the shards.

Starts a Redis Cluster of ``--primaries`` primaries with ``--replicas``
replicas each (``redis-server`` >= 7 and ``redis-cli --cluster create``;
Debian's ``redis-server`` package), a marketstream server on its
``redis+cluster://`` URL, and N WebSocket connections, connection ``c``
subscribed to the S streams ``(c*S + j) % K`` of K streams (the streams'
slots fall on every shard).  It publishes R messages/s for D seconds with
``SPUBLISH`` of plain envelopes, straight to the primary that owns each
stream's slot (or, ``--recoverable``, through
:class:`marketstream.publisher.Publisher`, whose Lua script SPUBLISHes),
and prints, per shard:

* the slots and the benchmark's streams it owns;
* ``PUBSUB SHARDCHANNELS`` (channels subscribed there) and the lowest
  ``PUBSUB SHARDNUMSUB`` of its streams (1: the server's one link);
* messages published to it (counted by the publisher, and ``INFO
  commandstats`` SPUBLISH calls on the primary);
* messages the server received from it (``/health``: ``redis.nodes``);
* deliveries expected and received (the Python receiver counts every frame
  per stream), and the loss;

then totals, loss and publish-to-receive latency p50/p99.  The server is
pinned to ``--server-cpu`` and everything else (the cluster, the publisher,
the receivers, this script) to ``--load-cpu``, as in
``scripts/bench_fanout.py``, whose helpers this script uses.

Standard runs::

    python scripts/bench_cluster.py                       # 1000 connections, 1000 streams, 10 each
    python scripts/bench_cluster.py --recoverable --json
    python scripts/bench_cluster.py --receiver wsblast --rate 20000   # totals; per shard: expected

With ``--receiver wsblast`` (the C receiver of ``bench_fanout``) only the
total of deliveries is measured; the per-shard deliveries are then the
expected ones and marked so.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import time
from typing import Any

import psutil
import redis

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_fanout as fanout  # noqa: E402  (puts the project root on sys.path)

from marketstream.upstream.cluster import key_slot  # noqa: E402
from marketstream.testing import (  # noqa: E402
    free_port,
    handshake,
    handshake_request,
    health,
    masked_frame,
    percentile,
    raise_fd_limit,
    stop_process,
    tree_cpu,
)
from tests.redis_topology import Cluster, find_redis7  # noqa: E402

log = fanout.log

STREAM_RE = re.compile(rb'"stream":"trade\.SYM(\d+)_USDC"')
TAIL = 40  # longer than any STREAM_RE match: a match cut by a read is completed by the next
E_RE = re.compile(rb'"E":(\d{19})')


# --- the cluster ---------------------------------------------------------------


def start_cluster(primaries: int, replicas: int) -> Cluster:
    """A settled cluster on loopback ports (started over on new ports when
    a port picked as free was taken before the node bound it)."""
    server, cli = find_redis7()
    if server is None:
        raise RuntimeError(cli)
    for attempt in range(3):
        cluster = Cluster(server, cli, primaries=primaries, replicas=replicas)
        try:
            return cluster.start()
        except BaseException as exc:
            cluster.stop()
            if attempt == 2 or "Address already in use" not in str(exc):
                raise
    raise AssertionError("unreachable")


def shard_map(cluster: Cluster, streams: int) -> tuple[list[Any], list[int], dict[Any, list]]:
    """``(primaries, owner index of each stream, {primary: slot ranges})``."""
    ranges = cluster.primaries()
    nodes = sorted(ranges, key=lambda n: min(r[0] for r in ranges[n]))
    owner = []
    for k in range(streams):
        slot = key_slot(fanout.stream_name(k))
        owner.append(
            next(i for i, n in enumerate(nodes) if any(a <= slot <= b for a, b in ranges[n]))
        )
    return nodes, owner, ranges


# --- publisher -------------------------------------------------------------------


def publisher(
    url: str,
    addrs: list[tuple[str, int]],
    owner: list[int],
    rate: float,
    duration: float,
    streams: int,
    recoverable: bool,
    out: Any,
) -> None:
    """Publish ``rate`` messages/s for ``duration`` s; send ``(sent, elapsed,
    per-shard sent)`` to ``out``.  Plain: pipelines of SPUBLISH, one per
    primary; recoverable: :class:`~marketstream.publisher.Publisher`."""
    names = fanout.stream_names(streams)
    per_shard = [0] * len(addrs)
    conns = []
    clients = []
    pub = None
    if recoverable:
        from marketstream.publisher import Publisher

        pub = Publisher(url, history=1000, ttl=600)
    else:
        for host, port in addrs:
            client = redis.Redis(host=host, port=port)
            clients.append(client)
            conns.append(client.connection_pool.get_connection())
    start = time.monotonic()
    sent = 0
    for sent, due in fanout.paced(rate, duration):
        now_ns = time.time_ns()
        for seq in range(sent, due):
            per_shard[owner[seq % streams]] += 1
        if pub is not None:
            pub.publish_many(
                [
                    (
                        names[seq % streams],
                        fanout.recoverable_data(seq % streams, seq, now_ns, streams),
                    )
                    for seq in range(sent, due)
                ]
            )
        else:
            batches: list[list[tuple[str, str, str]]] = [[] for _ in addrs]
            for seq in range(sent, due):
                k = seq % streams
                batches[owner[k]].append(
                    ("SPUBLISH", names[k], fanout.payload(k, seq, now_ns, streams))
                )
            for conn, commands in zip(conns, batches):
                if commands:
                    conn.send_packed_command(conn.pack_commands(commands))
            for conn, commands in zip(conns, batches):
                for _ in commands:
                    conn.read_response()
        sent = due
    out.send((sent, time.monotonic() - start, per_shard))
    out.close()
    if pub is not None:
        pub.close()
    for client, conn in zip(clients, conns):
        client.connection_pool.release(conn)
        client.close()


# --- receiver: every frame counted per stream ------------------------------------


class StreamCounter(asyncio.Protocol):
    """Counts frames per stream (by their ``"stream"`` field) and samples the
    latency of the first frame of each read."""

    counts: collections.Counter = collections.Counter()
    samples: list[float] = []
    sampling = False

    def __init__(self) -> None:
        self.tail = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not StreamCounter.sampling:
            return
        buf = self.tail + data if self.tail else data
        found = STREAM_RE.findall(buf)
        if found:
            StreamCounter.counts.update(found)
        # Keep the end of the read that may begin a match cut by it, but
        # nothing of a match already counted.
        keep = len(buf) - TAIL
        for match in STREAM_RE.finditer(buf, max(0, keep - TAIL)):
            keep = max(keep, match.end())
        self.tail = buf[max(keep, 0) :]
        at = E_RE.search(data)
        if at is not None:
            StreamCounter.samples.append((time.time_ns() - int(at.group(1))) / 1e6)


def receiver_process(host: str, port: int, plans: list[tuple[bytes, bytes]], control: Any) -> None:
    """One receiver process: connect ``plans`` (handshake request, subscribe
    frame), then obey ``control``: ``mark``, ``count``, ``finish``."""
    raise_fd_limit()
    sockets = []
    try:
        for request, subscribe in plans:
            sock = handshake((host, port), request)
            sock.sendall(subscribe)
            sockets.append(sock)
    except Exception as exc:  # report, do not hang the parent
        control.send(("error", "%s after %d connections" % (exc, len(sockets))))
        return
    asyncio.run(_receive(sockets, control))


async def _receive(sockets: list[socket.socket], control: Any) -> None:
    loop = asyncio.get_running_loop()
    protocols = []
    for sock in sockets:
        sock.setblocking(False)
        _, protocol = await loop.create_connection(StreamCounter, sock=sock)
        protocols.append(protocol)
    done = loop.create_future()

    def on_command() -> None:
        command = control.recv()
        if command == "mark":
            StreamCounter.counts = collections.Counter()
            StreamCounter.samples = []
            StreamCounter.sampling = True
            control.send("ok")
        elif command == "count":
            control.send(sum(StreamCounter.counts.values()))
        elif command == "finish":
            StreamCounter.sampling = False
            counts = {int(k): v for k, v in StreamCounter.counts.items()}
            control.send((counts, StreamCounter.samples))
            if not done.done():
                done.set_result(None)

    loop.add_reader(control.fileno(), on_command)
    control.send("ready")
    await done
    for protocol in protocols:
        protocol.transport.close()


class StreamReceiver:
    """``--processes`` receiver processes, each counting frames per stream."""

    name = "python"

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.children: list[tuple[Any, Any]] = []

    async def connect(self, host: str, port: int, args: Any) -> None:
        plans: list[list[tuple[bytes, bytes]]] = [[] for _ in range(self.processes)]
        for c in range(args.connections):
            names = [
                fanout.stream_name(k)
                for k in fanout.connection_streams(c, args.per_conn, args.streams)
            ]
            subscribe = masked_frame(
                json.dumps(
                    {"method": "SUBSCRIBE", "params": names, "id": c + 1}, separators=(",", ":")
                )
            )
            plans[c % self.processes].append((handshake_request(port, host=host), subscribe))
        ctx = multiprocessing.get_context("fork")
        for part in plans:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=receiver_process, args=(host, port, part, child), daemon=True)
            proc.start()
            child.close()
            self.children.append((proc, parent))
        for _, pipe in self.children:
            reply = await self._recv(pipe, max(60, args.connections / 100))
            if reply != "ready":
                raise RuntimeError("receiver: %s" % (reply,))

    async def _recv(self, pipe: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not pipe.poll():
            if time.monotonic() > deadline:
                raise RuntimeError("a receiver process did not answer")
            await asyncio.sleep(0.005)
        return pipe.recv()

    async def _all(self, command: str, timeout: float = 30) -> list[Any]:
        for _, pipe in self.children:
            pipe.send(command)
        return [await self._recv(pipe, timeout) for _, pipe in self.children]

    async def mark(self) -> None:
        await self._all("mark")

    async def count(self) -> int:
        return sum(await self._all("count"))

    async def finish(self) -> dict[str, Any]:
        per_stream: collections.Counter = collections.Counter()
        samples: list[float] = []
        for counts, found in await self._all("finish"):
            per_stream.update(counts)
            samples.extend(found)
        for proc, _ in self.children:
            proc.join(10)
        return {
            "received": sum(per_stream.values()),
            "per_stream": dict(per_stream),
            "samples": len(samples),
            "p50": percentile(samples, 0.50),
            "p99": percentile(samples, 0.99),
            "max": max(samples) if samples else None,
        }

    def kill(self) -> None:
        for proc, _ in self.children:
            if proc.is_alive():
                proc.kill()


# --- one run ---------------------------------------------------------------------


def _info_calls(node: Any, command: str) -> int:
    stats = node.client().info("commandstats")
    return int(stats.get("cmdstat_%s" % command, {}).get("calls", 0))


def _health_nodes(host: str, port: int) -> dict[str, dict[str, Any]]:
    return health(port, host).get("redis", {}).get("nodes", {})


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """One benchmark run; its figures (``shards``: one dict per primary)."""
    hard = raise_fd_limit()
    if 2 * args.connections + 200 > hard:
        log("warning: open-file limit %d is low for %d connections" % (hard, args.connections))
    can_pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1
    if can_pin:
        os.sched_setaffinity(0, {int(c) for c in args.load_cpu.split(",")})
    cluster = server = receiver = None
    try:
        started = time.monotonic()
        cluster = start_cluster(args.primaries, args.replicas)
        log(
            "cluster of %d nodes settled in %.1fs"
            % (len(cluster.nodes), time.monotonic() - started)
        )
        nodes, owner, ranges = shard_map(cluster, args.streams)
        host, port = "127.0.0.1", free_port()
        server = fanout.start_server("marketstream", args, host, port, cluster.url, can_pin)
        proc = psutil.Process(server.pid)
        deadline = time.monotonic() + 30
        while True:
            try:
                health(port, host)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the marketstream server did not start") from None
                await asyncio.sleep(0.05)

        subscribers = [0] * args.streams
        for c in range(args.connections):
            for k in fanout.connection_streams(c, args.per_conn, args.streams):
                subscribers[k] += 1
        if args.receiver == "wsblast":
            binary = fanout.wsblast_binary()
            if binary is None:
                raise RuntimeError("--receiver wsblast needs a C compiler (cc)")
            receiver = fanout.BlastReceiver(binary, args.sampled)
        else:
            receiver = StreamReceiver(args.receiver_processes)
        began = time.monotonic()
        await receiver.connect(host, port, args)
        connect_seconds = time.monotonic() - began
        log("connected %d in %.2fs" % (args.connections, connect_seconds))

        # Every wanted stream subscribed on its shard.
        wanted: list[list[str]] = [[] for _ in nodes]
        for k in range(args.streams):
            if subscribers[k]:
                wanted[owner[k]].append(fanout.stream_name(k))
        numsub_min: list[int | None] = [None] * len(nodes)
        deadline = time.monotonic() + 60
        for i, node in enumerate(nodes):
            client = node.client()
            while True:
                counts = []
                for j in range(0, len(wanted[i]), 500):
                    reply = client.execute_command("PUBSUB", "SHARDNUMSUB", *wanted[i][j : j + 500])
                    counts += [int(n) for n in reply[1::2]]
                if all(counts):
                    numsub_min[i] = min(counts) if counts else None
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("streams not subscribed on %s" % node.label)
                await asyncio.sleep(0.05)
            client.close()
        await asyncio.sleep(0.5)

        for node in nodes:
            node.call("CONFIG", "RESETSTAT")
        health_before = _health_nodes(host, port)
        await receiver.mark()
        cpu_before = tree_cpu(proc)
        pipe_out, pipe_in = multiprocessing.Pipe(duplex=False)
        publishing = multiprocessing.get_context("spawn").Process(
            target=publisher,
            args=(
                cluster.url,
                [n.addr for n in nodes],
                owner,
                args.rate,
                args.duration,
                args.streams,
                args.recoverable,
                pipe_in,
            ),
        )
        publishing.start()
        pipe_in.close()
        t0 = next_report = time.monotonic()
        while not pipe_out.poll() and publishing.is_alive():
            await asyncio.sleep(0.02)
            if time.monotonic() < next_report + 1.0:
                continue
            next_report = time.monotonic()
            log("t=%4.1fs received %9d deliveries" % (next_report - t0, await receiver.count()))
        published_at = time.monotonic()
        in_window = await receiver.count()
        if not pipe_out.poll():
            raise RuntimeError("the publisher failed")
        sent, elapsed, sent_per_shard = pipe_out.recv()
        publishing.join()
        per_stream_sent = [
            sent // args.streams + (1 if k < sent % args.streams else 0)
            for k in range(args.streams)
        ]
        expected_per_stream = [per_stream_sent[k] * subscribers[k] for k in range(args.streams)]
        expected = sum(expected_per_stream)
        last, last_change = -1, time.monotonic()
        while True:
            total = await receiver.count()
            now = time.monotonic()
            if total >= expected:
                break
            if total != last:
                last, last_change = total, now
            elif now - last_change > 2.0 or now - published_at > 60:
                break
            await asyncio.sleep(0.05)
        drain_seconds = time.monotonic() - published_at
        cpu = tree_cpu(proc) - cpu_before
        health_after = _health_nodes(host, port)
        shard_channels = []
        for node in nodes:
            client = node.client()
            shard_channels.append(len(client.execute_command("PUBSUB", "SHARDCHANNELS")))
            client.close()
        result = await receiver.finish()
        per_stream = result.get("per_stream")

        shards = []
        for i, node in enumerate(nodes):
            mine = [k for k in range(args.streams) if owner[k] == i]
            before = health_before.get(node.label, {})
            after = health_after.get(node.label, {})
            exp = sum(expected_per_stream[k] for k in mine)
            got = sum(per_stream.get(k, 0) for k in mine) if per_stream is not None else None
            shards.append(
                {
                    "node": node.label,
                    "slots": sum(b - a + 1 for a, b in ranges[node]),
                    "streams_owned": len(mine),
                    "shard_channels": shard_channels[i],
                    "shardnumsub_min": numsub_min[i],
                    "published": sent_per_shard[i],
                    "spublish_calls": _info_calls(node, "spublish"),
                    "evalsha_calls": _info_calls(node, "evalsha") if args.recoverable else None,
                    "server_received": (
                        after.get("messages", 0) - before.get("messages", 0) if after else None
                    ),
                    "server_channels": after.get("channels"),
                    "expected_deliveries": exp,
                    "received_deliveries": got if got is not None else exp,
                    "deliveries_measured": got is not None,
                    "loss_percent": round(100.0 * (exp - got) / exp, 3)
                    if got is not None and exp
                    else None,
                }
            )

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value, 2)

        received = result["received"]
        return {
            "primaries": len(nodes),
            "replicas_per_primary": args.replicas,
            "connections": args.connections,
            "streams": args.streams,
            "per_conn": args.per_conn,
            "rate": args.rate,
            "duration": args.duration,
            "recoverable": args.recoverable,
            "receiver": receiver.name,
            "server_cpus": args.server_cpu if can_pin else None,
            "load_cpus": args.load_cpu if can_pin else None,
            "connect_seconds": round(connect_seconds, 3),
            "published": sent,
            "published_per_second": round(sent / elapsed),
            "expected_deliveries": expected,
            "received_deliveries": received,
            "offered_deliveries_per_second": round(expected / elapsed),
            "sustained_deliveries_per_second": round(in_window / elapsed),
            "drain_seconds": round(drain_seconds, 2),
            "loss_percent": round(100.0 * (expected - received) / expected, 3) if expected else 0.0,
            "latency_ms_p50": ms(result["p50"]),
            "latency_ms_p99": ms(result["p99"]),
            "latency_ms_max": ms(result["max"]),
            "latency_samples": result["samples"],
            "server_cpu_seconds": round(cpu, 2),
            "server_cpu_seconds_per_million": round(cpu / received * 1e6, 3) if received else None,
            "shards": shards,
        }
    finally:
        if receiver is not None:
            receiver.kill()
        stop_process(server)
        if cluster is not None:
            cluster.stop()


# --- output ----------------------------------------------------------------------

SHARD_COLUMNS = [
    ("node", "node"),
    ("slots", "slots"),
    ("streams", "streams_owned"),
    ("SHARDCHANNELS", "shard_channels"),
    ("NUMSUB", "shardnumsub_min"),
    ("published", "published"),
    ("SPUBLISH", "spublish_calls"),
    ("server rcvd", "server_received"),
    ("deliveries exp", "expected_deliveries"),
    ("deliveries rcvd", "received_deliveries"),
    ("loss %", "loss_percent"),
]


def shard_table(figures: dict[str, Any]) -> str:
    """The per-shard table with a totals line."""
    rows = [[title for title, _ in SHARD_COLUMNS]]
    for shard in figures["shards"]:
        row = []
        for _, key in SHARD_COLUMNS:
            value = shard.get(key)
            if key == "received_deliveries" and not shard["deliveries_measured"]:
                value = f"({value:,})"
            row.append(
                "-"
                if value is None
                else f"{value:,}"
                if isinstance(value, int) and key != "node"
                else str(value)
            )
        rows.append(row)
    total: list[str] = ["total"]
    for _, key in SHARD_COLUMNS[1:]:
        values = [s.get(key) for s in figures["shards"]]
        if key == "shardnumsub_min":
            total.append(str(min((v for v in values if v is not None), default="-")))
        elif key == "loss_percent":
            total.append(str(figures["loss_percent"]))
        elif key == "received_deliveries":
            total.append("{:,}".format(figures["received_deliveries"]))
        elif all(isinstance(v, int) for v in values):
            total.append(f"{sum(values):,}")
        else:
            total.append("-")
    rows.append(total)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    )


def summary(figures: dict[str, Any]) -> str:
    f = figures
    lines = [
        "%d primaries (+%d replicas each); %d connections, %d streams, %d per connection; "
        "%s publishing %g msg/s for %gs"
        % (
            f["primaries"],
            f["replicas_per_primary"],
            f["connections"],
            f["streams"],
            f["per_conn"],
            "recoverable" if f["recoverable"] else "plain SPUBLISH",
            f["rate"],
            f["duration"],
        ),
        shard_table(f),
        "published %d (%d/s); deliveries %d of %d (loss %.3f%%), offered %d/s, sustained %d/s, "
        "drain %.2fs"
        % (
            f["published"],
            f["published_per_second"],
            f["received_deliveries"],
            f["expected_deliveries"],
            f["loss_percent"],
            f["offered_deliveries_per_second"],
            f["sustained_deliveries_per_second"],
            f["drain_seconds"],
        ),
        "latency p50 %s ms, p99 %s ms, max %s ms (%d samples); server CPU %.2fs (%s s per "
        "million deliveries)"
        % (
            f["latency_ms_p50"],
            f["latency_ms_p99"],
            f["latency_ms_max"],
            f["latency_samples"],
            f["server_cpu_seconds"],
            f["server_cpu_seconds_per_million"],
        ),
    ]
    if any(not s["deliveries_measured"] for s in f["shards"]):
        lines.append(
            "(deliveries in parentheses: expected, not counted per stream by %s)" % f["receiver"]
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line (every option shows its default in ``--help``)."""
    parser = argparse.ArgumentParser(
        description="Fan-out benchmark for marketstream on a Redis Cluster (sharded pub/sub).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    load = parser.add_argument_group("load")
    load.add_argument("--connections", type=int, default=1000, help="WebSocket connections")
    load.add_argument("--streams", type=int, default=1000, help="K streams in all")
    load.add_argument(
        "--per-conn",
        type=int,
        default=10,
        help="S streams per connection (connection c gets streams (c*S+j) %% K)",
    )
    load.add_argument("--rate", type=float, default=5000, help="messages/s published in all")
    load.add_argument("--duration", type=float, default=10, help="seconds of publishing")
    load.add_argument(
        "--recoverable",
        action="store_true",
        help="publish through marketstream.publisher.Publisher (Lua script, "
        "SPUBLISH, history) instead of plain SPUBLISH",
    )
    load.add_argument(
        "--receiver",
        choices=("python", "wsblast"),
        default="python",
        help="python: processes counting every frame per stream (per-shard "
        "deliveries); wsblast: the C receiver (heavy loads; totals only)",
    )
    load.add_argument(
        "--receiver-processes", type=int, default=2, help="processes of the python receiver"
    )
    load.add_argument(
        "--sampled",
        type=int,
        default=100,
        help="wsblast connections that parse frames for latency samples",
    )
    topo = parser.add_argument_group("cluster")
    topo.add_argument("--primaries", type=int, default=3, help="cluster primaries (shards)")
    topo.add_argument("--replicas", type=int, default=1, help="replicas per primary")
    servers = parser.add_argument_group("server")
    servers.add_argument(
        "--processes",
        type=int,
        default=1,
        help="marketstream worker processes (/health of one of them is read)",
    )
    servers.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a marketstream setting (repeatable)",
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
        help="CPU list for the cluster, the publisher, the receivers and this script",
    )
    pinning.add_argument("--no-pin", action="store_true", help="pin nothing")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the per-shard table (or ``--json``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.connections < 1 or args.streams < 1 or args.per_conn < 1:
        parser.error("--connections, --streams and --per-conn must be at least 1")
    if args.receiver_processes < 1:
        parser.error("--receiver-processes must be at least 1")

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # clean up: server, receivers, cluster

    signal.signal(signal.SIGTERM, interrupted)
    try:
        figures = asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    print(json.dumps(figures) if args.json else summary(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
