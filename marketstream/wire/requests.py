"""Client requests, without any I/O: parsing and validating client frames,
the ``/stream?streams=...`` query, stream-name rules, and the token bucket
that bounds a client's rate.

Client frames are JSON objects::

    {"method": "SUBSCRIBE", "params": ["trade.SOL_USDC", "depth.BTC_USDT"], "id": 1}

>>> parse_request('{"method":"SUBSCRIBE","params":["trade.SOL_USDC"],"id":1}')[:3]
('SUBSCRIBE', ('trade.SOL_USDC',), 1)
>>> parse_request('{"method":"SUBSCRIBE","params":["trade.SOL_USDC"],'
...               '"since":{"trade.SOL_USDC":1042}}').since
{'trade.SOL_USDC': 1042}
>>> parse_request('hello').reason
'invalid JSON'
>>> StreamRules().check("trade.SOL_USDC") is None
True
"""

import math
import re
from collections.abc import Iterable
from typing import NamedTuple, Protocol

import ujson

from marketstream.wire.positions import MAX_POSITION

__all__ = [
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "LIST_SUBSCRIPTIONS",
    "AUTH",
    "METHODS",
    "ERROR_INVALID_REQUEST",
    "ERROR_INVALID_JSON",
    "MAX_STREAM_NAME",
    "RequestId",
    "Request",
    "Invalid",
    "parse_request",
    "parse_stream_query",
    "StreamRules",
    "take_token",
]

SUBSCRIBE = "SUBSCRIBE"
UNSUBSCRIBE = "UNSUBSCRIBE"
LIST_SUBSCRIPTIONS = "LIST_SUBSCRIPTIONS"
#: ``{"method":"AUTH","params":["<jwt>"],"id":n}``: authenticate, or refresh
#: the token (see marketstream.server.auth).
AUTH = "AUTH"
METHODS = frozenset((SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS, AUTH))

# Binance's error codes for replies (sent only when acknowledgements are on).
ERROR_INVALID_REQUEST = 2
ERROR_INVALID_JSON = 3

MAX_STREAM_NAME = 200

#: A request id as echoed in replies: JSON null, a string or a finite number.
RequestId = int | float | str | None
#: Why a part of a request was ignored: (cause, text).
Problem = tuple[str, str]


class Request(NamedTuple):
    """A valid client request.

    ``since`` maps streams to the position to resume after; ``snapshot`` is
    True (every stream), a tuple of streams, or None (the configured
    default); ``problems`` says which parts of ``since``/``snapshot`` were
    ignored, as (cause, text) pairs with cause ``bad_since`` or
    ``bad_snapshot``.
    """

    method: str
    params: tuple[str, ...]
    id: RequestId
    since: dict[str, int] | None = None
    snapshot: bool | tuple[str, ...] | None = None
    problems: tuple[Problem, ...] = ()
    #: ``"acks": true`` turns acknowledgements on for the connection (None: not given).
    acks: bool | None = None


class Invalid(NamedTuple):
    """A frame that is not a valid request: why, the error code to reply
    with when acknowledgements are on, and the request id if one was found."""

    reason: str
    code: int = ERROR_INVALID_REQUEST
    id: RequestId = None


def _valid_id(value: object) -> bool:
    """An id we can echo in valid JSON: null, a string, or a finite number."""
    if value is None or isinstance(value, str):
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    return isinstance(value, float) and math.isfinite(value)


