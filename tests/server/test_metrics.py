"""/metrics: every metric moves when its event happens."""

import asyncio
import random
import time

import pytest
import redis
import tornado.httpclient
import tornado.websocket
from prometheus_client import CollectorRegistry, Histogram, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from marketstream.server import metrics

from marketstream.testing import RawClient, wait_until
from tests.helpers import (
    ServerProcess,
    clients_on_every_worker,
    connect,
    envelope,
    read,
    send,
    subscribed,
    ws_url,
)


def parse(text):
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(
                "{%s=%s}" % item for item in sorted(sample.labels.items()) if item[0] != "pid"
            )
            samples[key] = samples.get(key, 0) + sample.value
    return samples


async def scrape(port):
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        "http://127.0.0.1:%d/metrics" % port
    )
    assert response.headers["Content-Type"].startswith("text/plain")
    return parse(response.body.decode())


class Watch:
    """Scrape before and after an event; ``moved`` gives the differences."""

    def __init__(self, server):
        self.port = server.settings.port
        self.before = None

    async def start(self):
        self.before = await scrape(self.port)
        return self

    async def moved(self, name, expected=None, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            after = await scrape(self.port)
            delta = after.get(name, 0) - self.before.get(name, 0)
            if (delta == expected) if expected is not None else delta > 0:
                return delta
            if time.monotonic() > deadline:
                raise AssertionError(
                    "%s moved by %s, expected %s" % (name, delta, expected or "> 0")
                )
            await asyncio.sleep(0.05)


@pytest.mark.gen_test(timeout=60)
async def test_delivery_metrics_move(server, redis_client):
    watch = await Watch(server).start()
    ws = await connect(server)
    await watch.moved("marketstream_connections", 1)
    await send(ws, "SUBSCRIBE", ["trade.M_USDT", "depth.M_USDT"])
    await subscribed(redis_client, "trade.M_USDT", "depth.M_USDT")
    await watch.moved("marketstream_subscriptions", 2)
    await watch.moved("marketstream_upstream_channels", 2)
    payload = '{"stream":"trade.M_USDT","data":{"e":"trade"}}'
    for _ in range(3):
        redis_client.publish("trade.M_USDT", payload)
    for _ in range(3):
        await read(ws)
    await watch.moved("marketstream_redis_messages_total", 3)
    await watch.moved("marketstream_deliveries_total", 3)
    await watch.moved("marketstream_bytes_sent_total", 3 * (len(payload) + 2))
    batches = await watch.moved("marketstream_batches_total")
    await watch.moved("marketstream_batch_size_count", batches)
    await watch.moved("marketstream_batch_size_sum", 3)
    redis_client.publish("trade.M_USDT", "not json")
    await watch.moved("marketstream_dropped_total{cause=malformed_payload}", 1)
    ws.close()
    await watch.moved("marketstream_connections", 0)
    await watch.moved("marketstream_subscriptions", 0)


@pytest.mark.gen_test(timeout=60)
async def test_publish_latency_lands_in_the_bucket_of_the_publishers_timestamp(
    server, redis_client
):
    ws = await connect(server)
    await send(ws, "SUBSCRIBE", ["trade.LAT_USDT"])
    await subscribed(redis_client, "trade.LAT_USDT")
    watch = await Watch(server).start()
    # E in milliseconds, or none at all: no figure.
    redis_client.publish("trade.LAT_USDT", envelope("trade.LAT_USDT", E=int(time.time() * 1e3)))
    redis_client.publish("trade.LAT_USDT", envelope("trade.LAT_USDT", t=1))
    for _ in range(2):
        await read(ws)
    # Published 3.5 s ago (microseconds): in the (2.5, 5] s bucket, with
    # 1.5 s to spare for a slow machine.
    published = time.time() - 3.5
    redis_client.publish("trade.LAT_USDT", envelope("trade.LAT_USDT", E=int(published * 1e6)))
    await read(ws)
    await watch.moved("marketstream_publish_latency_seconds_count", 1)
    await watch.moved("marketstream_publish_latency_seconds_bucket{le=5.0}", 1)
    await watch.moved("marketstream_publish_latency_seconds_bucket{le=2.5}", 0)
    after = await scrape(server.settings.port)
    seconds = (
        after["marketstream_publish_latency_seconds_sum"]
        - watch.before["marketstream_publish_latency_seconds_sum"]
    )
    assert 3.5 <= seconds < time.time() - published, seconds


@pytest.mark.gen_test(timeout=60)
async def test_batch_latency_counts_batches_and_their_wait(server_factory, redis_client):
    # Batches at most every 2 s: the second message waits for its flush.
    server = await server_factory(server__min_flush_interval=2.0)
    ws = await connect(server)
    await send(ws, "SUBSCRIBE", ["trade.WAIT_USDT"])
    await subscribed(redis_client, "trade.WAIT_USDT")
    watch = await Watch(server).start()
    redis_client.publish("trade.WAIT_USDT", envelope("trade.WAIT_USDT", t=1))
    await read(ws)  # written at once: no flush for a long time
    redis_client.publish("trade.WAIT_USDT", envelope("trade.WAIT_USDT", t=2))
    await read(ws)  # held until 2 s after the first flush
    batches = await watch.moved("marketstream_batches_total")
    assert batches == 2
    await watch.moved("marketstream_batch_latency_seconds_count", batches)
    # The first at once, the second after (nearly) the rest of the 2 s.
    await watch.moved("marketstream_batch_latency_seconds_bucket{le=1.0}", 1)
    await watch.moved("marketstream_batch_latency_seconds_bucket{le=5.0}", 2)
    # No E in these payloads: no publish -> delivery figure.
    await watch.moved("marketstream_publish_latency_seconds_count", 0)


@pytest.mark.gen_test(timeout=60)
async def test_client_misbehaviour_metrics_move(server_factory):
    server = await server_factory(
        limits__messages_per_second=1,
        limits__messages_burst=3,
        server__ping_interval=0.3,
        server__ping_timeout=0.2,
    )
    watch = await Watch(server).start()
    ws = await connect(server)
    await ws.write_message("junk")
    await watch.moved("marketstream_dropped_total{cause=invalid_frame}", 1)
    await send(ws, "SUBSCRIBE", ["nope.M_USDT"])
    await watch.moved("marketstream_dropped_total{cause=rejected_stream}", 1)
    await send(ws, "LIST_SUBSCRIPTIONS")
    await read(ws)
    await send(ws, "LIST_SUBSCRIPTIONS")  # the 4th message within a second
    await watch.moved("marketstream_dropped_total{cause=rate_limit}", 1)
    silent = await RawClient.connect(server.settings.port)
    await silent.recv_close()
    await watch.moved("marketstream_dropped_total{cause=ping_timeout}", 1)


@pytest.mark.gen_test(timeout=60)
async def test_connection_level_metrics_move(server_factory):
    server = await server_factory(server__handshake_timeout=0.5, limits__frames_burst=20)
    watch = await Watch(server).start()
    port = server.settings.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
    assert (await reader.readline()).startswith(b"HTTP/1.1 413")
    await watch.moved("marketstream_refused_handshakes_total{cause=body_too_large}", 1)
    silent = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(silent[0].read(), 10) == b""  # closed at its deadline
    await watch.moved("marketstream_refused_handshakes_total{cause=handshake_timeout}", 1)
    flooder = await RawClient.connect(port)
    for _ in range(30):
        flooder.send(b"", opcode=0x9)
    assert (await flooder.recv_close())[0] == 1008
    await watch.moved("marketstream_dropped_total{cause=frame_rate_limit}", 1)
    writer.close(), silent[1].close(), flooder.close()


@pytest.mark.gen_test(timeout=60)
async def test_slow_consumer_metric_moves(server_factory, redis_client):
    server = await server_factory(limits__max_buffer_bytes=65536)
    watch = await Watch(server).start()
    stalled = await RawClient.connect(server.settings.port, rcvbuf=4096)
    stalled.send('{"method":"SUBSCRIBE","params":["depth.SLOW_USDT"],"id":1}')
    await subscribed(redis_client, "depth.SLOW_USDT")
    big = '{"stream":"depth.SLOW_USDT","data":{"e":"depth","f":"%s"}}' % ("x" * 100_000)
    for _ in range(100):  # 10 MB: past the kernel's socket buffers and the cap
        redis_client.publish("depth.SLOW_USDT", big)
        await asyncio.sleep(0)
    await watch.moved("marketstream_dropped_total{cause=slow_consumer}", 1, timeout=15)
    stalled.close()


@pytest.mark.gen_test(timeout=60)
async def test_refused_handshake_metrics_move(server_factory):
    server = await server_factory(
        server__max_connections=2,
        server__max_connections_per_ip=1,
        server__allowed_origins="https://ok.example",
    )
    watch = await Watch(server).start()
    with pytest.raises(tornado.httpclient.HTTPClientError):
        await tornado.websocket.websocket_connect(
            tornado.httpclient.HTTPRequest(
                ws_url(server), headers={"Origin": "https://evil.example"}
            )
        )
    await watch.moved("marketstream_refused_handshakes_total{cause=origin}", 1)
    await connect(server)
    with pytest.raises(tornado.httpclient.HTTPClientError):
        await connect(server)
    await watch.moved("marketstream_refused_handshakes_total{cause=max_connections_per_ip}", 1)

    server = await server_factory(server__max_connections=1)
    watch = await Watch(server).start()
    await connect(server)
    with pytest.raises(tornado.httpclient.HTTPClientError):
        await connect(server)
    await watch.moved("marketstream_refused_handshakes_total{cause=max_connections}", 1)


@pytest.mark.gen_test(timeout=60)
async def test_redis_metrics_move(server, redis_server, redis_client):
    watch = await Watch(server).start()
    assert watch.before["marketstream_redis_connected"] == 1
    redis_server.kill()
    await watch.moved("marketstream_redis_connected", -1)
    redis_server.restart()
    await watch.moved("marketstream_redis_connected", 0)
    await watch.moved("marketstream_redis_reconnects_total", 1)
    ws = await connect(server)  # a subscriber, so the connection is in pub/sub mode
    await send(ws, "SUBSCRIBE", ["trade.RM_USDT"])
    client = redis.Redis.from_url(redis_server.url)
    await subscribed(client, "trade.RM_USDT")
    client.client_kill_filter(_type="pubsub")
    await watch.moved("marketstream_redis_reconnects_total", 2)
    client.close()


def test_metrics_add_up_over_worker_processes(redis_url):
    server = ServerProcess("--redis-url", redis_url, "--processes", "2", "--acks")
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: server.output.count("listening on") == 2, 15, message="two workers")

        async def scenario():
            clients = await clients_on_every_worker(server, client, "trade.MPM_USDT", least=10)
            client.publish("trade.MPM_USDT", envelope("trade.MPM_USDT", E=int(time.time() * 1e6)))
            for ws in clients:
                await read(ws)
            # Whichever worker answers, the figures are the sum of both.
            for _ in range(6):
                deadline = time.monotonic() + 5
                while True:
                    samples = await scrape(server.port)
                    if samples.get("marketstream_connections") == len(clients) and samples.get(
                        "marketstream_deliveries_total"
                    ) == len(clients):
                        break
                    assert time.monotonic() < deadline, samples
                    await asyncio.sleep(0.1)
            assert samples["marketstream_upstream_channels"] == 2
            assert samples["marketstream_redis_messages_total"] == 2
            # Histograms too: one batch per worker, each with the message's E.
            assert (
                samples["marketstream_batch_latency_seconds_count"]
                == samples["marketstream_batches_total"]
                == 2
            )
            assert samples["marketstream_publish_latency_seconds_count"] == 2

        asyncio.run(scenario())
    finally:
        server.stop()
        client.close()


