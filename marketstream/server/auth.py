"""Authentication on the server: tokens at connect and in ``AUTH``
messages, who may subscribe what, connections per user, and expiry.

The decisions are sans-I/O (:mod:`marketstream.wire.tokens` verifies,
:mod:`marketstream.wire.access` decides per stream); this module holds the
per-process state and is called by :class:`~marketstream.server.handlers.StreamHandler`
through a few hooks (``Context.auth`` is the process's :class:`Sessions`):

* ``prepare`` (Tornado's path) and ``switch_protocols`` (the handshake
  shortcut): :meth:`Sessions.check_handshake` verifies the token of
  ``?token=`` or ``Authorization: Bearer`` before the 101; a bad one (or
  none with ``[auth] required``) is answered HTTP 401 with the reason, a
  user at ``max_connections_per_user`` 429.
* ``open``: :meth:`Sessions.opened`; ``on_close``: :meth:`Sessions.closed`.
* ``on_message``: ``{"method":"AUTH","params":["<jwt>"],"id":n}`` goes to
  :meth:`Sessions.on_auth`, always answered (a result or an error).
* ``_handle``: :meth:`Sessions.refusal` decides each stream.

State lives here, not on the handler (one attribute more there costs every
connection ~1.5 KB, see ``StreamHandler.initialize``): a dict of the
authenticated connections (anonymous ones are not in it and cost nothing),
the open connections per ``sub``, and one heap of expiry deadlines served
by one timer per process (as :mod:`marketstream.server.keepalive` does
for pings), not a timer per connection.  At its token's ``exp`` (plus
``[auth] leeway``) a connection is closed with 4001 "token expired",
unless an ``AUTH`` for the same ``sub`` brought a later ``exp``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any

import tornado.ioloop

from marketstream.fanout.counters import Counters
from marketstream.loglimit import LogLimiter
from marketstream.server.config import AuthSettings
from marketstream.wire import replies
from marketstream.wire.access import Access, Failure, Grant
from marketstream.wire.requests import Request, StreamRules

if TYPE_CHECKING:
    from marketstream.wire.tokens import Verifier

__all__ = ["Sessions", "CLOSE_TOKEN_EXPIRED", "ERROR_UNAUTHORIZED", "token_of", "redact_token"]

log = logging.getLogger(__name__)

#: Close code of a connection whose token expired (reason "token expired").
CLOSE_TOKEN_EXPIRED = 4001
#: Error code of a refused ``AUTH`` reply.
ERROR_UNAUTHORIZED = 401

_TOO_MANY = (429, "too many connections for this user", "max_connections_per_user")


def token_of(handler: Any) -> str | None:
    """The token a handshake carries: ``Authorization: Bearer <jwt>``, else
    ``?token=<jwt>``; None without one."""
    request = handler.request
    header = request.headers.get("Authorization")
    if header:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return str(value.strip())
    values = request.query_arguments.get("token")
    if values:
        return str(values[-1].decode("utf-8", "replace"))
    return None


def redact_token(uri: str) -> str:
    """``uri`` with the value of a ``token`` query argument hidden (for logs).

    >>> redact_token("/stream?streams=a&token=eyJhbGc.x.y")
    '/stream?streams=a&token=...'
    """
    path, sep, query = uri.partition("?")
    if not sep or "token=" not in query:
        return uri
    parts = ["token=..." if item.startswith("token=") else item for item in query.split("&")]
    return path + "?" + "&".join(parts)


def _response(status: int, reason: str) -> bytes:
    """A whole HTTP response that closes the connection (the shortcut's 401/429)."""
    body = reason.encode() + b"\n"
    extra = b""
    if status == 401:
        extra = b'WWW-Authenticate: Bearer error="invalid_token"\r\n'
    phrase = b"Unauthorized" if status == 401 else b"Too Many Requests"
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n%s"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (status, phrase, extra, len(body), body)
    )


