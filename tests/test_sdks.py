"""The exchange SDKs users already have, unchanged, pointed at a real
marketstream server: each receives every message of a subscribed stream,
in order.

Installed with the ``sdk`` extra (``pip install .[test,sdk]``).  Each test
subscribes through the SDK's own API, waits until the server has the
stream subscribed upstream, publishes 50 trades and waits (with a
deadline) for all of them.
"""

import asyncio
import time

import pytest
import ujson

from marketstream.publisher import Publisher
from marketstream.testing import async_wait_until, health, wait_until
from tests.helpers import ServerProcess, numsub


STREAM = "trade.SOL_USDC"
COUNT = 50


@pytest.fixture
def server_process(redis_url):
    server = ServerProcess("--redis-url", redis_url)
    server.wait_listening()
    yield server
    server.stop()


@pytest.fixture(params=["plain", "recoverable", "large"])
def publish(request, redis_client):
    """Publish ``COUNT`` trades on ``STREAM``: plain PUBLISH of envelopes, or
    through the recoverable publisher (frames then carry ``seq``), or large
    ones (over ``compression_min_bytes``: compressed for an SDK that offers
    permessage-deflate, as python-websockets and aiohttp do)."""

    def data(t):
        if request.param == "large":
            return dict(small(t), fills=[["150.%03d" % i, "0.010"] for i in range(60)])
        return small(t)

    def small(t):
        return {
            "e": "trade",
            "E": 1_700_000_000_000_000 + t,
            "s": "SOL_USDC",
            "t": t,
            "p": "150.%03d" % t,
            "q": "1.000",
            "m": t % 2 == 0,
            "T": 1_700_000_000_000 + t,
        }

    def run():
        if request.param != "recoverable":
            for t in range(COUNT):
                redis_client.publish(STREAM, ujson.dumps({"stream": STREAM, "data": data(t)}))
        else:
            with Publisher(redis_client, history=100) as pub:
                pub.publish_many([(STREAM, data(t)) for t in range(COUNT)])

    run.kind = request.param
    return run


def wait_subscribed(redis_client, server, timeout=10):
    wait_until(
        lambda: numsub(redis_client, STREAM) == 1,
        timeout,
        message="%s subscribed (server output:\n%s)" % (STREAM, server.output),
    )


def check(trades):
    """``trades``: the data objects received, in order of arrival."""
    assert [t["t"] for t in trades] == list(range(COUNT))
    assert all(t["s"] == "SOL_USDC" and t["e"] == "trade" for t in trades)


def base_url(server):
    return "ws://127.0.0.1:%d" % server.port


# --- binance-sdk-spot (Binance's official modular SDK, aiohttp) --------------------


def test_binance_sdk_spot(server_process, redis_client, publish):
    from binance_common.configuration import ConfigurationWebSocketStreams
    from binance_sdk_spot.spot import Spot

    received = []

    async def run():
        # stream_url is the base; the SDK appends /stream and sends
        # {"method":"SUBSCRIBE","params":[...],"id":"<uuid>"}.
        client = Spot(
            config_ws_streams=ConfigurationWebSocketStreams(stream_url=base_url(server_process))
        )
        connection = await client.websocket_streams.create_connection()
        assert connection is not None and connection.connections, "SDK did not connect"
        try:
            await connection.subscribe([STREAM])
            connection.on("message", received.append, STREAM)
            await asyncio.to_thread(wait_subscribed, redis_client, server_process)
            publish()
            await async_wait_until(
                lambda: len(received) >= COUNT, 10.0, message="%d trades" % COUNT
            )
        finally:
            await connection.close_connection(close_session=True)

    asyncio.run(run())
    assert all(m["stream"] == STREAM for m in received)
    check([m["data"] for m in received])


# --- binance-connector (SpotWebsocketStreamClient, websocket-client threads) -------


def test_binance_connector(server_process, redis_client, publish):
    from binance.websocket.spot.websocket_stream import SpotWebsocketStreamClient

    received = []
    client = SpotWebsocketStreamClient(
        stream_url=base_url(server_process),
        is_combined=True,
        on_message=lambda _, text: received.append(ujson.loads(text)),
    )
    try:
        client.subscribe(STREAM)  # {"method":"SUBSCRIBE","params":[...],"id":<ms timestamp>}
        wait_subscribed(redis_client, server_process)
        publish()
        wait_until(lambda: len(received) >= COUNT, 10, message="%d trades" % COUNT)
    finally:
        client.stop()
    assert all(m["stream"] == STREAM for m in received)
    check([m["data"] for m in received])


# --- python-binance (BinanceSocketManager.multiplex_socket, websockets) -------------


def test_python_binance_multiplex_socket(server_process, redis_client, publish):
    from binance import AsyncClient, BinanceSocketManager

    received = []

    async def run():
        client = AsyncClient()  # no keys: public streams only; makes no request
        try:
            manager = BinanceSocketManager(client)
            # The spot stream base URL; multiplex_socket connects to
            # <STREAM_URL>stream?streams=a/b (subscribed at connect time).
            manager.STREAM_URL = base_url(server_process) + "/"
            socket = manager.multiplex_socket([STREAM])
            # Its read loop polls every TIMEOUT (10 s) seconds for the order
            # to stop: a shorter poll only makes the test's exit quicker.
            socket.TIMEOUT = 0.5
            async with socket:
                await asyncio.to_thread(wait_subscribed, redis_client, server_process)
                publish()
                deadline = time.monotonic() + 10
                while len(received) < COUNT:
                    message = await asyncio.wait_for(socket.recv(), deadline - time.monotonic())
                    assert message.get("e") != "error", message
                    received.append(message)
        finally:
            await client.close_connection()

    asyncio.run(run())
    assert all(m["stream"] == STREAM for m in received)
    check([m["data"] for m in received])
    if publish.kind == "large":
        # python-binance runs on python-websockets, which offers
        # permessage-deflate: every trade came compressed and was inflated.
        assert health(server_process.port)["stats"]["deflated_messages"] == COUNT


# --- backpack-exchange-sdk (WebSocketClient, websocket-client thread) ---------------


def test_backpack_exchange_sdk(server_process, redis_client, publish):
    from backpack_exchange_sdk.websocket import WebSocketClient

    class MarketstreamWebSocketClient(WebSocketClient):
        """Backpack's client with the URL patched.  (It reconnects whenever
        its connection closes; after close() it does not, so the test ends
        cleanly.)"""

        url = base_url(server_process) + "/ws"
        closing = False

        def _connect(self):
            if self.closing:
                return
            self.base_url = self.url
            super()._connect()

        def close(self):
            self.closing = True
            super().close()

    received = []
    client = MarketstreamWebSocketClient()
    try:
        # Sends {"method":"SUBSCRIBE","params":[...]} without an id.
        client.subscribe([STREAM], received.append)
        wait_subscribed(redis_client, server_process)
        publish()
        wait_until(lambda: len(received) >= COUNT, 10, message="%d trades" % COUNT)
    finally:
        client.close()
    check(received)  # the callback gets the data objects
