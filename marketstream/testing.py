"""The test and benchmark toolkit (as Tornado has ``tornado.testing``):
waiting on a condition, free ports and a private redis-server, raw
WebSocket frames and handshakes, ``/health``, and the process figures the
benchmarks report.  The test suite and ``scripts/`` import it; nothing in
the package does.

Waiting, with a deadline, never sleep-and-hope::

    server = RedisServer().start()            # a private redis-server on a free port
    wait_until(lambda: health_status(port) == 200, 20, message="GET /health -> 200")
    await async_wait_until(lambda: len(manager.streams) == 3, message="three streams")

A WebSocket without a client library, byte by byte (what a polite library
will not do: never read, flood pings, send broken frames)::

    sock, rest = await raw_socket(port, "/ws")             # past the 101
    await loop.sock_sendall(sock, masked_frame('{"method":"LIST_SUBSCRIPTIONS","id":1}'))
    frames, rest = read_frames(rest + await loop.sock_recv(sock, 65536))

Frames both ways:

>>> frame = masked_frame("hi")
>>> frame[:2], len(frame)          # final text frame, masked, 2 bytes of payload
(b'\\x81\\x82', 8)
>>> read_frames(b"\\x81\\x02hi\\x88\\x02\\x03\\xe8\\x81")   # a text, a close, a partial one
([(1, b'hi'), (8, b'\\x03\\xe8')], b'\\x81')
>>> close_reason(b"\\x03\\xe9server shutting down")
(1001, 'server shutting down')
>>> percentile([3.0, 1.0, 2.0, 4.0], 0.5)
3.0
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from marketstream.server.embedded import RedisServer, free_port
from marketstream.server.net.workers import die_with_parent
from marketstream.wire.frames import OP_CLOSE, OP_TEXT

__all__ = [
    "wait_until",
    "async_wait_until",
    "free_port",
    "RedisServer",
    "die_with_parent",
    "masked_frame",
    "read_frames",
    "server_frames",
    "close_reason",
    "handshake_request",
    "handshake",
    "open_socket",
    "raw_socket",
    "until_closed",
    "close_frame",
    "RawClient",
    "health",
    "health_status",
    "process_gone",
    "stop_process",
    "server_command",
    "raise_fd_limit",
    "tree_rss",
    "tree_cpu",
    "percentile",
]

T = TypeVar("T")


# --- waiting -------------------------------------------------------------------


class _Deadline:
    def __init__(self, timeout: float, message: str) -> None:
        self.timeout = timeout
        self.end = time.monotonic() + timeout
        self.message = message

    def done(self, value: object) -> bool:
        """True once ``value`` is truthy; raises when the time is up."""
        if value:
            return True
        if time.monotonic() > self.end:
            raise AssertionError(
                "timed out after %.1fs waiting for %s" % (self.timeout, self.message)
            )
        return False


def _poll(predicate: Callable[[], T], ignore: tuple[type[BaseException], ...]) -> T | None:
    try:
        return predicate()
    except ignore:
        return None


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.01,
    message: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a true
    value, and return that; ``AssertionError`` (naming ``message``) after
    ``timeout`` seconds.  An exception of ``ignore`` counts as "not yet"::

        wait_until(lambda: redis.ping(), 10, ignore=(RedisError, OSError), message="Redis")

    >>> wait_until(lambda: 42)
    42
    """
    deadline = _Deadline(timeout, message)
    while True:
        value = _poll(predicate, ignore)
        if deadline.done(value):
            return value  # type: ignore[return-value]  # true, so not None
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.01,
    message: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """:func:`wait_until` inside an event loop: it yields to the loop
    between polls."""
    deadline = _Deadline(timeout, message)
    while True:
        value = _poll(predicate, ignore)
        if deadline.done(value):
            return value  # type: ignore[return-value]  # true, so not None
        await asyncio.sleep(interval)


# --- frames --------------------------------------------------------------------


def masked_frame(payload: bytes | str, opcode: int = OP_TEXT, fin: bool = True) -> bytes:
    """A client frame (masked, as RFC 6455 requires of clients) carrying
    ``payload`` (``str`` is sent as UTF-8), of any length."""
    data = payload.encode() if isinstance(payload, str) else payload
    first = (0x80 if fin else 0) | opcode
    length = len(data)
    if length < 126:
        header = struct.pack("!BB", first, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, length)
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def read_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The unmasked (server) frames complete in ``data``, as ``(opcode,
    payload)`` in order, and the bytes after the last complete one (one
    pass, however many frames)."""
    out: list[tuple[int, bytes]] = []
    end = len(data)
    at = 0
    while end - at >= 2:
        length, start = data[at + 1] & 0x7F, at + 2
        if length == 126:
            length, start = int.from_bytes(data[at + 2 : at + 4], "big"), at + 4
        elif length == 127:
            length, start = int.from_bytes(data[at + 2 : at + 10], "big"), at + 10
        if end < start + length:
            break
        out.append((data[at] & 0x0F, bytes(data[start : start + length])))
        at = start + length
    return out, bytes(data[at:])


def server_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """:func:`read_frames` without the opcodes: the payloads, and the rest."""
    frames, rest = read_frames(data)
    return [payload for _, payload in frames], rest


def close_reason(payload: bytes) -> tuple[int | None, str]:
    """``(code, reason)`` of a close frame's payload (no code: None)."""
    if len(payload) < 2:
        return None, ""
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode(errors="replace")


