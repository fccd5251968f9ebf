"""The marketstream wire protocol, without any I/O.

Everything that decides what bytes mean lives here, so it can be tested
directly: parsing and validating client frames, stream-name rules, and
encoding of server frames (down to the WebSocket frame header used by the
fan-out, which builds a frame once and shares it between subscribers).

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
>>> wrap_data(b"trade.SOL_USDC", b'{"e":"trade"}')
b'{"stream":"trade.SOL_USDC","data":{"e":"trade"}}'
"""

import json
import math
import re
import struct
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple, NoReturn

import orjson
import ujson

if TYPE_CHECKING:
    from marketstream.config import ProtocolSettings

__all__ = [
    "SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "METHODS",
    "ERROR_INVALID_REQUEST", "ERROR_INVALID_JSON",
    "Request", "Invalid", "parse_request", "parse_stream_query", "StreamRules", "MAX_POSITION",
    "encode_result", "encode_error", "encode_outcome", "wrap_data", "is_json_object",
    "gap_notice", "GAP_REASONS", "text_frame", "take_token",
    "MALFORMED", "WRONG_STREAM", "envelope_problem", "frame_problem",
]

SUBSCRIBE = "SUBSCRIBE"
UNSUBSCRIBE = "UNSUBSCRIBE"
LIST_SUBSCRIPTIONS = "LIST_SUBSCRIPTIONS"
METHODS = frozenset((SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS))

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
        return -2 ** 63 <= value < 2 ** 64
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


#: Positions are below 2^53 (exact in JavaScript).
MAX_POSITION = 2 ** 53 - 1


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
            problems.append(("bad_since", "since %.100s: not a position (an integer "
                             "0..2^53-1): %.40r" % (stream, position)))
        else:
            since[stream] = checked
    return since or None


def _parse_snapshot(value: object,
                    problems: list[Problem]) -> bool | tuple[str, ...] | None:
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

    def __init__(self,
                 types: Iterable[str] = ("depth", "trade", "ticker", "bookTicker", "kline"),
                 markets: Iterable[str] = (),
                 market_pattern: str | re.Pattern[str] = r"^[A-Z0-9]+_[A-Z0-9]+$") -> None:
        types = tuple(types)
        self.types = frozenset(types)
        self.markets = frozenset(markets)
        self.market_pattern = (re.compile(market_pattern) if isinstance(market_pattern, str)
                               else market_pattern)
        self._allowed_types = ", ".join(dict.fromkeys(types))
        # Names accepted before (at most ACCEPTED_CACHE): a client that
        # subscribes the same 1024 streams again and again costs a set
        # lookup per name, not a parse.
        self._accepted: set[str] = set()

    @classmethod
    def from_settings(cls, protocol: "ProtocolSettings") -> "StreamRules":
        """The rules of the ``[protocol]`` settings section."""
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
                parts[0], self._allowed_types)
        market = parts[-1]
        if self.markets:
            if market not in self.markets:
                return "unknown_market", "unknown market %r" % market
        elif not self.market_pattern.fullmatch(market):
            return "unknown_market", "invalid market %r (must match %s)" % (
                market, self.market_pattern.pattern)
        for middle in parts[1:-1]:
            if not _MIDDLE_PART.fullmatch(middle):
                return "invalid_name", "invalid stream name"
        if len(self._accepted) >= ACCEPTED_CACHE:
            self._accepted.clear()
        self._accepted.add(name)
        return None


# --- server frames -----------------------------------------------------------

def encode_result(request_id: RequestId, result: object = None) -> str:
    """``{"result": ..., "id": n}``, as text."""
    return ujson.dumps({"result": result, "id": request_id})


def encode_error(request_id: RequestId, code: int, msg: str) -> str:
    """``{"error": {"code": c, "msg": "..."}, "id": n}``, as text."""
    return ujson.dumps({"error": {"code": code, "msg": msg}, "id": request_id})


#: Most refused streams a reply names one by one (a request is bounded by
#: ``[limits] max_frame_bytes``; its reply stays a few kilobytes).
MAX_REFUSALS_LISTED = 100