@pytest.mark.gen_test(timeout=60)
async def test_recovery_metrics_move(server, redis_url):
    from marketstream.publisher import Publisher

    publisher = Publisher(redis_url, history=100, ttl=600)
    try:
        first = publisher.publish(
            "depth.METRICS_USDT",
            {"e": "depth", "U": 1, "u": 1},
            snapshot={"e": "depthSnapshot", "u": 1, "b": [], "a": []},
        )
        publisher.publish("depth.METRICS_USDT", {"e": "depth", "U": 2, "u": 2})
        watch = await Watch(server).start()
        ws = await tornado.websocket.websocket_connect(
            ws_url(server, "/stream?streams=depth.METRICS_USDT&snapshot=1")
        )
        await read(ws)  # the snapshot
        await watch.moved("marketstream_recovery_snapshots_total", 1)
        ws2 = await tornado.websocket.websocket_connect(
            ws_url(
                server,
                "/stream?streams=depth.METRICS_USDT&since=depth.METRICS_USDT:%d" % (first - 1),
            )
        )
        await read(ws2)
        # One after the first client's snapshot, two for the resume.
        await watch.moved("marketstream_recovery_replayed_total", 3)
        ws.close()
        ws2.close()
    finally:
        publisher.close()


@pytest.mark.parametrize("processes", [1, 2])
def test_observing_in_bulk_is_observing_each(processes):
    """The exporter's one-pass observe_all gives what observe() per value
    gives (it uses prometheus_client's per-bucket values), with one process
    and in multiprocess mode."""
    rng = random.Random(7)
    values = [0.0, 1e-9, 0.0001, 0.00010001, 0.005, 0.5, 10.0, 10.5, 1e9]
    values += [rng.expovariate(100) for _ in range(1000)]
    directory = metrics.enable_multiprocess() if processes > 1 else None
    try:
        registry = CollectorRegistry()
        each = Histogram("each", "", buckets=metrics.LATENCY_BUCKETS, registry=registry)
        bulk = Histogram("bulk", "", buckets=metrics.LATENCY_BUCKETS, registry=registry)
        for value in values:
            each.observe(value)
        metrics.observe_all(bulk, values[:500])
        metrics.observe_all(bulk, values[500:])
        if directory:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        found = {
            (family.name, sample.name[len(family.name) :], sample.labels.get("le")): sample.value
            for family in registry.collect()
            for sample in family.samples
        }
    finally:
        if directory:
            metrics.disable_multiprocess(directory)
    expected = {key[1:]: value for key, value in found.items() if key[0] == "each"}
    got = {key[1:]: value for key, value in found.items() if key[0] == "bulk"}
    assert got.keys() == expected.keys() and len(got) == len(metrics.LATENCY_BUCKETS) + 3
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key


