"""The WebSocket handler: it translates events, nothing more.

:class:`StreamHandler` turns WebSocket events into calls on the
:class:`~marketstream.server.channels.ChannelManager` (what to subscribe)
and the :mod:`marketstream.wire` modules (what frames mean); the manager
calls back :meth:`StreamHandler.write_frames` to deliver data.  A plain
``GET /`` (no Upgrade) gets the live market page with ``[server]
demo_page`` on.  The HTTP endpoints and the URL map are
:mod:`marketstream.server.http`'s.

The handler is one class made of four pieces, a module each, each class
extending the one before (one object per connection, nothing more)::

    identity.Identity          the state, and who the client is
    delivery.Delivery          the write path (write_frames), pings, closing
    conversation.Conversation  requests, budgets, replies in order
    handshake.Handshake        admission, the handshake, open and close

Its WebSocket protocol is :class:`~marketstream.server.wsprotocol.StreamProtocol`;
what the handlers share, :class:`~marketstream.server.context.Context`.
Serving it::

    context = Context(settings, manager)
    app = tornado.web.Application([(r"/ws", StreamHandler, {"context": context})])

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
* HTTP 401: a bad token (or none with ``[auth] required``); HTTP 429:
  ``[auth] max_connections_per_user`` (see :mod:`marketstream.server.auth`).
* 4001 "token expired": the token's ``exp`` passed without a refresh.
"""

from marketstream.server.context import Context
from marketstream.server.handshake import Handshake
from marketstream.server.page import STATIC_DIR
from marketstream.server.wsprotocol import StreamProtocol

__all__ = ["StreamHandler", "Context", "STATIC_DIR"]

#: The handler's WebSocket protocol, by its former name.
_Protocol = StreamProtocol


class StreamHandler(Handshake):
    """One WebSocket client.

    Endpoints ``/`` and ``/ws``; ``/stream?streams=a/b`` subscribes to
    ``a`` and ``b`` at connect time.  Its methods live in its pieces (see
    the module's docstring); this class only joins them.
    """
