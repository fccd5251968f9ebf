"""Recoverable publishing (the public name): every message gets a position,
a history and optionally a snapshot, in one atomic Redis call.

The code lives in :mod:`marketstream.upstream.publisher`; this module keeps
``from marketstream.publisher import Publisher, AsyncPublisher`` working::

    from marketstream.publisher import Publisher

    pub = Publisher("redis://127.0.0.1:6379/0", history=1000, ttl=3600)
    seq = pub.publish("trade.SOL_USDC", {"e": "trade", "p": "150.1", "q": "2"})
"""

from marketstream.upstream.publisher import (
    MAX_HISTORY,
    MAX_TTL,
    SCRIPT,
    SCRIPT_SHA,
    AsyncPublisher,
    Publisher,
    check_stream_name,
    encode_json,
    script_call,
    stream_keys,
)

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
