"""Every private Tornado name marketstream relies on, in one place.

The handshake shortcut (:mod:`marketstream.server.net.upgrade`), the direct frame
writes of :class:`~marketstream.server.handlers.StreamHandler` and
:class:`LeanIOStream` (no write buffer while nothing waits to be written)
go below Tornado's public API for speed and memory; the frame budget (each
client frame counted as it is read), the close frames checked, the proxy
headers of trusted proxies and the peer address ``/health`` looks at go
below it for what it does not offer.  The names they need are listed here
and checked once, at import (``MISSING`` would list what is missing, e.g.
``["tornado.websocket._WebSocketParams"]``):

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
import inspect
import logging
import operator
from collections.abc import Callable
from typing import Any

import tornado
import tornado.gen
import tornado.http1connection
import tornado.httpserver
import tornado.ioloop
import tornado.iostream
import tornado.tcpserver
import tornado.web
import tornado.websocket

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


def _assigns(function: Any, *names: str) -> bool:
    """Whether ``function``'s source assigns every ``self.<name>``."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    return all("self.%s =" % name in source or "self.%s: " % name in source for name in names)


def _writes_through(cls: type, *methods: str) -> bool:
    """Whether each of ``cls``'s ``methods`` writes its frames with
    ``self._write_frame`` (which the handler's protocol hooks: a direct
    write must not pass a frame Tornado only partly sent)."""
    if not callable(getattr(cls, "_write_frame", None)):
        return False
    try:
        return all(
            "self._write_frame(" in inspect.getsource(getattr(cls, name)) for name in methods
        )
    except (OSError, TypeError, AttributeError):
        return False


def _writes_only_in_write(cls: type) -> bool:
    """Whether ``cls`` makes its write buffer and write futures in
    ``__init__``, appends to them only in ``write`` and drains them in
    ``_handle_write`` (what :class:`LeanIOStream` relies on)."""
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


def _check() -> list[str]:
    missing = []
    buffer_class: Any = getattr(tornado.iostream, "_StreamBuffer", None)
    if not _assigns(getattr(buffer_class, "__init__", None), "_size"):
        missing.append("tornado.iostream._StreamBuffer._size")
    ws = tornado.websocket
    params = getattr(ws, "_WebSocketParams", None)
    if params is None or not {
        "ping_interval",
        "ping_timeout",
        "max_message_size",
        "compression_options",
    } <= set(inspect.signature(params).parameters):
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
    if not _assigns(ws.WebSocketProtocol13._create_compressors, "_compressor", "_decompressor"):
        missing.append("tornado.websocket.WebSocketProtocol13._compressor, _decompressor")
    if not _writes_through(
        ws.WebSocketProtocol13, "write_message", "write_ping", "close", "_send_pong"
    ):
        missing.append("tornado.websocket.WebSocketProtocol13._write_frame")
    if not callable(getattr(ws.WebSocketHandler, "_detach_stream", None)):
        missing.append("tornado.websocket.WebSocketHandler._detach_stream")
    context = getattr(tornado.httpserver, "_HTTPRequestContext", None)
    if context is None or not callable(getattr(context, "_apply_xheaders", None)):
        missing.append("tornado.httpserver._HTTPRequestContext._apply_xheaders")
    if not _assigns(getattr(context, "__init__", None), "address", "remote_ip", "protocol"):
        missing.append("tornado.httpserver._HTTPRequestContext attributes")
    if not (
        _assigns(tornado.http1connection.HTTP1Connection.__init__, "context")
        and _assigns(tornado.http1connection.HTTP1ServerConnection.__init__, "stream")
    ):
        missing.append("tornado.http1connection.HTTP1Connection.context")
    if not _assigns(
        tornado.httpserver.HTTPServer.initialize,
        "request_callback",
        "xheaders",
        "protocol",
        "trusted_downstream",
    ):
        missing.append("tornado.httpserver.HTTPServer attributes")
    if not (
        _assigns(tornado.web.RequestHandler.__init__, "_headers_written", "_finished")
        and _assigns(tornado.web.RequestHandler._execute, "_transforms")
    ):
        missing.append(
            "tornado.web.RequestHandler state (_headers_written, _finished, _transforms)"
        )
    if not _assigns(
        tornado.web.RequestHandler.clear, "_headers", "_write_buffer", "_status_code", "_reason"
    ):
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


def inflate_client_messages(ws: Any, parameters: dict[str, str | None]) -> None:
    """Give the server protocol ``ws`` Tornado's inflater for the client's
    compressed messages under the negotiated permessage-deflate
    ``parameters``; no compressor (the server's frames are built apart)."""
    ws._create_compressors("server", parameters, {})
    ws._compressor = None


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
_NO_FUTURES: collections.deque = collections.deque()


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
