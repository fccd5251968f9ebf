#!/usr/bin/env python3
"""Deployment smoke test for a running marketstream server.

Usage::

    python scripts/smoke_test.py                  # from WS_STREAM_URL and REDIS_URL
    python scripts/smoke_test.py --ws-url ws://127.0.0.1:4000/ws \\
        --redis-url redis://127.0.0.1:6379/0 [--stream trade.SMOKE_TEST] [--timeout 5]
    python scripts/smoke_test.py && echo deployed

``--ws-url`` defaults to ``$WS_STREAM_URL``, in either of the forms the
server accepts: ``host:port`` (tested as ``ws://host:port/ws``; 0.0.0.0
means this host) or a full ``ws://host:port/path`` URL.  ``--redis-url``
defaults to ``$REDIS_URL``: the Redis the server listens to, where the probe
is published.  The stream defaults to a random ``trade.SMOKE<HEX>_TEST`` so
that other servers and clients on the same Redis are not disturbed.

Steps, one ``PASS <step>: <detail>`` or ``FAIL <step>: <detail>`` line each
on stdout, stopping at the first failure:

1. health       GET http://host:port/health answers 200 with JSON
2. connect      the WebSocket handshake succeeds
3. subscribe    SUBSCRIBE; the server subscribes the Redis channel
                (PUBSUB NUMSUB goes up; an acknowledgement, when the server
                sends them, is accepted, an error reply fails)
4. deliver      a probe PUBLISHed to Redis arrives byte-identical (round-trip
                latency in ms); unrelated frames such as gap notices are ignored
5. unsubscribe  UNSUBSCRIBE; the server releases the Redis channel (PUBSUB
                NUMSUB is back to its value before step 3)
6. close        the WebSocket closes cleanly (close code 1000 echoed)

``--timeout`` is the deadline of each step, in seconds.  Exit code 0 when
every step passed, 1 otherwise (2 for a command-line usage error).

Only the standard library, tornado and redis-py are used.
"""

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.parse

import redis
import tornado.httpclient
import tornado.websocket

STEPS = ("health", "connect", "subscribe", "deliver", "unsubscribe", "close")
DEFAULT_WS = "127.0.0.1:4000"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
POLL_INTERVAL = 0.02


class StepFailed(Exception):
    """A step did not pass; the message is the detail of its FAIL line."""


def _local_host(host):
    """The address to connect to for a bind address."""
    if host in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return host


def ws_url_from(value):
    """A ws:// URL from ``host:port`` or a ws:// / wss:// URL.

    >>> ws_url_from("0.0.0.0:4000")
    'ws://127.0.0.1:4000/ws'
    >>> ws_url_from("ws://0.0.0.0:4000/stream-ws")
    'ws://127.0.0.1:4000/stream-ws'
    """
    value = value.strip()
    if "://" not in value:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError("expected host:port or ws://host:port/path, got %r" % value)
        return "ws://%s:%s/ws" % (_local_host(host), port)
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("expected a ws:// or wss:// URL, got %r" % value)
    host = parts.hostname
    host = _local_host("[%s]" % host if ":" in host else host)
    netloc = host if parts.port is None else "%s:%d" % (host, parts.port)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/ws", parts.query, ""))


def health_url(ws_url):
    parts = urllib.parse.urlsplit(ws_url)
    return "%s://%s/health" % ("https" if parts.scheme == "wss" else "http", parts.netloc)


