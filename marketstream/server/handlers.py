"""The WebSocket handler: it translates events, nothing more.

:class:`StreamHandler` turns WebSocket events into calls on the
:class:`~marketstream.server.channels.ChannelManager` (what to subscribe)
and the :mod:`marketstream.wire` modules (what frames mean); the manager
calls back :meth:`StreamHandler.write_frames` to deliver data.  A plain
``GET /`` (no Upgrade) gets the live market page with ``[server]
demo_page`` on.  The HTTP endpoints and the URL map are
:mod:`marketstream.server.http`'s.

Close codes and refusals (also in the README):

* HTTP 403: ``Origin`` not in ``[server] allowed_origins``.
* HTTP 429: ``[server] max_connections_per_ip`` reached for the client IP.
* HTTP 503: ``[server] max_connections`` reached in this process.
* HTTP 413, or closed: a request body, or a handshake that takes longer than
  ``[server] handshake_timeout`` (see :mod:`marketstream.server.net.upgrade`).
* 1001 "server shutting down"; 1001 "ping timeout" (no pong in time).
* 1008 "rate limit exceeded": over ``[limits] messages_per_second``.
* 1008 "frame rate exceeded": over ``[limits] frames_per_second`` (frames of
  any kind, control frames and fragments included).
* 1008 "slow consumer": more than ``[limits] max_buffer_bytes`` queued.
* 1009 "message too big": a frame over ``[limits] max_frame_bytes``.
* Streams refused like an invalid name (an error reply with acks):
  ``[limits] max_streams_per_connection`` and ``[limits] max_channels``.
"""

import asyncio
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Coroutine
from types import MappingProxyType
from typing import Any

import tornado.ioloop
import tornado.web
import tornado.websocket
from tornado.httputil import HTTPHeaders
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError

from marketstream.fanout.core import Want
from marketstream.loglimit import LogLimiter
from marketstream.server import compression
from marketstream.server.admission import Admission
from marketstream.server.channels import ChannelManager
from marketstream.server.net import tornado_compat as compat
from marketstream.server.net.upgrade import Switched
from marketstream.wire import replies, requests
from marketstream.wire.frames import CLOSE_POLICY, OP_CLOSE

__all__ = ["StreamHandler", "Context", "STATIC_DIR"]

log = logging.getLogger(__name__)


_SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
)

_NO_HEADERS = HTTPHeaders()
_LINGER_0 = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets
_DIRECT = compat.OK  # write to the socket directly when nothing is queued
_queued_bytes = compat.queued_bytes
_PLAIN = (IOStream, compat.LeanIOStream)  # streams without TLS (their socket takes the frames)
_NO_ARGS: MappingProxyType[str, Any] = MappingProxyType({})


class Context:
    """What the handlers of one process share: settings, the manager, the
    counters, admission and the stream rules."""

    def __init__(self, settings: Any, manager: ChannelManager | None = None) -> None:
        self.settings = settings
        self.manager = manager or ChannelManager.instance()
        self.counters = self.manager.counters
        self.admission = Admission(
            settings.server, self.counters, lambda: len(self.manager.connections)
        )
        self.rules = requests.StreamRules.from_settings(settings.protocol)
        self.acks = settings.protocol.acks
        self.log_limit = LogLimiter(log)  # for what a client can cause (refused streams)
        self.limits = settings.limits
        self.xheaders = settings.server.xheaders
        self.snapshot_types = frozenset(settings.recovery.snapshot_types)
        self.ws_params: Any = None  # Tornado's protocol parameters, made at the first handshake
        # Lines a client can cause: at most one per cause per second.
        self.log_limiter = LogLimiter(log)
        # permessage-deflate offered to clients (see server/compression.py).
        self.compression = settings.server.compression and self.manager.core.compressing is not None


def _send(sock: socket.socket, data: bytes | memoryview) -> int:
    """Bytes of ``data`` the kernel took from a non-blocking send; 0 when it
    took none or the socket failed (``IOStream.write`` then meets the error
    and closes the stream)."""
    try:
        return sock.send(data)
    except OSError:  # BlockingIOError and InterruptedError among them
        return 0


