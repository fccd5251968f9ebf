"""Recoverable publishing: every message gets a position, a history and
optionally a snapshot, in one atomic Redis call.

::

    from marketstream.publisher import Publisher, AsyncPublisher

    pub = Publisher("redis://127.0.0.1:6379/0", history=1000, ttl=3600)  # or Publisher(client)
    seq = pub.publish("trade.SOL_USDC", {"e": "trade", "p": "150.1", "q": "2"})  # -> position
    seq = pub.publish("ticker.SOL_USDC", ticker, snapshot=True)     # this message is the state
    seq = pub.publish("depth.SOL_USDC", diff, snapshot=book)        # the state after this diff
    seqs = pub.publish_many([("trade.SOL_USDC", t1, None), ("trade.SOL_USDC", t2, None)])
    pub.close()

    apub = AsyncPublisher("redis://127.0.0.1:6379/0")
    seq = await apub.publish("trade.SOL_USDC", '{"e":"trade"}')     # JSON text is sent verbatim
    await apub.aclose()

``data`` and ``snapshot`` may be dicts (encoded with ujson, compact, UTF-8
kept) or JSON text already encoded (``str`` or ``bytes``, passed through
verbatim); either must be one JSON object (strict RFC 8259, UTF-8: what
servers deliver), else ``ValueError``.  ``history`` is how many messages
Redis keeps per stream (exact, at most :data:`MAX_HISTORY`), ``ttl`` the
seconds after the last publish before a stream's keys expire (0: never, at
most :data:`MAX_TTL`).  On Redis Cluster (a ``RedisCluster`` client, or a ``redis+cluster://``
URL) messages go out with ``SPUBLISH`` (``sharded=`` overrides).

All the work is done by the Lua script ``marketstream/wire/recovery.lua``
(:data:`SCRIPT`; the format is :mod:`marketstream.wire.positions`), so
publishers in any language can do the same.  Load it once (``SCRIPT
LOAD``, which returns its SHA1) and call, for stream ``S``::

    EVALSHA <sha1> 3 {S}:seq {S}:log {S}:snap
            S <data-json> <history> <ttl> <snapmode> <snapdata-json> <pubcmd>

    snapmode  "" (no snapshot) | "self" (this message is the snapshot) | "data" (snapdata-json is)
    pubcmd    "publish" | "spublish" (Redis Cluster)

It replies with the position.  If the reply is a ``NOSCRIPT`` error (Redis
restarted, ``SCRIPT FLUSH``), ``SCRIPT LOAD`` again and retry the call.  The
script refuses (an error reply, nothing written) keys that are not exactly
``S``'s, a stream name it cannot use, and limits out of range.  On
channel ``S`` subscribers receive ``@<seq> {"stream":"S","data":<data-json>,"seq":<seq>}``.
Stream names may not contain whitespace, ``"``, ``\\``, ``{``, ``}`` or ``/``.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Generic, TypeVar

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import ujson
from redis.exceptions import NoScriptError, ResponseError

from marketstream.wire.payloads import is_json_object
from marketstream.wire.positions import (
    MAX_HISTORY,
    MAX_TTL,
    SCRIPT_PATH,
    check_stream_name,
    stream_keys,
)
from marketstream.upstream.clients import AsyncClient, Reply, SyncClient, async_client, sync_client

__all__ = [
    "AsyncPublisher",
    "Publisher",
    "SCRIPT",
    "SCRIPT_SHA",
    "encode_json",
    "script_call",
    "stream_keys",
    "check_stream_name",
    "MAX_HISTORY",
    "MAX_TTL",
]

SCRIPT: str = Path(SCRIPT_PATH).read_text(encoding="utf-8")
"""The text of ``recovery.lua``."""

SCRIPT_SHA: str = hashlib.sha1(SCRIPT.encode("utf-8")).hexdigest()
"""Its SHA1, as ``SCRIPT LOAD`` returns it."""

JSONInput = (
    str
    | bytes
    | bytearray
    | memoryview
    | Mapping[str, object]
    | Sequence[object]
    | int
    | float
    | bool
    | None
)
Message = tuple[str, JSONInput] | tuple[str, JSONInput, JSONInput]  # (stream, data[, snapshot])
#: ``(keys, args)`` of one call of the script.
ScriptCall = tuple[tuple[str, str, str], list[str | bytes | int]]


@functools.lru_cache(maxsize=65536)
def _checked_keys(stream: str) -> tuple[str, str, str]:
    return stream_keys(check_stream_name(stream))


def encode_json(value: JSONInput) -> str | bytes:
    """JSON text for ``value``: ``str``/``bytes`` are taken as JSON already.

    >>> encode_json({"p": "1.5", "s": "é/x"})
    '{"p":"1.5","s":"é/x"}'
    >>> encode_json('{"already":"json"}')
    '{"already":"json"}'
    """
    if isinstance(value, (str, bytes)):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False)


def script_call(
    stream: str,
    data: JSONInput,
    snapshot: JSONInput = None,
    history: int = 1000,
    ttl: int = 3600,
    sharded: bool = False,
) -> ScriptCall:
    """``(keys, args)`` of the script call publishing ``data`` on ``stream``.

    ``snapshot``: None/False (none), True (this message), or the snapshot's
    data (object or JSON text).
    """
    keys = _checked_keys(stream) if type(stream) is str else stream_keys(check_stream_name(stream))
    snapdata: str | bytes
    if snapshot is None or snapshot is False:
        mode, snapdata = "", ""
    elif snapshot is True:
        mode, snapdata = "self", ""
    else:
        mode, snapdata = "data", _json_object(snapshot, "snapshot")
    return keys, [
        stream,
        _json_object(data, "data"),
        history,
        ttl,
        mode,
        snapdata,
        "spublish" if sharded else "publish",
    ]


def _json_object(value: JSONInput, what: str) -> str | bytes:
    """:func:`encode_json` of ``value``, which must be one JSON object: a
    dict, or JSON text of one (checked as servers check it).

    >>> _json_object('{"p":"1.5"}', "data")
    '{"p":"1.5"}'
    >>> _json_object('{"p":1}, "stream": "other"', "data")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: data must be one JSON object ...
    """
    if isinstance(value, dict):
        return encode_json(value)
    text = encode_json(value) if isinstance(value, (str, bytes, bytearray, memoryview)) else None
    try:
        ok = text is not None and is_json_object(
            text.encode("utf-8") if isinstance(text, str) else text
        )
    except UnicodeEncodeError:
        ok = False
    if not ok or text is None:
        raise ValueError(
            "%s must be one JSON object (a dict, or its JSON text in UTF-8), "
            "not %.60r" % (what, value)
        )
    return text


def _check_limits(history: int, ttl: int) -> tuple[int, int]:
    for name, value, most in (("history", history, MAX_HISTORY), ("ttl", ttl, MAX_TTL)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
            raise ValueError("%s must be an integer from 0 to %d, not %r" % (name, most, value))
    return history, ttl


def _unpack(message: Message) -> tuple[str, JSONInput, JSONInput]:
    if len(message) == 2:
        return message[0], message[1], None
    stream, data, snapshot = message
    return stream, data, snapshot


_C = TypeVar("_C", SyncClient, AsyncClient)


class _Publishing(Generic[_C]):
    """What both publishers hold: the limits (checked), the client (made
    from a URL, and then theirs to close, or the one given) and whether
    they publish sharded (by default: on a Redis Cluster client)."""

    def __init__(
        self,
        url_or_client: str | _C,
        history: int,
        ttl: int,
        sharded: bool | None,
        connect: Callable[[str], _C],
        cluster: type[_C],
    ) -> None:
        self.history, self.ttl = _check_limits(history, ttl)
        self._owned = isinstance(url_or_client, str)
        self.client: _C = (
            connect(url_or_client) if isinstance(url_or_client, str) else url_or_client
        )
        self.sharded = bool(isinstance(self.client, cluster) if sharded is None else sharded)


class Publisher(_Publishing[SyncClient]):
    """Publishes recoverable messages through a synchronous redis-py client.

    ``url_or_client``: a URL (any form of ``REDIS_URL``: one server,
    Sentinel, Cluster; see :mod:`marketstream.upstream.urls`) or a ``redis.Redis`` /
    ``redis.cluster.RedisCluster``.  A client passed in is not closed by
    :meth:`close`.
    """

    def __init__(
        self,
        url_or_client: str | SyncClient,
        history: int = 1000,
        ttl: int = 3600,
        sharded: bool | None = None,
    ) -> None:
        super().__init__(
            url_or_client, history, ttl, sharded, sync_client, redis.cluster.RedisCluster
        )
        self._script = self.client.register_script(SCRIPT)

    def publish(self, stream: str, data: JSONInput, snapshot: JSONInput = None) -> int:
        """Publish ``data`` on ``stream``; returns its position."""
        keys, args = script_call(stream, data, snapshot, self.history, self.ttl, self.sharded)
        return int(self._script(keys=keys, args=args))

    def publish_many(self, messages: Iterable[Message]) -> list[int]:
        """Publish ``(stream, data[, snapshot])`` tuples in order, in one
        pipeline (one round trip); returns their positions."""
        calls = [
            script_call(*_unpack(m), history=self.history, ttl=self.ttl, sharded=self.sharded)
            for m in messages
        ]
        if not calls:
            return []
        results = self._run_pipeline(calls)
        if any(isinstance(r, NoScriptError) for r in results):
            # Redis lost its script cache (restart, SCRIPT FLUSH): the calls
            # that failed did nothing; load the script and run them again.
            self.client.script_load(SCRIPT)
            retry = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            for i, r in zip(retry, self._run_pipeline([calls[i] for i in retry])):
                results[i] = r
        return _positions(results)

    def _run_pipeline(self, calls: list[ScriptCall]) -> list[Reply]:
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", SCRIPT_SHA, 3, *keys, *args)
        return list(pipe.execute(raise_on_error=False))

    def close(self) -> None:
        """Close the client if this publisher created it."""
        if self._owned:
            self.client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPublisher(_Publishing[AsyncClient]):
    """:class:`Publisher` for asyncio (``redis.asyncio`` clients)::

    async with AsyncPublisher("redis://127.0.0.1:6379/0", history=500) as pub:
        seq = await pub.publish("trade.SOL_USDC", {"e": "trade"})
    """

    def __init__(
        self,
        url_or_client: str | AsyncClient,
        history: int = 1000,
        ttl: int = 3600,
        sharded: bool | None = None,
    ) -> None:
        super().__init__(
            url_or_client, history, ttl, sharded, async_client, redis.asyncio.cluster.RedisCluster
        )
        self._script = self.client.register_script(SCRIPT)

    async def publish(self, stream: str, data: JSONInput, snapshot: JSONInput = None) -> int:
        """Publish ``data`` on ``stream``; returns its position."""
        keys, args = script_call(stream, data, snapshot, self.history, self.ttl, self.sharded)
        return int(await self._script(keys=keys, args=args))

    async def publish_many(self, messages: Iterable[Message]) -> list[int]:
        """Like :meth:`Publisher.publish_many`."""
        calls = [
            script_call(*_unpack(m), history=self.history, ttl=self.ttl, sharded=self.sharded)
            for m in messages
        ]
        if not calls:
            return []
        results = await self._run_pipeline(calls)
        if any(isinstance(r, NoScriptError) for r in results):
            await self.client.script_load(SCRIPT)
            retry = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            for i, r in zip(retry, await self._run_pipeline([calls[i] for i in retry])):
                results[i] = r
        return _positions(results)

    async def _run_pipeline(self, calls: list[ScriptCall]) -> list[Reply]:
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", SCRIPT_SHA, 3, *keys, *args)
        return list(await pipe.execute(raise_on_error=False))

    async def aclose(self) -> None:
        """Close the client if this publisher created it."""
        if self._owned:
            await self.client.aclose()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _positions(results: list[Reply]) -> list[int]:
    for result in results:
        if isinstance(result, Exception):
            raise result if isinstance(result, ResponseError) else ResponseError(str(result))
    return [int(r) for r in results]
