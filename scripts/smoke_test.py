#!/usr/bin/env python3
"""Deployment smoke test for a running marketstream server.

Usage::

    python scripts/smoke_test.py                  # from WS_STREAM_URL and REDIS_URL
    python scripts/smoke_test.py --ws-url ws://127.0.0.1:4000/ws \\
        --redis-url redis://127.0.0.1:6379/0 [--stream trade.SMOKETEST_PROBE] [--timeout 5]
    python scripts/smoke_test.py && echo deployed

``--redis-url`` (or ``$REDIS_URL``) is required: the Redis the server
listens to, where the probes are published.  There is no default, so that the
test never passes against an unrelated Redis; without one the script stops
with exit code 2.  ``marketstream --demo`` prints its Redis URL and a
ready-to-run smoke-test line.

``--ws-url`` defaults to ``$WS_STREAM_URL``, else ``127.0.0.1:4000``, in
either of the forms the server accepts: ``host:port`` (tested as
``ws://host:port/ws``; 0.0.0.0 means this host) or a full
``ws://host:port/path`` URL.

The probes go to a stream of the test's own, never to a real market: by
default a random ``trade.SMOKETEST_<HEX>``.  ``--stream`` may name another
one whose market starts with ``SMOKETEST`` (for a server with a ``markets``
allow-list, allow e.g. ``SMOKETEST_PROBE``); any other name looks live and
is refused (exit code 2) unless ``--force`` is given.

Steps, one ``PASS <step>: <detail>`` or ``FAIL <step>: <detail>`` line each
on stdout (``SKIP <step>: <why>`` for a step that does not apply), stopping
at the first failure:

1. health       GET http://host:port/health answers 200 with JSON
2. connect      the WebSocket handshake succeeds
3. subscribe    SUBSCRIBE; the server subscribes the Redis channel
                (PUBSUB NUMSUB, on Redis Cluster SHARDNUMSUB, goes up; an
                acknowledgement, when the server sends them, is accepted,
                an error reply fails; LIST_SUBSCRIPTIONS lists the stream)
4. deliver      a probe PUBLISHed (SPUBLISH on a cluster) to Redis arrives
                byte-identical (round-trip latency in ms); unrelated frames
                such as gap notices are ignored
5. unsubscribe  UNSUBSCRIBE; the server releases the Redis channel (PUBSUB
                NUMSUB is back to its value before step 3)
6. close        the WebSocket closes cleanly (close code 1000 echoed)
7. positions    messages published with marketstream.publisher.Publisher
                arrive with positions ("seq") rising by exactly 1; after a
                disconnect, more are published, and a new connection that
                subscribes with "since" gets exactly the missed ones, in
                order, then live ones.  Behind nginx the new connection may
                land on another instance, which is the point.  Skipped, with
                "SKIP positions: not supported by this server", when the
                server delivers such a message without a position; skipped
                on a live stream given with --force.  The stream's history
                keys are deleted afterwards (and expire within a minute
                anyway).

``--timeout`` is the deadline of each wait, in seconds.  Exit code 0 when
every step passed or was skipped, 1 otherwise, 2 for a usage error.

Uses tornado, redis-py and the marketstream package (for the shared URL
redaction and the publisher).
"""

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.parse

import redis
import redis.cluster
import tornado.httpclient
import tornado.websocket

from marketstream.upstream.clients import sync_client
from marketstream.upstream.urls import redact_url

STEPS = ("health", "connect", "subscribe", "deliver", "unsubscribe", "close", "positions")
DEFAULT_WS = "127.0.0.1:4000"
SMOKE_MARKET_PREFIX = "SMOKETEST"
POLL_INTERVAL = 0.02
# The positions step: messages before the disconnect, missed while away.
POSITIONED = 5
MISSED = 3
HISTORY = 100  # capped history of the smoke stream
HISTORY_TTL = 60  # seconds; the keys are also deleted at the end


class StepFailed(Exception):
    """A step did not pass; the message is the detail of its FAIL line."""


class StepSkipped(Exception):
    """A step does not apply; the message is the detail of its SKIP line."""


def default_stream() -> str:
    """A fresh stream name of the smoke test's own.

    >>> is_smoke_stream(default_stream())
    True
    """
    return "trade.%s_%s" % (SMOKE_MARKET_PREFIX, os.urandom(4).hex().upper())


