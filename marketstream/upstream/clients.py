"""redis-py clients for a ``REDIS_URL`` in any of its forms, and what they raise.

::

    client = sync_client("redis+cluster://10.0.0.1:7000,10.0.0.2:7000")  # a RedisCluster
    aclient = async_client(url)    # redis.asyncio Redis / master of the Sentinel / RedisCluster
    check_redis(url)               # raises one of REDIS_ERRORS if Redis does not answer PING

A Sentinel client follows a failover: its pool asks which server is the
primary at most every :data:`PRIMARY_CHECK` seconds, and the sentinel with
the newest configuration answers.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, TypeAlias

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.exceptions import RedisError

from marketstream.upstream.urls import RedisURL, parse_redis_url

__all__ = [
    "REDIS_ERRORS",
    "AsyncClient",
    "Reply",
    "SyncClient",
    "async_client",
    "check_redis",
    "sync_client",
]

#: What :func:`sync_client` and :func:`async_client` return.
SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster

#: A command reply as redis-py returns it.  Any: redis-py types replies as
#: Any (``ResponseT``); read with hiredis over RESP2 they are bytes, ints,
#: None, errors and nested lists of them.
Reply: TypeAlias = Any

#: What a call to Redis raises when Redis is unreachable, fails or refuses:
#: redis-py's errors, socket errors, a connection closed mid-reply, a
#: timeout of our own.
REDIS_ERRORS = (RedisError, OSError, EOFError, asyncio.TimeoutError)


def _described(url: str | RedisURL) -> RedisURL:
    return url if isinstance(url, RedisURL) else parse_redis_url(url)


def _service(desc: RedisURL) -> str:
    if desc.service_name is None:  # parse_redis_url always sets it
        raise ValueError("a sentinel URL needs the service name")
    return desc.service_name


#: Seconds between two checks of which server is the Sentinel primary.
PRIMARY_CHECK = 0.5


def _newest(states: list[dict[str, Reply]], service: str) -> tuple[str, int]:
    """The primary named by the sentinel with the newest configuration.

    Sentinels learn a failover from each other within a couple of seconds;
    one that has not yet would name the old primary, which may still accept
    writes.  The configuration epoch says which answer is the latest.
    """
    best = max(states, key=lambda state: state.get("config-epoch", 0), default=None)
    if best is None:
        raise redis.sentinel.MasterNotFoundError("No master found for %r" % service)
    return best["ip"], best["port"]


class _Sentinel(redis.sentinel.Sentinel):
    """A Sentinel client that asks every sentinel and follows the newest
    configuration (see :func:`_newest`)."""

    def discover_master(self, service_name: str) -> tuple[str, int]:
        states = []
        for sentinel in self.sentinels:
            try:
                masters: Reply = sentinel.sentinel_masters()  # a dict by service name (RESP2)
                state = masters.get(service_name)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                continue
            ok = self.check_master_state(state, service_name) if state else False  # type: ignore[no-untyped-call]  # unannotated in redis-py
            if ok:
                states.append(state)
        return _newest(states, service_name)


class _AsyncSentinel(redis.asyncio.sentinel.Sentinel):
    """:class:`_Sentinel` for asyncio clients."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        states = []
        for sentinel in self.sentinels:
            try:
                masters: Reply = await sentinel.sentinel_masters()  # by service name (RESP2)
                state = masters.get(service_name)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                continue
            if state and self.check_master_state(state, service_name):
                states.append(state)
        return _newest(states, service_name)


class _FollowingPool(redis.sentinel.SentinelConnectionPool):
    """A Sentinel pool that asks which server is the primary at most every
    :data:`PRIMARY_CHECK` seconds when a connection is taken.

    redis-py asks only when it opens a connection, and after a forced
    failover (``SENTINEL FAILOVER``) the old primary keeps accepting writes
    for seconds: publishes would be acknowledged and lost.  When the primary
    moved, ``get_master_address`` drops the idle connections, so the one
    taken next goes to the new primary.
    """

    _checked = 0.0

    def get_connection(self, *args: object, **kwargs: object) -> redis.connection.Connection:
        now = time.monotonic()
        if now - self._checked >= PRIMARY_CHECK:
            self._checked = now
            self.get_master_address()  # type: ignore[no-untyped-call]  # unannotated in redis-py
        return super().get_connection(*args, **kwargs)


