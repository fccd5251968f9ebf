"""Small helpers shared by the server, the feed and the scripts.

- :func:`redact_url` -- a Redis URL fit for logs (password hidden, user kept)::

      >>> redact_url("redis://feed:s3cret@10.0.0.5:6379/0")
      'redis://feed:***@10.0.0.5:6379/0'

- :func:`die_with_parent` -- ask the kernel to SIGTERM this process when its
  parent dies (Linux; a no-op elsewhere).  Call it in a forked child or as a
  ``preexec_fn``.
- :func:`check_redis` -- fail fast (raise) if Redis cannot be reached::

      check_redis("redis://127.0.0.1:6379/0")   # raises RedisError / OSError
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import signal
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["check_redis", "die_with_parent", "redact_url", "sync_redis_client",
           "async_redis_client", "Confirmations"]

_MASK = "***"


def redact_url(url: str) -> str:
    """``url`` with its password hidden and everything else kept.

    The user name stays (it tells which ACL user connects); the password,
    in the authority or in a ``password=`` query parameter (which redis-py
    accepts too), becomes ``***``.  A URL without a password is returned
    unchanged::

        >>> redact_url("redis://user:pw@host:6379/0")
        'redis://user:***@host:6379/0'
        >>> redact_url("rediss://:pw@host:6380")
        'rediss://:***@host:6380'
        >>> redact_url("redis://user:p@ss@host/0")
        'redis://user:***@host/0'
        >>> redact_url("redis://host:6379/0?password=pw&db=1")
        'redis://host:6379/0?password=***&db=1'
        >>> redact_url("redis+sentinel://:pw@s1:26379,s2:26379/mymaster")
        'redis+sentinel://:***@s1:26379,s2:26379/mymaster'
        >>> redact_url("unix:///run/redis.sock?db=0")
        'unix:///run/redis.sock?db=0'
    """
    try:
        parts = urlsplit(url)
    except ValueError:      # e.g. an unbalanced "[" in the host
        head, sep, _ = url.rpartition("@")
        if not sep:
            return url
        scheme, slashes, userinfo = head.partition("//")
        return "%s%s%s@%s" % (scheme, slashes,
                              userinfo.partition(":")[0] + ":" + _MASK,
                              url.rpartition("@")[2])
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = "%s:%s@%s" % (userinfo.partition(":")[0], _MASK, hostport)
    query = parts.query
    if "password" in query.lower():
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(key, _MASK if "password" in key.lower() else value)
                           for key, value in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def die_with_parent() -> None:
    """Have the kernel send SIGTERM to this process when its parent exits.

    Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere it does nothing.  The
    kernel ties this to the parent *thread*: start the child from a thread
    that lives as long as the child should::

        subprocess.Popen(args, preexec_fn=die_with_parent)
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _redisurl() -> Any:
    try:
        return importlib.import_module("marketstream.redisurl")
    except ImportError:
        return None


def sync_redis_client(url: str, **kwargs: Any) -> Any:
    """A synchronous redis-py client for ``url``.

    ``redis://``, ``rediss://`` and ``unix://`` go through ``redis.from_url``;
    when ``marketstream.redisurl`` is present its ``sync_client(url)`` is used
    instead (it also knows ``redis+sentinel://`` and ``redis+cluster://``).
    ``kwargs`` (timeouts ...) go to the client.
    """
    module = _redisurl()
    if module is not None and hasattr(module, "sync_client"):
        return module.sync_client(url, **kwargs)
    import redis
    return redis.Redis.from_url(url, **kwargs)


def async_redis_client(url: str, **kwargs: Any) -> Any:
    """Like :func:`sync_redis_client`, for ``redis.asyncio``."""
    module = _redisurl()
    if module is not None and hasattr(module, "async_client"):
        return module.async_client(url, **kwargs)
    import redis.asyncio
    return redis.asyncio.Redis.from_url(url, **kwargs)


def check_redis(url: str, timeout: float = 5.0) -> None:
    """Raise if Redis at ``url`` does not answer PING within ``timeout`` s.

    Used before forking workers or starting the feed, so a wrong URL fails
    at once with a clear message rather than in every worker::

        try:
            check_redis(url)
        except (RedisError, OSError) as exc:
            log.error("cannot reach Redis at %s: %s", redact_url(url), exc)

    A malformed URL raises ``ValueError``.
    """
    client = sync_redis_client(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    finally:
        client.close()


class Confirmations:
    """Futures waiting for Redis to confirm channel subscriptions::

        confirmations = Confirmations()
        ok = await confirmations.wait(["trade.SOL_USDC"], lambda name: not confirmed(name))
        confirmations.resolve("trade.SOL_USDC")   # Redis said "subscribe"
        confirmations.fail_all()                  # the link was lost: False to everyone
    """

    def __init__(self) -> None:
        self._waiters: dict[str, list[asyncio.Future[bool]]] = {}

    async def wait(self, names: Iterable[str], pending: Callable[[str], bool],
                   timeout: float = 5.0) -> bool:
        """Wait until every name for which ``pending(name)`` is true now is
        resolved; False if one failed or ``timeout`` passed first."""
        loop = asyncio.get_running_loop()
        futures = []
        for name in names:
            if pending(name):
                future: asyncio.Future[bool] = loop.create_future()
                self._waiters.setdefault(name, []).append(future)
                futures.append(future)
        if not futures:
            return True
        try:
            await asyncio.wait_for(asyncio.gather(*futures), timeout)
            return all(f.result() for f in futures)
        except asyncio.TimeoutError:
            return False

    def resolve(self, name: str, ok: bool = True) -> None:
        """The subscription of ``name`` was confirmed (or, ``ok`` False, given up)."""
        for future in self._waiters.pop(name, ()):
            if not future.done():
                future.set_result(ok)

    def fail_all(self) -> None:
        """Every wait ends with False (the link was lost, or stopped)."""
        for name in list(self._waiters):
            self.resolve(name, False)