class Sessions:
    """The authentication state of one process (see the module's docstring)."""

    def __init__(
        self,
        settings: AuthSettings,
        rules: StreamRules,
        counters: Counters,
        log_limiter: LogLimiter,
    ) -> None:
        self.enabled = bool(settings.jwt_key)
        self.verifier: Verifier | None = None
        if self.enabled:
            # PyJWT with cryptography costs a process about 10 MB of memory:
            # loaded only where [auth] is configured.
            from marketstream.wire.tokens import Verifier

            self.verifier = Verifier(
                settings.jwt_key,
                settings.jwt_algorithms,
                settings.jwt_audience,
                settings.jwt_issuer,
                settings.leeway,
            )
        self.required = self.enabled and settings.required
        self.leeway = settings.leeway
        self.max_per_user = settings.max_connections_per_user
        self.rules = rules
        self.access = Access(rules, settings.protected if self.enabled else ())
        # With no [auth] and no protected streams, a name without "#" is the
        # stream rules' alone.
        self._plain = self.access.protected is None
        self.counters = counters
        self.log_limiter = log_limiter
        #: Open authenticated connections -> their grant.
        self.grants: dict[Any, Grant] = {}
        #: Open connections per sub.
        self.per_user: dict[str, int] = {}
        # Grants of handshakes not open yet (a handshake that fails after
        # its token was checked leaves nothing behind).
        self._pending: weakref.WeakKeyDictionary[Any, Grant] = weakref.WeakKeyDictionary()
        # (deadline, n, connection): the earliest expiry first; entries of
        # closed or refreshed connections are skipped when they come up.
        self._heap: list[tuple[float, int, Any]] = []
        self._count = itertools.count()
        self._timer: object = None
        self._timer_at = 0.0
        self._loop: tornado.ioloop.IOLoop | None = None

    # --- the handshake -------------------------------------------------------------

    def check_handshake(self, handler: Any) -> tuple[int, str, str] | None:
        """None to go on with the handshake (its grant, if any, kept for
        :meth:`opened`), else ``(status, reason, cause)`` after counting it."""
        if not self.enabled:
            return None
        token = token_of(handler)
        if token is None:
            if not self.required:
                return None
            return self._refuse_token(handler, Failure("missing", "token required"))
        assert self.verifier is not None
        result = self.verifier.verify(token)
        if isinstance(result, Failure):
            return self._refuse_token(handler, result)
        if self.max_per_user and self.per_user.get(result.sub, 0) >= self.max_per_user:
            status, reason, cause = _TOO_MANY
            self.counters.refused[cause] += 1
            self.log_limiter.log(
                logging.WARNING,
                cause,
                "refused %s: %s (%.64r)",
                handler.request.remote_ip,
                reason,
                result.sub,
            )
            return _TOO_MANY
        self.counters.auth_accepted += 1
        self._pending[handler] = result
        return None

    def _refuse_token(self, handler: Any, failure: Failure) -> tuple[int, str, str]:
        self.counters.auth_refused[failure.cause] += 1
        self.counters.refused["unauthorized"] += 1
        self.log_limiter.log(
            logging.WARNING,
            "unauthorized",
            "refused %s: %s",
            handler.request.remote_ip,
            failure.reason,
        )
        return 401, failure.reason, "unauthorized"

    def prepare(self, handler: Any) -> None:
        """Tornado's path (``StreamHandler.prepare``): answer a WebSocket
        handshake with a bad token 401 (a user over its limit 429)."""
        if handler.request.headers.get("Upgrade", "").lower() != "websocket":
            return  # the page, or Tornado's 426: not a connection
        refusal = self.check_handshake(handler)
        if refusal is not None:
            status, reason, _ = refusal
            handler.set_status(status)
            if status == 401:
                handler.set_header("WWW-Authenticate", 'Bearer error="invalid_token"')
            handler.finish(reason + "\n")

    def switching(self, handler: Any, stream: Any) -> bool:
        """The handshake shortcut (``StreamHandler.switch_protocols``):
        False after answering a refused handshake on ``stream`` and closing
        it (nothing of the handler is used then)."""
        refusal = self.check_handshake(handler)
        if refusal is None:
            return True
        handler.context.admission.handshake_done(stream)
        try:
            written = stream.write(_response(refusal[0], refusal[1]))
        except Exception:  # StreamClosedError: the client left
            stream.close()
            return False

        def close(future: Any) -> None:
            if not future.cancelled():
                future.exception()  # retrieved: a client gone meanwhile is no error
            stream.close()

        written.add_done_callback(close)
        return False

    # --- open connections ------------------------------------------------------------

    def opened(self, conn: Any) -> None:
        """A WebSocket opened: its handshake's grant (if any) now counts."""
        grant = self._pending.pop(conn, None) if self._pending else None
        if grant is not None:
            self._enter(conn, grant)

    def closed(self, conn: Any) -> None:
        """A connection closed: forget it."""
        grant = self.grants.pop(conn, None)
        if grant is None:
            return
        left = self.per_user.get(grant.sub, 1) - 1
        if left > 0:
            self.per_user[grant.sub] = left
        else:
            self.per_user.pop(grant.sub, None)
        if len(self._heap) > 64 and len(self._heap) > 2 * len(self.grants):
            grants = self.grants
            self._heap = [entry for entry in self._heap if entry[2] in grants]
            heapq.heapify(self._heap)

    def _enter(self, conn: Any, grant: Grant) -> None:
        if conn not in self.grants:
            self.per_user[grant.sub] = self.per_user.get(grant.sub, 0) + 1
        self.grants[conn] = grant
        if grant.exp is not None:
            self._expire_at(grant.exp + self.leeway, conn)

    def grant(self, conn: Any) -> Grant | None:
        """The grant of an open connection (None: anonymous)."""
        return self.grants.get(conn)

    # --- requests ------------------------------------------------------------------

    def refusal(self, conn: Any, name: str) -> tuple[str, str] | None:
        """Whether ``conn`` may subscribe ``name``: None, or ``(cause, reason)``."""
        grant = self.grants.get(conn) if self.grants else None
        if grant is None and self._plain and "#" not in name:
            return self.rules.refusal(name)
        return self.access.refusal(name, grant)

    def on_auth(self, conn: Any, request: Request) -> None:
        """``{"method":"AUTH","params":["<jwt>"],"id":n}``: authenticate or
        refresh; always answered.  A refused token changes nothing."""
        failure: Failure | tuple[str, str]
        if not self.enabled or self.verifier is None:
            failure = Failure("disabled", "authentication is not configured")
        elif len(request.params) != 1:
            failure = Failure("malformed", "AUTH takes one token")
        else:
            result = self.verifier.verify(request.params[0])
            current = self.grants.get(conn)
            if isinstance(result, Failure):
                failure = result
            elif current is not None and current.sub != result.sub:
                failure = Failure("wrong_sub", "the token is for another sub")
            elif (
                current is None
                and self.max_per_user
                and self.per_user.get(result.sub, 0) >= self.max_per_user
            ):
                self.counters.refused[_TOO_MANY[2]] += 1
                conn._answer(replies.encode_error(request.id, ERROR_UNAUTHORIZED, _TOO_MANY[1]))
                return
            else:
                self.counters.auth_refreshed += 1
                self._enter(conn, result)
                answer = {"sub": result.sub, "exp": result.exp}
                conn._answer(replies.encode_result(request.id, answer))
                return
        self.counters.auth_failed[failure[0]] += 1
        self.log_limiter.log(
            logging.INFO,
            "auth_failed",
            "AUTH refused for %s: %s",
            conn.identity,
            failure[1],
        )
        conn._answer(replies.encode_error(request.id, ERROR_UNAUTHORIZED, failure[1]))

    # --- expiry ------------------------------------------------------------------------

    def _expire_at(self, deadline: float, conn: Any) -> None:
        heapq.heappush(self._heap, (deadline, next(self._count), conn))
        if self._timer is None or deadline < self._timer_at:
            self._schedule(deadline)

    def _schedule(self, deadline: float) -> None:
        loop = self._loop = self._loop or tornado.ioloop.IOLoop.current()
        if self._timer is not None:
            loop.remove_timeout(self._timer)
        self._timer_at = deadline
        self._timer = loop.call_later(max(0.0, deadline - time.time()), self._expire)

    def _expire(self) -> None:
        """Close the connections whose token has expired (one timer for all)."""
        self._timer = None
        heap = self._heap
        now = time.time()
        while heap and heap[0][0] <= now:
            deadline, _, conn = heapq.heappop(heap)
            grant = self.grants.get(conn)
            if grant is None or grant.exp is None or grant.exp + self.leeway != deadline:
                continue  # closed, or refreshed since
            self.expired(conn)
        if heap:
            self._schedule(heap[0][0])

    def expired(self, conn: Any) -> None:
        """Close ``conn``: its token expired."""
        self.counters.closed["token_expired"] += 1
        self.log_limiter.log(
            logging.INFO, "token_expired", "closing %s: token expired", conn.identity
        )
        self.closed(conn)
        conn.context.manager.remove(conn)  # nothing more for it
        conn.close_for(CLOSE_TOKEN_EXPIRED, "token expired")

    def stop(self) -> None:
        """Stop the expiry timer (the server is shutting down)."""
        if self._timer is not None and self._loop is not None:
            self._loop.remove_timeout(self._timer)
        self._timer = None
