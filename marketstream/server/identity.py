"""The state every piece of a :class:`~marketstream.server.handlers.StreamHandler`
reads, and who its client is.

:class:`Identity` is the bottom of the handler's pieces (each a module of
its own, each a class the next one extends; one ``StreamHandler`` object per
connection, no object more)::

    Identity        the state (initialize) and the client's ip:port
      Delivery      the write path: frames to the socket, slow consumers, pings
        Conversation    requests, the frame and message budgets, replies in order
          Handshake     admission, the handshake, open and close
            StreamHandler

For example, ``handler.identity`` is ``"203.0.113.7:51234"`` once open
(``None`` before), and ``repr(handler)`` is ``<StreamHandler 203.0.113.7:51234>``.
"""

from __future__ import annotations

import asyncio

import tornado.websocket

from marketstream.server.context import Context
from marketstream.server.wsprotocol import FrameSink

__all__ = ["Identity"]


class Identity(tornado.websocket.WebSocketHandler):
    """A handler's state, and who its client is."""

    context: Context
    identity: str | None
    _ws: FrameSink | None  # the WebSocket protocol once open, None once closed
    _opened_at: float
    _tokens: float
    _tokens_at: float
    ping_sent: float
    frame_loop: asyncio.Future[None] | None
    _acks: bool | asyncio.Future[None]

    def initialize(self, context: Context) -> None:
        self.context = context
        self.identity = None
        # With one attribute more than a handler has today (29, with
        # Tornado's), CPython gives every handler a dict of its own instead
        # of compact shared-key storage: about 1.5 KB more per connection
        # (a test guards it).  Add state with care.
        self._ws = None  # the WebSocket protocol once open, None once closed
        self._opened_at = 0.0
        self._tokens = float(context.limits.messages_burst)
        self._tokens_at = 0.0
        self.ping_sent = 0.0  # loop time of the oldest unanswered keepalive ping
        self.frame_loop = None
        # Whether this connection gets acknowledgements ([protocol] acks, or
        # "acks": true in a request), and while some wait for Redis, the
        # task of the last one instead (True): each reply waits for the one
        # before it, so that replies keep the order of the requests.
        self._acks = context.acks

    def _make_identity(self) -> str:
        """``ip:port`` of the client.

        Behind a trusted proxy (``xheaders``, ``trusted_proxies``), the IP is
        the one the proxy reports and the port is the client's own from
        ``X-Real-Port`` (see conf/nginx.conf), else the proxy-side port,
        which is unique per connection within this process.
        """
        ip = self.request.remote_ip or "?"
        ws = self._ws
        stream = ws.stream if ws is not None else None
        sock = stream.socket if stream is not None else None
        peer = ("", 0)
        if sock is not None:
            try:
                peer = sock.getpeername()
            except OSError:
                pass
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
