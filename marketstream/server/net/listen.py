"""Binding the listening sockets: one set per worker, balanced by the kernel.

Workers that share one listening socket are not balanced: every idle worker
waits on it, and the one that wakes first takes the connection, so the least
busy worker (often the same one, again and again) gets most of them.  With
``SO_REUSEPORT`` every worker listens on a socket of its own bound to the
same port, and the kernel spreads new connections over those sockets by a
hash of the peer's address and port: an even split, whatever the workers do.

``SO_REUSEPORT`` would also let a second, unrelated server (run by the same
user) join the group and silently take half the connections.
:func:`bind_listeners` therefore first binds a plain probe socket, without
``SO_REUSEPORT``, which fails if anything at all listens on the address, and
names the address in the error::

    groups = bind_listeners("0.0.0.0", 4000, 2)   # one list of sockets per worker
    # worker i: server.add_sockets(groups[i])

    bind_listeners("0.0.0.0", 4000, 1)   # while the above still listens
    # AddressInUse: cannot listen on 0.0.0.0:4000: address already in use

Each socket is non-blocking, listens with a large backlog (a reconnect storm
of thousands of clients must not overflow it: dropped SYNs are retried only
after a second), and hands over connections once their request has arrived
(:func:`~marketstream.server.net.upgrade.defer_accept`).  Like
:func:`tornado.netutil.bind_sockets`, an empty host or ``None`` listens on
every address family (IPv4 and IPv6, the IPv6 socket ``IPV6_V6ONLY``), so a
worker's group may hold more than one socket.  Port 0 picks a free port,
the same for every socket::

    >>> groups = bind_listeners("127.0.0.1", 0, 2)
    >>> [len(group) for group in groups]
    [1, 1]
    >>> port = groups[0][0].getsockname()[1]
    >>> port == groups[1][0].getsockname()[1] > 0
    True
    >>> try:
    ...     bind_listeners("127.0.0.1", port, 1)
    ... except AddressInUse as exc:
    ...     str(exc) == "cannot listen on 127.0.0.1:%d: address already in use" % port
    True
    >>> for group in groups:
    ...     for sock in group:
    ...         sock.close()
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any, TypeAlias

from marketstream.server.net.upgrade import defer_accept

__all__ = ["AddressInUse", "bind_listeners", "listen_backlog"]

# The backlog is an int in listen(2) and the kernel caps it at somaxconn.
_MAX_BACKLOG = 65535


class AddressInUse(OSError):
    """Something already listens on the address; the message names it."""

    def __init__(self, address: str) -> None:
        super().__init__(errno.EADDRINUSE, "address already in use")
        self.address = address

    def __str__(self) -> str:
        return "cannot listen on %s: address already in use" % self.address


def listen_backlog() -> int:
    """The largest listen backlog the kernel grants: ``net.core.somaxconn``,
    at most 65535 (:data:`socket.SOMAXCONN` where it cannot be read)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            value = int(f.read())
    except (OSError, ValueError):
        value = socket.SOMAXCONN
    return max(1, min(value, _MAX_BACKLOG))


def _show(host: str, port: int) -> str:
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


#: A socket address as getaddrinfo gives it: (host, port) or (host, port, flowinfo, scope_id).
#: Any: typeshed types it as a union over every address family, which the
#: family read beside it does not narrow; the socket module takes any tuple.
SockAddr: TypeAlias = tuple[Any, ...]


def _addresses(host: str | None, port: int) -> list[tuple[int, SockAddr]]:
    """(family, sockaddr) to bind, as tornado.netutil.bind_sockets chooses them."""
    if host == "":
        host = None
    flags = socket.AI_PASSIVE
    if hasattr(socket, "AI_ADDRCONFIG"):
        flags |= socket.AI_ADDRCONFIG  # no IPv6 socket on a host without IPv6
    family = socket.AF_UNSPEC if socket.has_ipv6 else socket.AF_INET
    found: list[tuple[int, SockAddr]] = []
    for fam, _, _, _, sockaddr in sorted(
        set(socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, flags)),
        key=lambda info: info[0],
    ):
        address: SockAddr = sockaddr
        if fam not in (socket.AF_INET, socket.AF_INET6):
            continue
        if fam == socket.AF_INET6 and address[3] != 0:
            continue  # a link-local address with a scope id; tornado skips these too
        if (fam, address[:2]) not in [(f, a[:2]) for f, a in found]:
            found.append((fam, address))
    return found


def _socket(family: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.set_inheritable(False)
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restarts: TIME_WAIT
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind(sock: socket.socket, sockaddr: SockAddr, shown: str) -> None:
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUse(shown) from None
        raise OSError(exc.errno, "cannot listen on %s: %s" % (shown, exc.strerror)) from None


def bind_listeners(
    host: str | None, port: int, count: int, backlog: int | None = None
) -> list[list[socket.socket]]:
    """``count`` groups of listening sockets on ``host:port``, one per worker.

    Every socket of every group is bound with ``SO_REUSEPORT`` to the same
    address, so the kernel spreads connections evenly over the groups.
    Raises :class:`AddressInUse` (an ``OSError``) naming the address when
    anything already listens there, and ``OSError`` for other bind errors
    (e.g. permission denied); nothing stays bound then.  ``backlog`` defaults
    to :func:`listen_backlog`.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    backlog = listen_backlog() if backlog is None else backlog
    addresses = _addresses(host, port)
    # The probe: plain sockets, which fail on any address that is taken.
    probes: list[socket.socket] = []
    try:
        for family, sockaddr in addresses:
            if port == 0 and probes:
                sockaddr = (sockaddr[0], probes[0].getsockname()[1]) + tuple(sockaddr[2:])
            probe = _socket(family, reuse_port=False)
            probes.append(probe)
            _bind(probe, sockaddr, _show(sockaddr[0], port or sockaddr[1]))
        chosen = probes[0].getsockname()[1] if probes else port
    finally:
        for probe in probes:
            probe.close()
    groups: list[list[socket.socket]] = []
    try:
        for _ in range(count):
            group: list[socket.socket] = []
            groups.append(group)
            for family, sockaddr in addresses:
                sockaddr = (sockaddr[0], chosen) + tuple(sockaddr[2:])
                sock = _socket(family, reuse_port=True)
                _bind(sock, sockaddr, _show(sockaddr[0], chosen))
                group.append(sock)
                sock.setblocking(False)
                sock.listen(backlog)
            defer_accept(group)
    except BaseException:
        for group in groups:
            for sock in group:
                sock.close()
        raise
    return groups
