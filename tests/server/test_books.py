"""server/books.py, the books' shell: one timer per update interval, run
only while derived streams of that interval exist, ticking once per
interval whatever the number of subscribers.  A real Redis and server,
real WebSocket clients; the derived streams' ``tick`` is watched (called
through) to count the timers' ticks."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import ujson

from marketstream.testing import async_wait_until
from tests.helpers import connect, listeners, read, send, subscribed


@pytest.fixture
def ticks(server, monkeypatch):
    """Each tick of ``server``'s timers: (interval in ms, loop time)."""
    derived = server.manager.core.derived
    tick = derived.tick
    seen: list[tuple[int, float]] = []

    def counted(interval):
        seen.append((interval, asyncio.get_running_loop().time()))
        return tick(interval)

    monkeypatch.setattr(derived, "tick", counted)
    return seen


def timers(server):
    """The intervals whose timers are scheduled."""
    return set(server.manager.books._ticks)


def of(ticks, interval):
    return [at for ms, at in ticks if ms == interval]


@pytest.mark.gen_test(timeout=60)
async def test_timers_run_only_while_derived_streams_exist(server, redis_client, ticks):
    name = "T%s_USDT" % uuid.uuid4().hex[:8].upper()
    ws = await connect(server)
    # Streams that are not derived (a book stream among them): no timer.
    await send(ws, "SUBSCRIBE", ["depth." + name, "ticker." + name])
    await listeners(server, "ticker." + name, 1)
    await subscribed(redis_client, "ticker." + name)
    redis_client.publish("ticker." + name, ujson.dumps({"stream": "ticker." + name, "data": {}}))
    await read(ws, timeout=10)  # the server's loop has turned meanwhile
    assert timers(server) == set() and ticks == []
    # A derived stream: its interval's timer, ticking.
    await send(ws, "SUBSCRIBE", ["ticker.%s@250ms" % name], request_id=2)
    await async_wait_until(lambda: timers(server) == {250}, message="the 250 ms timer")
    await async_wait_until(lambda: len(of(ticks, 250)) >= 3, timeout=10, message="ticks")
    # The last derived stream goes: the timer stops at its next tick.
    await send(ws, "UNSUBSCRIBE", ["ticker.%s@250ms" % name], request_id=3)
    await async_wait_until(lambda: timers(server) == set(), timeout=10, message="stopped")
    stopped = len(of(ticks, 250))
    # No more ticks of it: another interval's timer (the probe) ticks past
    # a few 250 ms intervals meanwhile.
    await send(ws, "SUBSCRIBE", ["ticker.%s@100ms" % name], request_id=4)
    await async_wait_until(lambda: len(of(ticks, 100)) >= 8, timeout=10, message="probe ticks")
    assert len(of(ticks, 250)) == stopped
    assert timers(server) == {100}
    ws.close()


@pytest.mark.gen_test(timeout=60)
async def test_one_tick_per_interval_whatever_the_subscribers(server, redis_client, ticks):
    name = "T%s_USDT" % uuid.uuid4().hex[:8].upper()
    clients = [await connect(server) for _ in range(5)]
    for ws in clients:
        await send(ws, "SUBSCRIBE", ["ticker.%s@100ms" % name, "kline.%s@100ms" % name])
    streams = server.manager.core.derived.streams
    await async_wait_until(
        lambda: all(
            s in streams and len(streams[s].listeners) == 5
            for s in ("ticker.%s@100ms" % name, "kline.%s@100ms" % name)
        ),
        message="five subscribers of each",
    )
    # Two derived streams of 100 ms, five subscribers each: one timer.
    assert timers(server) == {100}
    await async_wait_until(lambda: len(of(ticks, 100)) >= 20, timeout=20, message="ticks")
    at = of(ticks, 100)
    elapsed = at[-1] - at[0]
    # One tick per 100 ms: each deadline at least 100 ms after the one
    # before and never before the previous tick ran, so n ticks span at
    # least (n - 2) intervals, however late a busy loop runs them.
    assert len(at) <= elapsed / 0.1 + 2, (len(at), elapsed)
    for ws in clients:
        ws.close()
    await async_wait_until(lambda: timers(server) == set(), timeout=10, message="stopped")
