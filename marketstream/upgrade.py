"""WebSocket handshakes without the general HTTP/1.1 machinery.

Handshakes come in storms: after a deploy, a network blip or a Redis
failover, every client reconnects at once.  Tornado's HTTP server handles
any request (keep-alive, bodies, routing, response formatting, access log),
and that generality is most of what a WebSocket handshake costs.

:class:`StreamServer` is Tornado's :class:`~tornado.httpserver.HTTPServer`
with one shortcut.  When a newly accepted connection holds a whole, plain
WebSocket upgrade request for a stream path, and the server would accept it
(connection limits, ``Origin``), the request is read from the socket,
answered with a prebuilt 101, and the socket goes to a new
:class:`~marketstream.handlers.StreamHandler`.  Everything else (other
paths, refusals, malformed or unusual requests, a request that arrives in
pieces) goes to Tornado unchanged, with nothing read from the socket, so
every error and refusal keeps Tornado's answer.  With :func:`defer_accept`
on the listening sockets, the kernel hands a connection over once its
request has arrived; one that comes before it (in a storm, the SYN queue
overflows into SYN cookies, which the kernel cannot hold back) waits for
its first bytes, up to :data:`REQUEST_WAIT`, so the shortcut applies to
nearly every handshake.  Connections are accepted by an
:class:`~marketstream.accept.Acceptor`::

    sockets = tornado.netutil.bind_sockets(4000)
    defer_accept(sockets)
    server = StreamServer(app, websocket=(["/", "/ws"], StreamHandler, {"context": context}))
    server.add_sockets(sockets)
"""

import asyncio
import re
import socket
from collections.abc import Callable, Collection, Iterable
from typing import Any, Protocol, cast

import tornado.httpserver
import tornado.iostream
from tornado import httputil

from marketstream import tornado_compat as compat
from marketstream.accept import ACCEPT_BATCH, Acceptor

__all__ = ["StreamServer", "Switched", "defer_accept", "upgrade_request"]

# Bigger requests (many cookies) are rare and take Tornado's path.
_PEEK_BYTES = 4096
# A header name (an RFC 9110 token).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Control characters but HTAB (checked once the CRLF line ends are split off).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_NONE = ("", "")
#: Seconds the shortcut waits for the request of a connection accepted
#: before it arrived; then Tornado's path takes the connection.
REQUEST_WAIT = 1.0
# _switch's answer when the request has not arrived yet.
_WAIT = "wait"
_END = b"\r\n\r\n"


