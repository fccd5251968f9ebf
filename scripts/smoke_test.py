#!/usr/bin/env python3
"""Deployment smoke test for a running marketstream server.

    python scripts/smoke_test.py                      # WS_STREAM_URL and REDIS_URL
    python scripts/smoke_test.py --ws-url ws://127.0.0.1:4000/ws --redis-url redis://127.0.0.1:6379/0
    python scripts/smoke_test.py && echo deployed

Steps, one ``PASS``/``FAIL`` line each, stopping at the first failure:
health, connect, subscribe, deliver (a probe published to Redis arrives
byte-identical), unsubscribe (the server released the Redis channel), close.
Exit code 0 when every step passed, 1 otherwise.
"""

import argparse
import asyncio
import os
import sys
import time
import urllib.parse

import redis
import tornado.httpclient
import tornado.websocket
import ujson


class StepFailed(Exception):
    pass


def ws_url_from(value):
    """``host:port`` (0.0.0.0 means this host) or a full ws:// URL."""
    if "://" in value:
        return value
    host, _, port = value.rpartition(":")
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return "ws://%s:%s/ws" % (host, port)


def health_url(ws_url):
    parts = urllib.parse.urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return "%s://%s/health" % (scheme, parts.netloc)


class Smoke:
    def __init__(self, ws_url, redis_url, stream, timeout):
        self.ws_url = ws_url
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=timeout)
        self.stream = stream
        self.timeout = timeout
        self.ws = None
        self.baseline = 0
        self.failed = False

    def report(self, ok, step, detail):
        print("%s %s: %s" % ("PASS" if ok else "FAIL", step, detail), flush=True)
        if not ok:
            self.failed = True

    def numsub(self):
        return self.redis.pubsub_numsub(self.stream)[0][1]

    async def wait_numsub(self, predicate):
        deadline = time.monotonic() + self.timeout
        while not predicate(self.numsub()):
            if time.monotonic() > deadline:
                raise StepFailed("PUBSUB NUMSUB %s is %d" % (self.stream, self.numsub()))
            await asyncio.sleep(0.02)

    async def next_frame(self, deadline):
        """The next frame that is not a gap notice or an acknowledgement."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StepFailed("nothing arrived within %.1fs" % self.timeout)
            frame = await asyncio.wait_for(self.ws.read_message(), remaining)
            if frame is None:
                raise StepFailed("the server closed the connection")
            try:
                message = ujson.loads(frame)
            except ValueError:
                return frame
            if "result" in message or (isinstance(message.get("data"), dict)
                                       and message["data"].get("e") == "gap"):
                continue
            return frame

    async def health(self):
        response = await tornado.httpclient.AsyncHTTPClient().fetch(
            health_url(self.ws_url), raise_error=False, request_timeout=self.timeout)
        if response.code != 200:
            raise StepFailed("HTTP %d %s" % (response.code, response.body[:200]))
        body = ujson.loads(response.body)
        return "status %s, %s connection(s)" % (body.get("status"), body.get("connections"))

    async def connect(self):
        self.ws = await asyncio.wait_for(tornado.websocket.websocket_connect(self.ws_url), self.timeout)
        return self.ws_url

    async def subscribe(self):
        self.baseline = self.numsub()
        await self.ws.write_message(ujson.dumps({"method": "SUBSCRIBE", "params": [self.stream], "id": 1}))
        await self.wait_numsub(lambda n: n > self.baseline)
        return "%s subscribed in Redis" % self.stream

    async def deliver(self):
        probe = ujson.dumps({"stream": self.stream, "data": {
            "e": "smoke", "id": os.urandom(8).hex(), "E": int(time.time() * 1e6)}})
        started = time.monotonic()
        self.redis.publish(self.stream, probe)
        frame = await self.next_frame(started + self.timeout)
        if frame != probe:
            raise StepFailed("expected %r, got %r" % (probe, frame[:200]))
        return "probe arrived byte-identical in %.1f ms" % ((time.monotonic() - started) * 1000)

    async def unsubscribe(self):
        await self.ws.write_message(ujson.dumps({"method": "UNSUBSCRIBE", "params": [self.stream], "id": 2}))
        await self.wait_numsub(lambda n: n <= self.baseline)
        return "Redis channel %s released" % self.stream

    async def close(self):
        self.ws.close(1000)
        return "closed"

    async def run(self):
        for step in (self.health, self.connect, self.subscribe, self.deliver, self.unsubscribe,
                     self.close):
            try:
                detail = await step()
            except StepFailed as exc:
                self.report(False, step.__name__, str(exc))
            except asyncio.TimeoutError:
                self.report(False, step.__name__, "timed out after %.1fs" % self.timeout)
            except Exception as exc:  # a smoke test reports, it does not crash
                self.report(False, step.__name__, "%s: %s" % (type(exc).__name__, exc))
            else:
                self.report(True, step.__name__, detail)
            if self.failed:
                break
        if self.ws is not None:
            self.ws.close()
        self.redis.close()
        return 1 if self.failed else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ws-url", default=os.environ.get("WS_STREAM_URL", "127.0.0.1:4000"),
                        help="ws://host:port/path or host:port (default: $WS_STREAM_URL)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
                        help="Redis the server listens to (default: $REDIS_URL)")
    parser.add_argument("--stream", default="trade.SMOKE%s_TEST" % os.urandom(4).hex().upper(),
                        help="stream to use (default: a random one)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per step")
    args = parser.parse_args(argv)
    smoke = Smoke(ws_url_from(args.ws_url), args.redis_url, args.stream, args.timeout)
    return asyncio.run(smoke.run())


if __name__ == "__main__":
    sys.exit(main())
