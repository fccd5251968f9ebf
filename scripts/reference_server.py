#!/usr/bin/env python3
"""A minimal Redis pub/sub to WebSocket fan-out server: the yardstick.

Not a product: it is what the fan-out benchmark compares marketstream to.
It does the least a correct fan-out server must do, in the cheapest way
Python allows, so that the difference to marketstream is the price of
marketstream's features and design:

* asyncio transports (uvloop when installed), no HTTP framework: an upgrade
  request is answered with a 101, ``GET /health`` with a line of JSON;
* one Redis connection, read with hiredis, subscribed to a channel while
  some client wants it (channel name = stream name);
* every Redis payload is sent as is (envelope payloads: the payload is the
  WebSocket frame's text), and its frame is built once per message;
* frames for one connection are collected for one loop iteration and
  written with one ``write`` call;
* a client whose unsent data passes ``--max-buffer`` bytes is dropped.

It understands ``{"method": "SUBSCRIBE" | "UNSUBSCRIBE", "params": [...],
"id": n}`` (no reply unless ``--acks``), answers pings and close frames, and
checks nothing else (stream names, payloads, origins, limits)::

    python scripts/reference_server.py --listen 127.0.0.1:4100 --redis-url redis://127.0.0.1:6379/0
    python scripts/reference_server.py --loop asyncio ...   # without uvloop
"""

import argparse
import asyncio
import base64
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import urllib.parse

