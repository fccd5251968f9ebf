"""Listening sockets per worker (marketstream.server.net.listen): one
SO_REUSEPORT group per worker on one port, every address family, a clear
error for a taken address, a backlog that holds a connection storm."""

import asyncio
import socket

import pytest

from marketstream.server.net.listen import AddressInUse, bind_listeners, listen_backlog


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


def test_a_connection_storm_fits_the_listen_backlog(bound):
    """2000 clients connect at once while nobody accepts: with Tornado's
    default backlog of 128 most SYNs would be dropped and retried a second
    (or more) later; here every client is connected and has sent its
    request almost at once."""
    assert listen_backlog() >= min(2048, socket.SOMAXCONN)
    [[listener]] = bound("127.0.0.1", 0, 1)
    port = listener.getsockname()[1]

    async def storm():
        loop = asyncio.get_running_loop()

        async def one():
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, b"GET /ws HTTP/1.1\r\n\r\n")
            return sock

        started = loop.time()
        sockets = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(2000))), 10)
        took = loop.time() - started
        for sock in sockets:
            sock.close()
        return took

    assert asyncio.run(storm()) < 0.9  # no SYN waited for a retransmission


def test_usage_example_in_the_docstring_holds():
    import doctest

    import marketstream.server.net.listen

    result = doctest.testmod(marketstream.server.net.listen)
    assert result.attempted > 0 and result.failed == 0
