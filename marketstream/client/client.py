"""The asyncio WebSocket client (:class:`Client`, on Tornado's client): a
thin shell around :class:`~marketstream.client.session.Session`, which
decides everything (the request on each connection, what each frame means,
the backoff); the shell connects, sends what the session says, feeds it the
frames it reads, sleeps the delays it gives and closes with a close frame.
Use it as ``marketstream.client.Client`` (see :mod:`marketstream.client`
for an example)."""

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar, overload

import tornado.httpclient
import tornado.websocket

from marketstream.client.auth import TokenKeeper, TokenSource
from marketstream.client.messages import Message
from marketstream.client.session import ConnectionLost, Session, StreamsRefused, why_closed
from marketstream.wire.frames import CLOSE_NORMAL

__all__ = ["Client", "ConnectionLost", "StreamsRefused", "NORMAL_CLOSURE"]

#: The close code the client sends when it closes (RFC 6455: normal closure).
NORMAL_CLOSURE = CLOSE_NORMAL

log = logging.getLogger(__name__)

#: What a connection attempt raises when the server cannot be reached.
CONNECT_ERRORS = (
    OSError,
    tornado.websocket.WebSocketError,
    tornado.httpclient.HTTPClientError,
    asyncio.TimeoutError,
)

T = TypeVar("T")