class _Protocol(tornado.websocket.WebSocketProtocol13):
    """Tornado's protocol with its frame-reading loop in a task of its own,
    and a budget for the frames a client sends.

    Tornado awaits the loop at the bottom of the handshake's coroutine chain
    (``_execute`` -> ``get`` -> ``accept_connection`` -> ``_accept_connection``),
    so those four frames and their locals (the parsed request headers among
    them) live as long as the connection: ~1.7 KB each.  Running the loop
    apart lets the handshake finish and be collected.

    Every frame a client sends, control frames and fragments included, takes
    a token from a bucket (``[limits] frames_per_second``, ``frames_burst``):
    past it the client is closed with 1008 "frame rate exceeded" (a flood of
    pings or empty fragments never reaches the message limit).  Once the
    close frame is sent, nothing but the client's close frame is handled;
    a client still over its budget then is not read any more (its frames
    wait in the kernel, which stops it sending) until Tornado drops the
    connection for want of the client's close frame.  Dropping it at once
    would reset the connection, and a reset can overtake the close frame.
    """

    # The budget's state in slots: the instance dict is at the size where
    # CPython still shares its keys between instances (29 attributes; one
    # more gives every connection a dict of its own, ~1.5 KB).
    __slots__ = ("frame_tokens", "frame_time", "deflate")

    handler: Any  # the StreamHandler

    def __init__(self, handler: Any, mask_outgoing: bool, params: Any) -> None:
        super().__init__(handler, mask_outgoing, params)
        self.frame_tokens = float(handler.context.limits.frames_burst)
        self.frame_time = time.monotonic()
        self.deflate: str | None = None  # the permessage-deflate agreed, if any

    async def _receive_frame_loop(self) -> None:
        self.start_frame_loop()

    def _receive_frame(self) -> Coroutine[Any, Any, None]:
        """The reading of the next frame, once the budget allows it.

        A plain function that hands the frame loop Tornado's coroutine: a
        coroutine of its own would stay suspended with it in every idle
        connection (~300 bytes each)."""
        limits = self.handler.context.limits
        now = time.monotonic()
        allowed, self.frame_tokens = requests.take_token(
            self.frame_tokens, self.frame_time, now, limits.frames_per_second, limits.frames_burst
        )
        self.frame_time = now
        if not allowed:
            if self.server_terminated:
                return self._until_closed()  # still flooding after our close frame
            self.handler.frames_exceeded()
        frame: Coroutine[Any, Any, None] = getattr(super(), compat.RECEIVE_FRAME)()
        return frame

    async def _until_closed(self) -> None:
        """Wait, reading nothing, until the stream is closed."""
        stream = self.stream
        if stream.closed():
            return
        closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def signal() -> None:
            if not closed.done():
                closed.set_result(None)

        stream.set_close_callback(signal)
        await closed

    def _handle_message(self, opcode: int, data: bytes) -> Any:
        if self.server_terminated and opcode != OP_CLOSE:
            return None  # our close frame is out: only the client's close counts
        if opcode == OP_CLOSE and len(data) > 2:
            try:
                data[2:].decode("utf-8")
            except UnicodeDecodeError:  # Tornado would raise in its frame loop
                self.handler.context.log_limiter.log(
                    logging.WARNING,
                    "bad_close_frame",
                    "closing %s: close frame with an invalid UTF-8 reason",
                    self.handler.identity,
                )
                self._abort()
                return None
        return getattr(super(), compat.HANDLE_MESSAGE)(opcode, data)

    def start_frame_loop(self) -> None:
        """Read frames in a task of its own."""
        # The handler keeps the task (the event loop only holds tasks weakly).
        loop = getattr(super(), compat.RECEIVE_FRAME_LOOP)
        handler: Any = self.handler
        task = handler.frame_loop = asyncio.ensure_future(loop())
        task.add_done_callback(self._frame_loop_done)

    def _frame_loop_done(self, task: asyncio.Future) -> None:
        handler: Any = self.handler
        handler.frame_loop = None
        if not task.cancelled() and task.exception() is not None:
            handler.context.log_limiter.log(
                logging.ERROR,
                "frame_loop_failed",
                "frame loop of %s failed",
                self.handler,
                exc_info=task.exception(),
            )
            self._abort()

    # The socket :meth:`StreamHandler.write_frames` may write to directly,
    # or None.  Set only while the stream's write buffer was empty at the
    # last check and Tornado has written nothing since (a frame of its own
    # may sit half-sent in that buffer); once Tornado has written the close
    # frame, StreamHandler._write_buffered leaves it None for good.
    direct: socket.socket | None = None

    def _write_frame(self, *args: Any, **kwargs: Any) -> Any:
        self.direct = None  # Tornado writes: recheck its buffer before writing past it
        return super()._write_frame(*args, **kwargs)


