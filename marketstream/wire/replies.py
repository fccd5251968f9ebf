"""What the server says to a client besides market data: replies to
requests (Binance-style, with acknowledgements on) and gap notices.

>>> encode_result(1)
'{"result":null,"id":1}'
>>> encode_error(2, 2, "unknown method")
'{"error":{"code":2,"msg":"unknown method"},"id":2}'
>>> import json
>>> json.loads(gap_notice("trade.SOL_USDC", 1.5, "history_trimmed"))["data"]["reason"]
'history_trimmed'
"""

import time

import ujson

from marketstream.wire.requests import ERROR_INVALID_REQUEST, RequestId
from marketstream.wire.streams import MAX_STREAM_NAME

__all__ = [
    "encode_result",
    "encode_error",
    "encode_outcome",
    "MAX_REFUSALS_LISTED",
    "gap_notice",
    "GAP_REASONS",
]


def encode_result(request_id: RequestId, result: object = None) -> str:
    """``{"result": ..., "id": n}``, as text."""
    return ujson.dumps({"result": result, "id": request_id})


def encode_error(request_id: RequestId, code: int, msg: str) -> str:
    """``{"error": {"code": c, "msg": "..."}, "id": n}``, as text."""
    return ujson.dumps({"error": {"code": code, "msg": msg}, "id": request_id})


#: Most refused streams a reply names one by one (a request is bounded by
#: ``[limits] max_frame_bytes``; its reply stays a few kilobytes).
MAX_REFUSALS_LISTED = 100


def encode_outcome(
    request_id: RequestId,
    accepted_key: str,
    accepted: list[str],
    refused: list[tuple[str, str]],
    problems: list[str],
) -> str:
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
    error: dict[str, object] = {
        "code": ERROR_INVALID_REQUEST,
        "msg": "; ".join(texts),
        accepted_key: accepted,
    }
    if refused:
        listed = refused[:MAX_REFUSALS_LISTED]
        error["refused"] = {name[:MAX_STREAM_NAME]: reason for name, reason in listed}
        if len(refused) > len(listed):
            error["refused_more"] = len(refused) - len(listed)
    return ujson.dumps({"error": error, "id": request_id}, escape_forward_slashes=False)


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
    "history_lost": "the stream's history is gone (expired, or lost by Redis); updates were missed",
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
    "slow_reader": "the connection read too slowly: its book updates were skipped until it "
    "caught up; a fresh snapshot follows",
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
        {
            "stream": stream,
            "data": {
                "e": "gap",
                "s": market,
                "E": now_us,
                "reason": reason,
                "msg": GAP_REASONS[reason],
            },
        }
    ).encode()
