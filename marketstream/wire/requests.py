"""Client requests, without any I/O: parsing and validating client frames
and the ``/stream?streams=...`` query.  (Which stream names may be
subscribed is :mod:`~marketstream.wire.streams`; the token bucket that
bounds a client's rate, :mod:`~marketstream.wire.rates`: both are
re-exported here.)

Client frames are JSON objects::

    {"method": "SUBSCRIBE", "params": ["trade.SOL_USDC", "depth.BTC_USDT"], "id": 1}

>>> parse_request('{"method":"SUBSCRIBE","params":["trade.SOL_USDC"],"id":1}')[:3]
('SUBSCRIBE', ('trade.SOL_USDC',), 1)
>>> parse_request('{"method":"SUBSCRIBE","params":["trade.SOL_USDC"],'
...               '"since":{"trade.SOL_USDC":1042}}').since
{'trade.SOL_USDC': 1042}
>>> parse_request('hello').reason
'invalid JSON'
"""

import math
from typing import NamedTuple

import ujson

from marketstream.wire.positions import MAX_POSITION
from marketstream.wire.rates import take_token
from marketstream.wire.streams import MAX_STREAM_NAME, StreamRules

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