def defer_accept(sockets: Iterable[socket.socket], seconds: int = 1) -> None:
    """Ask the kernel (Linux) not to hand over a connection on these
    listening sockets until its first data arrives, for up to ``seconds``."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is None:
        return
    for sock in sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, option, seconds)


def upgrade_request(data: bytes, paths: Collection[str]
                    ) -> tuple[httputil.RequestStartLine, httputil.HTTPHeaders, int] | None:
    """(start line, headers, length of the request) if ``data`` begins with a
    whole WebSocket upgrade request, version 13, for one of ``paths``, that
    carries nothing that needs Tornado's general handling; else None.

    >>> req = (b"GET /ws HTTP/1.1\\r\\nHost: h\\r\\nUpgrade: websocket\\r\\n"
    ...        b"Connection: Upgrade\\r\\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\n"
    ...        b"Sec-WebSocket-Version: 13\\r\\n\\r\\n")
    >>> upgrade_request(req, {"/ws"})[0].path
    '/ws'
    >>> upgrade_request(req.replace(b"13", b"8"), {"/ws"}) is None
    True
    """
    end = data.find(_END)
    if end < 0:
        return None
    text = data[:end].decode("latin1")
    if _CONTROL.search(text.replace("\r\n", "")) is not None:
        return None  # a bare CR or LF, or another control character
    lines = text.split("\r\n")
    try:
        start = httputil.parse_request_start_line(lines[0])
    except httputil.HTTPInputError:
        return None
    if (start.method != "GET" or start.version != "HTTP/1.1"
            or start.path.partition("?")[0] not in paths):
        return None
    # Header lines, read more strictly than HTTP allows: a name that is not
    # a token, a folded line or a repeated header goes to Tornado's parser.
    fields: dict[str, tuple[str, str]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or _TOKEN.match(name) is None:
            return None
        key = name.lower()
        if key in fields:
            return None
        fields[key] = (name, value.strip(" \t"))
    get = fields.get
    if ((get("upgrade") or _NONE)[1].lower() != "websocket"
            or (get("sec-websocket-version") or _NONE)[1] != "13"
            or not (get("sec-websocket-key") or _NONE)[1] or not (get("host") or _NONE)[1]
            # Tornado would negotiate these, or read a body.
            or "sec-websocket-protocol" in fields or "content-length" in fields
            or "transfer-encoding" in fields
            or "upgrade" not in [t.strip(" \t").lower()
                                 for t in (get("connection") or _NONE)[1].split(",")]):
        return None
    headers = httputil.HTTPHeaders({name: value for name, value in fields.values()})
    return start, headers, end + len(_END)


class Switched:
    """The request's connection once the shortcut has taken the socket: what
    a :class:`~tornado.web.RequestHandler` asks of it while it is built.  A
    handler can tell from it that no HTTP response is to be written."""

    __slots__ = ("context",)

    def __init__(self, context: Any) -> None:
        self.context = context  # tornado.httpserver._HTTPRequestContext

    def set_close_callback(self, callback: Callable[[], None] | None) -> None:
        pass  # the WebSocket's frame loop notices the close


class _Switching(Protocol):
    """What the shortcut needs of the WebSocket handler it builds."""

    def switch_protocols(self, stream: tornado.iostream.IOStream, key: str) -> None: ...


#: (paths, handler class, handler keyword arguments)
_WebSocketRoute = tuple[frozenset[str], Callable[..., _Switching], dict[str, Any]]


class StreamServer(tornado.httpserver.HTTPServer):
    """An :class:`~tornado.httpserver.HTTPServer` that answers plain
    WebSocket handshakes itself.

    ``websocket`` is (paths, handler class, handler keyword arguments); the
    handler class needs ``context`` (a :class:`~marketstream.handlers.Context`)
    among its arguments and a ``switch_protocols(stream, key)`` method.
    ``handshakes`` counts the handshakes answered here.

    Connections are accepted by an :class:`~marketstream.accept.Acceptor`:
    all at once, and handed to the handshake ``accept_batch`` per turn of
    the event loop, at most ``accept_limit`` waiting.  A connection whose
    request has not arrived yet waits for it (up to :data:`REQUEST_WAIT`)
    before the shortcut decides.
    """

    def initialize(self, request_callback: Any, *args: Any,
                   websocket: tuple[Iterable[str], Callable[..., _Switching], dict[str, Any]]
                   | None = None,
                   accept_batch: int = ACCEPT_BATCH, accept_limit: int = 65536,
                   **kwargs: Any) -> None:
        super().initialize(request_callback, *args, **kwargs)
        self.websocket: _WebSocketRoute | None = None
        if websocket is not None:
            paths, handler_class, handler_kwargs = websocket
            self.websocket = (frozenset(paths), handler_class, dict(handler_kwargs))
        self.handshakes = 0
        self.acceptor: Acceptor | None = None
        self._accept_args = (accept_batch, accept_limit)

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        if not compat.OK:
            super().add_sockets(sockets)
            return
        if self.acceptor is None:
            batch, limit = self._accept_args
            self.acceptor = Acceptor(compat.handle_connection(self), batch=batch, limit=limit)
        for sock in sockets:
            self.acceptor.add(sock)

    def stop(self) -> None:
        if self.acceptor is not None:
            self.acceptor.close()
        super().stop()

    def handle_stream(self, stream: tornado.iostream.IOStream, address: tuple[Any, ...]) -> None:
        # TLS connections (ssl_options) always take Tornado's path.
        websocket = self.websocket
        if websocket is None or self.ssl_options is not None:
            super().handle_stream(stream, address)
            return
        verdict = self._switch(websocket, stream, address)
        if verdict == _WAIT:
            self._await_request(websocket, stream, address)
        elif not verdict:
            super().handle_stream(stream, address)

    def _await_request(self, websocket: _WebSocketRoute, stream: tornado.iostream.IOStream,
                       address: tuple[Any, ...]) -> None:
        """Decide once the request arrives (or Tornado's path decides after
        :data:`REQUEST_WAIT`).  Nothing else watches the socket meanwhile.

        In a storm thousands wait at once, so this goes to the asyncio loop
        directly (Tornado's add_handler and call_later wrap every call)."""
        loop = asyncio.get_running_loop()
        fd = stream.socket.fileno()

        def arrived() -> None:
            loop.remove_reader(fd)
            timer.cancel()
            if self._switch(websocket, stream, address) is not True:
                super(StreamServer, self).handle_stream(stream, address)

        def expired() -> None:
            loop.remove_reader(fd)
            super(StreamServer, self).handle_stream(stream, address)

        loop.add_reader(fd, arrived)
        timer = loop.call_later(REQUEST_WAIT, expired)

    def _switch(self, websocket: _WebSocketRoute, stream: tornado.iostream.IOStream,
                address: tuple[Any, ...]) -> bool | str:
        """Take the handshake if it qualifies (True); False leaves the socket
        untouched, and so does ``_WAIT``: nothing has arrived yet."""
        paths, handler_class, handler_kwargs = websocket
        sock = stream.socket
        try:
            data = sock.recv(_PEEK_BYTES, socket.MSG_PEEK)
        except BlockingIOError:
            return _WAIT
        except OSError:  # reset
            return False
        found = upgrade_request(data, paths)
        if found is None:
            return False
        start, headers, length = found
        context = compat.request_context(self, stream, address)
        if self.xheaders:
            compat.apply_xheaders(context, headers)
        admission = handler_kwargs["context"].admission
        origin = headers.get("Origin")
        if origin is None:
            if "Sec-Fetch-Site" in headers:
                return False  # Tornado's cross-origin rules decide
        elif not admission.origin_allowed(origin):
            return False
        if admission.refusal(context.remote_ip) is not None:
            return False
        try:
            sock.recv(length)  # exactly the request: the peek saw it whole
        except OSError:
            return False  # nothing read: Tornado meets the error
        # Switched stands in for the HTTP connection (duck-typed, see its docstring).
        request = httputil.HTTPServerRequest(
            connection=cast(httputil.HTTPConnection, Switched(context)),
            start_line=start, headers=headers)
        handler = handler_class(self.request_callback, request, **handler_kwargs)
        self.handshakes += 1
        handler.switch_protocols(stream, headers["Sec-WebSocket-Key"])
        return True
