"""Tokens for the client: where a token comes from, when to refresh it,
and the refresh itself (an ``AUTH`` message on the open connection).

A token source is the token (a string) or a function returning a fresh
one (plain or ``async``).  :class:`TokenKeeper` asks the source on every
(re)connect, and while connected sends ``{"method":"AUTH","params":[<a
fresh token>]}`` before the current one's ``exp``, so a long-running
client never sees the server's 4001 "token expired".  A plain string
cannot be refreshed: when it expires, the server closes the connection and
the reconnection is refused; give a function for anything long-running.

The token's ``exp`` is read without verifying it (the client has no key;
the server verifies).  The refresh comes :func:`refresh_delay` seconds
after the token was fetched: half its lifetime, at most 30 s before ``exp``.

>>> refresh_delay(exp=1000.0, now=940.0)   # 60 s left: refresh 30 s before
30.0
>>> refresh_delay(exp=1004.0, now=1000.0)  # 4 s left: refresh half-way
2.0
>>> refresh_delay(exp=None, now=0.0) is None
True
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import ujson

__all__ = ["TokenSource", "TokenKeeper", "token_expiry", "refresh_delay"]

log = logging.getLogger(__name__)

#: A token, or a function (plain or async) that returns a fresh one.
TokenSource = str | Callable[[], str] | Callable[[], Awaitable[str]]

#: The most seconds before ``exp`` a token is refreshed.
REFRESH_BEFORE = 30.0
#: Seconds between two attempts when the token function fails.
RETRY_DELAY = 1.0


def token_expiry(token: str) -> float | None:
    """The ``exp`` of ``token`` (not verified), None if it has none or is
    not a JWT."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    if isinstance(exp, (int, float)) and not isinstance(exp, bool):
        return float(exp)
    return None


def refresh_delay(exp: float | None, now: float) -> float | None:
    """Seconds from ``now`` to the refresh of a token that expires at
    ``exp`` (None: never)."""
    if exp is None:
        return None
    left = max(0.0, exp - now)
    return left - min(REFRESH_BEFORE, left / 2)


class TokenKeeper:
    """A token source, and the refresh of the token of one open connection
    at a time (see the module's docstring)."""

    def __init__(self, source: TokenSource) -> None:
        if not isinstance(source, str) and not callable(source):
            raise TypeError("token must be a string or a function returning one")
        self.source = source
        self.refreshes = 0  # AUTH messages sent
        self._token = ""  # the token of the last handshake
        self._task: asyncio.Future[None] | None = None
        self._request_id = 0

    @property
    def refreshable(self) -> bool:
        return not isinstance(self.source, str)

    async def fetch(self) -> str:
        """A token from the source (the function called now)."""
        source = self.source
        if isinstance(source, str):
            return source
        token = source()
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str):
            raise TypeError("the token function returned %r, not a string" % type(token))
        return token

    async def headers(self) -> dict[str, str]:
        """The handshake's ``Authorization`` header, with a fresh token."""
        token = await self.fetch()
        self._token = token
        return {"Authorization": "Bearer " + token}

    def start(self, ws: Any) -> None:
        """Refresh the token of the connection ``ws`` (a Tornado WebSocket
        client connection) before each ``exp`` until :meth:`stop`."""
        self.stop()
        if self.refreshable:
            self._task = asyncio.ensure_future(self._refresh(ws, self._token))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _refresh(self, ws: Any, token: str) -> None:
        while True:
            exp = token_expiry(token)
            delay = refresh_delay(exp, time.time())
            if delay is None:
                return
            await asyncio.sleep(delay)
            try:
                fresh = await self.fetch()
            except Exception as exc:  # the user's function: keep trying until exp
                log.warning("token refresh failed: %s", exc)
                await asyncio.sleep(RETRY_DELAY)
                continue
            if fresh == token:  # the function has nothing newer yet
                if exp is not None and exp <= time.time():
                    return
                await asyncio.sleep(RETRY_DELAY)
                continue
            self._request_id -= 1  # negative ids: never those of the client's requests
            message = {"method": "AUTH", "params": [fresh], "id": self._request_id}
            try:
                await ws.write_message(ujson.dumps(message))
            except Exception:  # closed: the reconnection fetches a fresh token
                return
            self.refreshes += 1
            token = fresh