def encode_outcome(request_id: RequestId, accepted_key: str, accepted: list[str],
                   refused: list[tuple[str, str]], problems: list[str]) -> str:
    """The acknowledgement of a SUBSCRIBE or UNSUBSCRIBE, as text.

    Everything done as asked: ``{"result": null, "id": n}`` (Binance's
    reply).  Else an error (code 2) whose ``msg`` says what went wrong and
    which also says, for clients that read it, which streams were carried
    out (under ``accepted_key``: ``subscribed`` or ``unsubscribed``) and
    which were refused, with the reason of each (``refused``: name ->
    reason; at most :data:`MAX_REFUSALS_LISTED`, then ``refused_more``
    counts the rest):

    >>> encode_outcome(1, "subscribed", ["trade.A_B"], [], [])
    '{"result":null,"id":1}'
    >>> import json
    >>> json.loads(encode_outcome(2, "subscribed", ["trade.A_B"],  # doctest: +NORMALIZE_WHITESPACE
    ...                           [("trades.A_B", "unknown stream type 'trades'")], []))["error"]
    {'code': 2, 'msg': "trades.A_B: unknown stream type 'trades'",
     'subscribed': ['trade.A_B'], 'refused': {'trades.A_B': "unknown stream type 'trades'"}}
    """
    if not refused and not problems:
        return encode_result(request_id)
    texts = ["%s: %s" % (name[:100], reason) for name, reason in refused[:10]]
    if len(refused) > 10:
        texts.append("%d more streams refused" % (len(refused) - 10))
    texts.extend(problems[:10])
    error: dict[str, object] = {"code": ERROR_INVALID_REQUEST, "msg": "; ".join(texts),
                                accepted_key: accepted}
    if refused:
        listed = refused[:MAX_REFUSALS_LISTED]
        error["refused"] = {name[:MAX_STREAM_NAME]: reason for name, reason in listed}
        if len(refused) > len(listed):
            error["refused_more"] = len(refused) - len(listed)
    return ujson.dumps({"error": error, "id": request_id}, escape_forward_slashes=False)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError("not JSON: %s" % name)


# The standard library's C decoder is strict RFC 8259 once NaN and Infinity
# are refused (ujson also takes leading zeros and "1."): it is the judge.
_STRICT = json.JSONDecoder(parse_constant=_reject_constant)


def is_json_object(payload: bytes) -> bool:
    """True if ``payload`` (bytes) is one JSON object (strict RFC 8259, UTF-8).

    Every plain payload from Redis goes through here.  orjson reads a
    150-byte payload in ~0.5 us against ~1.6 us for the standard library,
    and whatever it accepts the standard library accepts too; it refuses
    a few things the standard library takes (a lone surrogate escape, a
    number beyond a double's range), so its refusals go to the standard
    library, whose verdict stands (a test checks both agree).
    """
    try:
        return type(orjson.loads(payload)) is dict
    except ValueError:  # orjson.JSONDecodeError
        pass
    try:
        return isinstance(_STRICT.decode(payload.decode("utf-8")), dict)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False


#: Why a payload from Redis is dropped: not one JSON object (strict, UTF-8)
#: or not the shape the recovery script writes ...
MALFORMED = "malformed_payload"
#: ... or its top-level ``"stream"`` is not the channel it came on (missing,
#: another stream, or twice: a browser's ``JSON.parse`` takes the last one,
#: so the frame would land on another stream).
WRONG_STREAM = "wrong_stream"

_STREAM_KEY = b'"stream"'
_FRAME_HEAD = b'{"stream":"'
_FRAME_DATA = b'","data":'


def _top_level_pairs(pairs: list[tuple[str, object]]) -> list[tuple[str, object]]:
    return pairs


# The strict decoder again, keeping every key of an object (duplicates too).
_PAIRS = json.JSONDecoder(object_pairs_hook=_top_level_pairs, parse_constant=_reject_constant)


def envelope_problem(stream: str, payload: bytes) -> str | None:
    """None if ``payload`` is a complete client message for ``stream``: one
    JSON object (strict RFC 8259, UTF-8, as :func:`is_json_object` judges)
    with exactly one top-level ``"stream"``, equal to ``stream``; else
    :data:`MALFORMED` or :data:`WRONG_STREAM`.

    >>> envelope_problem("trade.A_B", b'{"stream":"trade.A_B","data":{}}') is None
    True
    >>> envelope_problem("trade.A_B", b'{"stream":"trade.C_D","data":{}}')
    'wrong_stream'
    >>> envelope_problem("trade.A_B", b'{"stream":"trade.C_D","data":{},"stream":"trade.A_B"}')
    'wrong_stream'

    The parse that :func:`is_json_object` does anyway finds the stream
    (the last one, as ``JSON.parse`` does); a payload that holds
    ``"stream"`` more than once is read again, key by key, and refused if
    it has a second top-level one.  (A second one spelled with escapes,
    ``"str\\u0065am"``, is not looked for: it is refused when it comes
    last, the one browsers and most parsers take.)
    """
    try:
        message = orjson.loads(payload)
    except ValueError:  # orjson.JSONDecodeError: the standard library judges
        if not is_json_object(payload):
            return MALFORMED
        message = _STRICT.decode(payload.decode("utf-8"))
    if type(message) is not dict:
        return MALFORMED
    if message.get("stream") != stream:
        return WRONG_STREAM
    if payload.count(_STREAM_KEY) != 1:
        try:
            keys = [key for key, _ in _PAIRS.decode(payload.decode("utf-8"))]
        except (ValueError, RecursionError):
            return MALFORMED
        if keys.count("stream") != 1:
            return WRONG_STREAM
    return None


