"""The HTTP endpoints beside the WebSocket ones, and the URL map.

- ``GET /health`` (:class:`HealthHandler`): 200 while Redis is live, else
  503; the details only to a trusted peer asking directly;
- ``GET /metrics`` (:class:`MetricsHandler`): Prometheus text format;
- ``GET /static/...``: the page's files and the JavaScript client;
- :func:`routes`: the URL map of one process, the WebSocket paths
  (:func:`ws_paths`) served by :class:`~marketstream.server.handlers.StreamHandler`.
"""

import logging
import os
from typing import TYPE_CHECKING, Any

import tornado.web
import ujson

from marketstream.server.auth import redact_token
from marketstream.server.config import Settings
from marketstream.server.handlers import STATIC_DIR, Context, StreamHandler
from marketstream.server.net import tornado_compat as compat

if TYPE_CHECKING:  # prometheus_client loads when /metrics is served
    from marketstream.server.metrics import Exporter

__all__ = ["HealthHandler", "MetricsHandler", "log_request", "routes", "ws_paths"]

access_log = logging.getLogger("tornado.access")


#: Headers that say a request was forwarded by a proxy for someone else.
_FORWARDED = ("X-Real-IP", "X-Forwarded-For", "Forwarded")


class HealthHandler(tornado.web.RequestHandler):
    """``GET /health``: 200 while the Redis pub/sub connection is live, else 503.

    Everyone gets the status and the counts (connections, streams, upstream
    channels); the details (Redis nodes and their addresses, the pid, the
    counters) go only to a direct request from an address in ``[server]
    trusted_proxies`` (a tool on the host itself, by default), never to a
    request a proxy forwarded (it carries ``X-Real-IP`` or
    ``X-Forwarded-For``) or to anyone else.
    """

    def initialize(self, context: Context) -> None:
        self.context = context

    def get(self) -> None:
        manager = self.context.manager
        healthy = manager.healthy
        body: dict[str, Any] = {"status": "ok" if healthy else "unavailable"}
        details = manager.health()
        if self._for_insiders():
            body["pid"] = os.getpid()
            body.update(details)
        else:
            body.update(
                (key, details[key]) for key in ("connections", "streams", "upstream_channels")
            )
        self.set_status(200 if healthy else 503)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(ujson.dumps(body))

    def _for_insiders(self) -> bool:
        """Whether the request came straight from a trusted address."""
        address = compat.peer_address(self.request.connection)
        if not (isinstance(address, tuple) and address and isinstance(address[0], str)):
            return False
        headers = self.request.headers
        return self.context.admission.trusted(address[0]) and not any(
            name in headers for name in _FORWARDED
        )


class MetricsHandler(tornado.web.RequestHandler):
    """``GET /metrics``: Prometheus text format."""

    def initialize(self, exporter: "Exporter") -> None:
        self.exporter = exporter

    def get(self) -> None:
        from marketstream.server.metrics import CONTENT_TYPE_LATEST

        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.exporter.render())


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log, quieter: refusals are logged where they are
    decided, so only server errors are worth a warning here."""
    status = handler.get_status()
    request = handler.request
    level = logging.ERROR if status >= 500 and status != 503 else logging.DEBUG
    access_log.log(
        level,
        "%d %s %s (%s) %.1fms",
        status,
        request.method,
        redact_token(request.uri or ""),  # a ?token= stays out of the log
        request.remote_ip,
        1000.0 * request.request_time(),
    )


def ws_paths(settings: Settings) -> list[str]:
    """The paths that serve WebSocket: /, /ws, /stream and the configured one."""
    paths = ["/", "/ws", "/stream"]
    if settings.ws_path and settings.ws_path not in paths:
        paths.append(settings.ws_path)
    return paths


def routes(
    context: Context, exporter: "Exporter | None" = None
) -> list[tuple[str, type, dict[str, Any]]]:
    """The URL map for one process."""
    table: list[tuple[str, type, dict[str, Any]]] = [
        (path, StreamHandler, {"context": context}) for path in ws_paths(context.settings)
    ]
    table.append(("/health", HealthHandler, {"context": context}))
    table.append((r"/static/(.*)", tornado.web.StaticFileHandler, {"path": STATIC_DIR}))
    if exporter is not None:
        table.append(("/metrics", MetricsHandler, {"exporter": exporter}))
    return table