def is_smoke_stream(name: str) -> bool:
    """True if ``name`` is marked as a smoke-test stream: its market (the
    last dot-separated part) starts with ``SMOKETEST``.

    >>> is_smoke_stream("trade.SMOKETEST_1A2B3C4D"), is_smoke_stream("trade.SOL_USDC")
    (True, False)
    """
    return name.rpartition(".")[2].startswith(SMOKE_MARKET_PREFIX)


def _local_host(host):
    """The address to connect to for a bind address."""
    if host in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return host


def ws_url_from(value: str) -> str:
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


def health_url(ws_url: str) -> str:
    """The /health URL of the server behind ``ws_url``.

    >>> health_url("wss://stream.example.com/ws")
    'https://stream.example.com/health'
    """
    parts = urllib.parse.urlsplit(ws_url)
    return "%s://%s/health" % ("https" if parts.scheme == "wss" else "http", parts.netloc)


def _error_text(exc):
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


class Connection:
    """An open WebSocket whose frames are read into a queue as they come;
    None in the queue marks the end."""

    def __init__(self, ws):
        self.ws = ws
        self.frames = asyncio.Queue()
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self):
        try:
            while True:
                frame = await self.ws.read_message()
                await self.frames.put(frame)
                if frame is None:
                    return
        except Exception:  # the connection broke: same as closed for the steps
            await self.frames.put(None)

    def closed_detail(self):
        ws = self.ws
        return "the server closed the connection (code %s%s)" % (
            ws.close_code,
            ", %s" % ws.close_reason if ws.close_reason else "",
        )

    async def next_frame(self, deadline, what):
        """The next text frame; StepFailed at ``deadline`` or on close."""
        try:
            frame = await asyncio.wait_for(self.frames.get(), max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            raise StepFailed(what) from None
        if frame is None:
            raise StepFailed(self.closed_detail())
        return frame

    async def close(self, timeout):
        """Close with 1000 and wait for the server's answer; the close code
        it echoed, or None if it did not answer within ``timeout``."""
        self.ws.close(1000, "smoke test done")
        try:
            await asyncio.wait_for(asyncio.shield(self.reader), timeout)
        except asyncio.TimeoutError:
            return None
        return self.ws.close_code

    async def abort(self):
        self.ws.close(1000, "smoke test aborted")
        try:
            await asyncio.wait_for(self.reader, 1.0)
        except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
            pass


def _reply_to(frame, request_id):
    """For a reply to ``request_id``: None if it is a success, else the
    error text.  Raises LookupError if ``frame`` is no such reply."""
    try:
        message = json.loads(frame)
    except (TypeError, ValueError):
        raise LookupError(frame) from None
    if not isinstance(message, dict) or message.get("id") != request_id or "stream" in message:
        raise LookupError(frame)
    if "error" in message:
        return json.dumps(message["error"])
    if "result" in message:
        return None
    raise LookupError(frame)


class Smoke:
    """The steps against one server."""

    def __init__(self, ws_url: str, redis_url: str, stream: str, timeout: float):
        self.ws_url = ws_url
        self.redis_url = redis_url
        self.stream = stream
        self.timeout = timeout
        self.redis = None
        self.conn = None
        self.connections = []
        self.baseline = 0
        self.closed_by_us = False
        self.wrote_history = False

    # --- plumbing ------------------------------------------------------------

    def _redis(self):
        if self.redis is None:
            self.redis = sync_client(
                self.redis_url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
            )
        return self.redis

    def _redis_failed(self, what, exc):
        return StepFailed(
            "%sRedis %s: %s"
            % (what + " " if what else "", redact_url(self.redis_url), _error_text(exc))
        )

    @property
    def sharded(self):
        """On Redis Cluster the server uses sharded pub/sub (SSUBSCRIBE)."""
        return isinstance(self._redis(), redis.cluster.RedisCluster)

    @property
    def numsub_name(self):
        return "SHARDNUMSUB" if self.sharded else "NUMSUB"

    def numsub(self):
        try:
            client = self._redis()
            if self.sharded:
                # Ask the primary that owns the channel's slot (summing over
                # every node, as redis-py would, gives 0).
                node = client.get_node_from_key(self.stream)
                return client.execute_command("PUBSUB SHARDNUMSUB", self.stream, target_nodes=node)[
                    0
                ][1]
            return client.pubsub_numsub(self.stream)[0][1]
        except redis.RedisError as exc:
            raise self._redis_failed("", exc) from None

    def publish_plain(self, payload):
        """PUBLISH (SPUBLISH on a cluster) ``payload``; the receiver count."""
        client = self._redis()
        return (client.spublish if self.sharded else client.publish)(self.stream, payload)

    async def _open(self):
        request = tornado.httpclient.HTTPRequest(
            self.ws_url, connect_timeout=self.timeout, request_timeout=self.timeout
        )
        try:
            ws = await asyncio.wait_for(tornado.websocket.websocket_connect(request), self.timeout)
        except asyncio.TimeoutError:
            raise StepFailed(
                "%s: no handshake within %.1fs" % (self.ws_url, self.timeout)
            ) from None
        except tornado.httpclient.HTTPClientError as exc:
            body = (
                exc.response.body[:200].decode("utf-8", "replace")
                if (exc.response is not None and exc.response.body)
                else ""
            )
            raise StepFailed("%s: handshake refused: %s %s" % (self.ws_url, exc, body)) from None
        except (OSError, tornado.websocket.WebSocketError) as exc:
            raise StepFailed("%s: %s" % (self.ws_url, _error_text(exc))) from None
        conn = Connection(ws)
        self.connections.append(conn)
        return conn

    async def _await_numsub(self, conn, done, request_id, what):
        """Poll PUBSUB NUMSUB until ``done(n)``, failing on an error reply to
        ``request_id``; then ask LIST_SUBSCRIPTIONS (always answered), so
        that an acknowledgement sent before it has arrived too.  Returns
        (count, acknowledged, the listed streams); other frames that arrive
        meanwhile are kept, in order."""
        deadline = time.monotonic() + self.timeout
        list_id = request_id + 1000
        kept, acked, listed, asked = [], False, None, False
        count = 0  # PUBSUB NUMSUB, polled until done(count)
        try:
            while True:
                while not conn.frames.empty():
                    frame = conn.frames.get_nowait()
                    if frame is None:
                        raise StepFailed(conn.closed_detail())
                    if asked and listed is None:
                        try:
                            message = json.loads(frame)
                        except ValueError:
                            message = None
                        if (
                            isinstance(message, dict)
                            and message.get("id") == list_id
                            and "stream" not in message
                        ):
                            listed = message.get("result")
                            if not isinstance(listed, list):
                                raise StepFailed("LIST_SUBSCRIPTIONS answered %s" % frame[:300])
                            return count, acked, listed
                    try:
                        error = _reply_to(frame, request_id)
                    except LookupError:
                        kept.append(frame)
                        continue
                    if error is not None:
                        raise StepFailed("the server refused: %s" % error)
                    acked = True
                if not asked:
                    count = self.numsub()
                    if done(count):
                        asked = True
                        await conn.ws.write_message(
                            json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": list_id})
                        )
                if time.monotonic() > deadline:
                    if asked:
                        raise StepFailed(
                            "no answer to LIST_SUBSCRIPTIONS within %.1fs" % self.timeout
                        )
                    raise StepFailed(
                        "PUBSUB %s %s is %d after %.1fs: %s"
                        % (self.numsub_name, self.stream, count, self.timeout, what)
                    )
                await asyncio.sleep(POLL_INTERVAL)
        finally:
            # Put back what was not ours, in order, ahead of anything newer.
            rest = []
            while not conn.frames.empty():
                rest.append(conn.frames.get_nowait())
            for frame in kept + rest:
                conn.frames.put_nowait(frame)

    # --- steps ---------------------------------------------------------------

    async def health(self):
        url = health_url(self.ws_url)
        try:
            response = await tornado.httpclient.AsyncHTTPClient().fetch(
                url, raise_error=False, connect_timeout=self.timeout, request_timeout=self.timeout
            )
        except (OSError, tornado.httpclient.HTTPClientError) as exc:
            raise StepFailed("GET %s: %s" % (url, _error_text(exc))) from None
        if response.code == 599:
            raise StepFailed("GET %s: %s" % (url, _error_text(response.error)))
        body = response.body or b""
        try:
            status = json.loads(body)
        except ValueError:
            status = None
        if response.code != 200:
            raise StepFailed(
                "GET %s: HTTP %d %s" % (url, response.code, body[:300].decode("utf-8", "replace"))
            )
        if not isinstance(status, dict):
            raise StepFailed(
                "GET %s: HTTP 200 but the body is not a JSON object: %r" % (url, body[:200])
            )
        detail = "%s HTTP 200, status %s" % (url, status.get("status"))
        if "connections" in status:
            detail += ", %s client(s), %s stream(s)" % (
                status.get("connections"),
                status.get("streams"),
            )
        return detail

    async def connect(self):
        started = time.monotonic()
        self.conn = await self._open()
        return "%s in %.1f ms" % (self.ws_url, (time.monotonic() - started) * 1000)

    async def subscribe(self):
        self.baseline = self.numsub()
        await self.conn.ws.write_message(
            json.dumps({"method": "SUBSCRIBE", "params": [self.stream], "id": 1})
        )
        count, acked, listed = await self._await_numsub(
            self.conn,
            lambda n: n > self.baseline and n >= 1,
            1,
            "the server did not subscribe the Redis channel (invalid stream name? "
            "is the server on this Redis?)",
        )
        if self.stream not in listed:
            raise StepFailed("LIST_SUBSCRIPTIONS does not list %s: %s" % (self.stream, listed))
        return "%s subscribed in Redis %s (PUBSUB %s %d -> %d%s)" % (
            self.stream,
            redact_url(self.redis_url),
            self.numsub_name,
            self.baseline,
            count,
            ", acknowledged" if acked else "",
        )

    async def deliver(self):
        probe_id = os.urandom(8).hex()
        probe = json.dumps(
            {
                "stream": self.stream,
                "data": {"e": "smoke", "id": probe_id, "E": int(time.time() * 1_000_000)},
            },
            separators=(",", ":"),
        ).encode()
        started = time.monotonic()
        deadline = started + self.timeout
        try:
            receivers = self.publish_plain(probe)
        except redis.RedisError as exc:
            raise self._redis_failed("PUBLISH to", exc) from None
        ignored = 0
        while True:
            frame = await self.conn.next_frame(
                deadline,
                "the probe did not arrive within %.1fs (%d Redis subscriber(s) got it, "
                "%d unrelated frame(s) ignored)" % (self.timeout, receivers, ignored),
            )
            elapsed = time.monotonic() - started
            data = frame.encode("utf-8") if isinstance(frame, str) else frame
            if data == probe:
                return "probe arrived byte-identical in %.1f ms%s" % (
                    elapsed * 1000,
                    " (%d unrelated frame(s) ignored)" % ignored if ignored else "",
                )
            if probe_id.encode() in data:
                received = data[: len(probe) + 200].decode("utf-8", "replace")
                raise StepFailed(
                    "the probe arrived altered: sent %s, received %s" % (probe.decode(), received)
                )
            ignored += 1  # a gap notice, an acknowledgement, anything else

    async def unsubscribe(self):
        await self.conn.ws.write_message(
            json.dumps({"method": "UNSUBSCRIBE", "params": [self.stream], "id": 2})
        )
        count, acked, listed = await self._await_numsub(
            self.conn,
            lambda n: n <= self.baseline,
            2,
            "the server did not release the Redis channel",
        )
        if self.stream in listed:
            raise StepFailed("LIST_SUBSCRIPTIONS still lists %s" % self.stream)
        return "Redis channel %s released (PUBSUB %s %d%s)" % (
            self.stream,
            self.numsub_name,
            count,
            ", acknowledged" if acked else "",
        )

    async def close(self):
        self.closed_by_us = True
        code = await self.conn.close(self.timeout)
        if code is None:
            raise StepFailed(
                "the server did not answer the close frame within %.1fs" % self.timeout
            )
        if code != 1000:
            ws = self.conn.ws
            raise StepFailed(
                "the server answered with close code %s%s"
                % (code, " (%s)" % ws.close_reason if ws.close_reason else "")
            )
        return "close code 1000 echoed"

    # --- positions and resume -----------------------------------------------

    async def positions(self):
        if not is_smoke_stream(self.stream):
            raise StepSkipped(
                "not run on %s, a live stream (--force): it would add "
                "positions and history to it" % self.stream
            )
        try:
            from marketstream.publisher import Publisher
        except ImportError:
            raise StepSkipped(
                "not supported by this installation (marketstream.publisher is missing)"
            ) from None
        publisher = Publisher(self._redis(), history=HISTORY, ttl=HISTORY_TTL)
        run_id = os.urandom(8).hex()
        counter = iter(range(1, 1_000_000))

        def publish():
            data = {
                "e": "smoke",
                "id": run_id,
                "i": next(counter),
                "E": int(time.time() * 1_000_000),
            }
            self.wrote_history = True
            try:
                return publisher.publish(self.stream, data), data
            except redis.RedisError as exc:
                raise self._redis_failed("publishing with positions to", exc) from None

        # 1. Live: a position on every frame, rising by exactly 1.  A plain
        # message right after the first one tells, without waiting for a
        # timeout, a server that drops messages with positions (it does not
        # know them) from a slow one: Redis and the server keep the order.
        first = await self._open()
        await first.ws.write_message(
            json.dumps({"method": "SUBSCRIBE", "params": [self.stream], "id": 11})
        )
        await self._await_numsub(
            first,
            lambda n: n > self.baseline and n >= 1,
            11,
            "the server did not subscribe the Redis channel",
        )
        sent = [publish()]
        try:
            self.publish_plain(
                json.dumps(
                    {"stream": self.stream, "data": {"e": "smoke", "id": run_id, "fence": True}}
                )
            )
        except redis.RedisError as exc:
            raise self._redis_failed("PUBLISH to", exc) from None
        sent += [publish() for _ in range(POSITIONED - 1)]
        seqs = [seq for seq, _ in sent]
        if seqs != list(range(seqs[0], seqs[0] + POSITIONED)):
            raise StepFailed("the publisher's positions do not rise by 1: %s" % seqs)
        await self._expect(first, run_id, sent, "live", first_frame=True)
        if await first.close(self.timeout) is None:
            raise StepFailed(
                "the server did not answer the close frame within %.1fs" % self.timeout
            )

        # 2. Missed while disconnected, then resumed with "since" (behind a
        # load balancer possibly on another instance), followed by live
        # ones with nothing repeated.  The live one is published as soon as
        # the server has the subscription: it must come after the missed.
        await self._await_released()
        missed = [publish() for _ in range(MISSED)]
        last = seqs[-1]
        second = await self._open()
        await second.ws.write_message(
            json.dumps(
                {
                    "method": "SUBSCRIBE",
                    "params": [self.stream],
                    "id": 12,
                    "since": {self.stream: last},
                }
            )
        )
        await self._await_numsub(
            second,
            lambda n: n > self.baseline and n >= 1,
            12,
            "the server did not subscribe the Redis channel",
        )
        live = [publish()]
        await self._expect(
            second, run_id, missed + live, "resumed with since=%d" % last, early=live[0]
        )
        if await second.close(self.timeout) is None:
            raise StepFailed(
                "the server did not answer the close frame within %.1fs" % self.timeout
            )
        return (
            "%d messages with positions %d..%d, rising by 1; after a disconnect the %d "
            "missed (%d..%d) arrived exactly once on resume with since=%d, then live %d"
            % (POSITIONED, seqs[0], last, MISSED, missed[0][0], missed[-1][0], last, live[0][0])
        )

    async def _await_released(self):
        """Wait until no client of this run holds the Redis channel."""
        deadline = time.monotonic() + self.timeout
        while (count := self.numsub()) > self.baseline:
            if time.monotonic() > deadline:
                raise StepFailed(
                    "PUBSUB %s %s is %d %.1fs after the disconnect: the server did "
                    "not release the Redis channel"
                    % (self.numsub_name, self.stream, count, self.timeout)
                )
            await asyncio.sleep(POLL_INTERVAL)

    async def _expect(self, conn, run_id, sent, what, first_frame=False, early=None):
        """Read frames until every (seq, data) of ``sent`` arrived, in
        order, as ``{"stream":..,"data":..,"seq":..}``.  Replies, frames of
        other streams and older probes are skipped; a gap notice, a
        duplicate or a frame out of order fails.  With ``first_frame``, a
        first message without a position, or the plain fence message ahead
        of it, means the server does not support positions.  ``early``: a
        (seq, data) of ``sent`` whose arrival ahead of its turn means the
        ones before it were not delivered at all."""
        deadline = time.monotonic() + self.timeout
        marker = run_id.encode()
        unsupported = "not supported by this server (%s)"
        for index, (seq, data) in enumerate(sent):
            while True:
                frame = await conn.next_frame(
                    deadline,
                    "%s: %d of %d message(s) arrived within %.1fs"
                    % (what, index, len(sent), self.timeout),
                )
                raw = frame.encode("utf-8") if isinstance(frame, str) else frame
                try:
                    message = json.loads(raw)
                except ValueError:
                    message = None
                if not isinstance(message, dict) or message.get("stream") != self.stream:
                    if marker in raw:
                        raise StepFailed("%s: a message arrived malformed: %s" % (what, raw[:300]))
                    continue  # an acknowledgement, another stream's frame
                got = message.get("data")
                if isinstance(got, dict) and got.get("e") == "gap":
                    raise StepFailed("%s: the server sent a gap notice: %s" % (what, raw[:300]))
                if not isinstance(got, dict) or got.get("id") != run_id:
                    continue  # an older probe of this stream, not ours
                check_support = first_frame and index == 0
                if got.get("fence"):
                    if check_support:
                        raise StepSkipped(
                            unsupported % "it dropped a message published with a "
                            "position, and delivered a plain one sent after it"
                        )
                    continue
                if "seq" not in message and check_support:
                    raise StepSkipped(unsupported % 'frames carry no "seq"')
                if early is not None and early != (seq, data) and got == early[1]:
                    raise StepFailed(
                        "%s: %d of %d missed message(s) arrived before the live "
                        "one at position %d" % (what, index, len(sent) - 1, early[0])
                    )
                if message.get("seq") != seq or got != data:
                    raise StepFailed(
                        "%s: expected position %d (message %d), got %s"
                        % (what, seq, data["i"], raw[:300].decode("utf-8", "replace"))
                    )
                break

    # --- driver --------------------------------------------------------------

    async def run(self) -> int:
        """Run the steps, print one line each; 0 if none failed, else 1."""
        failed = False
        try:
            for name in STEPS:
                step = getattr(self, name)
                limit = self.timeout * (8 if name == "positions" else 3)
                status = "PASS"
                try:
                    detail = await asyncio.wait_for(step(), limit)
                except StepFailed as exc:
                    status, detail = "FAIL", str(exc)
                except StepSkipped as exc:
                    status, detail = "SKIP", str(exc)
                except asyncio.TimeoutError:
                    status, detail = "FAIL", "timed out after %.1fs" % limit
                except Exception as exc:  # a smoke test reports, it does not crash
                    status, detail = "FAIL", "%s: %s" % (type(exc).__name__, _error_text(exc))
                print("%s %s: %s" % (status, name, detail), flush=True)
                if status == "FAIL":
                    failed = True
                    break
        finally:
            await self._cleanup()
        return 1 if failed else 0

    async def _cleanup(self):
        for conn in self.connections:
            if conn is not self.conn or not self.closed_by_us:
                await conn.abort()
        if self.redis is not None:
            try:
                if self.wrote_history and is_smoke_stream(self.stream):
                    from marketstream.publisher import stream_keys

                    self.redis.delete(*stream_keys(self.stream))
            except (redis.RedisError, ImportError):
                pass  # they expire on their own
            try:
                self.redis.close()
            except Exception:
                pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Smoke-test a running marketstream server: health, connect, subscribe, "
        "deliver, unsubscribe, close, positions. Exit code 0 when all pass, "
        "1 when one fails, 2 for a usage error."
    )
    parser.add_argument(
        "--ws-url",
        default=os.environ.get("WS_STREAM_URL") or DEFAULT_WS,
        help="ws://host:port/path or host:port (then ws://host:port/ws); "
        "default: $WS_STREAM_URL, else %s" % DEFAULT_WS,
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL") or None,
        help="the Redis the server listens to (required; default: $REDIS_URL)",
    )
    parser.add_argument(
        "--stream",
        default=None,
        help="stream to test with; its market must start with %s "
        "(default: a random trade.%s_<HEX>)" % (SMOKE_MARKET_PREFIX, SMOKE_MARKET_PREFIX),
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="allow a --stream that looks live (the probe is published into it)",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="deadline of each wait in seconds (default: 5)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the steps; the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if not args.redis_url:
        parser.error(
            "no Redis URL: pass --redis-url URL or set REDIS_URL to the Redis the "
            "server listens to (marketstream --demo prints its URL)"
        )
    stream = args.stream or default_stream()
    if not is_smoke_stream(stream) and not args.force:
        parser.error(
            "--stream %s looks like a live stream: the probe would be published into "
            "it. Use a market starting with %s (e.g. trade.%s_PROBE), or add --force"
            % (stream, SMOKE_MARKET_PREFIX, SMOKE_MARKET_PREFIX)
        )
    try:
        ws_url = ws_url_from(args.ws_url)
    except ValueError as exc:
        print("FAIL health: %s" % exc, flush=True)
        return 1
    try:
        return asyncio.run(Smoke(ws_url, args.redis_url, stream, args.timeout).run())
    except KeyboardInterrupt:
        print("FAIL interrupted: stopped by the user", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