def parse_request(frame: str | bytes) -> Request | Invalid:
    """Parse one client frame (``str`` for text, ``bytes`` for binary).

    Returns a :class:`Request`, or an :class:`Invalid` saying why not.
    Never raises.
    """
    if not isinstance(frame, str):
        return Invalid("binary frame", ERROR_INVALID_JSON)
    try:
        message = ujson.loads(frame)
    except (ValueError, OverflowError):
        return Invalid("invalid JSON", ERROR_INVALID_JSON)
    if not isinstance(message, dict):
        return Invalid("not a JSON object")
    # A request without an id is served like "id": null (Backpack's SDK
    # sends none); an id that cannot be echoed as JSON is refused.
    request_id = message.get("id")
    if not _valid_id(request_id):
        return Invalid("invalid id")
    method = message.get("method")
    if not isinstance(method, str):
        return Invalid("missing or invalid method", id=request_id)
    if method not in METHODS:
        return Invalid("unknown method %.40r" % method, id=request_id)
    params = message.get("params", [] if method == LIST_SUBSCRIPTIONS else None)
    if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
        return Invalid("params must be an array of strings", id=request_id)
    if method != LIST_SUBSCRIPTIONS and not params:
        return Invalid("params must not be empty", id=request_id)
    acks = message.get("acks")
    if acks is not None and not isinstance(acks, bool):
        return Invalid("acks must be true or false", id=request_id)
    if method != SUBSCRIBE or ("since" not in message and "snapshot" not in message):
        return Request(method, tuple(params), request_id, acks=acks)
    problems: list[Problem] = []
    since = _parse_since(message.get("since"), problems)
    snapshot = _parse_snapshot(message.get("snapshot"), problems)
    return Request(method, tuple(params), request_id, since, snapshot, tuple(problems), acks)