import hiredis

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def text_frame(payload: bytes) -> bytes:
    """An unmasked server text frame (the same bytes for every recipient)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def _command(*parts) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        if isinstance(part, str):
            part = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class Hub:
    """Streams, their clients, and the writes waiting for this loop iteration."""

    def __init__(self, loop, acks=False, max_buffer=8 << 20):
        self.loop = loop
        self.acks = acks
        self.max_buffer = max_buffer
        self.streams = {}  # name -> set of Client
        self.clients = set()
        self.pending = {}  # Client -> list of frames
        self.flush_scheduled = False
        self.redis = None
        self.messages = 0

    # Redis side
    def deliver(self, channel: bytes, payload: bytes) -> None:
        clients = self.streams.get(channel.decode())
        if not clients:
            return
        self.messages += 1
        frame = text_frame(payload)
        pending = self.pending
        for client in clients:
            frames = pending.get(client)
            if frames is None:
                pending[client] = [frame]
            else:
                frames.append(frame)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        pending, self.pending = self.pending, {}
        limit = self.max_buffer
        for client, frames in pending.items():
            transport = client.transport
            if transport is None or transport.is_closing():
                continue
            transport.write(frames[0] if len(frames) == 1 else b"".join(frames))
            if transport.get_write_buffer_size() > limit:
                client.drop()

    # client side
    def subscribe(self, client, names) -> None:
        for name in names:
            clients = self.streams.get(name)
            if clients is None:
                clients = self.streams[name] = set()
                self.redis.send(_command("SUBSCRIBE", name))
            clients.add(client)
            client.streams.add(name)

    def unsubscribe(self, client, names) -> None:
        for name in names:
            clients = self.streams.get(name)
            if clients is None:
                continue
            clients.discard(client)
            client.streams.discard(name)
            if not clients:
                del self.streams[name]
                self.redis.send(_command("UNSUBSCRIBE", name))

    def gone(self, client) -> None:
        self.clients.discard(client)
        self.pending.pop(client, None)
        self.unsubscribe(client, list(client.streams))


class RedisSubscriber(asyncio.Protocol):
    def __init__(self, hub):
        self.hub = hub
        self.reader = hiredis.Reader()
        self.transport = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def send(self, data):
        self.transport.write(data)

    def data_received(self, data):
        reader = self.reader
        reader.feed(data)
        deliver = self.hub.deliver
        while True:
            reply = reader.gets()
            if reply is False:
                return
            if isinstance(reply, list) and reply[0] == b"message":
                deliver(reply[1], reply[2])

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)


class Client(asyncio.Protocol):
    """One HTTP connection: /health, or a WebSocket after the upgrade."""

    __slots__ = ("hub", "transport", "buffer", "streams", "upgraded")

    def __init__(self, hub):
        self.hub = hub
        self.transport = None
        self.buffer = b""
        self.streams = set()
        self.upgraded = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 16384:
                    self.transport.close()
                return
            head, self.buffer = self.buffer[:end].decode("latin1"), self.buffer[end + 4 :]
            self.request(head)
            if not self.upgraded:
                return
        self.frames()

    def request(self, head):
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        path = parts[1] if len(parts) > 1 else "/"
        if path.startswith("/health"):
            body = json.dumps(
                {
                    "status": "ok",
                    "pid": os.getpid(),
                    "connections": len(self.hub.clients),
                    "streams": len(self.hub.streams),
                }
            ).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            self.transport.close()
            return
        key = headers.get("sec-websocket-key")
        if headers.get("upgrade", "").lower() != "websocket" or not key:
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            self.transport.close()
            return
        accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % accept
        )
        self.upgraded = True
        self.hub.clients.add(self)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        if "streams" in query:
            self.hub.subscribe(self, [s for s in query["streams"][0].split("/") if s])

    def frames(self):
        buf = self.buffer
        pos = 0
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            at = pos + 2
            if n == 126:
                if len(buf) - at < 2:
                    break
                n = struct.unpack_from("!H", buf, at)[0]
                at += 2
            elif n == 127:
                if len(buf) - at < 8:
                    break
                n = struct.unpack_from("!Q", buf, at)[0]
                at += 8
            masked = b1 & 0x80
            if len(buf) - at < n + (4 if masked else 0):
                break
            payload = buf[at + 4 : at + 4 + n] if masked else buf[at : at + n]
            if masked:
                mask = buf[at : at + 4]
                key = int.from_bytes((mask * (n // 4 + 1))[:n], "big") if n else 0
                payload = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")
                at += 4
            pos = at + n
            opcode = b0 & 0x0F
            if opcode == 0x1:
                self.message(payload)
            elif opcode == 0x8:
                self.transport.write(b"\x88\x02\x03\xe8")
                self.transport.close()
                return
            elif opcode == 0x9:
                self.transport.write(bytes((0x8A, len(payload))) + payload)
        self.buffer = buf[pos:]

    def message(self, payload):
        try:
            request = json.loads(payload)
            method, params = request["method"], request.get("params") or []
        except (ValueError, KeyError, TypeError):
            return
        if method == "SUBSCRIBE":
            self.hub.subscribe(self, params)
        elif method == "UNSUBSCRIBE":
            self.hub.unsubscribe(self, params)
        else:
            return
        if self.hub.acks:
            self.transport.write(
                text_frame(json.dumps({"result": None, "id": request.get("id")}).encode())
            )

    def drop(self):
        self.transport.abort()

    def connection_lost(self, exc):
        if self.upgraded:
            self.hub.gone(self)
        self.transport = None


async def serve(host, port, redis_url, acks=False, max_buffer=8 << 20, backlog=4096):
    """Serve until SIGTERM/SIGINT (or until the Redis connection is lost)."""
    loop = asyncio.get_running_loop()
    hub = Hub(loop, acks=acks, max_buffer=max_buffer)
    url = urllib.parse.urlsplit(redis_url)
    _, hub.redis = await loop.create_connection(
        lambda: RedisSubscriber(hub), url.hostname or "127.0.0.1", url.port or 6379
    )
    if url.password:
        hub.redis.send(_command("AUTH", urllib.parse.unquote(url.password)))
    server = await loop.create_server(
        lambda: Client(hub), host, port, backlog=backlog, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    print(
        "reference server listening on ws://%s:%d/ (pid %d, %s)"
        % (host, bound, os.getpid(), type(loop).__module__.split(".")[0]),
        file=sys.stderr,
        flush=True,
    )
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    await asyncio.wait([stop, hub.redis.lost], return_when=asyncio.FIRST_COMPLETED)
    server.close()
    for client in list(hub.clients):
        if client.transport is not None:
            client.transport.abort()
    return 0 if stop.done() else 1


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Minimal Redis pub/sub to WebSocket fan-out server (benchmark yardstick).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:4100",
        metavar="HOST:PORT",
        help="address to listen on (port 0: any free port)",
    )
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/0",
        help="Redis to subscribe (redis:// only; channel name = stream name)",
    )
    parser.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop; auto: uvloop when installed",
    )
    parser.add_argument(
        "--acks", action="store_true", help='reply {"result":null,"id":n} to requests'
    )
    parser.add_argument(
        "--max-buffer",
        type=int,
        default=8 << 20,
        metavar="BYTES",
        help="drop a client whose unsent data passes this",
    )
    parser.add_argument("--backlog", type=int, default=socket.SOMAXCONN, help="listen backlog")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    runner = asyncio.run
    if args.loop != "asyncio":
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            if args.loop == "uvloop":
                parser.error("uvloop is not installed (pip install uvloop)")
    try:
        return runner(
            serve(
                host.strip("[]") or "0.0.0.0",
                int(port),
                args.redis_url,
                args.acks,
                args.max_buffer,
                args.backlog,
            )
        )
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
