"""marketstream.server.delivery: the write path (straight to the kernel,
buffered behind what waits), and what an idle connection keeps for it."""

import asyncio
import collections
import gc
import socket

import pytest
import ujson

from marketstream.testing import (
    async_wait_until,
    masked_frame,
    raw_socket,
    server_frames,
)
from tests.helpers import (
    connect,
    envelope,
    listeners,
)


@pytest.mark.gen_test(timeout=30)
async def test_idle_connections_keep_no_empty_write_buffers_or_ack_sets(
    server_factory, redis_client
):
    """Per-connection memory: an open connection that keeps up has no write
    buffer and write-future queue of its own (two deques, ~1.5 KB) and no
    set of acknowledgements in flight (216 bytes) once they are sent."""
    server = await server_factory(protocol__acks="true")

    def containers():
        gc.collect()
        kinds = collections.Counter(type(o).__name__ for o in gc.get_objects())
        return kinds["deque"], kinds["set"]

    async def frame(sock, data):
        while True:
            frames, rest = server_frames(data)
            if frames:
                return ujson.loads(frames[0]), rest
            data += await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)

    loop = asyncio.get_running_loop()
    before = containers()
    # Bare sockets: a client library's own buffers would be counted too.
    clients = [await raw_socket(server.settings.port) for _ in range(40)]
    subscribe = masked_frame(
        ujson.dumps({"method": "SUBSCRIBE", "params": ["trade.XRP_USDT"], "id": 1})
    )
    for sock, _ in clients:
        await loop.sock_sendall(sock, subscribe)
    for sock, data in clients:
        assert (await frame(sock, data))[0] == {"result": None, "id": 1}
    await listeners(server, "trade.XRP_USDT", 40)
    deques, sets = containers()
    assert deques - before[0] < 10 and sets - before[1] < 10, (before, (deques, sets))
    redis_client.publish("trade.XRP_USDT", envelope("trade.XRP_USDT", t=1))
    for sock, _ in clients:
        assert (await frame(sock, b""))[0]["data"]["t"] == 1
        sock.close()


def test_a_send_the_kernel_cannot_take_returns_what_it_took():
    """The direct write's send: whole, in part when the kernel fills, 0 when
    it takes nothing or the socket is gone (IOStream then meets the error)."""
    from marketstream.server.delivery import _send

    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    assert _send(ours, b"abc") == 3 and theirs.recv(3) == b"abc"
    big = b"x" * (1 << 20)
    took = _send(ours, big)
    assert 0 < took < len(big)
    while _send(ours, big):
        pass  # the kernel is full now
    assert _send(ours, memoryview(big)[:10]) == 0
    theirs.close()
    ours.close()
    assert _send(ours, b"late") == 0


@pytest.mark.gen_test
async def test_frames_for_a_closed_connection_go_nowhere(server):
    """What the fan-out still hands a connection that has closed is dropped
    quietly: no error, no write."""
    ws = await connect(server)
    await async_wait_until(lambda: server.manager.connections, message="registered")
    handler = next(iter(server.manager.connections))
    ws.close()
    await async_wait_until(lambda: not server.manager.connections, message="closed")
    await async_wait_until(lambda: handler._ws is None, message="on_close ran")
    handler.write_frames(b"\x81\x01x")
    handler.send_ping()
    handler.close_for(1008, "late", reset=True)
