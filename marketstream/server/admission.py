"""Admission: which connections and handshakes are accepted, the per-IP
counts, and the connections still handshaking.

No sockets here; the handler and the handshake shortcut ask the same
object:

>>> from marketstream.server.config import load_settings
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

A connection counts from the moment the server takes it up, before its
request has arrived: :meth:`Admission.admit` registers it as handshaking
(under its peer address, ``key`` being anything that stands for the
connection) with the time by which it must be done; :meth:`Admission.enter`
(the WebSocket opened) or :meth:`Admission.handshake_done` (a plain HTTP
request was read, or the connection closed) ends that;
:meth:`Admission.expired` hands back the connections whose time is up, for
the server to close.  A WebSocket handshake is refused when the open and
handshaking connections (but itself) reach a limit:

>>> admission.admit("conn-1", "10.0.0.8", deadline=10.0) is None
True
>>> admission.refusal("10.0.0.8", key="conn-1") is None    # it does not count against itself
True
>>> admission.handshaking, admission.next_deadline()
(1, 10.0)
>>> admission.refusal("10.0.0.8")                          # but against any other
(429, 'too many connections from your address', 'max_connections_per_ip')

:meth:`Admission.admit` refuses a connection at once, before its request
is read, only when it cannot be served whatever it asks: an IP with
``max_connections_per_ip`` connections still handshaking, or a process
with :data:`HTTP_RESERVE` connections beyond ``max_connections`` (the
reserve lets ``/health`` and ``/metrics`` answer while the process is
full of WebSockets):

>>> admission.admit("conn-2", "10.0.0.8", deadline=11.0)
(429, 'too many connections from your address', 'max_connections_per_ip')
>>> admission.expired(now=10.0)
['conn-1']
>>> admission.handshaking, admission.admit("conn-3", "10.0.0.8", deadline=12.0) is None
(0, True)

Proxy headers (``X-Real-IP``...) count only from ``[server] trusted_proxies``
when ``[server] xheaders`` is on:

>>> admission.trusted("127.0.0.1"), admission.trusted("203.0.113.5")
(True, False)
>>> admission.proxied("127.0.0.1")      # xheaders is off in these settings
False

Refusals: HTTP 403 for an ``Origin`` not in ``[server] allowed_origins``,
429 when ``[server] max_connections_per_ip`` is reached for the client IP,
503 when ``[server] max_connections`` is reached in this process (open
connections and handshaking ones together).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Hashable

from marketstream.server.config import ServerSettings
from marketstream.fanout.counters import Counters

__all__ = ["Admission", "Refusal", "HTTP_RESERVE"]

#: (HTTP status, reason, cause): what a refused handshake is answered and
#: counted as.
Refusal = tuple[int, str, str]

_TOO_MANY: Refusal = (503, "too many connections", "max_connections")
_TOO_MANY_FROM_IP: Refusal = (
    429,
    "too many connections from your address",
    "max_connections_per_ip",
)
#: Connections taken up beyond ``max_connections`` (refused if they ask for
#: a WebSocket): room for plain HTTP requests while the process is full.
#: The server's open-file limit leaves room for them (server/app.py).
HTTP_RESERVE = 16


class Admission:
    """Origin rules, trusted proxies and connection limits of one process."""

    def __init__(
        self, server: ServerSettings, counters: Counters, open_connections: Callable[[], int]
    ) -> None:
        self.counters = counters
        self.open_connections = open_connections
        self.allowed_origins = frozenset(o.rstrip("/").lower() for o in server.allowed_origins)
        self.max_connections = server.max_connections
        self.max_per_ip = server.max_connections_per_ip
        self.xheaders = server.xheaders
        # Client IP -> connections, open and handshaking (only when max_per_ip);
        # the handshaking ones alone.
        self.per_ip: dict[str, int] = {}
        self._handshaking_ip: dict[str, int] = {}
        # Trusted single addresses compare as strings (no parsing per
        # handshake); only networks need the ipaddress module.
        networks = server.trusted_proxies
        self._trusted_addresses = frozenset(
            str(n.network_address) for n in networks if n.num_addresses == 1
        )
        self._trusted_networks = tuple(n for n in networks if n.num_addresses > 1)
        # Connections still handshaking, in the order they came (so their
        # deadlines rise): key -> (deadline, the IP they count under or None).
        self._handshakes: dict[Hashable, tuple[float, str | None]] = {}

    # --- who is who -----------------------------------------------------------

    def origin_allowed(self, origin: str) -> bool:
        """Whether a browser page from ``origin`` may connect (no side effects)."""
        allowed = self.allowed_origins
        return not allowed or origin.rstrip("/").lower() in allowed

    def trusted(self, ip: str) -> bool:
        """Whether ``ip`` (a peer address) is in ``[server] trusted_proxies``."""
        if ip in self._trusted_addresses:
            return True
        if not self._trusted_networks and not ip.startswith("::ffff:"):
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is not None:  # an IPv4 client on an IPv6 socket
            address = mapped
        return str(address) in self._trusted_addresses or any(
            address in network for network in self._trusted_networks
        )

    def proxied(self, peer_ip: str) -> bool:
        """Whether a connection from ``peer_ip`` comes through a proxy whose
        ``X-Real-IP`` / ``X-Forwarded-For`` / ``X-Real-Port`` headers count."""
        return self.xheaders and self.trusted(peer_ip)

    # --- limits -----------------------------------------------------------------

    def refusal(self, ip: str, key: Hashable | None = None) -> Refusal | None:
        """None to admit a handshake from client ``ip``, else the refusal.
        ``key``: the connection, if it was :meth:`admit`-ted (it does not
        count against itself)."""
        entry = self._handshakes.get(key) if key is not None else None
        others = self.open_connections() + len(self._handshakes) - (entry is not None)
        if others >= self.max_connections:
            return _TOO_MANY
        if self.max_per_ip:
            mine = entry is not None and entry[1] == ip
            if self.per_ip.get(ip, 0) - mine >= self.max_per_ip:
                return _TOO_MANY_FROM_IP
        return None

    def refused(self, cause: str) -> None:
        """Count a refused handshake (or a connection closed before it was done)."""
        self.counters.refused[cause] += 1

    def enter(self, ip: str, key: Hashable | None = None) -> None:
        """A WebSocket from client ``ip`` opened (ending connection ``key``'s
        handshake, if given)."""
        if key is not None:
            self.handshake_done(key)
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

    # --- connections still handshaking --------------------------------------------

    @property
    def handshaking(self) -> int:
        """Connections taken up and not yet done with their handshake."""
        return len(self._handshakes)

    def admit(self, key: Hashable, ip: str | None, deadline: float) -> Refusal | None:
        """A connection was taken up: refuse it (its refusal), or count it as
        handshaking until :meth:`enter`, :meth:`handshake_done` or
        ``deadline``.  ``ip``: its peer address when that is the client's
        (None behind a trusted proxy: it counts per IP once its request
        says whose it is)."""
        taken = self.open_connections() + len(self._handshakes)
        if taken >= self.max_connections + HTTP_RESERVE:
            return _TOO_MANY
        if ip is not None and self.max_per_ip:
            handshaking = self._handshaking_ip
            if handshaking.get(ip, 0) >= self.max_per_ip:
                return _TOO_MANY_FROM_IP
            handshaking[ip] = handshaking.get(ip, 0) + 1
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        else:
            ip = None
        self._handshakes[key] = (deadline, ip)
        return None

    def handshake_done(self, key: Hashable) -> None:
        """Connection ``key`` is no longer handshaking (nothing if it was not)."""
        entry = self._handshakes.pop(key, None)
        if entry is not None and entry[1] is not None:
            ip = entry[1]
            self.leave(ip)
            left = self._handshaking_ip.get(ip, 1) - 1
            if left > 0:
                self._handshaking_ip[ip] = left
            else:
                self._handshaking_ip.pop(ip, None)

    def next_deadline(self) -> float | None:
        """The earliest deadline of a connection still handshaking."""
        for deadline, _ in self._handshakes.values():
            return deadline
        return None

    def expired(self, now: float) -> list[Hashable]:
        """The connections whose deadline is ``now`` or earlier, no longer
        counted (the caller closes them)."""
        handshakes = self._handshakes
        gone: list[Hashable] = []
        for key, (deadline, _) in handshakes.items():
            if deadline > now:
                break
            gone.append(key)
        for key in gone:
            self.handshake_done(key)
        return gone