def frame_problem(channel: bytes, seq: int, frame: bytes) -> str | None:
    """None if ``frame`` is what the recovery script publishes at position
    ``seq`` on ``channel``: ``{"stream":"<channel>","data":<object>,"seq":<seq>}``
    with ``<object>`` one JSON object (strict, UTF-8) and ``seq`` at most
    :data:`MAX_POSITION`; else :data:`MALFORMED` or :data:`WRONG_STREAM`.

    >>> frame_problem(b"t.A_B", 7, b'{"stream":"t.A_B","data":{"p":"1"},"seq":7}') is None
    True
    >>> frame_problem(b"t.A_B", 7, b'{"stream":"t.A_B","data":{},"stream":"t.C_D","seq":7}')
    'malformed_payload'
    >>> frame_problem(b"t.A_B", 7, b'{"stream":"t.C_D","data":{},"seq":7}')
    'wrong_stream'

    The stream, the position and the frame's shape are byte comparisons;
    only the data is parsed (the check a plain payload gets), so a frame
    that passes is one JSON object whose only ``"stream"`` is ``channel``.
    """
    head = _FRAME_HEAD + channel + _FRAME_DATA
    tail = b',"seq":%d}' % seq
    if frame.startswith(head) and frame.endswith(tail) and seq <= MAX_POSITION:
        if is_json_object(frame[len(head):len(frame) - len(tail)]):
            return None
        return MALFORMED
    if frame.startswith(_FRAME_HEAD) and not frame.startswith(channel + b'"', 11):
        return WRONG_STREAM
    return MALFORMED


def wrap_data(stream: bytes, payload: bytes) -> bytes:
    """``{"stream":"<stream>","data":<payload>}`` from bytes, without re-encoding."""
    return b'{"stream":"' + stream + b'","data":' + payload + b"}"


#: The ``data.reason`` codes of gap notices, with the ``data.msg`` each
#: carries (the README lists them too).
GAP_REASONS = {
    # Plain streams (no positions): what was published meanwhile is gone.
    "link_outage": "the server's Redis connection was lost and restored; "
                   "updates published meanwhile were missed",
    "shard_interrupted": "the stream's Redis Cluster shard was cut off (slot moved, failover "
                         "or lost link) and the stream subscribed again; updates published "
                         "meanwhile were missed",
    # Recoverable streams: what the history could not give back.
    "history_lost": "the stream's history is gone (expired, or lost by Redis); "
                    "updates were missed",
    "history_trimmed": "the stream's history no longer reaches back to the position asked for; "
                       "updates were missed",
    "max_replay": "the position asked for is further behind than the server replays "
                  "([recovery] max_replay); updates were missed",
    "replay_too_large": "what was missed since the position asked for is more than the "
                        "connection may be sent at once (half of [limits] max_buffer_bytes); "
                        "updates were missed",
    "snapshot_too_large": "the stream's snapshot is more than the connection may be sent at "
                          "once (half of [limits] max_buffer_bytes); subscribe to it alone",
    "since_ahead": "the position asked for is ahead of the stream's latest: positions "
                   "started over (a Redis failover lost writes) or come from another history",
    "lost_writes": "the stream's positions went back (a Redis failover lost its latest writes); "
                   "positions start over",
}


def gap_notice(stream: str, now: float | None = None, reason: str = "link_outage") -> bytes:
    """The message that tells a stream's listeners updates may have been
    missed: ``data.reason`` is one of :data:`GAP_REASONS`, ``data.msg``
    says it in words.

    >>> import json
    >>> json.loads(gap_notice("trade.SOL_USDC", 1.5, "history_trimmed"))["data"]["reason"]
    'history_trimmed'
    """
    now_us = int((time.time() if now is None else now) * 1_000_000)
    market = stream.rsplit(".", 1)[-1]
    return ujson.dumps(
        {"stream": stream, "data": {"e": "gap", "s": market, "E": now_us, "reason": reason,
                                    "msg": GAP_REASONS[reason]}}
    ).encode()


def text_frame(payload: bytes) -> bytes:
    """A complete, unmasked, final WebSocket text frame (RFC 6455 5.2) for
    ``payload`` (UTF-8 bytes).

    A server frame without compression is the same bytes for every recipient,
    so the fan-out builds it once per message and writes it to many sockets.
    """
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x81, 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 127, length)
    return header + payload


def take_token(tokens: float, last: float, now: float, rate: float,
               burst: float) -> tuple[bool, float]:
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
