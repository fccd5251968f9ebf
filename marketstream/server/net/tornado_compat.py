"""Every private Tornado name marketstream relies on, in one place.

The handshake shortcut (:mod:`marketstream.server.net.upgrade`), the direct frame
writes of :class:`~marketstream.server.handlers.StreamHandler` and
:class:`LeanIOStream` (no write buffer while nothing waits to be written)
go below Tornado's public API for speed and memory; the frame budget (each
client frame counted as it is read), the close frames checked, the proxy
headers of trusted proxies and the peer address ``/health`` looks at go
below it for what it does not offer.  The names they need are listed here
and checked once, at import (``MISSING`` would list what is missing, e.g.
``["tornado.websocket._WebSocketParams"]``).  The checks look at what
Tornado does, not at how its source is written: each makes the object
(a protocol, a request context, a server, a handler, a write buffer) with
stand-ins and watches what it keeps or writes, so a reformat upstream does
not turn the fast paths off.  Two look at source text, where no call at
import can tell (each says so): that only ``write`` adds to an IOStream's
write buffer, and that ``RequestHandler._execute`` sets ``_transforms``.

>>> from marketstream.server.net import tornado_compat as compat
>>> compat.OK          # every name exists in the installed Tornado
True
>>> compat.MISSING
[]

When something is missing (a Tornado release renamed it), one warning is
logged and the server uses Tornado's public paths only: ``fast_handshake``
is turned off, frames go through ``IOStream.write``, streams are Tornado's
own, and the handshake state is left as Tornado keeps it; only complete
messages count against a client's budget, proxy headers are ignored (the
peer address is the client's) and ``/health`` shows no details.  Nothing
fails in the middle of a handshake.

To vet a new Tornado release: install it, run the test suite, and check
``python -c "import marketstream.server.net.tornado_compat as c; print(c.MISSING)"``
prints ``[]``; then widen the pin in ``setup.cfg``.
"""

from __future__ import annotations

import collections
from asyncio import Future
import inspect
import logging
import operator
import socket
import zlib
from collections.abc import Callable
from typing import Any

import tornado
import tornado.gen
import tornado.http1connection
import tornado.httpserver
import tornado.httputil
import tornado.ioloop
import tornado.iostream
import tornado.tcpserver
import tornado.web
import tornado.websocket

from marketstream.wire.frames import CLOSE_NORMAL, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT

__all__ = [
    "OK",
    "MISSING",
    "handle_connection",
    "LeanIOStream",
    "websocket_params",
    "request_context",
    "apply_xheaders",
    "queued_bytes",
    "finish_http",
    "prepare_switch",
    "release_response",
    "RECEIVE_FRAME_LOOP",
    "RECEIVE_FRAME",
    "HANDLE_MESSAGE",
    "peer_address",
    "inflate_client_messages",
]

log = logging.getLogger(__name__)

#: The protocol method that reads frames until the connection ends; the
#: handler runs it as a task of its own.
RECEIVE_FRAME_LOOP = "_receive_frame_loop"
#: The protocol method the loop awaits for each frame (the handler's
#: protocol counts the frame against the client's budget first).
RECEIVE_FRAME = "_receive_frame"
#: The protocol method that acts on a whole message or control frame.
HANDLE_MESSAGE = "_handle_message"


class _Reached(Exception):
    """Raised by a stand-in to show that a call reached it."""


class _StubSocket:
    """What a request context reads of a stream's socket."""

    family = socket.AF_INET


class _StubStream:
    """What Tornado's constructors and close paths read of a stream."""

    socket = _StubSocket()
    max_buffer_size = 1 << 20

    def closed(self) -> bool:
        return False

    def set_close_callback(self, callback: object) -> None:
        pass


