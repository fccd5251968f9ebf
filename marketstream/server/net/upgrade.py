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
:class:`~marketstream.server.handlers.StreamHandler`.  Everything else (other
paths, refusals, malformed or unusual requests, a request that arrives in
pieces) goes to Tornado unchanged, with nothing read from the socket, so
every error and refusal keeps Tornado's answer.  With :func:`defer_accept`
on the listening sockets, the kernel hands a connection over once its
request has arrived; one that comes before it (in a storm, the SYN queue
overflows into SYN cookies, which the kernel cannot hold back) waits for
its first bytes, up to :data:`REQUEST_WAIT`, so the shortcut applies to
nearly every handshake.  Connections are accepted by an
:class:`~marketstream.server.net.accept.Acceptor`::

    sockets = tornado.netutil.bind_sockets(4000)
    defer_accept(sockets)
    server = StreamServer(app, admission=context.admission, handshake_timeout=10,
                          websocket=(["/", "/ws"], StreamHandler, {"context": context}))
    server.add_sockets(sockets)

It also bounds what a connection may do before it is a WebSocket, on every
path (the shortcut, Tornado's, ``fast_handshake`` off):

* Every connection counts toward the connection limits from the moment it
  is taken up (:meth:`~marketstream.server.admission.Admission.admit`), so a
  WebSocket handshake past a limit is refused (503, 429) though the others
  have not finished theirs; an address with ``max_connections_per_ip``
  handshakes in flight, or a process full beyond its reserve for plain
  HTTP, is answered at once, before the request is read.
* One that has not sent its whole request (head and body) and finished the
  WebSocket handshake within ``handshake_timeout`` seconds is closed.
* A request that announces a body over :data:`MAX_BODY_BYTES`, or one of
  unknown length (no endpoint takes a body), is answered 413 and closed
  without reading the body.
* ``X-Real-IP`` / ``X-Forwarded-For`` count only from a trusted proxy
  (:meth:`~marketstream.server.admission.Admission.proxied`).
"""

import asyncio
import http
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any, Protocol, TypeAlias, cast

import tornado.http1connection
import tornado.httpserver
import tornado.iostream
from tornado import httputil

from marketstream.server.net import tornado_compat as compat
from marketstream.server.net.accept import ACCEPT_BATCH, Acceptor, Address
from marketstream.server.admission import Admission, Refusal
from marketstream.loglimit import LogLimiter

__all__ = ["StreamServer", "Switched", "defer_accept", "upgrade_request", "MAX_BODY_BYTES"]

log = logging.getLogger(__name__)

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
#: The largest request body read (no endpoint takes one); a request that
#: announces more, or a body of unknown length, is answered 413 at once.
MAX_BODY_BYTES = 4096
#: Seconds between two looks for connections past their handshake
#: deadline, at least (a connection is closed this much late at most).
SWEEP_INTERVAL = 0.1


def defer_accept(sockets: Iterable[socket.socket], seconds: int = 1) -> None:
    """Ask the kernel (Linux) not to hand over a connection on these
    listening sockets until its first data arrives, for up to ``seconds``."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is None:
        return
    for sock in sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, option, seconds)


