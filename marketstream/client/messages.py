"""What a client yields: one :class:`Message` per frame of a stream, of a
kind (:data:`MESSAGE`, :data:`SNAPSHOT` or :data:`GAP`).  No I/O.

>>> Message("trade.SOL_USDC", {"e": "trade", "p": "1.5"}, 42, MESSAGE, "...").seq
42
>>> is_snapshot_data({"e": "depthSnapshot", "u": 3, "b": [], "a": []})
True
"""

from typing import Any, NamedTuple

__all__ = ["Message", "MESSAGE", "SNAPSHOT", "GAP", "is_snapshot_data"]

MESSAGE = "message"
SNAPSHOT = "snapshot"
GAP = "gap"


class Message(NamedTuple):
    """One message of a stream.

    ``seq`` is the stream's position (None on plain streams and for gap
    notices); ``kind`` is ``"message"``, ``"snapshot"`` (the stream's state
    as of ``seq``: data whose ``e`` ends in ``Snapshot``, such as
    ``depthSnapshot``; streams whose snapshot is an ordinary message, such
    as tickers, get it as a ``"message"``) or ``"gap"`` (updates may have
    been missed: from the server, or noticed by the client;
    ``data["reason"]`` is a code for why -- the server's (see the README's
    "Gap notices"), or ``reconnected`` (a plain stream after a
    reconnection) and ``positions_missing`` (a position jumped) for those
    the client notices -- and ``data["msg"]`` says it in words);
    ``raw`` is the frame's text as received (for a gap the client noticed
    itself, a frame of the same shape as the server's gap notice).
    """

    stream: str
    data: Any  # the frame's "data" as ujson.loads gives it: any JSON value
    seq: int | None
    kind: str
    raw: str


def is_snapshot_data(data: object) -> bool:
    """Whether ``data`` is a stream's state (``e`` ends in ``Snapshot``)."""
    return isinstance(data, dict) and str(data.get("e", "")).endswith("Snapshot")
