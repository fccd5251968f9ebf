"""permessage-deflate on a connection: the Tornado side of
:mod:`marketstream.wire.deflate`.

At the handshake, on both accept paths (the shortcut of
:mod:`marketstream.server.net.upgrade` and Tornado's),
:func:`accept` reads the client's offer and, when the server takes it,
gives the connection's protocol Tornado's inflater for the client's
compressed messages (Tornado keeps it, with ``client_no_context_takeover``
nothing lives between messages) and returns the
``Sec-WebSocket-Extensions`` of the 101.  No compressor per connection:
the fan-out compresses each message once for every compressing client
(:mod:`marketstream.fanout.compressing`), and :func:`reply_frame` a reply
to one client.
"""

from __future__ import annotations

from tornado.httputil import HTTPHeaders

from marketstream.server.context import Context
from marketstream.server.net import tornado_compat as compat
from marketstream.server.wsprotocol import FrameSink, StreamProtocol
from marketstream.wire import deflate
from marketstream.wire.frames import text_frame

__all__ = ["accept", "with_extension", "reply_frame"]

HEADER = "Sec-WebSocket-Extensions"


def accept(context: Context, ws: StreamProtocol, headers: HTTPHeaders) -> str | None:
    """Negotiate compression for ``ws`` (the new connection's protocol,
    which keeps the answer in ``ws.deflate``) from the request's
    ``headers``: the ``Sec-WebSocket-Extensions`` value of the response,
    or None (plain frames: compression off, nothing offered, or nothing
    acceptable)."""
    if not context.compression:
        return None
    agreement = deflate.negotiate(headers.get(HEADER))
    if agreement is None:
        return None
    compat.inflate_client_messages(ws, agreement.parameters)
    ws.deflate = agreement.response
    return agreement.response


def with_extension(response: bytes, extension: str) -> bytes:
    """A prebuilt 101 (ending in an empty line) with the extension header."""
    return response[:-2] + b"%s: %s\r\n\r\n" % (HEADER.encode(), extension.encode("latin1"))


def reply_frame(context: Context, ws: FrameSink | None, payload: bytes) -> bytes:
    """The frame of a reply to one client: compressed like a message when
    the connection compresses and the reply is large enough.  ``ws``: the
    connection's protocol (Tornado's own, where the fast paths are off,
    never compresses)."""
    frame = text_frame(payload)
    if getattr(ws, "deflate", None) is None:
        return frame
    return context.manager.core.compressing.frame(payload, frame)
