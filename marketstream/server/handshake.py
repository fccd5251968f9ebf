"""The handshake and life of a :class:`~marketstream.server.handlers.StreamHandler`:
admission, the WebSocket upgrade (Tornado's, or the shortcut of
:mod:`marketstream.server.net.upgrade`), open and close.

A request is admitted or refused before anything else (:meth:`Handshake.prepare`,
:meth:`Handshake.check_origin`); once open, the connection registers with
the process's :class:`~marketstream.server.channels.ChannelManager` and
drops what only the handshake needed::

    GET /stream?streams=trade.SOL_USDC HTTP/1.1     (Upgrade: websocket)
    -> 101, registered, subscribed to trade.SOL_USDC
    GET / HTTP/1.1                                  (no Upgrade)
    -> the live market page ([server] demo_page), else 426
"""

from __future__ import annotations

import logging
import sys
import time
from types import MappingProxyType
from typing import Any

import tornado.websocket
from tornado.httputil import HTTPHeaders
from tornado.iostream import IOStream

from marketstream.server import compression
from marketstream.server.context import log
from marketstream.server.conversation import Conversation
from marketstream.server.net import tornado_compat as compat
from marketstream.server.net.upgrade import Switched
from marketstream.server.page import page
from marketstream.server.wsprotocol import FrameSink, StreamProtocol
from marketstream.wire import requests

__all__ = ["Handshake"]

_SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
)

_NO_HEADERS = HTTPHeaders()
# Any: Tornado types the request's argument tables as dicts of lists.
_NO_ARGS: MappingProxyType[str, Any] = MappingProxyType({})


class Handshake(Conversation):
    """Admission, the handshake, open and close."""

    def clear(self) -> None:
        connection: object = self.request.connection
        if type(connection) is Switched:
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
            return
        ctx.auth.prepare(self)  # a bad token: 401

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
            self.finish(page())
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
            ws = super().get_websocket_protocol()
            if ws is not None:
                # write_frames reads it; no direct writes on this path
                ws.direct = None  # type: ignore[attr-defined]
            return ws
        if ctx.ws_params is None:  # the same for every connection: share one
            ctx.ws_params = compat.websocket_params(
                self.ping_interval,
                self.ping_timeout,
                self.max_message_size,
                self.get_compression_options(),
            )
        ws = StreamProtocol(self, False, ctx.ws_params)
        extension = compression.accept(ctx, ws, self.request.headers)
        connection: object = self.request.connection
        if extension is not None and type(connection) is not Switched:
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
        if not self.context.auth.switching(self, stream):
            return  # a bad token: answered 401 and closed
        self.open_args, self.open_kwargs = (), {}
        # The shortcut runs only where tornado_compat.OK: the protocol is ours.
        ws: StreamProtocol = self.get_websocket_protocol()  # type: ignore[assignment]
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
        # A StreamProtocol, or Tornado's own with .direct set (tornado_compat
        # not OK): get_websocket_protocol made it.
        ws: FrameSink = self.ws_connection  # type: ignore[assignment]
        stream = ws.stream
        self._ws = ws
        stream.max_write_buffer_size = ctx.limits.max_buffer_bytes
        # Market data is many small frames: without TCP_NODELAY, Nagle's
        # algorithm holds a frame back until the client acknowledges the
        # previous one (up to 40 ms with delayed ACKs).
        self.set_nodelay(True)
        self._opened_at = self._tokens_at = time.monotonic()
        self.identity = self._make_identity()
        # No longer handshaking: an open connection from now on.
        ctx.admission.enter(self.request.remote_ip or "?", stream)
        ctx.manager.register(self, getattr(ws, "deflate", None) is not None)
        ctx.auth.opened(self)
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

    def on_close(self) -> None:
        ctx = self.context
        ctx.manager.remove(self)
        ctx.auth.closed(self)
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
