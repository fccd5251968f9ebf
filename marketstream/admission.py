"""Admission: which handshakes are accepted, and the per-IP counts.

No sockets here; the handler and the handshake shortcut ask the same
object:

>>> from marketstream.config import load_settings
>>> settings = load_settings(environ={}, overrides={
...     "server.allowed_origins": "https://exchange.example.com",
...     "server.max_connections_per_ip": "1"})
>>> admission = Admission(settings.server, Counters(), open_connections=lambda: 10)
>>> admission.origin_allowed("https://exchange.example.com")
True
>>> admission.origin_allowed("https://elsewhere.example")
False
>>> admission.refusal("10.0.0.7") is None     # None, or (status, reason, cause)
True
>>> admission.enter("10.0.0.7")               # a connection from that IP opened ...
>>> admission.refusal("10.0.0.7")
(429, 'too many connections from your address', 'max_connections_per_ip')
>>> admission.leave("10.0.0.7")               # ... and closed
>>> admission.refusal("10.0.0.7") is None
True

Refusals: HTTP 403 for an ``Origin`` not in ``[server] allowed_origins``,
429 when ``[server] max_connections_per_ip`` is reached for the client IP,
503 when ``[server] max_connections`` is reached in this process.
"""

from __future__ import annotations

from collections.abc import Callable

from marketstream.config import ServerSettings
from marketstream.counters import Counters

__all__ = ["Admission"]


class Admission:
    """Origin rules and connection limits of one process."""

    def __init__(self, server: ServerSettings, counters: Counters,
                 open_connections: Callable[[], int]) -> None:
        self.counters = counters
        self.open_connections = open_connections
        self.allowed_origins = frozenset(o.rstrip("/").lower() for o in server.allowed_origins)
        self.max_connections = server.max_connections
        self.max_per_ip = server.max_connections_per_ip
        self.per_ip: dict[str, int] = {}  # client IP -> open connections (only when max_per_ip)

    def origin_allowed(self, origin: str) -> bool:
        """Whether a browser page from ``origin`` may connect (no side effects)."""
        allowed = self.allowed_origins
        return not allowed or origin.rstrip("/").lower() in allowed

    def refusal(self, ip: str) -> tuple[int, str, str] | None:
        """None to admit a handshake from ``ip``, else (status, reason, cause)."""
        if self.open_connections() >= self.max_connections:
            return 503, "too many connections", "max_connections"
        if self.max_per_ip and self.per_ip.get(ip, 0) >= self.max_per_ip:
            return 429, "too many connections from your address", "max_connections_per_ip"
        return None

    def refused(self, cause: str) -> None:
        """Count a refused handshake."""
        self.counters.refused[cause] += 1

    def enter(self, ip: str) -> None:
        """A connection from ``ip`` was opened."""
        if self.max_per_ip:
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1

    def leave(self, ip: str) -> None:
        """A connection from ``ip`` (counted by :meth:`enter`) closed."""
        if self.max_per_ip:
            left = self.per_ip.get(ip, 1) - 1
            if left > 0:
                self.per_ip[ip] = left
            else:
                self.per_ip.pop(ip, None)
