"""The asyncio WebSocket client (:class:`Client`, on Tornado's client):
subscribe, iterate over messages, reconnect with jittered backoff, resume
every recoverable stream with ``since``, report gaps and refused streams,
close with a close frame.  Use it as ``marketstream.client.Client`` (see
:mod:`marketstream.client` for an example)."""

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import tornado.httpclient
import tornado.websocket
import ujson

from marketstream.client.messages import GAP, MESSAGE, SNAPSHOT, Message, is_snapshot_data
from marketstream.client.resync import Resyncs, positions_skip
from marketstream.wire.frames import CLOSE_NORMAL

__all__ = ["Client", "ConnectionLost", "StreamsRefused", "NORMAL_CLOSURE"]

#: The close code the client sends when it closes (RFC 6455: normal closure).
NORMAL_CLOSURE = CLOSE_NORMAL

log = logging.getLogger(__name__)


class ConnectionLost(ConnectionError):
    """The connection dropped and the client was made with ``reconnect=False``."""


class StreamsRefused(ValueError):
    """The server refused some of the streams (a name it does not serve, or
    too many streams): ``refused`` maps each to the server's reason.

    The client goes on with the other streams (iterate again), and does not
    ask for the refused ones again."""

    def __init__(self, refused: dict[str, str]) -> None:
        super().__init__(
            "the server refused %s" % "; ".join("%s: %s" % item for item in refused.items())
        )
        self.refused = refused


def _gap_message(stream: str, reason: str, msg: str, **extra: Any) -> Message:
    data = {
        "e": "gap",
        "s": stream.rsplit(".", 1)[-1],
        "E": int(time.time() * 1_000_000),
        "reason": reason,
        "msg": msg,
    }
    data.update(extra)
    raw = ujson.dumps({"stream": stream, "data": data}, escape_forward_slashes=False)
    return Message(stream, data, None, GAP, raw)