class StreamHandler(tornado.websocket.WebSocketHandler):
    """One WebSocket client.

    Endpoints ``/`` and ``/ws``; ``/stream?streams=a/b`` subscribes to
    ``a`` and ``b`` at connect time.
    """

    def initialize(self, context: Context) -> None:
        self.context = context
        self.identity: str | None = None
        # With one attribute more than a handler has today (29, with
        # Tornado's), CPython gives every handler a dict of its own instead
        # of compact shared-key storage: about 1.5 KB more per connection
        # (a test guards it).  Add state with care.
        self._ws: Any = None  # the WebSocket protocol once open, None once closed
        self._opened_at = 0.0
        self._tokens = float(context.limits.messages_burst)
        self._tokens_at = 0.0
        self.ping_sent = 0.0  # loop time of the oldest unanswered keepalive ping
        self.frame_loop = None
        # Whether this connection gets acknowledgements ([protocol] acks, or
        # "acks": true in a request), and while some wait for Redis, the
        # task of the last one instead (True): each reply waits for the one
        # before it, so that replies keep the order of the requests.
        self._acks: bool | asyncio.Future[None] = context.acks

    # --- handshake -----------------------------------------------------------

    def clear(self) -> None:
        if type(self.request.connection) is Switched:
            # The handshake shortcut sends a prebuilt 101: no HTTP response
            # to prepare (Tornado's defaults format a Date on every call).
            compat.prepare_switch(self)
            return
        super().clear()

    def prepare(self) -> None:
        ctx = self.context
        admission = ctx.admission
        # The connection counts as handshaking (Admission.admit): not against itself.
        stream = getattr(self.request.connection, "stream", None)
        refusal = admission.refusal(self.request.remote_ip or "?", stream)
        if refusal is not None:
            status, reason, cause = refusal
            admission.refused(cause)
            ctx.log_limiter.log(
                logging.WARNING, cause, "refused %s: %s", self.request.remote_ip, reason
            )
            self.set_status(status)
            self.finish(reason)

    async def get(self, *args: Any, **kwargs: Any) -> None:
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            self._plain_get()
            return
        await super().get(*args, **kwargs)

    def _plain_get(self) -> None:
        """A GET without Upgrade: the live market page on ``/`` when
        ``[server] demo_page`` is on, else 426 saying what this endpoint is."""
        if self.request.path == "/" and self.context.settings.server.demo_page:
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.set_header("Cache-Control", "no-cache")
            self.finish(_page())
            return
        self.set_status(426)
        self.set_header("Upgrade", "websocket")
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("This is a WebSocket endpoint: connect with a WebSocket client.\n")

    def check_origin(self, origin: str) -> bool:
        admission = self.context.admission
        if admission.origin_allowed(origin):
            return True
        admission.refused("origin")
        self.context.log_limiter.log(
            logging.WARNING,
            "origin",
            "refused %s: origin %r not allowed",
            self.request.remote_ip,
            origin[:200],
        )
        return False

    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol | None:
        if self.request.headers.get("Sec-WebSocket-Version") != "13":
            return None
        ctx = self.context
        if not compat.OK:
            ws: Any = super().get_websocket_protocol()
            if ws is not None:
                ws.direct = None  # write_frames reads it; no direct writes on this path
            return ws
        if ctx.ws_params is None:  # the same for every connection: share one
            ctx.ws_params = compat.websocket_params(
                self.ping_interval,
                self.ping_timeout,
                self.max_message_size,
                self.get_compression_options(),
            )
        ws = _Protocol(self, False, ctx.ws_params)
        extension = compression.accept(ctx, ws, self.request.headers)
        if extension is not None and type(self.request.connection) is not Switched:
            self.set_header(compression.HEADER, extension)  # Tornado's path
        return ws

    def switch_protocols(self, stream: IOStream, key: str) -> None:
        """Answer 101 on ``stream`` and start the WebSocket, for a request
        :mod:`marketstream.server.net.upgrade` has already checked.

        What :meth:`get` and Tornado's ``_accept_connection`` do for a plain
        request (no subprotocol, admitted, origin allowed; permessage-deflate
        is negotiated in :meth:`get_websocket_protocol`), without building an
        HTTP response: the 101 is one prebuilt write.
        """
        self.open_args, self.open_kwargs = (), {}
        ws: Any = self.get_websocket_protocol()
        self.ws_connection = ws
        compat.finish_http(self)  # the HTTP exchange is over
        ws.stream = stream
        self._ws = ws  # what write_frames writes to (open() sets it on Tornado's path)
        response = _SWITCHING % ws.compute_accept_value(key).encode()
        if ws.deflate is not None:
            response = compression.with_extension(response, ws.deflate)
        self.write_frames(response)
        ws.start_pinging()
        try:
            self.open()  # synchronous: nothing awaits it here
        except Exception:
            self.log_exception(*sys.exc_info())
            self.context.admission.handshake_done(stream)
            self.on_connection_close()  # closes the socket, undoes what open() did
            return
        ws.start_frame_loop()

    # --- WebSocket events ----------------------------------------------------

    def open(self, *args: str, **kwargs: str) -> None:
        ctx = self.context
        self._ws = self.ws_connection
        self._ws.stream.max_write_buffer_size = ctx.limits.max_buffer_bytes
        # Market data is many small frames: without TCP_NODELAY, Nagle's
        # algorithm holds a frame back until the client acknowledges the
        # previous one (up to 40 ms with delayed ACKs).
        self.set_nodelay(True)
        self._opened_at = self._tokens_at = time.monotonic()
        self.identity = self._make_identity()
        # No longer handshaking: an open connection from now on.
        ctx.admission.enter(self.request.remote_ip or "?", self._ws.stream)
        ctx.manager.register(self, getattr(self._ws, "deflate", None) is not None)
        log.info("connect %s", self.identity)
        initial = self.get_query_argument("streams", "")
        since = self.get_query_argument("since", "")
        snapshot = self.get_query_argument("snapshot", "")
        self._release_handshake_state()
        if initial:
            self._handle(requests.parse_stream_query(initial, since, snapshot), reply=False)

    if compat.OK:

        def _detach_stream(self) -> IOStream:
            # Tornado's version also shadows seven HTTP methods with instance
            # attributes, which turns every handler's compact attribute
            # storage into a full dict (~1.6 KB a connection).  Those methods
            # already raise after the handshake (it finished the response).
            return self.detach()

    def _release_handshake_state(self) -> None:
        """Drop what only the HTTP handshake needed (headers, arguments,
        response state): thousands of idle connections each keep less."""
        request = self.request
        # The HTTP connection objects hold the parsed headers, the request
        # line and futures; the socket now belongs to the WebSocket.
        request.connection = request.server_connection = None
        request.body = b""
        request.headers = _NO_HEADERS
        # Typed as dicts and lists by Tornado; nothing reads them any more,
        # so they share one empty mapping (or None).
        for name in ("arguments", "query_arguments", "body_arguments", "files"):
            setattr(request, name, _NO_ARGS)
        if compat.OK:
            compat.release_response(self)
        for name in ("ui", "path_args", "path_kwargs", "open_args", "open_kwargs"):
            setattr(self, name, None)

    def on_message(self, message: str | bytes) -> None:
        if self.ws_connection is None:
            return None  # closing (on Tornado's own protocol, which reads on)
        ctx = self.context
        now = time.monotonic()
        allowed, self._tokens = requests.take_token(
            self._tokens,
            self._tokens_at,
            now,
            ctx.limits.messages_per_second,
            ctx.limits.messages_burst,
        )
        self._tokens_at = now
        if not allowed:
            ctx.counters.closed["rate_limit"] += 1
            ctx.log_limiter.log(
                logging.WARNING, "rate_limit", "closing %s: rate limit exceeded", self.identity
            )
            self.close(CLOSE_POLICY, "rate limit exceeded")
            return None
        request = requests.parse_request(message)
        if isinstance(request, requests.Invalid):
            ctx.counters.invalid_frames += 1
            log.debug("ignored frame from %s: %s", self.identity, request.reason)
            if self._acks:
                self._answer(replies.encode_error(request.id, request.code, request.reason))
            return None
        if request.acks and not self._acks:
            self._acks = True  # asked for on this connection, from this request on
        self._handle(request, reply=bool(self._acks))

    def frames_exceeded(self) -> None:
        """The client sent more frames than ``[limits] frames_per_second``
        allows (its protocol keeps the count): close with 1008."""
        ctx = self.context
        ctx.counters.closed["frame_rate_limit"] += 1
        ctx.log_limiter.log(
            logging.WARNING, "frame_rate_limit", "closing %s: frame rate exceeded", self.identity
        )
        ctx.manager.remove(self)  # nothing more for it
        self.close_for(CLOSE_POLICY, "frame rate exceeded", reset=True)

    def on_pong(self, data: bytes) -> None:
        self.ping_sent = 0.0

    def on_close(self) -> None:
        ctx = self.context
        ctx.manager.remove(self)
        ws = self._ws
        if ws is not None:
            ctx.admission.leave(self.request.remote_ip or "?")
            if ws.stream is not None:
                # A stream closed by an error keeps it, and its traceback's
                # frames refer back to the stream: a reference cycle that
                # only the (rarely run, see app.GC_THRESHOLDS) cycle
                # collector would free.  Nothing reads it after this.
                ws.stream.error = None
        if self.identity is not None:
            code = self.close_code
            log.info(
                "disconnect %s %s duration=%.1fs",
                self.identity,
                "no close frame" if code is None else "code=%d" % code,
                time.monotonic() - self._opened_at,
            )
        self._ws = None

    # --- requests ------------------------------------------------------------

    def _handle(self, request: requests.Request, reply: bool) -> None:
        """Carry out a valid request; acknowledgements never hold up reading
        (a SUBSCRIBE's ack waits for Redis in a task of its own)."""
        ctx = self.context
        manager = ctx.manager
        if request.method == requests.LIST_SUBSCRIPTIONS:
            self._answer(replies.encode_result(request.id, manager.subscriptions(self)))
            return
        valid: list[str] = []
        refused: list[tuple[str, str]] = []
        for name in request.params:
            refusal = ctx.rules.refusal(name)
            if refusal is None:
                valid.append(name)
            else:
                self._refuse(name, refusal[0], refusal[1], refused)
        valid = list(dict.fromkeys(valid))
        if request.method == requests.UNSUBSCRIBE:
            manager.unsubscribe(self, valid)
            if reply:
                self._answer(replies.encode_outcome(request.id, "unsubscribed", valid, refused, []))
            return
        current = manager.connections.get(self, {})
        new = [name for name in valid if name not in current]
        limit = ctx.limits.max_streams_per_connection
        room = max(limit - len(current), 0)
        if len(new) > room:
            over = new[room:]
            for name in over:
                self._refuse(
                    name, "too_many_streams", "too many streams (limit %d)" % limit, refused
                )
            new = new[:room]
            dropped = frozenset(over)
            valid = [name for name in valid if name not in dropped]
        capped = manager.over_channel_cap(new)
        if capped:
            # Refused like an invalid name: the process has all the Redis
            # channels it may ([limits] max_channels).
            for name in capped:
                self._refuse(name, "max_channels", "too many streams on this server", refused)
            gone = frozenset(capped)
            new = [name for name in new if name not in gone]
            valid = [name for name in valid if name not in gone]
        problems = []
        for cause, text in request.problems:
            ctx.counters.ignored[cause] += 1
            problems.append(text)
        manager.subscribe(self, new, self._wants(request, new))
        if reply:
            pending = self._acks
            self._later(
                self._ack_when_subscribed(
                    pending if isinstance(pending, asyncio.Future) else None,
                    request.id,
                    new,
                    valid,
                    refused,
                    problems,
                )
            )

    def _refuse(self, name: str, cause: str, reason: str, refused: list[tuple[str, str]]) -> None:
        """Count and log (rate-limited) a stream not subscribed; add it to
        ``refused`` for the reply."""
        ctx = self.context
        ctx.counters.rejected_streams += 1
        ctx.counters.rejected[cause] += 1
        ctx.log_limit.log(
            logging.INFO,
            "rejected_stream",
            "refused stream %.100r from %s: %s",
            name,
            self.identity,
            reason,
        )
        refused.append((name, reason))

    def _answer(self, text: str) -> None:
        """Reply now, or after the replies still waiting for Redis."""
        pending = self._acks
        if isinstance(pending, asyncio.Future):
            self._later(self._reply_after(pending, text))
        else:
            self._reply(text)

    def _later(self, reply: Coroutine[Any, Any, None]) -> None:
        """Run ``reply`` (which waits for the one before it) as the last
        reply in flight; the handler holds it (the event loop holds tasks
        only weakly), and each holds the one before it."""
        task = asyncio.ensure_future(reply)
        self._acks = task
        task.add_done_callback(self._ack_done)

    def _ack_done(self, task: asyncio.Future[None]) -> None:
        if self._acks is task:
            self._acks = True  # nothing in flight: acks stay on

    async def _reply_after(self, previous: asyncio.Future[None], text: str) -> None:
        await asyncio.wait([previous])
        if self._ws is not None:
            self._reply(text)

    def _wants(self, request: requests.Request, names: list[str]) -> dict[str, Want]:
        """What to recover on each of ``names``: the request's ``since`` and
        ``snapshot``, else the snapshot default of ``[recovery]``."""
        since = request.since or {}
        snapshot = request.snapshot
        default = self.context.snapshot_types
        wants = {}
        for name in names:
            if snapshot is None:
                wanted = bool(default) and name.partition(".")[0] in default
            else:
                wanted = snapshot is True or (snapshot is not False and name in snapshot)
            position = since.get(name)
            if position is not None or wanted:
                wants[name] = Want(position, wanted)
        return wants

    async def _ack_when_subscribed(
        self,
        previous: asyncio.Future[None] | None,
        request_id: requests.RequestId,
        names: list[str],
        subscribed: list[str],
        refused: list[tuple[str, str]],
        problems: list[str],
    ) -> None:
        if not await self.context.manager.wait_subscribed(names):
            problems = problems + [
                "Redis has not confirmed the subscription yet (the "
                "streams are delivered once it does)"
            ]
        if previous is not None:
            await asyncio.wait([previous])
        if self._ws is not None:
            self._reply(
                replies.encode_outcome(request_id, "subscribed", subscribed, refused, problems)
            )

    def _reply(self, text: str) -> None:
        self.write_frames(compression.reply_frame(self.context, self._ws, text.encode()))

    # --- delivery ------------------------------------------------------------

    def write_frames(self, data: bytes | memoryview) -> None:
        """Queue complete WebSocket frames (bytes) for this client.

        The one place that writes below ``write_message``: frames are built
        once per message by the fan-out and shared by all recipients.  A
        client with more than ``max_buffer_bytes`` unsent is closed.

        While nothing waits in the stream's write buffer, the bytes go
        straight to the kernel, which takes them whole unless the client
        lags.  This skips the Future, callback and buffer bookkeeping of
        ``IOStream.write``, and touches two objects (the protocol and the
        socket) instead of five: it runs once per client per batch, the
        largest cost per delivery after the system call itself.
        """
        ws = self._ws
        if ws is None:
            return
        sock = ws.direct
        if sock is not None:
            try:  # _send, inline: this runs a hundred thousand times a second
                sent = sock.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            ws.direct = None  # the kernel is full: the rest, and what follows, queue
            self._queue(ws, memoryview(data)[sent:])
            return
        self._write_buffered(ws, data)

    def _write_buffered(self, ws: Any, data: bytes | memoryview) -> None:
        """:meth:`write_frames` when the direct path is off: straight to the
        kernel again if the stream's buffer has emptied, else behind what
        waits there."""
        if ws.server_terminated:
            return
        stream = ws.stream
        # A closed stream has no socket (and no write buffer): the check
        # comes first, and IOStream.write below raises StreamClosedError.
        if (
            _DIRECT
            and (sock := stream.socket) is not None
            and type(stream) in _PLAIN
            and not _queued_bytes(stream)
        ):
            sent = _send(sock, data)
            if sent == len(data):
                ws.direct = sock  # the buffer is empty: go straight to the kernel again
                return
            data = memoryview(data)[sent:]
        self._queue(ws, data)

    def _queue(self, ws: Any, data: bytes | memoryview) -> None:
        """Queue ``data`` in the stream's write buffer (Tornado writes it
        as the client reads)."""
        stream = ws.stream
        try:
            stream.write(data)
        except StreamClosedError:
            pass  # on_close follows
        except StreamBufferFullError:
            self._slow_consumer()

    def _slow_consumer(self) -> None:
        self.context.counters.closed["slow_consumer"] += 1
        self.context.log_limiter.log(
            logging.WARNING,
            "slow_consumer",
            "closing %s: slow consumer (over %d bytes queued)",
            self.identity,
            self.context.limits.max_buffer_bytes,
        )
        self.context.manager.remove(self)  # nothing more for it
        self.close_for(CLOSE_POLICY, "slow consumer", reset=True)

    def close_for(self, code: int, reason: str, reset: bool = False) -> None:
        """Close even when the send buffer is full (the close frame queues
        behind it; Tornado drops the TCP connection if the client has not
        answered within 5 s).

        With ``reset``, that drop is a TCP reset (``SO_LINGER`` 0): the
        kernel frees what is still queued for a client that stopped reading
        at once, instead of holding it (up to ``tcp_wmem``, megabytes) in
        FIN-WAIT-1 until the client reads or TCP gives up.  A client that
        does read gets the close frame first, as usual.
        """
        ws = self._ws
        if ws is not None and ws.stream is not None:
            ws.stream.max_write_buffer_size = None
            if reset and ws.stream.socket is not None:
                try:
                    ws.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
                except OSError:
                    pass
        self.close(code, reason)

    def send_ping(self) -> None:
        """Send a keepalive ping (see :mod:`marketstream.server.keepalive`)."""
        if self._ws is None:
            return
        try:
            self.ping()
        except (StreamClosedError, tornado.websocket.WebSocketClosedError):
            pass  # on_close follows
        except StreamBufferFullError:
            self._slow_consumer()

    # --- identity ------------------------------------------------------------

    def _make_identity(self) -> str:
        """``ip:port`` of the client.

        Behind a trusted proxy (``xheaders``, ``trusted_proxies``), the IP is
        the one the proxy reports and the port is the client's own from
        ``X-Real-Port`` (see conf/nginx.conf), else the proxy-side port,
        which is unique per connection within this process.
        """
        ip = self.request.remote_ip or "?"
        try:
            peer = self._ws.stream.socket.getpeername()
        except (OSError, AttributeError):
            peer = ("", 0)
        port = None
        if self.context.admission.proxied(peer[0]):
            header = self.request.headers.get("X-Real-Port", "")
            if header.isdigit():
                port = int(header)
        if port is None:
            port = peer[1]
        return ("[%s]:%d" if ":" in ip else "%s:%d") % (ip, port)

    def __repr__(self) -> str:
        return "<StreamHandler %s>" % self.identity


STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def _page() -> bytes:
    """The live market page (read once; it ships inside the package)."""
    global _PAGE
    if _PAGE is None:
        with open(os.path.join(STATIC_DIR, "index.html"), "rb") as handle:
            _PAGE = handle.read()
    return _PAGE


_PAGE: bytes | None = None