def _position(value: object) -> int | None:
    """``value`` as a position, or None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_POSITION else None


def _parse_since(value: object, problems: list[Problem]) -> dict[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.append(("bad_since", "since must be an object of stream: position"))
        return None
    since: dict[str, int] = {}
    for stream, position in value.items():
        checked = _position(position)
        if checked is None:
            problems.append(
                (
                    "bad_since",
                    "since %.100s: not a position (an integer "
                    "0..2^53-1): %.40r" % (stream, position),
                )
            )
        else:
            since[stream] = checked
    return since or None


def _parse_snapshot(value: object, problems: list[Problem]) -> bool | tuple[str, ...] | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    problems.append(("bad_snapshot", "snapshot must be true, false or a list of streams"))
    return None


def parse_stream_query(streams: str, since: str = "", snapshot: str = "") -> Request:
    """The subscribe request of a ``/stream?streams=a/b&since=a:1042&snapshot=1``
    URL, from its (already decoded) query values.

    >>> r = parse_stream_query("trade.A_B/depth.A_B", "trade.A_B:1042", "1")
    >>> r.params, r.since, r.snapshot
    (('trade.A_B', 'depth.A_B'), {'trade.A_B': 1042}, True)
    >>> parse_stream_query("trade.A_B", "trade.A_B:-1").problems[0][0]
    'bad_since'
    """
    names = tuple(name for name in streams.split("/") if name)
    problems: list[Problem] = []
    positions: dict[str, int] = {}
    for item in since.split(","):
        if not item:
            continue
        stream, sep, text = item.rpartition(":")
        position = _position(int(text)) if sep and text.isdigit() and len(text) < 20 else None
        if position is None or not stream:
            problems.append(("bad_since", "since %.100s: not stream:position" % item))
        else:
            positions[stream] = position
    flag: bool | None = None
    if snapshot:
        flag = snapshot.lower() in ("1", "true", "yes")
        if not flag and snapshot.lower() not in ("0", "false", "no"):
            problems.append(("bad_snapshot", "snapshot must be 1 or 0"))
            flag = None
    return Request(SUBSCRIBE, names, None, positions or None, flag, tuple(problems))


class RuleSettings(Protocol):
    """What :meth:`StreamRules.from_settings` reads (the ``[protocol]`` section)."""

    @property
    def stream_types(self) -> tuple[str, ...]: ...

    @property
    def markets(self) -> tuple[str, ...]: ...

    @property
    def market_pattern(self) -> re.Pattern[str]: ...


_MIDDLE_PART = re.compile(r"[A-Za-z0-9]+")
#: Stream names a :class:`StreamRules` remembers as accepted, at most.
ACCEPTED_CACHE = 65536


class StreamRules:
    """Which stream names may be subscribed.

    A name is ``<type>.<MARKET>`` with optional middle parts
    (``kline.1m.SOL_USDC``, ``depth.200ms.SOL_USDC``).  ``types`` is an
    allow-list of stream types; ``markets`` an allow-list of markets, or empty
    to accept any market matching ``market_pattern``.

    >>> StreamRules().refusal("trades.BTC_USDT")[1]
    "unknown stream type 'trades' (allowed: depth, trade, ticker, bookTicker, kline)"
    >>> StreamRules().refusal("btcusdt@trade")[0]
    'invalid_name'
    """

    #: Why a name is refused (the ``cause`` of :meth:`refusal`), as counted
    #: in ``marketstream_rejected_streams_total``.
    CAUSES = ("invalid_name", "unknown_type", "unknown_market")

    def __init__(
        self,
        types: Iterable[str] = ("depth", "trade", "ticker", "bookTicker", "kline"),
        markets: Iterable[str] = (),
        market_pattern: str | re.Pattern[str] = r"^[A-Z0-9]+_[A-Z0-9]+$",
    ) -> None:
        types = tuple(types)
        self.types = frozenset(types)
        self.markets = frozenset(markets)
        self.market_pattern = (
            re.compile(market_pattern) if isinstance(market_pattern, str) else market_pattern
        )
        self._allowed_types = ", ".join(dict.fromkeys(types))
        # Names accepted before (at most ACCEPTED_CACHE): a client that
        # subscribes the same 1024 streams again and again costs a set
        # lookup per name, not a parse.
        self._accepted: set[str] = set()

    @classmethod
    def from_settings(cls, protocol: "RuleSettings") -> "StreamRules":
        """The rules of the ``[protocol]`` settings section
        (:class:`marketstream.server.config.ProtocolSettings`)."""
        return cls(protocol.stream_types, protocol.markets, protocol.market_pattern)

    def check(self, name: str) -> str | None:
        """None if ``name`` is an acceptable stream, else the reason it is not."""
        refusal = self.refusal(name)
        return None if refusal is None else refusal[1]

    def refusal(self, name: str) -> tuple[str, str] | None:
        """None if ``name`` is an acceptable stream, else ``(cause, reason)``:
        the cause one of :attr:`CAUSES`, the reason a sentence for the client."""
        if name in self._accepted:
            return None
        if not name or len(name) > MAX_STREAM_NAME:
            return "invalid_name", "invalid stream name (1 to %d characters)" % MAX_STREAM_NAME
        parts = name.split(".")
        if len(parts) < 2:
            return "invalid_name", "stream name must be <type>.<MARKET>, e.g. trade.BTC_USDT"
        if parts[0] not in self.types:
            return "unknown_type", "unknown stream type %r (allowed: %s)" % (
                parts[0],
                self._allowed_types,
            )
        market = parts[-1]
        if self.markets:
            if market not in self.markets:
                return "unknown_market", "unknown market %r" % market
        elif not self.market_pattern.fullmatch(market):
            return "unknown_market", "invalid market %r (must match %s)" % (
                market,
                self.market_pattern.pattern,
            )
        for middle in parts[1:-1]:
            if not _MIDDLE_PART.fullmatch(middle):
                return "invalid_name", "invalid stream name"
        if len(self._accepted) >= ACCEPTED_CACHE:
            self._accepted.clear()
        self._accepted.add(name)
        return None


def take_token(
    tokens: float, last: float, now: float, rate: float, burst: float
) -> tuple[bool, float]:
    """Token bucket step: ``(allowed, tokens)`` after one message at ``now``.

    ``tokens`` and ``last`` are the bucket's level and the time it was last
    updated; it refills at ``rate`` per second up to ``burst``.

    >>> take_token(1.0, 0.0, 0.0, rate=10, burst=5)
    (True, 0.0)
    >>> take_token(0.0, 0.0, 0.05, rate=10, burst=5)
    (False, 0.5)
    """
    tokens = min(float(burst), tokens + (now - last) * rate)
    if tokens >= 1.0:
        return True, tokens - 1.0
    return False, tokens
