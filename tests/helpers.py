"""What the test suite's fixtures and scenarios share: settings and servers
of the suite, WebSocket clients on a server, Redis checks, scripts.  The
generic tools (waiting, ports, raw frames and handshakes, /health) are
marketstream.testing's."""

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import tornado.websocket
import ujson

from marketstream.server.config import load_settings
from marketstream.testing import async_wait_until, free_port, health_status, wait_until


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
        await async_wait_until(
            lambda channel=channel: numsub(redis_client, channel) == count,
            message="%s subscribed upstream" % channel,
        )


async def subscribe_all(server, redis_client, clients, stream):
    """Subscribe every client to ``stream`` and wait until the server
    registered them all and Redis has the channel subscribed."""
    for ws in clients:
        await send(ws, "SUBSCRIBE", [stream])
    await listeners(server, stream, len(clients))
    await subscribed(redis_client, stream)


async def listeners(server, stream, count):
    """Wait until ``count`` connections of ``server`` listen to ``stream``."""
    await async_wait_until(
        lambda: len(server.manager.streams.get(stream, ())) == count,
        message="%d listeners on %s" % (count, stream),
    )


async def released(redis_client, *channels):
    for channel in channels:
        await async_wait_until(
            lambda channel=channel: numsub(redis_client, channel) == 0,
            message="%s released upstream" % channel,
        )


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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ServerProcess:
    """``python -m marketstream ...`` with its stderr collected in a thread."""

    def __init__(self, *args, env=None, port=None):
        self.port = port or free_port()
        environ = {
            k: v
            for k, v in os.environ.items()
            if k not in ("REDIS_URL", "WS_STREAM_URL", "MARKETSTREAM_CONFIG")
        }
        environ.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "marketstream", "--listen", "127.0.0.1:%d" % self.port, *args],
            cwd=ROOT,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self):
        return "".join(self.lines)

    def wait_listening(self, timeout=15):
        wait_until(
            lambda: "listening on" in self.output or self.proc.poll() is not None,
            timeout,
            message="server start",
        )
        assert self.proc.poll() is None, self.output

    def wait_healthy(self, timeout=20):
        """Wait until GET /health answers 200 (or the process exits)."""
        wait_until(
            lambda: self.proc.poll() is not None or health_status(self.port) == 200,
            timeout,
            interval=0.05,
            message="GET /health -> 200",
        )
        assert self.proc.poll() is None, "server exited early:\n" + self.output

    def redis_children(self):
        import psutil

        return [
            child
            for child in psutil.Process(self.proc.pid).children(recursive=True)
            if "redis-server" in child.name()
        ]

    def stop(self, timeout=10):
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(10)


async def clients_on_every_worker(server, redis_client, stream, workers=2, timeout=20, least=1):
    """Connect clients subscribed to ``stream`` until all ``workers`` of a
    multi-process ``server`` (a ServerProcess run with acks) hold some.

    The workers share one listening socket and the kernel gives each new
    connection to whichever wakes first, so clients connect in concurrent
    batches: one client at a time can keep landing on the same worker.
    Each worker subscribes the stream upstream once, so NUMSUB counts the
    workers in use.  Returns the clients (at least ``least``).
    """
    url = "ws://127.0.0.1:%d/ws" % server.port
    request = ujson.dumps({"method": "SUBSCRIBE", "params": [stream], "id": 1})

    async def one():
        ws = await tornado.websocket.websocket_connect(url)
        await ws.write_message(request)
        # With acks on, the reply means Redis confirmed the subscription.
        reply = ujson.loads(await read(ws))
        assert reply == {"result": None, "id": 1}, (reply, server.output)
        return ws

    clients = []
    deadline = time.monotonic() + timeout
    while redis_client.pubsub_numsub(stream)[0][1] < workers or len(clients) < least:
        assert time.monotonic() < deadline, "connections never reached all %d workers:\n%s" % (
            workers,
            server.output,
        )
        clients.extend(await asyncio.gather(*(one() for _ in range(10))))
    return clients


def load_script(path):
    """The module of a script in scripts/ (imported, not run)."""
    import importlib.util

    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_options_documented(path, options):
    """Every option of the script at ``path`` has help text, and its
    ``--help`` shows the default of each of ``options``."""
    for action in load_script(path).build_parser()._actions:
        if action.dest != "help":
            assert action.help, "%s has no help text" % action.option_strings
    text = subprocess.run(
        [sys.executable, path, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    ).stdout
    for option in options:
        entry = text[text.index("\n  " + option) :].split("\n  -", 2)[1]
        assert "default:" in entry, (option, entry)