def _assigns(function: Any, *names: str) -> bool:
    """Whether ``function``'s source assigns every ``self.<name>``.

    Text, for what no call at import can show (a coroutine that runs a
    whole request): a reformat upstream can fail this check, which turns
    the fast paths off with a warning naming it."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    return all("self.%s =" % name in source or "self.%s: " % name in source for name in names)


def _buffer_counts_bytes() -> bool:
    """Whether Tornado's write buffer keeps the bytes it holds in ``_size``
    (what :data:`queued_bytes` reads): appended to and advanced, it says so."""
    try:
        buffer: Any = tornado.iostream._StreamBuffer()
        empty = buffer._size == 0
        buffer.append(b"abcd")
        buffer.advance(1)
        return bool(empty and buffer._size == 3 == len(buffer))
    except Exception:
        return False


def _params_kept() -> bool:
    """Whether ``_WebSocketParams`` keeps the four parameters it is given."""
    try:
        params = tornado.websocket._WebSocketParams(
            ping_interval=1.0, ping_timeout=2.0, max_message_size=3, compression_options=None
        )
        kept = (
            params.ping_interval,
            params.ping_timeout,
            params.max_message_size,
            params.compression_options,
        )
        return kept == (1.0, 2.0, 3, None)
    except Exception:
        return False


def _makes_compressors(cls: type) -> bool:
    """Whether ``cls._create_compressors`` sets ``_compressor`` and
    ``_decompressor`` (what :func:`inflate_client_messages` relies on): it is
    called for the server side on a protocol made with stand-ins, and the
    inflater it keeps must inflate a message deflated without history."""
    try:
        ws: Any = cls(_StubStream(), False, tornado.websocket._WebSocketParams())
        ws._create_compressors("server", {"client_no_context_takeover": None}, {})
        deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        data = deflate.compress(b"marketstream") + deflate.flush(zlib.Z_SYNC_FLUSH)
        return bool(
            ws._compressor is not None and ws._decompressor.decompress(data[:-4]) == b"marketstream"
        )
    except Exception:
        return False


def _writes_through(cls: type) -> bool:
    """Whether ``cls``'s ``write_message``, ``write_ping``, ``_send_pong``
    and ``close`` write their frames with ``self._write_frame`` (which the
    handler's protocol hooks: a direct write must not pass a frame Tornado
    only partly sent): each is called on a protocol whose ``_write_frame``
    notes the frame's opcode and stops the call there."""
    opcodes: list[int] = []

    def write_frame(fin: bool, opcode: int, data: bytes, flags: int = 0) -> None:
        opcodes.append(opcode)
        raise _Reached

    try:
        ws: Any = cls(_StubStream(), False, tornado.websocket._WebSocketParams())
        ws.stream = _StubStream()
        ws._write_frame = write_frame
        calls: list[Callable[[], object]] = [
            lambda: ws.write_message("x"),
            lambda: ws.write_ping(b"x"),
            lambda: ws._send_pong(b"x"),
            lambda: ws.close(CLOSE_NORMAL),
        ]
        for call in calls:
            try:
                call()
            except _Reached:
                pass
    except Exception:
        return False
    return opcodes == [OP_TEXT, OP_PING, OP_PONG, OP_CLOSE]


def _writes_only_in_write(cls: type) -> bool:
    """Whether ``cls`` makes its write buffer and write futures in
    ``__init__``, appends to them only in ``write`` and drains them in
    ``_handle_write`` (what :class:`LeanIOStream` relies on).

    Text: that no other method adds to them is something only the source
    can tell (and a stream cannot be made at import without an event loop)."""
    try:
        whole = inspect.getsource(cls)
        write = inspect.getsource(cls.write)  # type: ignore[attr-defined]
        init = inspect.getsource(cls.__init__)  # type: ignore[misc]
    except (OSError, TypeError, AttributeError):
        return False
    appends = ("self._write_buffer.append(", "self._write_futures.append(")
    return (
        callable(getattr(cls, "_handle_write", None))
        and all(whole.count(a) == 1 and a in write for a in appends)
        and "self._write_buffer = _StreamBuffer()" in init
        and "self._write_futures" in init
    )


def _request_context_works(context_class: Any) -> bool:
    """Whether a request context made for a stream keeps its address, the
    client's IP and the protocol, and takes the IP from ``X-Real-Ip`` when
    asked to apply the proxy headers."""
    try:
        context = context_class(_StubStream(), ("192.0.2.1", 5), None, None)
        before = (context.address, context.remote_ip, context.protocol)
        context._apply_xheaders(tornado.httputil.HTTPHeaders({"X-Real-Ip": "198.51.100.7"}))
        return bool(
            before == (("192.0.2.1", 5), "192.0.2.1", "http")
            and context.remote_ip == "198.51.100.7"
        )
    except Exception:
        return False


def _connections_keep_context() -> bool:
    """Whether the HTTP/1 server connection keeps its stream and context,
    and the HTTP/1 connection takes a ``context``.

    ``HTTP1Connection`` makes a Future as it is made (an event loop, at
    import): its ``context`` argument, documented as readable as
    ``connection.context``, is checked by name."""
    try:
        stream, context = _StubStream(), object()
        server: Any = tornado.http1connection.HTTP1ServerConnection(
            stream,  # type: ignore[arg-type]  # a stand-in
            None,
            context,
        )
        takes = inspect.signature(tornado.http1connection.HTTP1Connection).parameters
        return server.stream is stream and server.context is context and "context" in takes
    except Exception:
        return False


