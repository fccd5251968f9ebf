"""Helpers shared by the tests: WebSocket clients and Redis checks."""

import asyncio
import socket
import struct
import time

import pytest
import tornado.websocket
import ujson

from marketstream.config import load_settings
from marketstream.embedded import free_port


def wait_until(predicate, timeout=5.0, interval=0.01, message="condition"):
    """Poll a synchronous predicate until it is true or fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % message)
        time.sleep(interval)


async def async_wait_until(predicate, timeout=5.0, interval=0.01, message="condition"):
    """Like wait_until, but yields to the event loop between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % message)
        await asyncio.sleep(interval)


def make_settings(redis_url, **overrides):
    flat = {"redis.url": redis_url, "server.listen": "127.0.0.1:%d" % free_port()}
    flat.update({key.replace("__", "."): str(value) for key, value in overrides.items()})
    return load_settings(environ={}, overrides=flat)


def ws_url(server, path="/ws"):
    return "ws://127.0.0.1:%d%s" % (server.settings.port, path)


async def connect(server, path="/ws", **kwargs):
    return await tornado.websocket.websocket_connect(ws_url(server, path), **kwargs)


async def send(ws, method, params=None, request_id=1):
    message = {"method": method, "id": request_id}
    if params is not None:
        message["params"] = params
    await ws.write_message(ujson.dumps(message))


def numsub(redis_client, channel):
    return redis_client.pubsub_numsub(channel)[0][1]


async def subscribed(redis_client, *channels, count=1):
    for channel in channels:
        await async_wait_until(lambda: numsub(redis_client, channel) == count,
                               message="%s subscribed upstream" % channel)


async def released(redis_client, *channels):
    for channel in channels:
        await async_wait_until(lambda: numsub(redis_client, channel) == 0,
                               message="%s released upstream" % channel)


async def read(ws, timeout=5.0):
    message = await asyncio.wait_for(ws.read_message(), timeout)
    assert message is not None, "connection closed"
    return message


async def no_message(ws, wait=0.2):
    """Assert nothing arrives within ``wait`` (used after a probe message
    that is known to arrive later, so absence is meaningful)."""
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(ws.read_message()), wait)


def envelope(stream, **data):
    data.setdefault("e", stream.split(".")[0])
    return ujson.dumps({"stream": stream, "data": data})


def abort(ws):
    """Drop the TCP connection without a close frame (RST)."""
    sock = ws.protocol.stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.protocol.stream.close()
