"""Redis outages, bad and slow clients, limits, leaks."""

import asyncio
import random
import time
import urllib.request

import psutil
import pytest
import redis
import redis.asyncio
import tornado.httpclient
import tornado.websocket
import ujson

from marketstream.testing import RawClient, async_wait_until, raw_socket
from tests.helpers import ServerProcess, abort, connect, read, send, subscribed


async def health_status(server):
    client = tornado.httpclient.AsyncHTTPClient()
    response = await client.fetch(
        "http://127.0.0.1:%d/health" % server.settings.port, raise_error=False
    )
    return response.code


async def read_until_gap(ws, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        message = ujson.loads(await read(ws, max(0.01, deadline - time.monotonic())))
        if message["data"]["e"] == "gap":
            return message


#: Messages a paced publisher lets the readers fall behind: 16 x 20 KB, far
#: below the 1 MiB cap, so a reader is never a slow consumer however slowly
#: a busy machine runs it.
WINDOW = 16


async def drain(ws, received, index, count, timeout=30):
    """Read ``count`` frames from ``ws``, checking they come in order
    (``data.t`` = 0, 1, ...); ``received[index]`` counts them."""
    while received[index] < count:
        frame = await asyncio.wait_for(ws.read_message(), timeout)
        assert frame is not None, "reader closed after %d of %d (code %s, %r)" % (
            received[index],
            count,
            ws.close_code,
            ws.close_reason,
        )
        assert ujson.loads(frame)["data"]["t"] == received[index]
        received[index] += 1


async def publish_paced(redis_url, stream, count, filler, received):
    """Publish ``count`` depth messages carrying ``filler``, each once every
    reader has received all but the last :data:`WINDOW` before it.

    The readers run in the test's process, which a busy machine may starve:
    at a fixed rate they fell megabytes behind (3.9 MB unread in the
    kernel, then a 1.8 MB batch on top) and were rightly closed as slow
    consumers beside the stalled clients.  Paced by the readers, the
    publisher still sends the stalled clients everything, and a reader can
    only be closed by a server that cuts off a client that keeps up."""
    publisher = redis.asyncio.Redis.from_url(redis_url)
    try:
        for t in range(count):
            await async_wait_until(
                lambda t=t: min(received) >= t - WINDOW,
                30,
                message="the readers to reach message %d" % (t - WINDOW),
            )
            await publisher.publish(
                stream, '{"stream":"%s","data":{"e":"depth","t":%d,"f":"%s"}}' % (stream, t, filler)
            )
    finally:
        await publisher.aclose()


# --- Redis outages -------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_redis_killed_and_restarted(server, redis_server, redis_client):
    streams = ["trade.OUT_USDT", "depth.OUT_USDT"]
    a, b = await connect(server), await connect(server)
    await send(a, "SUBSCRIBE", streams)
    await send(b, "SUBSCRIBE", streams[:1])
    await async_wait_until(lambda: len(server.manager.streams) == 2)
    await subscribed(redis_client, *streams)
    redis_client.publish(streams[0], '{"stream":"trade.OUT_USDT","data":{"e":"trade","t":1}}')
    assert ujson.loads(await read(a))["data"]["t"] == 1
    assert ujson.loads(await read(b))["data"]["t"] == 1

    redis_server.kill()
    await async_wait_until(lambda: not server.manager.healthy, message="outage noticed")
    assert await health_status(server) == 503
    await asyncio.sleep(0.5)  # an outage of some length: reconnect attempts fail meanwhile
    assert a.protocol is not None and b.protocol is not None  # clients stay connected

    redis_server.restart()
    back = time.monotonic()
    gaps_a = {(await read_until_gap(a))["stream"] for _ in streams}
    resumed = time.monotonic() - back
    assert gaps_a == set(streams)
    gap_b = await read_until_gap(b)
    assert gap_b["stream"] == streams[0] and gap_b["data"]["s"] == "OUT_USDT"
    assert resumed < 1.5, "resubscribed %.2fs after Redis came back" % resumed
    await async_wait_until(lambda: server.manager.healthy, message="healthy again")
    assert await health_status(server) == 200

    client = redis.Redis.from_url(redis_server.url)
    client.publish(streams[0], '{"stream":"trade.OUT_USDT","data":{"e":"trade","t":2}}')
    assert ujson.loads(await read(a))["data"]["t"] == 2
    assert ujson.loads(await read(b))["data"]["t"] == 2
    assert server.counters.reconnects == 1
    client.close()


@pytest.mark.gen_test(timeout=30)
async def test_subscriber_killed_by_redis(server, redis_client):
    # What Redis does to a subscriber past client-output-buffer-limit pubsub.
    ws = await connect(server)
    await send(ws, "SUBSCRIBE", ["trade.KILL_USDT"])
    await subscribed(redis_client, "trade.KILL_USDT")
    assert redis_client.client_kill_filter(_type="pubsub") >= 1
    gap = await read_until_gap(ws)
    assert gap["stream"] == "trade.KILL_USDT"
    await subscribed(redis_client, "trade.KILL_USDT")
    redis_client.publish(
        "trade.KILL_USDT", '{"stream":"trade.KILL_USDT","data":{"e":"trade","t":7}}'
    )
    assert ujson.loads(await read(ws))["data"]["t"] == 7
    assert server.counters.reconnects == 1
    assert await health_status(server) == 200


# --- slow consumers --------------------------------------------------------------


def test_stalled_client_is_closed_and_others_get_everything(redis_url):
    server = ServerProcess("--redis-url", redis_url)  # default cap: 1 MiB per client
    client = redis.Redis.from_url(redis_url)
    try:
        server.wait_listening()
        proc = psutil.Process(server.proc.pid)

        async def scenario():
            # Subscribed when the handshake ends: nothing published later is missed.
            readers = [
                await tornado.websocket.websocket_connect(
                    "ws://127.0.0.1:%d/stream?streams=depth.BIG_USDT" % server.port
                )
                for _ in range(3)
            ]
            stalled = await RawClient.connect(server.port, rcvbuf=4096)
            stalled.send('{"method":"SUBSCRIBE","params":["depth.BIG_USDT"],"id":1}')
            await async_wait_until(
                lambda: client.pubsub_numsub("depth.BIG_USDT")[0][1] == 1,
                10,
                message="subscribed upstream",
            )
            rss_before = proc.memory_info().rss
            count = 600  # 12 MB in all: far past the 1 MiB cap of the stalled client
            received = [0] * len(readers)
            tasks = [
                asyncio.ensure_future(drain(ws, received, i, count)) for i, ws in enumerate(readers)
            ]
            await publish_paced(redis_url, "depth.BIG_USDT", count, "x" * 20_000, received)
            await asyncio.gather(*tasks)
            growth = proc.memory_info().rss - rss_before
            # The stalled client was cut off (its socket is closed by the
            # server within Tornado's 5 s close handshake timeout).
            code, reason = await stalled.recv_close(timeout=15)
            return growth, code, reason

        growth, code, reason = asyncio.run(scenario())
        assert growth < 40 * 2**20, "server RSS grew %d bytes" % growth
        # The close frame queues behind the unread data, so the client may
        # see only the TCP close; when it does see the frame, it says why.
        assert (code, reason) in ((1008, "slow consumer"), (None, ""))
        assert "slow consumer" in server.output
    finally:
        server.stop()
        client.close()


# --- bad input -------------------------------------------------------------------


def random_frame(rng):
    choice = rng.random()
    if choice < 0.2:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(0, 200)))
    if choice < 0.3:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
    methods = ["SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "subscribe", "", 7, None]
    params = [
        ["trade.SOL_USDC"],
        ["trade.FUZZ_%d" % rng.randrange(10)],
        [],
        "x",
        [1],
        None,
        ["depth." + "A" * rng.randrange(300)],
        [{"a": 1}],
    ]
    message = {}
    for key, values in (("method", methods), ("params", params), ("id", [1, "1", None, True, 2.5])):
        if rng.random() < 0.9:
            message[key] = rng.choice(values)
    text = ujson.dumps(message)
    if rng.random() < 0.2:
        text = text[: rng.randrange(len(text) + 1)]
    return text


@pytest.mark.gen_test(timeout=60)
async def test_random_frames_never_harm_a_clean_client(server_factory, redis_client):
    server = await server_factory(
        limits__messages_per_second=1000000,
        limits__messages_burst=1000000,
        limits__frames_per_second=1000000,
        limits__frames_burst=1000000,
    )
    clean = await connect(server)
    await send(clean, "SUBSCRIBE", ["trade.SOL_USDC"])
    await subscribed(redis_client, "trade.SOL_USDC")
    rng = random.Random(1234)
    fuzzers = [await connect(server) for _ in range(3)]
    published = 0
    for i in range(3000):
        ws = fuzzers[i % 3]
        frame = random_frame(rng)
        await ws.write_message(frame, binary=isinstance(frame, bytes))
        if i % 15 == 0:
            redis_client.publish(
                "trade.SOL_USDC",
                '{"stream":"trade.SOL_USDC","data":{"e":"trade","t":%d}}' % published,
            )
            published += 1
    got = [ujson.loads(await read(clean))["data"]["t"] for _ in range(published)]
    assert got == list(range(published))
    # The fuzzers are still connected and served.
    for ws in fuzzers:
        await send(ws, "LIST_SUBSCRIPTIONS", request_id="last")
        while True:
            reply = ujson.loads(await read(ws))
            if reply.get("id") == "last":
                break
    assert server.counters.invalid_frames > 500


@pytest.mark.gen_test(timeout=120)
async def test_no_leaks_after_many_connection_cycles(server, redis_client):
    async def cycle(i):
        ws = await connect(server)
        await send(ws, "SUBSCRIBE", ["trade.LEAK%d_USDT" % (i % 40), "depth.LEAK%d_USDT" % (i % 7)])
        if i % 3 == 0:
            await send(ws, "UNSUBSCRIBE", ["depth.LEAK%d_USDT" % (i % 7)], request_id=2)
        await send(ws, "LIST_SUBSCRIPTIONS", request_id=3)
        await read(ws)  # the reply: the server has processed the subscribe
        if i % 2:
            ws.close()
        else:
            abort(ws)

    for start in range(0, 4000, 20):
        await asyncio.gather(*(cycle(i) for i in range(start, start + 20)))
    await async_wait_until(
        lambda: not server.manager.connections, timeout=20, message="all connections gone"
    )
    assert server.manager.streams == {}
    await async_wait_until(
        lambda: redis_client.pubsub_channels("*LEAK*") == [],
        timeout=10,
        message="upstream channels released",
    )


# --- limits ----------------------------------------------------------------------


@pytest.mark.gen_test
async def test_streams_per_connection_limit(server_factory):
    server = await server_factory(limits__max_streams_per_connection=3, protocol__acks="true")
    ws = await connect(server)
    await send(ws, "SUBSCRIBE", ["trade.A_B", "trade.C_D", "trade.E_F"])
    assert ujson.loads(await read(ws)) == {"result": None, "id": 1}
    await send(ws, "SUBSCRIBE", ["trade.A_B", "trade.G_H"], request_id=2)
    reply = ujson.loads(await read(ws))
    assert reply["error"]["code"] == 2 and "too many streams" in reply["error"]["msg"]
    await send(ws, "LIST_SUBSCRIPTIONS", request_id=3)
    assert ujson.loads(await read(ws))["result"] == ["trade.A_B", "trade.C_D", "trade.E_F"]
    assert server.counters.rejected["too_many_streams"] == 1  # trade.G_H


@pytest.mark.gen_test
async def test_frame_size_limit(server_factory):
    server = await server_factory(limits__max_frame_bytes=1024)
    ws = await connect(server)
    at_limit = '{"method":"LIST_SUBSCRIPTIONS","id":1,"pad":"%s"}'
    at_limit = at_limit % ("x" * (1024 - len(at_limit) + 2))
    assert len(at_limit) == 1024
    await ws.write_message(at_limit)
    assert ujson.loads(await read(ws)) == {"result": [], "id": 1}
    await ws.write_message(at_limit + " ")
    assert await asyncio.wait_for(ws.read_message(), 5) is None
    assert ws.close_code == 1009


@pytest.mark.gen_test
async def test_message_rate_limit(server_factory):
    server = await server_factory(limits__messages_per_second=1, limits__messages_burst=5)
    ws = await connect(server)
    for i in range(5):
        await send(ws, "LIST_SUBSCRIPTIONS", request_id=i)
        assert ujson.loads(await read(ws))["id"] == i
    await send(ws, "LIST_SUBSCRIPTIONS", request_id=99)
    assert await asyncio.wait_for(ws.read_message(), 5) is None
    assert (ws.close_code, ws.close_reason) == (1008, "rate limit exceeded")
    assert server.counters.closed["rate_limit"] == 1


@pytest.mark.gen_test(timeout=20)
async def test_keepalive_closes_silent_peers_only(server_factory):
    # The polite client answers on the server's own event loop: a timeout
    # shorter than a busy machine's pause between two turns would close it.
    server = await server_factory(server__ping_interval=0.5, server__ping_timeout=0.5)
    polite = await connect(server)  # Tornado's client answers pings by itself
    silent = await RawClient.connect(server.settings.port)
    # The silent client reads (so it is not a slow consumer) but never pongs.
    opcode, _ = await silent.recv()
    assert opcode == 0x9
    code, reason = await silent.recv_close()
    assert (code, reason) == (1001, "ping timeout")
    await async_wait_until(lambda: len(server.manager.connections) == 1)
    start = time.monotonic()
    await async_wait_until(lambda: time.monotonic() - start > 2.0, 5)  # several more sweeps
    await send(polite, "LIST_SUBSCRIPTIONS")
    assert ujson.loads(await read(polite)) == {"result": [], "id": 1}
    assert server.counters.closed["ping_timeout"] == 1


def _server_side_sockets(port):
    """(state, bytes queued to send) of every TCP socket on local ``port``,
    from /proc/net/tcp (state 04 is FIN-WAIT-1)."""
    found = []
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local_port = int(fields[1].split(":")[1], 16)
            if local_port == port:
                found.append((fields[3], int(fields[4].split(":")[0], 16)))
    return found


def test_a_closed_slow_consumer_leaves_no_kernel_memory_behind(redis_url):
    """A client that stopped reading is reset once its close frame cannot be
    delivered: the megabytes queued for it are freed, not left in FIN-WAIT-1."""
    server = ServerProcess("--redis-url", redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        server.wait_listening()

        async def scenario():
            stalled = await RawClient.connect(server.port, rcvbuf=4096)
            stalled.send('{"method":"SUBSCRIBE","params":["depth.STALL_USDT"],"id":1}')
            await async_wait_until(
                lambda: client.pubsub_numsub("depth.STALL_USDT")[0][1] == 1,
                message="subscribed upstream",
            )
            filler = "x" * 50_000
            for t in range(200):  # 10 MB: past the 1 MiB cap and the kernel's buffers
                client.publish(
                    "depth.STALL_USDT",
                    '{"stream":"depth.STALL_USDT","data":'
                    '{"e":"depth","t":%d,"f":"%s"}}' % (t, filler),
                )
                if "slow consumer" in server.output:
                    break
            await async_wait_until(
                lambda: "slow consumer" in server.output, 10, message="slow consumer closed"
            )
            # Tornado waits 5 s for the close handshake, then drops the
            # connection; the client still reads nothing.
            await async_wait_until(
                lambda: (
                    not any(
                        queued
                        for state, queued in _server_side_sockets(server.port)
                        if state != "0A"
                    )
                ),  # 0A: the listening socket
                12,
                interval=0.2,
                message="the server's socket and its queued bytes released",
            )
            stalled.close()

        asyncio.run(scenario())
    finally:
        server.stop()
        client.close()


def _tcp_memory_pages():
    """The kernel's TCP buffer memory in pages (/proc/net/sockstat)."""
    with open("/proc/net/sockstat") as stats:
        for line in stats:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1])
    return 0