# --- handshakes ----------------------------------------------------------------


def handshake_request(
    port: int, path: str = "/ws", headers: Mapping[str, str] | None = None, host: str = "127.0.0.1"
) -> bytes:
    """A WebSocket upgrade request (a fresh key) for ``host:port``.

    >>> handshake_request(4000, "/stream?streams=trade.A_B").split(b"\\r\\n")[:3]
    [b'GET /stream?streams=trade.A_B HTTP/1.1', b'Host: 127.0.0.1:4000', b'Upgrade: websocket']
    """
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET %s HTTP/1.1" % path,
        "Host: %s:%d" % (host, port),
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: " + key,
        "Sec-WebSocket-Version: 13",
    ]
    lines += ["%s: %s" % item for item in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def handshake(address: tuple[str, int], request: bytes) -> socket.socket:
    """One blocking WebSocket handshake on a new connection to ``address``:
    the socket past the 101 (``TCP_NODELAY`` on).  ``RuntimeError`` if the
    server refuses or closes.  The cheapest sequential client::

        sock = handshake(("127.0.0.1", port), handshake_request(port))
    """
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    try:
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
    except BaseException:
        sock.close()
        raise
    return sock


async def open_socket(
    port: int,
    data: bytes = b"",
    source: str | None = None,
    rcvbuf: int | None = None,
    host: str = "127.0.0.1",
) -> socket.socket:
    """A connected non-blocking socket to ``host:port`` (from address
    ``source``, with a receive buffer of ``rcvbuf`` bytes if given) that
    has sent ``data``."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        if source:
            sock.bind((source, 0))
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        if data:
            await loop.sock_sendall(sock, data)
    except BaseException:
        sock.close()
        raise
    return sock


async def raw_socket(
    port: int,
    path: str = "/ws",
    rcvbuf: int | None = None,
    headers: Mapping[str, str] | None = None,
    source: str | None = None,
) -> tuple[socket.socket, bytes]:
    """A non-blocking socket past its WebSocket handshake (the 101 read),
    and the bytes that came after the 101: no client library, no buffers
    beside the kernel's.  Send frames with :func:`masked_frame`."""
    loop = asyncio.get_running_loop()
    sock = await open_socket(port, handshake_request(port, path, headers), source, rcvbuf)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
        assert chunk, "closed during the handshake"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock, rest


async def until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Read a non-blocking ``sock`` until the peer closes it (or resets it);
    the bytes read.  ``AssertionError`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    data = b""
    while True:
        remaining = deadline - loop.time()
        assert remaining > 0, "still open after %.1f s (read %r)" % (timeout, data[:100])
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), remaining)
        except ConnectionResetError:
            return data
        except asyncio.TimeoutError:
            continue
        if not chunk:
            return data
        data += chunk


async def close_frame(
    sock: socket.socket, data: bytes = b"", timeout: float = 10.0
) -> tuple[int | None, str]:
    """``(code, reason)`` of the server's close frame, read from a bare
    non-blocking socket (``data``: bytes already read) past any other frame
    (pongs, replies).  ``AssertionError`` if the connection ends first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        frames, data = read_frames(data)
        for opcode, payload in frames:
            if opcode == OP_CLOSE:
                return close_reason(payload)
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), deadline - loop.time())
        assert chunk, "closed without a close frame"
        data += chunk


class RawClient:
    """A bare-bones WebSocket client over asyncio streams, for what a polite
    client library will not do: never read, never answer pings, send
    arbitrary frames.  Use it inside a running event loop::

        client = await RawClient.connect(port)
        client.send('{"method":"LIST_SUBSCRIPTIONS","id":1}')
        opcode, payload = await client.recv()
        client.send(b"", opcode=OP_PING)
        code, reason = await client.recv_close()
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls,
        port: int,
        path: str = "/ws",
        headers: Mapping[str, str] | None = None,
        rcvbuf: int | None = None,
        source: str | None = None,
    ) -> RawClient:
        """Connect to 127.0.0.1:``port`` and finish the handshake."""
        sock = await open_socket(port, source=source, rcvbuf=rcvbuf)
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
        writer.write(handshake_request(port, path, headers))
        status = await reader.readuntil(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 101"), status
        return cls(reader, writer)

    def send(self, payload: bytes | str, opcode: int = OP_TEXT) -> None:
        """Send one frame (final, masked)."""
        self.writer.write(masked_frame(payload, opcode))

    async def recv(self, timeout: float = 5.0) -> tuple[int | None, bytes]:
        """The next frame as (opcode, payload); (None, b"") at EOF."""

        async def read_frame() -> tuple[int | None, bytes]:
            try:
                head = await self.reader.readexactly(2)
            except asyncio.IncompleteReadError:
                return None, b""
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            return head[0] & 0x0F, await self.reader.readexactly(length)

        return await asyncio.wait_for(read_frame(), timeout)

    async def recv_close(self, timeout: float = 10.0) -> tuple[int | None, str]:
        """Skip frames until a close frame; return (code, reason)."""
        deadline = time.monotonic() + timeout
        while True:
            opcode, payload = await self.recv(max(0.01, deadline - time.monotonic()))
            if opcode is None:
                return None, ""
            if opcode == OP_CLOSE:
                return close_reason(payload)

    def close(self) -> None:
        self.writer.close()


# --- health --------------------------------------------------------------------


def health(
    port: int,
    host: str = "127.0.0.1",
    headers: Mapping[str, str] | None = None,
    timeout: float = 2.0,
) -> dict[str, Any]:  # Any: what json.loads gives
    """``GET /health`` as JSON (a direct request from this host gets the
    details: ``pid``, ``redis``, ``stats``).  Raises ``OSError`` while
    nothing answers, ``urllib.error.HTTPError`` (an ``OSError`` too) on
    503::

        wait_until(lambda: health(port)["upstream_channels"] == 10, ignore=(OSError,))
    """
    request = urllib.request.Request(
        "http://%s:%d/health" % (host, port), headers=dict(headers or {})
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body: dict[str, Any] = json.loads(response.read())  # Any: JSON values
        return body


def health_status(port: int, host: str = "127.0.0.1") -> int | None:
    """The HTTP status of ``GET /health``, or None while nothing answers."""
    try:
        with urllib.request.urlopen("http://%s:%d/health" % (host, port), timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


# --- processes -----------------------------------------------------------------


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie nobody reaped yet counts
    as gone: a container's first process may never reap orphans)."""
    try:
        with open("/proc/%d/stat" % pid) as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


# Any: a Popen in text or in bytes mode.
def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 20) -> None:
    """SIGTERM ``proc`` (a Popen, or None), SIGKILL it if it has not exited
    within ``timeout`` seconds, and reap it."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def server_command(
    port: int,
    redis_url: str,
    settings: Iterable[str] = (),
    *,
    host: str = "127.0.0.1",
    processes: int = 1,
    clients: int | None = None,
    log_level: str = "WARNING",
    cpus: str | None = None,
) -> list[str]:
    """The command line of a marketstream server listening on
    ``host:port`` with Redis at ``redis_url`` and ``processes`` workers,
    logging at ``log_level``: as the benchmarks start it.  ``clients``
    makes room for that many connections from this one address
    (``server.max_connections`` of ``clients + 100``, no limit per
    address); ``settings`` are ``SECTION.KEY=VALUE`` items passed with
    ``--set`` after those (so they win); ``cpus`` pins the server to a CPU
    list with ``taskset -c``::

        server = subprocess.Popen(server_command(port, redis.url, ["server.ping_interval=0"]))

    >>> server_command(4000, "redis://h:6379/0", ["protocol.acks=true"], clients=900)[3:]
    ['--listen', '127.0.0.1:4000', '--redis-url', 'redis://h:6379/0', '--log-level', 'WARNING',
     '--processes', '1', '--set', 'server.max_connections=1000',
     '--set', 'server.max_connections_per_ip=0', '--set', 'protocol.acks=true']
    """
    command = [sys.executable, "-m", "marketstream", "--listen", "%s:%d" % (host, port)]
    command += ["--redis-url", redis_url, "--log-level", log_level]
    command += ["--processes", str(processes)]
    if clients is not None:
        command += ["--set", "server.max_connections=%d" % (clients + 100)]
        command += ["--set", "server.max_connections_per_ip=0"]
    for item in settings:
        command += ["--set", item]
    if cpus is not None:
        command = ["taskset", "-c", cpus] + command
    return command


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# Any: a psutil.Process (psutil is in the test extra only, and untyped here).
def _tree(proc: Any) -> list[Any]:
    return [proc] + list(proc.children(recursive=True))


def tree_rss(proc: Any) -> int:  # Any: a psutil.Process, as for _tree
    """Resident bytes of a ``psutil.Process`` and its children."""
    return sum(p.memory_info().rss for p in _tree(proc) if p.is_running())


def tree_cpu(proc: Any) -> float:  # Any: a psutil.Process, as for _tree
    """CPU seconds (user + system) of a ``psutil.Process`` and its living
    children."""
    import psutil  # the test extra: only the benchmarks measure processes

    total = 0.0
    for p in _tree(proc):
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values`` by rank; None if empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