def _server_keeps_settings() -> bool:
    """Whether an HTTP server keeps its callback, ``xheaders``, ``protocol``
    and ``trusted_downstream`` as given."""

    def callback(request: object) -> None:
        pass

    try:
        server: Any = tornado.httpserver.HTTPServer(
            callback, xheaders=True, protocol="https", trusted_downstream=["192.0.2.9"]
        )
        return bool(
            server.request_callback is callback
            and server.xheaders is True
            and server.protocol == "https"
            and list(server.trusted_downstream) == ["192.0.2.9"]
        )
    except Exception:
        return False


class _StubConnection:
    """What a request handler asks of its HTTP connection as it is made."""

    context = None

    def set_close_callback(self, callback: object) -> None:
        pass


def _handler_state() -> tuple[bool, bool]:
    """Whether a request handler, once made, has its response state
    (``_headers_written``, ``_finished`` False) and what ``clear()`` sets
    (``_headers``, ``_write_buffer``, ``_status_code``, ``_reason``)."""
    try:
        request = tornado.httputil.HTTPServerRequest(
            start_line=tornado.httputil.RequestStartLine("GET", "/", "HTTP/1.1"),
            headers=tornado.httputil.HTTPHeaders({"Host": "localhost"}),
            connection=_StubConnection(),  # type: ignore[arg-type]  # a stand-in
        )
        handler = tornado.web.RequestHandler(tornado.web.Application(), request)
        state: dict[str, Any] = vars(handler)
    except Exception:
        return False, False
    made = state.get("_headers_written") is False and state.get("_finished") is False
    cleared = all(n in state for n in ("_headers", "_write_buffer", "_status_code", "_reason"))
    return made, cleared


def _check() -> list[str]:
    missing = []
    if not _buffer_counts_bytes():
        missing.append("tornado.iostream._StreamBuffer._size")
    ws = tornado.websocket
    if not _params_kept():
        missing.append("tornado.websocket._WebSocketParams")
    for name in (
        RECEIVE_FRAME_LOOP,
        RECEIVE_FRAME,
        HANDLE_MESSAGE,
        "_abort",
        "compute_accept_value",
        "start_pinging",
        "_create_compressors",
    ):
        if not callable(getattr(ws.WebSocketProtocol13, name, None)):
            missing.append("tornado.websocket.WebSocketProtocol13.%s" % name)
    if not _makes_compressors(ws.WebSocketProtocol13):
        missing.append("tornado.websocket.WebSocketProtocol13._compressor, _decompressor")
    if not _writes_through(ws.WebSocketProtocol13):
        missing.append("tornado.websocket.WebSocketProtocol13._write_frame")
    if not callable(getattr(ws.WebSocketHandler, "_detach_stream", None)):
        missing.append("tornado.websocket.WebSocketHandler._detach_stream")
    context = getattr(tornado.httpserver, "_HTTPRequestContext", None)
    if context is None or not callable(getattr(context, "_apply_xheaders", None)):
        missing.append("tornado.httpserver._HTTPRequestContext._apply_xheaders")
    elif not _request_context_works(context):
        missing.append("tornado.httpserver._HTTPRequestContext attributes")
    if not _connections_keep_context():
        missing.append("tornado.http1connection.HTTP1Connection.context")
    if not _server_keeps_settings():
        missing.append("tornado.httpserver.HTTPServer attributes")
    made, cleared = _handler_state()
    # _execute is a coroutine that runs a whole request: only its text can tell.
    if not (made and _assigns(tornado.web.RequestHandler._execute, "_transforms")):
        missing.append(
            "tornado.web.RequestHandler state (_headers_written, _finished, _transforms)"
        )
    if not cleared:
        missing.append("tornado.web.RequestHandler.clear state (_headers, _write_buffer, ...)")
    if not _writes_only_in_write(tornado.iostream.BaseIOStream):
        missing.append("tornado.iostream.BaseIOStream._write_buffer, _write_futures")
    if list(
        inspect.signature(
            getattr(tornado.tcpserver.TCPServer, "_handle_connection", lambda: None)
        ).parameters
    ) != ["self", "connection", "address"]:
        missing.append("tornado.tcpserver.TCPServer._handle_connection")
    return missing


MISSING: list[str] = _check()
OK: bool = not MISSING

if not OK:
    log.warning(
        "Tornado %s lacks %s: serving through Tornado's public API only (fast_handshake off)",
        tornado.version,
        ", ".join(MISSING),
    )


# --- the accessors --------------------------------------------------------------


def websocket_params(
    ping_interval: float | None,
    ping_timeout: float | None,
    max_message_size: int,
    compression_options: Any,
) -> Any:
    """Tornado's per-connection protocol parameters (shareable: one object
    for every connection)."""
    return tornado.websocket._WebSocketParams(
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        max_message_size=max_message_size,
        compression_options=compression_options,
    )