class Client:
    """Subscribe to ``streams`` at ``url`` and iterate over their messages.

    ``snapshot``: False, True (every stream) or a list of streams for which
    the server sends the stream's snapshot first.  ``since`` maps streams to
    the last position already seen (resume from there at the first
    connection).  ``reconnect``: reconnect after a lost connection (else
    iteration raises :class:`ConnectionLost`); the delay before attempt
    ``n`` is ``min(backoff[1], backoff[0] * 2 ** n)`` scaled by a random
    factor in [0.5, 1].  ``on_state`` is called with ``"connecting"``,
    ``"connected"``, ``"disconnected"`` and ``"closed"``.

    On every reconnection the client subscribes again, with ``since`` set
    to the last position it got on each recoverable stream, so the server
    replays what was missed; frames it already has are dropped.  A position
    that jumps without a gap notice from the server, and a plain stream
    after a reconnection, are reported as a ``"gap"`` message.

    The client asks the server for acknowledgements on its own connection
    (``"acks": true``): a stream the server refuses makes the iteration
    raise :class:`StreamsRefused`, with the server's reason for each, and
    the client goes on with the others.  ``disconnect_reason`` says why the
    last connection ended or the last attempt failed (the close code and
    reason, or the error).  :meth:`close` (also at the end of ``async
    with``) sends a close frame (1000) and waits for the server's.

    Counters: ``connects``, ``reconnects`` (connections after the first),
    ``resumes`` (reconnections that asked for a replay), ``gaps`` (gap
    messages yielded), ``duplicates`` (frames dropped as already seen).
    ``last_seq`` maps each stream to the last position yielded.

    ::

        async with Client("ws://127.0.0.1:4000/ws", ["trade.SOL_USDC"]) as client:
            async for msg in client:
                print(msg.stream, msg.seq, msg.data["p"])
    """

    def __init__(
        self,
        url: str,
        streams: Iterable[str],
        snapshot: bool | Iterable[str] = False,
        reconnect: bool = True,
        backoff: tuple[float, float] = (0.1, 5.0),
        since: dict[str, int] | None = None,
        on_state: Callable[[str], None] | None = None,
        connect_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        close_timeout: float = 2.0,
    ) -> None:
        self.url = url
        self.streams = list(dict.fromkeys(streams))
        if not self.streams:
            raise ValueError("no streams")
        if snapshot is True:
            self.snapshot_streams = set(self.streams)
        elif snapshot is False or snapshot is None:
            self.snapshot_streams = set()
        else:
            self.snapshot_streams = set(snapshot)
        self.reconnect = reconnect
        self.backoff = (float(backoff[0]), float(backoff[1]))
        self.on_state = on_state
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.close_timeout = close_timeout
        self.last_seq: dict[str, int] = dict(since or {})
        self.state = "idle"
        self.connects = 0
        self.reconnects = 0
        self.resumes = 0
        self.gaps = 0
        self.duplicates = 0
        self.refused: dict[str, str] = {}  # streams the server refused -> its reason
        self.disconnect_reason: str | None = None
        self._refusal: StreamsRefused | None = None  # raised by the iteration, once
        self._ws: tornado.websocket.WebSocketClientConnection | None = None
        self._closed = False
        self._attempt = 0
        self._request_id = 0
        self._pending: collections.deque[Message] = collections.deque()
        self._after_gap: set[str] = set()
        self._seen: set[str] = set()  # streams that delivered something on this client
        self._plain: set[str] = set()  # streams whose last message had no seq
        self._resyncs = Resyncs()  # streams started over on this connection

    # -- life cycle --------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is open."""
        return self._ws is not None

    def _set_state(self, state: str) -> None:
        self.state = state
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:  # a faulty callback must not break the stream
                log.exception("state callback failed")

    async def connect(self) -> None:
        """Connect and subscribe once (iteration does this by itself).
        Raises OSError / WebSocketError / HTTPClientError when it fails."""
        self._set_state("connecting")
        request = tornado.httpclient.HTTPRequest(
            self.url, connect_timeout=self.connect_timeout, request_timeout=self.connect_timeout
        )
        ws = await tornado.websocket.websocket_connect(request, ping_interval=self.ping_interval)
        if self._closed:
            ws.close(NORMAL_CLOSURE)
            raise ConnectionLost("client closed")
        first = self.connects == 0
        self.connects += 1
        self._ws = ws
        self._attempt = 0
        since = {s: self.last_seq[s] for s in self.streams if s in self.last_seq}
        snapshot = [s for s in self.streams if s in self.snapshot_streams and s not in since]
        self._request_id += 1
        # Acknowledgements on this connection: a refused stream is reported.
        request_body: dict[str, Any] = {
            "method": "SUBSCRIBE",
            "params": self.streams,
            "id": self._request_id,
            "acks": True,
        }
        if since:
            request_body["since"] = since
        if snapshot:
            request_body["snapshot"] = snapshot
        self._after_gap = set()
        self._resyncs.clear()
        if not first:
            self.reconnects += 1
            if since:
                self.resumes += 1
            # Plain streams cannot be replayed: say so.
            for stream in self.streams:
                if stream in self._seen and stream not in since and stream not in snapshot:
                    self._report(
                        _gap_message(
                            stream,
                            "reconnected",
                            "reconnected; updates published meanwhile may have been missed",
                        )
                    )
        await ws.write_message(ujson.dumps(request_body, escape_forward_slashes=False))
        self._set_state("connected")

    async def close(self) -> None:
        """Close the connection and end the iteration: a close frame (1000),
        then the server's, within ``close_timeout`` seconds."""
        self._closed = True
        ws, self._ws = self._ws, None
        if ws is not None:
            await _close(ws, self.close_timeout)
        self._set_state("closed")

    async def resync(self, stream: str) -> bool:
        """Start ``stream`` over from its snapshot (after a :class:`BookGap`),
        on the same connection: unsubscribe and subscribe again asking for
        its snapshot; queued messages of ``stream``, and those received
        until its snapshot, are dropped; the other streams go on.  Returns
        False and does nothing for a plain stream (its frames carry no
        ``seq``: the server has no snapshot to start over from)."""
        if stream in self._plain:
            return False
        self.last_seq.pop(stream, None)
        self.snapshot_streams.add(stream)
        self._pending = collections.deque(m for m in self._pending if m.stream != stream)
        ws = self._ws  # without a connection, the next one asks for the snapshot
        if ws is not None:
            try:
                for request in self._resyncs.start(stream, self._next_id):
                    await ws.write_message(request)
            except tornado.websocket.WebSocketClosedError:
                pass  # closed meanwhile: the next connection asks for the snapshot
        return True

    def _next_id(self) -> int:
        self._request_id += 1
        return self._request_id

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def _drop(self, reason: str | None = None) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.close(NORMAL_CLOSURE)
        if not self._closed:
            self.disconnect_reason = reason
            self._set_state("disconnected")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before reconnection attempt ``attempt`` (0-based)."""
        low, high = self.backoff
        return min(high, low * 2.0**attempt) * random.uniform(0.5, 1.0)

    async def _ensure_connected(self) -> None:
        while self._ws is None:
            if self._closed:
                raise StopAsyncIteration
            if self.connects and not self.reconnect:
                raise ConnectionLost("connection to %s lost" % self.url)
            if self._attempt or self.connects:
                await asyncio.sleep(self.delay(self._attempt))
                if self._closed:
                    raise StopAsyncIteration
            try:
                await self.connect()
            except ConnectionLost:
                raise StopAsyncIteration from None
            except (
                OSError,
                tornado.websocket.WebSocketError,
                tornado.httpclient.HTTPClientError,
                asyncio.TimeoutError,
            ) as exc:
                self._attempt += 1
                if not self.reconnect:
                    raise
                log.info("cannot connect to %s (%s); retrying", self.url, exc)
                self.disconnect_reason = "cannot connect: %s" % (exc or type(exc).__name__)
                self._set_state("disconnected")

    # -- messages ----------------------------------------------------------

    def __aiter__(self) -> "Client":
        return self

    async def __anext__(self) -> Message:
        while True:
            if self._refusal is not None:
                refusal, self._refusal = self._refusal, None
                raise refusal
            if self._pending:
                return self._pending.popleft()
            await self._ensure_connected()
            ws = self._ws
            if ws is None:  # closed meanwhile
                continue
            failure = None
            try:
                frame = await ws.read_message()
            except Exception as exc:  # tornado raises for some broken streams
                log.info("connection to %s failed: %s", self.url, exc)
                frame, failure = None, exc
            if frame is None:
                if ws is self._ws:
                    self._drop(_why_closed(ws, failure))
                continue
            if isinstance(frame, bytes):
                continue
            self._handle(frame)

    def _report(self, message: Message) -> None:
        if message.kind == GAP:
            self.gaps += 1
        self._pending.append(message)

    def _handle(self, frame: str) -> None:
        """Turn one frame into zero or more queued messages."""
        try:
            obj = ujson.loads(frame)
        except ValueError:
            log.warning("ignoring a frame that is not JSON: %.80r", frame)
            return
        if not isinstance(obj, dict):
            return
        if not isinstance(obj.get("stream"), str):
            if isinstance(obj.get("error"), dict):
                self._on_error(obj["error"])
            return  # {"result": null, "id": n}: subscribed
        stream, data, seq = obj["stream"], obj.get("data"), obj.get("seq")
        self._seen.add(stream)
        if self._resyncs.drops(stream, data):
            return  # sent before the snapshot of a resync
        if isinstance(data, dict) and data.get("e") == "gap" and seq is None:
            self._after_gap.add(stream)
            # Positions may start over after a gap (history lost): the next
            # one is the new base, whatever its value.
            self.last_seq.pop(stream, None)
            self._report(Message(stream, data, None, GAP, frame))
            return
        if not isinstance(seq, int) or isinstance(seq, bool):
            self._plain.add(stream)
            self._pending.append(Message(stream, data, None, MESSAGE, frame))
            return
        self._plain.discard(stream)
        last = self.last_seq.get(stream)
        if is_snapshot_data(data):
            self._after_gap.discard(stream)
            self.last_seq[stream] = seq
            self._pending.append(Message(stream, data, seq, SNAPSHOT, frame))
            return
        if last is not None and seq <= last:
            self.duplicates += 1
            return
        if (
            last is not None
            and seq != last + 1
            and stream not in self._after_gap
            and not positions_skip(stream)  # depth10.X, X@100ms: positions skip
        ):
            self._report(
                _gap_message(
                    stream,
                    "positions_missing",
                    "positions %d to %d missing" % (last + 1, seq - 1),
                    **{"from": last + 1, "to": seq - 1},
                )
            )
        self._after_gap.discard(stream)
        self.last_seq[stream] = seq
        self._pending.append(Message(stream, data, seq, MESSAGE, frame))

    def _on_error(self, error: dict[str, Any]) -> None:
        """An error reply: refused streams are dropped and raised by the
        iteration; anything else is logged."""
        refused = error.get("refused")
        if isinstance(refused, dict) and refused:
            refused = {str(name): str(reason) for name, reason in refused.items()}
            self.refused.update(refused)
            self.streams = [s for s in self.streams if s not in refused]
            self._refusal = StreamsRefused(refused)
            if error.get("refused_more"):
                log.warning("the server refused %s more streams", error["refused_more"])
            return
        log.warning("the server answered: %s", error.get("msg", error))


def _why_closed(
    ws: tornado.websocket.WebSocketClientConnection, failure: BaseException | None
) -> str:
    """Why ``ws`` ended, for people: the close code and reason, or the error."""
    if ws.close_code is not None:
        return "closed by the server: %d %s" % (ws.close_code, ws.close_reason or "")
    if failure is not None:
        return "connection failed: %s" % (failure or type(failure).__name__)
    return "connection lost (no close frame)"


async def _close(ws: tornado.websocket.WebSocketClientConnection, timeout: float) -> None:
    """Send a close frame and wait up to ``timeout`` seconds for the server's
    (reading what still comes), as RFC 6455 asks; then drop the connection."""
    protocol: Any = ws.protocol
    if protocol is None or protocol.stream is None:
        return
    stream = protocol.stream
    ws.close(NORMAL_CLOSURE)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not stream.closed():
        left = deadline - loop.time()
        if left <= 0:
            stream.close()
            return
        try:
            # Short waits: another task may be reading this connection too.
            await asyncio.wait_for(ws.read_message(), min(left, 0.1))
        except asyncio.TimeoutError:
            pass
