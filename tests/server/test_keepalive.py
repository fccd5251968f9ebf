"""Keepalive: a client that answers pings is never closed by it, whatever
``ping_interval`` and ``ping_timeout`` are; one that does not answer is
closed within ``ping_interval + ping_timeout`` plus one sweep.

Real server, real Redis, real sockets: a Tornado client (which answers
pings by itself, as browsers and every WebSocket library do) and a raw
client that reads frames but never answers a ping.
"""

import asyncio
import time

import pytest
import redis
import tornado.websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marketstream.server.app import Server
from marketstream.testing import RawClient, async_wait_until
from tests.helpers import envelope, make_settings, read, send


async def _scenario(redis_url, interval, timeout, run_for):
    """Run a polite and a silent client for ``run_for`` seconds; return
    (polite still open, seconds until the silent one was closed, its close code
    and reason)."""
    server = Server(
        make_settings(redis_url, server__ping_interval=interval, server__ping_timeout=timeout)
    )
    await server.start()
    try:
        port = server.settings.port
        polite = await tornado.websocket.websocket_connect("ws://127.0.0.1:%d/ws" % port)
        await send(polite, "SUBSCRIBE", ["trade.KEEP_ALIVE"])
        silent = await RawClient.connect(port)
        started = time.monotonic()
        await async_wait_until(
            lambda: len(server.manager.connections) == 2, message="both clients registered"
        )
        code, reason = await silent.recv_close(timeout=run_for + 5)
        silent_closed_after = time.monotonic() - started
        silent.close()
        remaining = run_for - (time.monotonic() - started)
        if remaining > 0:
            await asyncio.sleep(remaining)  # the polite client must live through it
        # Still open, still served: a message published now arrives.
        alive = polite.protocol is not None and polite.close_code is None
        if alive:
            await async_wait_until(
                lambda: "trade.KEEP_ALIVE" in server.manager.streams,
                message="polite client subscribed",
            )
            client = redis.Redis.from_url(redis_url)
            try:
                await async_wait_until(
                    lambda: client.publish("trade.KEEP_ALIVE", envelope("trade.KEEP_ALIVE", t=1)),
                    message="publish reaches the server",
                )
            finally:
                client.close()
            assert "trade.KEEP_ALIVE" in await read(polite)
        polite.close()
        return alive, silent_closed_after, code, reason
    finally:
        await server.stop()


def _check(result, interval, timeout):
    alive, closed_after, code, reason = result
    assert alive, "a client that answers pings was closed (interval %s, timeout %s)" % (
        interval,
        timeout,
    )
    assert (code, reason) == (1001, "ping timeout")
    # First ping at ~interval, closed when it is timeout old; allow one more
    # sweep and scheduling noise on a busy machine.
    assert closed_after <= interval + timeout + interval + 1.0, closed_after
    assert closed_after >= min(interval, timeout) * 0.9, closed_after


@pytest.mark.parametrize("interval, timeout", [(0.4, 0.4), (0.2, 0.6), (0.6, 0.2), (0.05, 0.3)])
def test_polite_client_stays_silent_one_goes(redis_url, interval, timeout):
    run_for = max(4 * interval, 2 * (interval + timeout))
    _check(asyncio.run(_scenario(redis_url, interval, timeout, run_for)), interval, timeout)


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(interval=st.floats(0.05, 0.4), ratio=st.floats(0.25, 4.0))
def test_any_interval_and_timeout_ratio(redis_url, interval, ratio):
    timeout = max(0.1, round(interval * ratio, 3))
    run_for = max(4 * interval, 2 * (interval + timeout))
    _check(asyncio.run(_scenario(redis_url, interval, timeout, run_for)), interval, timeout)


@pytest.mark.slow
def test_shipped_defaults_keep_healthy_clients_beyond_two_intervals(redis_url):
    """The defaults (20 s / 20 s) once closed every client at 40 s."""
    defaults = make_settings(redis_url).server
    interval, timeout = defaults.ping_interval, defaults.ping_timeout
    assert (interval, timeout) == (20, 20)
    server_run = 2 * interval + 5  # 45 s: past the 40 s at which the old code closed everyone

    async def scenario():
        server = Server(make_settings(redis_url))
        await server.start()
        try:
            port = server.settings.port
            polite = await tornado.websocket.websocket_connect("ws://127.0.0.1:%d/ws" % port)
            await send(polite, "SUBSCRIBE", ["trade.KEEP_ALIVE"])
            silent = await RawClient.connect(port)
            started = time.monotonic()
            code, reason = await silent.recv_close(timeout=server_run)
            closed_after = time.monotonic() - started
            await asyncio.sleep(max(0.0, server_run - (time.monotonic() - started)))
            assert polite.close_code is None and polite.protocol is not None, (
                "the polite client was closed after %.0f s" % (time.monotonic() - started)
            )
            assert server.counters.closed["ping_timeout"] == 1
            polite.close()
            return code, reason, closed_after
        finally:
            await server.stop()

    code, reason, closed_after = asyncio.run(scenario())
    assert (code, reason) == (1001, "ping timeout")
    assert timeout <= closed_after <= interval + timeout + 2, closed_after
