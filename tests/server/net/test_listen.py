"""Listening sockets per worker (marketstream.server.net.listen): one
SO_REUSEPORT group per worker on one port, every address family, a clear
error for a taken address, a backlog that holds a connection storm."""

import asyncio
import socket
import struct
import sys

import pytest

from marketstream.server.net.listen import AddressInUse, bind_listeners, listen_backlog
from marketstream.testing import async_wait_until


@pytest.fixture
def bound():
    """bind_listeners(...) whose sockets are closed after the test."""
    groups = []

    def bind(*args, **kwargs):
        found = bind_listeners(*args, **kwargs)
        groups.extend(found)
        return found

    yield bind
    for group in groups:
        for sock in group:
            sock.close()


def test_port_zero_gives_every_worker_the_same_free_port(bound):
    groups = bound("127.0.0.1", 0, 3)
    ports = {sock.getsockname()[1] for group in groups for sock in group}
    assert len(groups) == 3 and all(len(group) == 1 for group in groups)
    assert len(ports) == 1 and ports.pop() > 0


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_every_address_family_when_no_host_is_given(bound):
    groups = bound("", 0, 2)
    for group in groups:
        families = sorted(sock.family for sock in group)
        assert socket.AF_INET in families
        assert len({sock.getsockname()[1] for sock in group}) == 1
        for sock in group:
            if sock.family == socket.AF_INET6:
                assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1


def test_a_taken_address_fails_naming_it_and_leaves_nothing_bound(bound):
    [[first]] = bound("127.0.0.1", 0, 1)
    port = first.getsockname()[1]
    with pytest.raises(AddressInUse) as caught:
        bind_listeners("127.0.0.1", port, 2)
    assert str(caught.value) == "cannot listen on 127.0.0.1:%d: address already in use" % port
    first.close()
    # Nothing of the failed attempt holds the port: it binds again at once.
    again = bound("127.0.0.1", port, 2)
    assert again[1][0].getsockname()[1] == port


def test_a_plain_server_on_the_port_is_not_joined(bound):
    plain = socket.socket()
    plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    plain.bind(("127.0.0.1", 0))
    plain.listen()
    try:
        with pytest.raises(OSError, match="address already in use"):
            bind_listeners("127.0.0.1", plain.getsockname()[1], 1)
    finally:
        plain.close()


# struct tcp_info (Linux, include/uapi/linux/tcp.h) up to tcpi_total_retrans:
# eight bytes of __u8 fields, then __u32 fields; tcpi_unacked (segments sent
# and not acknowledged, a SYN included) at byte 24, tcpi_total_retrans
# (segments retransmitted over the socket's life, SYNs included) at 100.
_TCP_INFO_BYTES = 104
_REQUEST = b"GET /ws HTTP/1.1\r\n\r\n"

linux_tcp_info = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads Linux's struct tcp_info"
)


def _unacked_and_retransmitted(sock):
    """(tcpi_unacked, tcpi_total_retrans) of a client socket."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    return struct.unpack_from("I", raw, 24)[0], struct.unpack_from("I", raw, 100)[0]


async def _storm(port, clients):
    """``clients`` clients connect to ``port`` at once and send a request
    while nobody accepts.  Waits until each has either had its request
    acknowledged or retransmitted something (its SYN, dropped by a full
    queue, is retried after a second; a dropped request after at least
    200 ms); returns (the clients that retransmitted, the seconds that
    took)."""
    loop = asyncio.get_running_loop()
    sockets = [socket.socket() for _ in range(clients)]

    async def one(sock):
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, _REQUEST)

    def settled():
        for task, sock in zip(tasks, sockets):
            unacked, retransmitted = _unacked_and_retransmitted(sock)
            if not retransmitted and not (task.done() and unacked == 0):
                return False
        return True

    started = loop.time()
    tasks = [asyncio.ensure_future(one(sock)) for sock in sockets]
    try:
        await async_wait_until(
            settled, 30, interval=0.05, message="each request acknowledged or retransmitted"
        )
        took = loop.time() - started
        for task in tasks:
            if task.done():
                task.result()  # a refused or failed connection fails the test
        return sum(1 for sock in sockets if _unacked_and_retransmitted(sock)[1]), took
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sock in sockets:
            sock.close()


@linux_tcp_info
def test_a_connection_storm_fits_the_listen_backlog(bound):
    """2000 clients connect at once while nobody accepts: with Tornado's
    default backlog of 128 most SYNs would be dropped and retried a second
    (or more) later; here no client retransmits its SYN or its request
    (each client's own TCP counters say so, however slow the machine)."""
    assert listen_backlog() >= min(2048, socket.SOMAXCONN)
    [[listener]] = bound("127.0.0.1", 0, 1)

    retransmitted, took = asyncio.run(_storm(listener.getsockname()[1], 2000))
    assert retransmitted == 0
    assert took < 10  # a sanity bound: the storm itself takes about half a second


@linux_tcp_info
def test_a_storm_past_a_small_backlog_is_retransmitted(bound):
    """The measure above sees an overflow: past a backlog of 16 (at most 17
    connections queued, nobody accepting) the other clients' SYNs or
    requests are dropped, and every one of those clients retransmits."""
    [[listener]] = bound("127.0.0.1", 0, 1, backlog=16)

    retransmitted, _ = asyncio.run(_storm(listener.getsockname()[1], 200))
    assert retransmitted >= 200 - 2 * 17


def test_usage_example_in_the_docstring_holds():
    import doctest

    import marketstream.server.net.listen

    result = doctest.testmod(marketstream.server.net.listen)
    assert result.attempted > 0 and result.failed == 0