@pytest.mark.gen_test(timeout=60)
async def test_compression_metrics_move(server, redis_client):
    """A message compressed once for two compressing clients: counted once,
    with its frame's bytes before and after."""
    import websockets

    from marketstream.wire.deflate import Deflater
    from marketstream.wire.frames import text_frame

    watch = await Watch(server).start()
    clients = [await websockets.connect(ws_url(server)) for _ in range(2)]
    try:
        for ws in clients:
            await ws.send('{"method":"SUBSCRIBE","params":["depth.M_USDT"],"id":1}')
        await watch.moved("marketstream_subscriptions", 2)
        await subscribed(redis_client, "depth.M_USDT")
        payload = envelope("depth.M_USDT", b=[["%d.5" % i, "1.0"] for i in range(100)])
        redis_client.publish("depth.M_USDT", payload)
        for ws in clients:
            assert await asyncio.wait_for(ws.recv(), 10) == payload
        plain = text_frame(payload.encode())
        compressed = Deflater().frame(payload.encode(), plain)
        assert compressed is not plain
        await watch.moved("marketstream_deflated_messages_total", 1)
        await watch.moved("marketstream_deflate_input_bytes_total", len(plain))
        await watch.moved("marketstream_deflate_output_bytes_total", len(compressed))
        await watch.moved("marketstream_bytes_sent_total", 2 * len(compressed))
    finally:
        for ws in clients:
            await ws.close()
