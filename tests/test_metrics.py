"""/metrics: every metric moves when its event happens."""

import asyncio
import time

import pytest
import redis
import tornado.httpclient
import tornado.websocket
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (RawClient, ServerProcess, clients_on_every_worker, connect, read, send,
                           subscribed, wait_until, ws_url)


def parse(text):
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join("{%s=%s}" % item for item in sorted(sample.labels.items())
                                        if item[0] != "pid")
            samples[key] = samples.get(key, 0) + sample.value
    return samples


async def scrape(port):
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        "http://127.0.0.1:%d/metrics" % port)
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
                raise AssertionError("%s moved by %s, expected %s" % (name, delta, expected or "> 0"))
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
    await watch.moved('marketstream_dropped_total{cause=malformed_payload}', 1)
    ws.close()
    await watch.moved("marketstream_connections", 0)
    await watch.moved("marketstream_subscriptions", 0)


@pytest.mark.gen_test(timeout=60)
async def test_client_misbehaviour_metrics_move(server_factory):
    server = await server_factory(limits__messages_per_second=1, limits__messages_burst=3,
                                  server__ping_interval=0.3, server__ping_timeout=0.2)
    watch = await Watch(server).start()
    ws = await connect(server)
    await ws.write_message("junk")
    await watch.moved('marketstream_dropped_total{cause=invalid_frame}', 1)
    await send(ws, "SUBSCRIBE", ["nope.M_USDT"])
    await watch.moved('marketstream_dropped_total{cause=rejected_stream}', 1)
    await send(ws, "LIST_SUBSCRIPTIONS")
    await read(ws)
    await send(ws, "LIST_SUBSCRIPTIONS")  # the 4th message within a second
    await watch.moved('marketstream_dropped_total{cause=rate_limit}', 1)
    silent = await RawClient.connect(server.settings.port)
    await silent.recv_close()
    await watch.moved('marketstream_dropped_total{cause=ping_timeout}', 1)


@pytest.mark.gen_test(timeout=60)
async def test_connection_level_metrics_move(server_factory):
    server = await server_factory(server__handshake_timeout=0.5, limits__frames_burst=20)
    watch = await Watch(server).start()
    port = server.settings.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
    assert (await reader.readline()).startswith(b"HTTP/1.1 413")
    await watch.moved('marketstream_refused_handshakes_total{cause=body_too_large}', 1)
    silent = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(silent[0].read(), 10) == b""  # closed at its deadline
    await watch.moved('marketstream_refused_handshakes_total{cause=handshake_timeout}', 1)
    flooder = await RawClient.connect(port)
    for _ in range(30):
        flooder.send(b"", opcode=0x9)
    assert (await flooder.recv_close())[0] == 1008
    await watch.moved('marketstream_dropped_total{cause=frame_rate_limit}', 1)
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
    await watch.moved('marketstream_dropped_total{cause=slow_consumer}', 1, timeout=15)
    stalled.close()


@pytest.mark.gen_test(timeout=60)
async def test_refused_handshake_metrics_move(server_factory):
    server = await server_factory(server__max_connections=2, server__max_connections_per_ip=1,
                                  server__allowed_origins="https://ok.example")
    watch = await Watch(server).start()
    with pytest.raises(tornado.httpclient.HTTPClientError):
        await tornado.websocket.websocket_connect(tornado.httpclient.HTTPRequest(
            ws_url(server), headers={"Origin": "https://evil.example"}))
    await watch.moved('marketstream_refused_handshakes_total{cause=origin}', 1)
    await connect(server)
    with pytest.raises(tornado.httpclient.HTTPClientError):
        await connect(server)
    await watch.moved('marketstream_refused_handshakes_total{cause=max_connections_per_ip}', 1)

    server = await server_factory(server__max_connections=1)
    watch = await Watch(server).start()
    await connect(server)
    with pytest.raises(tornado.httpclient.HTTPClientError):
        await connect(server)
    await watch.moved('marketstream_refused_handshakes_total{cause=max_connections}', 1)


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
            client.publish("trade.MPM_USDT", '{"stream":"trade.MPM_USDT","data":{"e":"trade"}}')
            for ws in clients:
                await read(ws)
            # Whichever worker answers, the figures are the sum of both.
            for _ in range(6):
                deadline = time.monotonic() + 5
                while True:
                    samples = await scrape(server.port)
                    if (samples.get("marketstream_connections") == len(clients)
                            and samples.get("marketstream_deliveries_total") == len(clients)):
                        break
                    assert time.monotonic() < deadline, samples
                    await asyncio.sleep(0.1)
            assert samples["marketstream_upstream_channels"] == 2
            assert samples["marketstream_redis_messages_total"] == 2

        asyncio.run(scenario())
    finally:
        server.stop()
        client.close()


@pytest.mark.gen_test(timeout=60)
async def test_recovery_metrics_move(server, redis_url):
    from marketstream.publisher import Publisher
    publisher = Publisher(redis_url, history=100, ttl=600)
    try:
        first = publisher.publish("depth.METRICS_USDT", {"e": "depth", "U": 1, "u": 1},
                                  snapshot={"e": "depthSnapshot", "u": 1, "b": [], "a": []})
        publisher.publish("depth.METRICS_USDT", {"e": "depth", "U": 2, "u": 2})
        watch = await Watch(server).start()
        ws = await tornado.websocket.websocket_connect(
            ws_url(server, "/stream?streams=depth.METRICS_USDT&snapshot=1"))
        await read(ws)  # the snapshot
        await watch.moved("marketstream_recovery_snapshots_total", 1)
        ws2 = await tornado.websocket.websocket_connect(
            ws_url(server, "/stream?streams=depth.METRICS_USDT&since=depth.METRICS_USDT:%d"
                   % (first - 1)))
        await read(ws2)
        # One after the first client's snapshot, two for the resume.
        await watch.moved("marketstream_recovery_replayed_total", 3)
        ws.close()
        ws2.close()
    finally:
        publisher.close()