def test_two_hundred_stalled_clients_release_their_kernel_memory(redis_url):
    """200 clients stop reading a busy stream: each is cut off at its cap,
    and soon after (Tornado's 5 s close wait) none of their sockets remains
    on the server side and the kernel's TCP memory is back near where it
    was; readers beside them get every message in order."""
    server = ServerProcess("--redis-url", redis_url)
    client = redis.Redis.from_url(redis_url)
    stream = "depth.STALL200_USDT"
    try:
        server.wait_listening()

        async def scenario():
            base = _tcp_memory_pages()
            readers = [
                await tornado.websocket.websocket_connect(
                    "ws://127.0.0.1:%d/stream?streams=%s" % (server.port, stream)
                )
                for _ in range(3)
            ]
            # Bare sockets that are never read: an asyncio stream would go on
            # reading each into the test's memory (up to 2 MiB apiece, 400 MB
            # for 200), and that work in this process starved the readers.
            stalled = [
                (await raw_socket(server.port, "/stream?streams=%s" % stream, rcvbuf=4096))[0]
                for _ in range(200)
            ]
            await async_wait_until(
                lambda: client.pubsub_numsub(stream)[0][1] == 1 and "connect" in server.output,
                message="subscribed",
            )
            count = 400  # 8 MB: past every stalled client's 1 MiB cap and kernel buffers
            received = [0] * len(readers)
            tasks = [
                asyncio.ensure_future(drain(ws, received, i, count)) for i, ws in enumerate(readers)
            ]
            await publish_paced(redis_url, stream, count, "x" * 20_000, received)
            await asyncio.gather(*tasks)  # the readers got everything, in order

            def slow_consumers():  # (logged once a second: counted in /health)
                with urllib.request.urlopen("http://127.0.0.1:%d/health" % server.port) as reply:
                    return ujson.loads(reply.read())["stats"]["closed"]["slow_consumer"]

            await async_wait_until(
                lambda: slow_consumers() >= 200, 30, message="200 slow consumers closed"
            )
            held = _tcp_memory_pages()
            # Tornado waits 5 s for a close handshake, then resets (SO_LINGER 0).
            # (Not the listener, nor a TIME-WAIT a /health request above
            # left: those hold no buffers.)
            await async_wait_until(
                lambda: (
                    len([s for s in _server_side_sockets(server.port) if s[0] not in ("0A", "06")])
                    <= len(readers)
                ),
                20,
                interval=0.2,
                message="no stalled client's socket left on the server side",
            )
            # The kernel's TCP memory is counted for the whole machine, where
            # other work comes and goes: most of what the stalled clients
            # held (megabytes each) must be gone, not every page.
            limit = base + max(1024, (held - base) // 4)
            await async_wait_until(
                lambda: _tcp_memory_pages() <= limit,
                20,
                interval=0.2,
                message="TCP memory back near its base (%d pages, %d held)" % (base, held),
            )
            for sock in stalled:
                sock.close()
            for ws in readers:
                ws.close()

        asyncio.run(scenario())
    finally:
        server.stop()
        client.close()