def upgrade_request(
    data: bytes, paths: Collection[str]
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
    if (
        start.method != "GET"
        or start.version != "HTTP/1.1"
        or start.path.partition("?")[0] not in paths
    ):
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
    if (
        (get("upgrade") or _NONE)[1].lower() != "websocket"
        or (get("sec-websocket-version") or _NONE)[1] != "13"
        or not (get("sec-websocket-key") or _NONE)[1]
        or not (get("host") or _NONE)[1]
        # Tornado would negotiate these, or read a body.
        or "sec-websocket-protocol" in fields
        or "content-length" in fields
        or "transfer-encoding" in fields
        or "upgrade"
        not in [t.strip(" \t").lower() for t in (get("connection") or _NONE)[1].split(",")]
    ):
        return None
    headers = httputil.HTTPHeaders({name: value for name, value in fields.values()})
    return start, headers, end + len(_END)


class Switched:
    """The request's connection once the shortcut has taken the socket: what
    a :class:`~tornado.web.RequestHandler` asks of it while it is built.  A
    handler can tell from it that no HTTP response is to be written."""

    __slots__ = ("context",)

    def __init__(self, context: compat.RequestContext) -> None:
        self.context = context

    def set_close_callback(self, callback: Callable[[], None] | None) -> None:
        pass  # the WebSocket's frame loop notices the close


class _Switching(Protocol):
    """What the shortcut needs of the WebSocket handler it builds."""

    def switch_protocols(self, stream: tornado.iostream.IOStream, key: str) -> None: ...


#: A handler's keyword arguments.  Any: Tornado types them so (``URLSpec.kwargs``,
#: ``RequestHandler.initialize(**kwargs)``), each handler's of its own types.
_HandlerArgs: TypeAlias = dict[str, Any]
#: (paths, handler class, handler keyword arguments)
_WebSocketRoute = tuple[frozenset[str], Callable[..., _Switching], _HandlerArgs]


class StreamServer(tornado.httpserver.HTTPServer):
    """An :class:`~tornado.httpserver.HTTPServer` that answers plain
    WebSocket handshakes itself, and bounds every connection until it is a
    WebSocket (see the module's docstring).

    ``admission`` (an :class:`~marketstream.server.admission.Admission`) decides
    the limits and which proxies' headers count; ``handshake_timeout`` is
    the seconds a connection has to send its request and finish its
    handshake.  Tornado's ``xheaders`` is not used: the proxy headers count
    per connection, from trusted proxies only.
    ``websocket`` is (paths, handler class, handler keyword arguments); the
    handler class needs ``context`` (a :class:`~marketstream.server.handlers.Context`)
    among its arguments and a ``switch_protocols(stream, key)`` method.
    ``handshakes`` counts the handshakes answered here.

    Connections are accepted by an :class:`~marketstream.server.net.accept.Acceptor`:
    all at once, and handed to the handshake ``accept_batch`` per turn of
    the event loop, at most ``accept_limit`` waiting.  A connection whose
    request has not arrived yet waits for it (up to :data:`REQUEST_WAIT`)
    before the shortcut decides.
    """

    def initialize(
        self,
        request_callback: httputil.HTTPServerConnectionDelegate
        | Callable[[httputil.HTTPServerRequest], None],
        *args: Any,  # Any: HTTPServer.initialize's own signature, passed on whole
        admission: Admission | None = None,
        handshake_timeout: float = 10.0,
        log_limiter: LogLimiter | None = None,
        websocket: tuple[Iterable[str], Callable[..., _Switching], _HandlerArgs] | None = None,
        accept_batch: int = ACCEPT_BATCH,
        accept_limit: int = 65536,
        **kwargs: Any,  # Any: as *args
    ) -> None:
        if admission is None:
            raise TypeError("StreamServer needs admission")
        if kwargs.get("xheaders"):
            raise TypeError(
                "StreamServer applies proxy headers itself, from trusted proxies "
                "only ([server] xheaders, trusted_proxies): do not pass xheaders"
            )
        super().initialize(request_callback, *args, **kwargs)
        self.admission = admission
        self.handshake_timeout = handshake_timeout
        self.log_limiter = log_limiter or LogLimiter(log)
        self.websocket: _WebSocketRoute | None = None
        if websocket is not None:
            paths, handler_class, handler_kwargs = websocket
            self.websocket = (frozenset(paths), handler_class, dict(handler_kwargs))
        self.handshakes = 0
        self.acceptor: Acceptor | None = None
        self._accept_args = (accept_batch, accept_limit)
        self._sweeper: asyncio.TimerHandle | None = None
        # Connections waiting for their request (see _await_request) -> stop waiting.
        self._waiting: dict[tornado.iostream.IOStream, Callable[[], None]] = {}

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
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        super().stop()

    def handle_stream(self, stream: tornado.iostream.IOStream, address: Address) -> None:
        if not self._admit(stream, address):
            return
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

    # --- the bounds -------------------------------------------------------------

    def _admit(self, stream: tornado.iostream.IOStream, address: Address) -> bool:
        """Count a new connection as handshaking, or refuse it at once."""
        admission = self.admission
        peer = _peer_ip(address)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.handshake_timeout
        # Behind a trusted proxy the peer is the proxy: the client's own
        # address is known once the request's headers are.
        counted = None if peer is None or admission.proxied(peer) else peer
        refusal = admission.admit(stream, counted, deadline)
        if refusal is not None:
            self._refuse(stream, peer, refusal)
            return False
        if self._sweeper is None:
            self._sweeper = loop.call_at(deadline, self._sweep)
        return True

    def _refuse(
        self, stream: tornado.iostream.IOStream, peer: str | None, refusal: Refusal
    ) -> None:
        """Answer a connection past a limit without reading its request, and close it."""
        status, reason, cause = refusal
        self.admission.refused(cause)
        self.log_limiter.log(logging.WARNING, cause, "refused %s: %s", peer, reason)
        sock = stream.socket
        if sock is not None and self.ssl_options is None:
            try:
                # Drop what already came: closing a socket with unread data
                # resets the connection, and the client may lose the answer.
                sock.recv(_PEEK_BYTES)
            except OSError:
                pass
            try:
                sock.send(_response(status, reason))
            except OSError:
                pass
        stream.close()

    def _sweep(self) -> None:
        """Close the connections past their handshake deadline."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        admission = self.admission
        expired = admission.expired(now)
        for stream in expired:
            admission.refused("handshake_timeout")
            stop_waiting = self._waiting.pop(cast(tornado.iostream.IOStream, stream), None)
            if stop_waiting is not None:
                stop_waiting()
            cast(tornado.iostream.IOStream, stream).close()
        if expired:
            self.log_limiter.log(
                logging.WARNING,
                "handshake_timeout",
                "closed %d connection(s) that did not complete a request and handshake within %g s",
                len(expired),
                self.handshake_timeout,
            )
        following = admission.next_deadline()
        if following is not None:
            self._sweeper = loop.call_at(max(following, now + SWEEP_INTERVAL), self._sweep)

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        return _Gate(
            self,
            super().start_request(server_conn, request_conn),
            request_conn,
            getattr(server_conn, "stream", None),
        )

    def on_close(self, server_conn: object) -> None:
        super().on_close(server_conn)
        # Gone (or a WebSocket now) before its request was read.
        self.admission.handshake_done(getattr(server_conn, "stream", None))

    # --- the shortcut -----------------------------------------------------------

    def _await_request(
        self,
        websocket: _WebSocketRoute,
        stream: tornado.iostream.IOStream,
        address: Address,
    ) -> None:
        """Decide once the request arrives (or Tornado's path decides after
        :data:`REQUEST_WAIT`).  Nothing else watches the socket meanwhile.

        In a storm thousands wait at once, so this goes to the asyncio loop
        directly (Tornado's add_handler and call_later wrap every call)."""
        loop = asyncio.get_running_loop()
        fd = stream.socket.fileno()
        waiting = self._waiting

        def stop() -> None:
            loop.remove_reader(fd)
            timer.cancel()

        def arrived() -> None:
            del waiting[stream]
            stop()
            if self._switch(websocket, stream, address) is not True:
                super(StreamServer, self).handle_stream(stream, address)

        def expired() -> None:
            del waiting[stream]
            loop.remove_reader(fd)
            super(StreamServer, self).handle_stream(stream, address)

        loop.add_reader(fd, arrived)
        timer = loop.call_later(REQUEST_WAIT, expired)
        waiting[stream] = stop

    def _switch(
        self,
        websocket: _WebSocketRoute,
        stream: tornado.iostream.IOStream,
        address: Address,
    ) -> bool | str:
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
        admission = self.admission
        if admission.proxied(context.remote_ip):
            compat.apply_xheaders(context, headers)
        origin = headers.get("Origin")
        if origin is None:
            if "Sec-Fetch-Site" in headers:
                return False  # Tornado's cross-origin rules decide
        elif not admission.origin_allowed(origin):
            return False
        if admission.refusal(context.remote_ip, stream) is not None:
            return False
        try:
            sock.recv(length)  # exactly the request: the peek saw it whole
        except OSError:
            return False  # nothing read: Tornado meets the error
        # Switched stands in for the HTTP connection (duck-typed, see its docstring).
        request = httputil.HTTPServerRequest(
            connection=cast(httputil.HTTPConnection, Switched(context)),
            start_line=start,
            headers=headers,
        )
        handler = handler_class(self.request_callback, request, **handler_kwargs)
        self.handshakes += 1
        handler.switch_protocols(stream, headers["Sec-WebSocket-Key"])
        return True


class _Gate(httputil.HTTPMessageDelegate):
    """What every request on Tornado's path passes through before the
    application: a body over :data:`MAX_BODY_BYTES` (or of unknown length)
    is refused with 413 before it is read; proxy headers are applied when
    the peer is a trusted proxy (and undone after the request, for the next
    one on a kept-alive connection); once the request is read, its
    connection no longer counts as handshaking."""

    __slots__ = ("server", "delegate", "connection", "stream", "saved")

    def __init__(
        self,
        server: StreamServer,
        delegate: httputil.HTTPMessageDelegate,
        connection: httputil.HTTPConnection,
        stream: tornado.iostream.IOStream | None,
    ) -> None:
        self.server = server
        self.delegate = delegate
        self.connection = connection
        self.stream = stream
        self.saved: tuple[str, str] | None = None

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        peer = _peer_ip(compat.peer_address(self.connection))  # None unless compat.OK
        if _body_too_large(headers):
            self._refuse_body(peer)
            return None
        if peer is not None and self.server.admission.proxied(peer):
            context: compat.RequestContext = getattr(self.connection, "context", None)
            self.saved = (context.remote_ip, context.protocol)
            compat.apply_xheaders(context, headers)
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        try:
            self.delegate.finish()  # runs the handler: a WebSocket opens in there
        finally:
            self.server.admission.handshake_done(self.stream)
            self._restore()

    def on_connection_close(self) -> None:
        try:
            self.delegate.on_connection_close()
        finally:
            self._restore()

    def _restore(self) -> None:
        if self.saved is not None:
            context: compat.RequestContext = getattr(self.connection, "context", None)
            context.remote_ip, context.protocol = self.saved
            self.saved = None

    def _refuse_body(self, peer: str | None) -> None:
        server = self.server
        server.admission.refused("body_too_large")
        server.log_limiter.log(
            logging.WARNING,
            "body_too_large",
            "refused %s: a request body over %d bytes or of unknown length",
            peer,
            MAX_BODY_BYTES,
        )
        # Detached, Tornado's connection reads nothing more from the socket.
        stream = cast(tornado.http1connection.HTTP1Connection, self.connection).detach()
        try:
            written = stream.write(_response(413, "request body too large"))
        except tornado.iostream.StreamClosedError:
            return

        def close(future: asyncio.Future[None]) -> None:
            if not future.cancelled():
                future.exception()  # retrieved: a client gone meanwhile is no error
            stream.close()

        written.add_done_callback(close)


def _peer_ip(address: Address) -> str | None:
    """The IP of a TCP peer address (None for other kinds of socket)."""
    if isinstance(address, tuple) and address and isinstance(address[0], str) and address[0]:
        return address[0]
    return None


def _body_too_large(headers: httputil.HTTPHeaders) -> bool:
    """Whether a request announces a body over :data:`MAX_BODY_BYTES`, or
    one of unknown length.  (A malformed length is Tornado's to answer.)"""
    if "Transfer-Encoding" in headers:
        return True
    length = headers.get("Content-Length", "").strip()
    return length.isdigit() and (len(length) > 12 or int(length) > MAX_BODY_BYTES)


def _response(status: int, reason: str) -> bytes:
    """A whole HTTP response that closes the connection: ``reason`` as its body."""
    body = reason.encode() + b"\n"
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (status, http.HTTPStatus(status).phrase.encode(), len(body), body)
    )