class _AsyncFollowingPool(redis.asyncio.sentinel.SentinelConnectionPool):
    """:class:`_FollowingPool` for asyncio clients."""

    _checked = 0.0

    async def get_connection(
        self, *args: object, **kwargs: object
    ) -> redis.asyncio.connection.AbstractConnection:
        now = time.monotonic()
        if now - self._checked >= PRIMARY_CHECK:
            self._checked = now
            await self.get_master_address()  # type: ignore[no-untyped-call]  # unannotated in redis-py
        # unannotated in redis-py: say what it returns.
        conn: redis.asyncio.connection.AbstractConnection = await super().get_connection(  # type: ignore[no-untyped-call]
            *args, **kwargs
        )
        return conn


def sync_client(url: str | RedisURL, **kwargs: Any) -> SyncClient:  # Any: redis-py's options
    """A synchronous redis-py client for ``url``.

    * one server: ``redis.Redis``;
    * Sentinel: the primary's ``redis.Redis`` from
      ``redis.sentinel.Sentinel(...).master_for(service_name)``, which asks
      the sentinels again after a failover;
    * Cluster: ``redis.cluster.RedisCluster`` with the seeds as startup nodes.

    ``kwargs`` go to the client (``decode_responses=True`` ...)::

        client = sync_client("redis+sentinel://127.0.0.1:26379/prices")
        client.publish("trade.SOL_USDC", payload)
    """
    desc = _described(url)
    conn = desc.connection_kwargs()
    conn.update(kwargs)
    if desc.mode == "single":
        if desc.path is not None:
            conn.pop("ssl", None)
            return redis.Redis(unix_socket_path=desc.path, db=desc.db, **conn)
        host, port = desc.seeds[0]
        return redis.Redis(host=host, port=port, db=desc.db, **conn)
    if desc.mode == "sentinel":
        sentinel = _Sentinel(list(desc.seeds), sentinel_kwargs=desc.sentinel_kwargs(), **conn)
        # master_for is unannotated in redis-py: say what it returns.
        primary: redis.Redis = sentinel.master_for(
            _service(desc), db=desc.db, connection_pool_class=_FollowingPool
        )
        return primary
    nodes = [redis.cluster.ClusterNode(host, port) for host, port in desc.seeds]
    return redis.cluster.RedisCluster(startup_nodes=nodes, **conn)


def async_client(
    url: str | RedisURL,
    **kwargs: Any,  # Any: redis-py's options
) -> AsyncClient:
    """An asyncio redis-py client for ``url`` (``redis.asyncio.Redis``, the
    Sentinel primary's ``redis.asyncio.Redis`` from
    ``redis.asyncio.sentinel.Sentinel.master_for``, or
    ``redis.asyncio.cluster.RedisCluster``); see :func:`sync_client`::

        client = async_client("redis+cluster://127.0.0.1:7000")
        await client.spublish("trade.SOL_USDC", payload)
        await client.aclose()
    """
    desc = _described(url)
    conn = desc.connection_kwargs()
    conn.update(kwargs)
    if desc.mode == "single":
        if desc.path is not None:
            conn.pop("ssl", None)
            return redis.asyncio.Redis(unix_socket_path=desc.path, db=desc.db, **conn)
        host, port = desc.seeds[0]
        return redis.asyncio.Redis(host=host, port=port, db=desc.db, **conn)
    if desc.mode == "sentinel":
        sentinel = _AsyncSentinel(list(desc.seeds), sentinel_kwargs=desc.sentinel_kwargs(), **conn)
        # master_for is unannotated in redis-py: say what it returns.
        aprimary: redis.asyncio.Redis = sentinel.master_for(
            _service(desc), db=desc.db, connection_pool_class=_AsyncFollowingPool
        )
        return aprimary
    nodes = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in desc.seeds]
    return redis.asyncio.cluster.RedisCluster(startup_nodes=nodes, **conn)


def check_redis(url: str, timeout: float = 5.0) -> None:
    """Raise if Redis at ``url`` does not answer PING within ``timeout`` s.

    Used before forking workers or starting the feed, so a wrong URL fails
    at once with a clear message rather than in every worker::

        try:
            check_redis(url)
        except REDIS_ERRORS as exc:
            log.error("cannot reach Redis at %s: %s", redact_url(url), exc)

    A malformed URL raises ``ValueError``.
    """
    client = sync_client(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    finally:
        client.close()