def redacted(url):
    """``url`` without its password, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urllib.parse.urlunsplit((parts.scheme, "%s:***@%s" % (user, netloc), parts.path,
                                    parts.query, parts.fragment))


def _error_text(exc):
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


class Smoke:
    """The six steps against one server."""

    def __init__(self, ws_url, redis_url, stream, timeout):
        self.ws_url = ws_url
        self.redis_url = redis_url
        self.stream = stream
        self.timeout = timeout
        self.redis = None
        self.ws = None
        self.frames = None      # asyncio.Queue of text frames; None marks the end
        self.reader = None
        self.baseline = 0
        self.closed_by_us = False

    # --- plumbing ------------------------------------------------------------

    def _redis(self):
        if self.redis is None:
            self.redis = redis.Redis.from_url(self.redis_url, socket_timeout=self.timeout,
                                              socket_connect_timeout=self.timeout)
        return self.redis

    def numsub(self):
        try:
            return self._redis().pubsub_numsub(self.stream)[0][1]
        except redis.RedisError as exc:
            raise StepFailed("Redis %s: %s" % (redacted(self.redis_url), _error_text(exc)))

    async def _read_frames(self):
        try:
            while True:
                frame = await self.ws.read_message()
                await self.frames.put(frame)
                if frame is None:
                    return
        except Exception:  # the connection broke: same as closed for the steps
            await self.frames.put(None)

    def _closed_detail(self):
        ws = self.ws
        return "the server closed the connection (code %s%s)" % (
            ws.close_code, ", %s" % ws.close_reason if ws.close_reason else "")

    def _reply_to(self, frame, request_id):
        """For a reply to ``request_id``: None if it is a success, else the
        error text.  Raises LookupError if ``frame`` is no such reply."""
        try:
            message = json.loads(frame)
        except (TypeError, ValueError):
            raise LookupError(frame)
        if not isinstance(message, dict) or message.get("id") != request_id or "stream" in message:
            raise LookupError(frame)
        if "error" in message:
            return json.dumps(message["error"])
        if "result" in message:
            return None
        raise LookupError(frame)

    async def _await_numsub(self, done, request_id, what):
        """Poll PUBSUB NUMSUB until ``done(n)``, failing on an error reply to
        ``request_id``; other frames that arrive meanwhile are kept."""
        deadline = time.monotonic() + self.timeout
        kept, acked = [], False
        try:
            while True:
                while not self.frames.empty():
                    frame = self.frames.get_nowait()
                    if frame is None:
                        raise StepFailed(self._closed_detail())
                    try:
                        error = self._reply_to(frame, request_id)
                    except LookupError:
                        kept.append(frame)
                        continue
                    if error is not None:
                        raise StepFailed("the server refused: %s" % error)
                    acked = True
                count = self.numsub()
                if done(count):
                    return count, acked
                if time.monotonic() > deadline:
                    raise StepFailed("PUBSUB NUMSUB %s is %d after %.1fs: %s"
                                     % (self.stream, count, self.timeout, what))
                await asyncio.sleep(POLL_INTERVAL)
        finally:
            # Put back what was not ours, in order, ahead of anything newer.
            rest = []
            while not self.frames.empty():
                rest.append(self.frames.get_nowait())
            for frame in kept + rest:
                self.frames.put_nowait(frame)

    # --- steps ---------------------------------------------------------------

    async def health(self):
        url = health_url(self.ws_url)
        try:
            response = await tornado.httpclient.AsyncHTTPClient().fetch(
                url, raise_error=False, connect_timeout=self.timeout, request_timeout=self.timeout)
        except (OSError, tornado.httpclient.HTTPClientError) as exc:
            raise StepFailed("GET %s: %s" % (url, _error_text(exc)))
        if response.code == 599:
            raise StepFailed("GET %s: %s" % (url, _error_text(response.error)))
        body = response.body or b""
        try:
            status = json.loads(body)
        except ValueError:
            status = None
        if response.code != 200:
            raise StepFailed("GET %s: HTTP %d %s" % (url, response.code,
                                                     body[:300].decode("utf-8", "replace")))
        if not isinstance(status, dict):
            raise StepFailed("GET %s: HTTP 200 but the body is not a JSON object: %r"
                             % (url, body[:200]))
        detail = "%s HTTP 200, status %s" % (url, status.get("status"))
        if "connections" in status:
            detail += ", %s client(s), %s stream(s)" % (status.get("connections"),
                                                        status.get("streams"))
        return detail

    async def connect(self):
        started = time.monotonic()
        request = tornado.httpclient.HTTPRequest(self.ws_url, connect_timeout=self.timeout,
                                                 request_timeout=self.timeout)
        try:
            self.ws = await asyncio.wait_for(tornado.websocket.websocket_connect(request),
                                             self.timeout)
        except asyncio.TimeoutError:
            raise StepFailed("%s: no handshake within %.1fs" % (self.ws_url, self.timeout))
        except tornado.httpclient.HTTPClientError as exc:
            body = exc.response.body[:200].decode("utf-8", "replace") if (
                exc.response is not None and exc.response.body) else ""
            raise StepFailed("%s: handshake refused: %s %s" % (self.ws_url, exc, body))
        except (OSError, tornado.websocket.WebSocketError) as exc:
            raise StepFailed("%s: %s" % (self.ws_url, _error_text(exc)))
        self.frames = asyncio.Queue()
        self.reader = asyncio.ensure_future(self._read_frames())
        return "%s in %.1f ms" % (self.ws_url, (time.monotonic() - started) * 1000)

    async def subscribe(self):
        self.baseline = self.numsub()
        await self.ws.write_message(json.dumps(
            {"method": "SUBSCRIBE", "params": [self.stream], "id": 1}))
        count, acked = await self._await_numsub(
            lambda n: n > self.baseline and n >= 1, 1,
            "the server did not subscribe the Redis channel (invalid stream name? "
            "is the server on this Redis?)")
        return "%s subscribed in Redis (PUBSUB NUMSUB %d -> %d%s)" % (
            self.stream, self.baseline, count, ", acknowledged" if acked else "")

    async def deliver(self):
        probe_id = os.urandom(8).hex()
        probe = json.dumps({"stream": self.stream, "data": {
            "e": "smoke", "id": probe_id, "E": int(time.time() * 1_000_000)}},
            separators=(",", ":")).encode()
        started = time.monotonic()
        deadline = started + self.timeout
        try:
            receivers = self._redis().publish(self.stream, probe)
        except redis.RedisError as exc:
            raise StepFailed("PUBLISH to Redis %s: %s" % (redacted(self.redis_url), _error_text(exc)))
        ignored = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                frame = await asyncio.wait_for(self.frames.get(), max(remaining, 0))
            except asyncio.TimeoutError:
                raise StepFailed("the probe did not arrive within %.1fs (%d Redis subscriber(s) "
                                 "got it, %d unrelated frame(s) ignored)"
                                 % (self.timeout, receivers, ignored))
            if frame is None:
                raise StepFailed(self._closed_detail())
            elapsed = time.monotonic() - started
            data = frame.encode("utf-8") if isinstance(frame, str) else frame
            if data == probe:
                return "probe arrived byte-identical in %.1f ms%s" % (
                    elapsed * 1000, " (%d unrelated frame(s) ignored)" % ignored if ignored else "")
            if probe_id.encode() in data:
                raise StepFailed("the probe arrived altered: sent %s, received %s"
                                 % (probe.decode(), data[:len(probe) + 200].decode("utf-8", "replace")))
            ignored += 1  # a gap notice, an acknowledgement, anything else

    async def unsubscribe(self):
        await self.ws.write_message(json.dumps(
            {"method": "UNSUBSCRIBE", "params": [self.stream], "id": 2}))
        count, acked = await self._await_numsub(
            lambda n: n <= self.baseline, 2, "the server did not release the Redis channel")
        return "Redis channel %s released (PUBSUB NUMSUB %d%s)" % (
            self.stream, count, ", acknowledged" if acked else "")

    async def close(self):
        self.closed_by_us = True
        self.ws.close(1000, "smoke test done")
        try:
            await asyncio.wait_for(asyncio.shield(self.reader), self.timeout)
        except asyncio.TimeoutError:
            raise StepFailed("the server did not answer the close frame within %.1fs"
                             % self.timeout)
        if self.ws.close_code != 1000:
            raise StepFailed("the server answered with close code %s%s" % (
                self.ws.close_code, " (%s)" % self.ws.close_reason if self.ws.close_reason else ""))
        return "close code 1000 echoed"

    # --- driver --------------------------------------------------------------

    async def run(self):
        failed = False
        try:
            for name in STEPS:
                step = getattr(self, name)
                try:
                    detail = await asyncio.wait_for(step(), self.timeout * 3)
                except StepFailed as exc:
                    failed, detail = True, str(exc)
                except asyncio.TimeoutError:
                    failed, detail = True, "timed out after %.1fs" % (self.timeout * 3)
                except Exception as exc:  # a smoke test reports, it does not crash
                    failed, detail = True, "%s: %s" % (type(exc).__name__, _error_text(exc))
                print("%s %s: %s" % ("FAIL" if failed else "PASS", name, detail), flush=True)
                if failed:
                    break
        finally:
            await self._cleanup()
        return 1 if failed else 0

    async def _cleanup(self):
        if self.ws is not None and not self.closed_by_us:
            self.ws.close(1000, "smoke test aborted")
        if self.reader is not None:
            try:
                await asyncio.wait_for(self.reader, 1.0)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                pass
        if self.redis is not None:
            try:
                self.redis.close()
            except Exception:
                pass


def build_parser():
    parser = argparse.ArgumentParser(
        description="Smoke-test a running marketstream server: health, connect, subscribe, "
                    "deliver, unsubscribe, close. Exit code 0 when all pass, else 1.")
    parser.add_argument("--ws-url", default=os.environ.get("WS_STREAM_URL") or DEFAULT_WS,
                        help="ws://host:port/path or host:port (then ws://host:port/ws); "
                             "default: $WS_STREAM_URL, else %s" % DEFAULT_WS)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL") or DEFAULT_REDIS,
                        help="the Redis the server listens to; default: $REDIS_URL, else %s"
                             % DEFAULT_REDIS)
    parser.add_argument("--stream", default="trade.SMOKE%s_TEST" % os.urandom(4).hex().upper(),
                        help="stream to test with (default: a random trade.SMOKE<HEX>_TEST)")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="deadline of each step in seconds (default: 5)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    try:
        ws_url = ws_url_from(args.ws_url)
    except ValueError as exc:
        print("FAIL health: %s" % exc, flush=True)
        return 1
    try:
        return asyncio.run(Smoke(ws_url, args.redis_url, args.stream, args.timeout).run())
    except KeyboardInterrupt:
        print("FAIL interrupted: stopped by the user", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