def request_context(server: tornado.httpserver.HTTPServer, stream: Any, address: Any) -> Any:
    """The request context Tornado's HTTP server would make for ``stream``."""
    return tornado.httpserver._HTTPRequestContext(
        stream, address, server.protocol, server.trusted_downstream
    )


def apply_xheaders(context: Any, headers: Any) -> None:
    """Take the client address from X-Real-IP / X-Forwarded-For."""
    context._apply_xheaders(headers)


def peer_address(connection: Any) -> Any:
    """The TCP peer address of a request's HTTP connection (before any
    proxy header), or None where Tornado does not keep it."""
    if not OK:
        return None
    return getattr(getattr(connection, "context", None), "address", None)


#: ``queued_bytes(stream)``: how many bytes wait in ``stream``'s write buffer.
#: A C-level getter (no Python frame): it runs once per write.
queued_bytes: Callable[[tornado.iostream.IOStream], int] = operator.attrgetter(
    "_write_buffer._size"
)


def inflate_client_messages(
    ws: tornado.websocket.WebSocketProtocol13, parameters: dict[str, str | None]
) -> None:
    """Give the server protocol ``ws`` Tornado's inflater for the client's
    compressed messages under the negotiated permessage-deflate
    ``parameters``; no compressor (the server's frames are built apart)."""
    ws._create_compressors("server", parameters, {})
    state: Any = ws  # private state, set beyond its declared types
    state._compressor = None


def prepare_switch(handler: tornado.web.RequestHandler) -> None:
    """What ``clear()`` sets up, for a response that is a prebuilt 101."""
    state: Any = handler  # private state, set beyond its declared types
    state._headers = None
    state._write_buffer = []
    state._status_code = 101
    state._reason = "Switching Protocols"


def finish_http(handler: tornado.web.RequestHandler) -> None:
    """Mark the HTTP exchange of ``handler`` as over (the 101 went out)."""
    handler._headers_written = handler._finished = True


def release_response(handler: tornado.web.RequestHandler) -> None:
    """Drop the response state a WebSocket handler no longer needs."""
    state: Any = handler  # private state, set beyond its declared types
    state._headers = state._transforms = state._write_buffer = None


class LeanIOStream(tornado.iostream.IOStream):
    """An IOStream whose write buffer exists only while something waits in it.

    Tornado gives every stream a write buffer and a queue of write futures,
    two deques of ~760 bytes each, empty almost always: a WebSocket client
    that keeps up gets its frames straight from the socket (see
    ``StreamHandler.write_frames``).  Here both are shared empty
    placeholders until :meth:`write` needs them, and go back to the
    placeholders once everything written has reached the kernel.  Only
    ``write`` adds to them, and nothing is ever added to the placeholders
    (checked at import; see ``MISSING``)::

        stream = LeanIOStream(sock)
        stream.write(b"...")   # the buffer exists while the kernel is full
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._write_buffer = _NO_BUFFER
        self._write_futures = _NO_FUTURES

    def write(self, data: bytes | memoryview) -> Any:
        if self._write_futures is _NO_FUTURES and not self.closed():  # closed: write raises
            self._write_buffer = tornado.iostream._StreamBuffer()
            self._write_futures = collections.deque()
        return super().write(data)

    def _handle_write(self) -> None:
        super()._handle_write()
        if (
            not self._write_futures
            and self._write_futures is not _NO_FUTURES
            and self._write_buffer is not None
            and not self._write_buffer
        ):
            self._write_buffer = _NO_BUFFER
            self._write_futures = _NO_FUTURES


# Shared by every idle LeanIOStream (None where Tornado lacks the class: OK
# is then False, and no LeanIOStream is made).
_NO_BUFFER: Any = getattr(tornado.iostream, "_StreamBuffer", lambda: None)()
_NO_FUTURES: collections.deque[tuple[int, Future[None]]] = collections.deque()


def handle_connection(server: tornado.tcpserver.TCPServer) -> Callable[[Any, Any], None]:
    """What Tornado's server runs for a connection it accepted:
    ``handle_connection(server)(connection, address)`` wraps the socket in
    an IOStream and passes it to ``server.handle_stream``.  A plain socket
    gets a :class:`LeanIOStream`; TLS goes through Tornado's own code."""
    if server.ssl_options is not None or not OK:
        method: Callable[[Any, Any], None] = server._handle_connection
        return method

    def handle(connection: Any, address: Any) -> None:
        try:
            stream = LeanIOStream(
                connection,
                max_buffer_size=server.max_buffer_size,
                read_chunk_size=server.read_chunk_size,
            )
            future = server.handle_stream(stream, address)
            if future is not None:
                tornado.ioloop.IOLoop.current().add_future(
                    tornado.gen.convert_yielded(future), lambda f: f.result()
                )
        except Exception:
            log.error("Error in connection callback", exc_info=True)

    return handle
