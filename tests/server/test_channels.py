"""The batched delivery path, and worker processes."""

import asyncio
import logging
import os
import re
import signal
import socket
import time

import psutil
import pytest
import redis
import ujson

from marketstream.server.channels import ChannelManager
from marketstream.wire.frames import text_frame
from marketstream.testing import async_wait_until, raw_socket, server_frames, wait_until
from tests.helpers import (
    ServerProcess,
    abort,
    clients_on_every_worker,
    connect,
    envelope,
    read,
    send,
    subscribe_all,
    subscribed,
)


def publish_burst(redis_client, messages):
    """Publish (channel, payload) pairs in one pipeline: they reach the
    server back to back, so its reader sees them in few large batches."""
    pipe = redis_client.pipeline(transaction=False)
    for channel, payload in messages:
        pipe.publish(channel, payload)
    pipe.execute()


def seq_message(stream, seq):
    return stream, '{"stream":"%s","data":{"e":"trade","t":%d}}' % (stream, seq)


async def collect(ws, count, timeout=20.0):
    """Read ``count`` frames; return the (stream, t) pairs in arrival order."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        frame = await asyncio.wait_for(ws.read_message(), max(0.01, deadline - time.monotonic()))
        assert frame is not None, "closed after %d of %d frames" % (len(out), count)
        message = ujson.loads(frame)
        out.append((message["stream"], message["data"]["t"]))
    return out


@pytest.mark.gen_test(timeout=60)
async def test_batches_keep_per_stream_order_and_deliver_once(server, redis_client):
    streams = ["trade.A_USDT", "trade.B_USDT", "trade.C_USDT"]
    # Each client listens to two streams, overlapping; one listens to all three.
    plans = [streams[:2], streams[1:], [streams[0], streams[2]], streams]
    clients = []
    for plan in plans:
        ws = await connect(server)
        await send(ws, "SUBSCRIBE", plan)
        clients.append(ws)
    await async_wait_until(lambda: sum(len(v) for v in server.manager.streams.values()) == 9)
    await subscribed(redis_client, *streams)

    per_stream = 1000
    burst = [seq_message(streams[i % 3], i // 3) for i in range(per_stream * 3)]
    batches_before = server.counters.batches
    publish_burst(redis_client, burst)

    for ws, plan in zip(clients, plans):
        got = await collect(ws, per_stream * len(plan))
        for stream in plan:
            seqs = [t for s, t in got if s == stream]
            assert seqs == list(range(per_stream)), "order or duplicates on %s" % stream
        assert {s for s, _ in got} == set(plan)
    # The burst was delivered in batches, not message by message.
    assert server.counters.batches - batches_before < len(burst) / 2


@pytest.mark.gen_test(timeout=60)
async def test_burst_of_ten_thousand_arrives_complete(server, redis_client):
    a, b = await connect(server), await connect(server)
    await subscribe_all(server, redis_client, (a, b), "depth.BURST_USDT")
    publish_burst(redis_client, [seq_message("depth.BURST_USDT", i) for i in range(10_000)])
    for ws in (a, b):
        got = await collect(ws, 10_000)
        assert [t for _, t in got] == list(range(10_000))


@pytest.mark.gen_test(timeout=60)
async def test_connection_closed_mid_batch_does_not_disturb_others(server, redis_client):
    clients = [await connect(server) for _ in range(6)]
    await subscribe_all(server, redis_client, clients, "trade.MID_USDT")

    burst = [seq_message("trade.MID_USDT", i) for i in range(3000)]
    publish_burst(redis_client, burst[:1000])
    # Two clients vanish while frames are in flight: one aborts, one closes.
    abort(clients[1])
    clients[3].close()
    publish_burst(redis_client, burst[1000:])
    for index in (0, 2, 4, 5):
        got = await collect(clients[index], 3000)
        assert [t for _, t in got] == list(range(3000))
    await async_wait_until(lambda: len(server.manager.connections) == 4)


class _Recorder:
    def __init__(self, fail=False):
        self.data = []
        self.fail = fail

    def write_frames(self, data):
        if self.fail:
            raise RuntimeError("socket exploded")
        self.data.append(data)


@pytest.mark.gen_test
async def test_failing_connection_in_a_batch_does_not_stop_the_others(redis_url, redis_client):
    # A connection whose write raises (a bug, a broken socket) is isolated:
    # the others in the same batch still get their frames.
    manager = ChannelManager(redis_url)
    await manager.start()
    try:
        good1, bad, good2 = _Recorder(), _Recorder(fail=True), _Recorder()
        for conn in (good1, bad, good2):
            manager.subscribe(conn, ["trade.ISO_USDT"])
        assert await manager.wait_subscribed(["trade.ISO_USDT"])
        publish_burst(redis_client, [seq_message("trade.ISO_USDT", i) for i in range(50)])
        await async_wait_until(lambda: sum(d.count(b"\x81") for d in good2.data) >= 50)
        assert b"".join(good1.data) == b"".join(good2.data)
        # One write per connection per batch: fewer writes than messages.
        assert len(good1.data) == manager.counters.batches < 50
    finally:
        await manager.stop()


# --- worker processes --------------------------------------------------------


def worker_pids(server):
    return sorted(
        child.pid
        for child in psutil.Process(server.proc.pid).children()
        if "redis" not in child.name()
    )


def test_two_workers_both_deliver_and_a_killed_worker_comes_back(redis_url):
    server = ServerProcess("--redis-url", redis_url, "--processes", "2", "--acks")
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: server.output.count("listening on") == 2, 15, message="two workers")
        assert len(worker_pids(server)) == 2

        async def scenario():
            clients = await clients_on_every_worker(server, client, "trade.MP_USDT")
            client.publish("trade.MP_USDT", '{"stream":"trade.MP_USDT","data":{"e":"trade","t":1}}')
            for ws in clients:
                assert ujson.loads(await read(ws))["data"]["t"] == 1
            for ws in clients:
                ws.close()

        asyncio.run(scenario())

        victim = worker_pids(server)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: re.search(
                r"worker \d \(pid %d\) was killed by signal 9; restarting" % victim, server.output
            ),
            10,
            message="restart logged",
        )
        wait_until(
            lambda: len(worker_pids(server)) == 2 and victim not in worker_pids(server),
            10,
            message="replacement worker",
        )
        wait_until(
            lambda: server.output.count("listening on") == 3, 10, message="replacement serving"
        )

        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(20) == 0, server.output
    finally:
        server.stop()
        client.close()


@pytest.mark.gen_test
async def test_min_flush_interval_coalesces_writes(redis_url, redis_client):
    manager = ChannelManager(redis_url, min_flush_interval=0.3)
    await manager.start()
    try:
        conn = _Recorder()
        manager.subscribe(conn, ["trade.PACE_USDT"])
        assert await manager.wait_subscribed(["trade.PACE_USDT"])
        for i in range(10):  # ten separate publishes, ten separate arrivals
            redis_client.publish(*seq_message("trade.PACE_USDT", i))
        await async_wait_until(lambda: b"".join(conn.data).count(b"\x81") == 10)
        # The first goes out at once; the rest wait for the interval, together.
        assert len(conn.data) <= 3
        assert manager.counters.batches == len(conn.data)
    finally:
        await manager.stop()


@pytest.mark.gen_test
async def test_a_flush_between_a_stream_closing_and_on_close_is_quiet(server, redis_client, caplog):
    """A client resets its connection: Tornado closes the stream at once but
    runs on_close a turn later.  A flush in between skips that client
    without an error, and the others get their frames."""
    clients = [await connect(server) for _ in range(2)]
    await subscribe_all(server, redis_client, clients, "trade.GONE_USDT")
    gone = next(iter(server.manager.connections))
    gone.ws_connection.stream.close()
    server.manager.on_message(b"trade.GONE_USDT", envelope("trade.GONE_USDT", t=1).encode())
    server.manager._flush()  # before on_close has run
    assert len(server.manager.connections) == 2
    survivor = next(
        ws
        for ws in clients
        if ":%d" % ws.protocol.stream.socket.getsockname()[1] not in gone.identity
    )
    assert ujson.loads(await read(survivor))["data"]["t"] == 1
    await async_wait_until(lambda: len(server.manager.connections) == 1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.gen_test(timeout=30)
async def test_a_frame_tornado_sent_in_part_is_never_cut_by_the_fan_out(server):
    """Tornado's own writes (pings, write_message, the close frame) go
    through its stream's buffer.  When the kernel took only part of one, a
    fan-out frame written next must wait behind the rest, even when the
    kernel has room again by then: written straight to the socket it would
    land inside the other frame."""
    loop = asyncio.get_running_loop()
    client, data = await raw_socket(server.settings.port, rcvbuf=4096)
    await async_wait_until(lambda: server.manager.connections, message="registered")
    handler = next(iter(server.manager.connections))
    handler.ws_connection.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    handler.write_frames(text_frame(b'{"n":1}'))  # straight to the kernel
    big = "x" * 200_000
    handler.write_message(big)  # the kernel takes a few KB; the rest waits in Tornado's buffer
    # The client reads what the kernel holds, without giving the server's
    # event loop a turn: the kernel has room again, Tornado has not yet
    # written more of its frame.
    received = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            chunk = client.recv(65536)
        except BlockingIOError:
            if len(received) > 8192:
                break
            time.sleep(0.001)
            continue
        assert chunk, "closed"
        received += chunk
    handler.write_frames(text_frame(b'{"n":2}'))
    data += received
    frames = []
    deadline = time.monotonic() + 5
    while True:
        done, data = server_frames(data)
        frames += done
        if len(frames) >= 3 or time.monotonic() > deadline:
            break
        try:
            data += await asyncio.wait_for(loop.sock_recv(client, 1 << 16), 1)
        except asyncio.TimeoutError:
            pass
    client.close()
    assert frames == [b'{"n":1}', big.encode(), b'{"n":2}']
