"""HTTP and WebSocket handlers: they translate events, nothing more.

:class:`StreamHandler` turns WebSocket events into calls on the
:class:`~marketstream.channels.ChannelManager` (what to subscribe) and the
:mod:`~marketstream.protocol` module (what frames mean); the manager calls
back :meth:`StreamHandler.write_frames` to deliver data.
"""

import logging
import os
import time

import tornado.web
import tornado.websocket
import ujson
from tornado.iostream import StreamBufferFullError, StreamClosedError

from marketstream import protocol
from marketstream.channels import ChannelManager

__all__ = ["StreamHandler", "HealthHandler", "Context", "routes"]

log = logging.getLogger("marketstream.connections")


class Context:
    """What the handlers of one application share (one per process)."""

    def __init__(self, settings, manager=None):
        self.settings = settings
        self.manager = manager or ChannelManager.instance()
        self.rules = protocol.StreamRules.from_settings(settings.protocol)
        self.acks = settings.protocol.acks
        self.xheaders = settings.server.xheaders


class StreamHandler(tornado.websocket.WebSocketHandler):
    """One WebSocket client.

    Endpoints ``/`` and ``/ws``; ``/stream?streams=a/b`` subscribes to
    ``a`` and ``b`` at connect time.
    """

    def initialize(self, context):
        self.context = context
        self.identity = None
        self._ws = None
        self._opened_at = 0.0

    # --- WebSocket events ----------------------------------------------------

    def open(self, *args, **kwargs):
        ctx = self.context
        self._ws = self.ws_connection
        self._opened_at = time.monotonic()
        self.identity = self._make_identity()
        ctx.manager.register(self)
        log.info("connect %s", self.identity)
        initial = self.get_query_argument("streams", "")
        if initial:
            names = [name for name in initial.split("/") if name]
            return self._handle(protocol.Request(protocol.SUBSCRIBE, tuple(names), None),
                                reply=False)
        return None

    def on_message(self, message):
        request = protocol.parse_request(message)
        if isinstance(request, protocol.Invalid):
            self.context.manager.stats.invalid_frames += 1
            log.debug("ignored frame from %s: %s", self.identity, request.reason)
            if self.context.acks:
                self._reply(protocol.encode_error(request.id, request.code, request.reason))
            return None
        return self._handle(request, reply=self.context.acks)

    def on_close(self):
        self.context.manager.remove(self)
        log.info("disconnect %s code=%s duration=%.1fs", self.identity,
                 self.close_code, time.monotonic() - self._opened_at)
        self._ws = None

    # --- requests ------------------------------------------------------------

    def _handle(self, request, reply):
        manager = self.context.manager
        if request.method == protocol.LIST_SUBSCRIPTIONS:
            self._reply(protocol.encode_result(request.id, manager.subscriptions(self)))
            return None
        valid, errors = [], []
        for name in request.params:
            reason = self.context.rules.check(name)
            if reason is None:
                valid.append(name)
            else:
                errors.append("%s: %s" % (name[:100], reason))
        if errors:
            manager.stats.invalid_frames += 1
        if request.method == protocol.SUBSCRIBE:
            manager.subscribe(self, valid)
            if reply:
                return self._ack_when_subscribed(request.id, valid, errors)
        else:
            manager.unsubscribe(self, valid)
        if reply:
            self._ack(request.id, errors)
        return None

    async def _ack_when_subscribed(self, request_id, names, errors):
        if not await self.context.manager.wait_subscribed(names):
            errors = errors + ["upstream subscription not confirmed yet"]
        self._ack(request_id, errors)

    def _ack(self, request_id, errors):
        if errors:
            self._reply(protocol.encode_error(request_id, protocol.ERROR_INVALID_REQUEST,
                                              "; ".join(errors)))
        else:
            self._reply(protocol.encode_result(request_id))

    def _reply(self, text):
        self.write_frames(protocol.text_frame(text.encode()))

    # --- delivery ------------------------------------------------------------

    def write_frames(self, data):
        """Queue complete WebSocket frames (bytes) for this client.

        The one place that writes below ``write_message``: frames are built
        once per message by the fan-out and shared by all recipients.
        """
        ws = self._ws
        if ws is None or ws.server_terminated:
            return
        try:
            ws.stream.write(data)
        except StreamClosedError:
            pass  # on_close follows
        except StreamBufferFullError:
            self.close(1008, "slow consumer")

    # --- identity ------------------------------------------------------------

    def _make_identity(self):
        """``ip:port``; behind a trusted proxy, the client IP it reports and
        the proxy-side port, which keeps the identity unique per connection."""
        ip = self.request.remote_ip
        try:
            port = self._ws.stream.socket.getpeername()[1]
        except (OSError, AttributeError, IndexError):
            port = 0
        return ("[%s]:%d" if ":" in ip else "%s:%d") % (ip, port)

    def __repr__(self):
        return "<StreamHandler %s>" % self.identity


class HealthHandler(tornado.web.RequestHandler):
    """``GET /health``: 200 while the Redis pub/sub connection is live, else 503."""

    def initialize(self, context):
        self.context = context

    def get(self):
        manager = self.context.manager
        healthy = manager.healthy
        body = {"status": "ok" if healthy else "unavailable", "pid": os.getpid()}
        body.update(manager.health())
        self.set_status(200 if healthy else 503)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(ujson.dumps(body))


def routes(context):
    """The URL map for one process."""
    ws_paths = ["/", "/ws", "/stream"]
    if context.settings.ws_path and context.settings.ws_path not in ws_paths:
        ws_paths.append(context.settings.ws_path)
    table = [(path, StreamHandler, {"context": context}) for path in ws_paths]
    table.append(("/health", HealthHandler, {"context": context}))
    return table