class _InSession(Generic[T]):
    """An attribute of :class:`Client` kept by its session (read and written
    there), so the client's public names stay where users look for them."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, client: None, owner: type) -> "_InSession[T]": ...

    @overload
    def __get__(self, client: "Client", owner: type) -> T: ...

    def __get__(self, client: "Client | None", owner: type) -> "T | _InSession[T]":
        if client is None:
            return self
        value: T = getattr(client.session, self.name)
        return value

    def __set__(self, client: "Client", value: T) -> None:
        setattr(client.session, self.name, value)


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

    ``token``: a JWT, or a function (plain or async) returning a fresh one,
    for private streams (:mod:`marketstream.client.auth`): sent as
    ``Authorization: Bearer`` on every (re)connect, and refreshed with
    ``AUTH`` before each ``exp`` when it is a function.
    ``compression``: offer permessage-deflate (the server then compresses
    large messages, such as snapshots).

    Counters: ``connects``, ``reconnects`` (connections after the first),
    ``resumes`` (reconnections that asked for a replay), ``gaps`` (gap
    messages yielded), ``duplicates`` (frames dropped as already seen).
    ``last_seq`` maps each stream to the last position yielded.  They are
    the :attr:`session`'s, which holds all of the protocol's state.

    ::

        async with Client("ws://127.0.0.1:4000/ws", ["trade.SOL_USDC"]) as client:
            async for msg in client:
                print(msg.stream, msg.seq, msg.data["p"])
    """

    streams: _InSession[list[str]] = _InSession()
    snapshot_streams: _InSession[set[str]] = _InSession()
    reconnect: _InSession[bool] = _InSession()
    backoff: _InSession[tuple[float, float]] = _InSession()
    on_state: _InSession[Callable[[str], None] | None] = _InSession()
    last_seq: _InSession[dict[str, int]] = _InSession()
    state: _InSession[str] = _InSession()
    connects: _InSession[int] = _InSession()
    reconnects: _InSession[int] = _InSession()
    resumes: _InSession[int] = _InSession()
    gaps: _InSession[int] = _InSession()
    duplicates: _InSession[int] = _InSession()
    refused: _InSession[dict[str, str]] = _InSession()
    disconnect_reason: _InSession[str | None] = _InSession()

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
        token: TokenSource | None = None,
        compression: bool = False,
    ) -> None:
        self.url = url
        self.auth = TokenKeeper(token) if token is not None else None
        # Offer permessage-deflate (off by default: see the README's Compression).
        # Any: Tornado's type of its compression options.
        # Any: Tornado types websocket_connect's compression_options so.
        self.compression_options: dict[str, Any] | None = {} if compression else None
        self.session = Session(
            streams, snapshot, reconnect, backoff, since, on_state, logger=log, url=url
        )
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.close_timeout = close_timeout
        self._ws: tornado.websocket.WebSocketClientConnection | None = None

    # -- life cycle --------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is open."""
        return self._ws is not None

    def delay(self, attempt: int) -> float:
        """Seconds to wait before reconnection attempt ``attempt`` (0-based)."""
        return self.session.delay(attempt)

    async def connect(self) -> None:
        """Connect and subscribe once (iteration does this by itself).
        Raises OSError / WebSocketError / HTTPClientError when it fails."""
        self.session.connecting()
        headers = await self.auth.headers() if self.auth is not None else None
        request = tornado.httpclient.HTTPRequest(
            self.url,
            connect_timeout=self.connect_timeout,
            request_timeout=self.connect_timeout,
            headers=headers,
        )
        ws = await tornado.websocket.websocket_connect(
            request, ping_interval=self.ping_interval, compression_options=self.compression_options
        )
        if self.session.closed:
            ws.close(NORMAL_CLOSURE)
            raise ConnectionLost("client closed")
        self._ws = ws
        if self.auth is not None:
            self.auth.start(ws)  # AUTH with a fresh token before each exp
        await ws.write_message(self.session.connected())

    async def close(self) -> None:
        """Close the connection and end the iteration: a close frame (1000),
        then the server's, within ``close_timeout`` seconds."""
        self.session.close()
        if self.auth is not None:
            self.auth.stop()
        ws, self._ws = self._ws, None
        if ws is not None:
            await _close(ws, self.close_timeout)
        self.session.finish_close()

    async def resync(self, stream: str) -> bool:
        """Start ``stream`` over from its snapshot (after a :class:`BookGap`),
        on the same connection: unsubscribe and subscribe again asking for
        its snapshot; queued messages of ``stream``, and those received
        until its snapshot, are dropped; the other streams go on.  Returns
        False and does nothing for a plain stream (its frames carry no
        ``seq``: the server has no snapshot to start over from)."""
        requests = self.session.resync(stream)
        if requests is None:
            return False
        ws = self._ws  # without a connection, the next one asks for the snapshot
        if ws is not None:
            try:
                for request in requests:
                    await ws.write_message(request)
            except tornado.websocket.WebSocketClosedError:
                pass  # closed meanwhile: the next connection asks for the snapshot
        return True

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _drop(self, reason: str | None = None) -> None:
        if self.auth is not None:
            self.auth.stop()
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.close(NORMAL_CLOSURE)
        self.session.connection_lost(reason)

    async def _ensure_connected(self) -> None:
        session = self.session
        while self._ws is None:
            if session.closed:
                raise StopAsyncIteration
            delay = session.next_delay()
            if delay is not None:
                await asyncio.sleep(delay)
                if session.closed:
                    raise StopAsyncIteration
            try:
                await self.connect()
            except ConnectionLost:
                raise StopAsyncIteration from None
            except CONNECT_ERRORS as exc:
                if not session.connect_failed(exc):
                    raise
                log.info("cannot connect to %s (%s); retrying", self.url, exc)

    # -- messages ----------------------------------------------------------

    def __aiter__(self) -> "Client":
        return self

    async def __anext__(self) -> Message:
        while True:
            event = self.session.next_event()
            if isinstance(event, StreamsRefused):
                raise event
            if event is not None:
                return event
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
                    self._drop(why_closed(ws.close_code, ws.close_reason, failure))
                continue
            if isinstance(frame, str):
                self.session.receive(frame)


async def _close(ws: tornado.websocket.WebSocketClientConnection, timeout: float) -> None:
    """Send a close frame and wait up to ``timeout`` seconds for the server's
    (reading what still comes), as RFC 6455 asks; then drop the connection."""
    protocol: Any = ws.protocol  # Tornado types it as the base class, without .stream
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
