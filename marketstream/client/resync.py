"""Starting one stream over on an open connection, without any I/O.

After a :class:`~marketstream.client.book.BookGap` (an update missing, or a
checksum that does not match), a book stream starts over from its snapshot:
the client unsubscribes and subscribes again asking for the snapshot, on
the same connection, and drops the frames of that stream still in flight
until its snapshot (or a top-N frame, or a gap notice) arrives; the other
streams go on.

>>> resyncs = Resyncs()
>>> ids = iter(range(7, 100))
>>> for text in resyncs.start("depth.A_B", lambda: next(ids)):
...     print(text)
{"method":"UNSUBSCRIBE","params":["depth.A_B"],"id":7}
{"method":"SUBSCRIBE","params":["depth.A_B"],"id":8,"snapshot":["depth.A_B"]}
>>> resyncs.drops("depth.A_B", {"e": "depth", "U": 5, "u": 5})   # in flight
True
>>> resyncs.drops("depth.C_D", {"e": "depth", "U": 9, "u": 9})   # another stream
False
>>> resyncs.drops("depth.A_B", {"e": "depthSnapshot", "u": 7})   # the snapshot
False
>>> resyncs.drops("depth.A_B", {"e": "depth", "U": 8, "u": 8})   # live again
False

Frames of derived streams skip positions (a top-N frame or a merged diff
carries the position of the last diff it covers), so a jump there is not
a gap: :func:`positions_skip`.

>>> positions_skip("depth10.A_B"), positions_skip("depth.A_B@100ms"), positions_skip("depth.A_B")
(True, True, False)
"""

from collections.abc import Callable
from typing import Any

import ujson

from marketstream.client.messages import is_snapshot_data
from marketstream.wire.books import DEPTH_TOP
from marketstream.wire.derived import DerivedRules

__all__ = ["Resyncs", "positions_skip"]

_DERIVED = DerivedRules()


def positions_skip(stream: str) -> bool:
    """Whether ``stream`` is a derived stream, whose positions skip."""
    return _DERIVED.parse(stream) is not None


class Resyncs:
    """The streams being started over on the current connection."""

    def __init__(self) -> None:
        self._streams: set[str] = set()

    def start(self, stream: str, next_id: Callable[[], int]) -> list[str]:
        """Start ``stream`` over: the requests to send, in order (ids from
        ``next_id``); its frames are dropped until its snapshot comes."""
        self._streams.add(stream)
        unsubscribe = {"method": "UNSUBSCRIBE", "params": [stream], "id": next_id()}
        subscribe = {
            "method": "SUBSCRIBE",
            "params": [stream],
            "id": next_id(),
            "snapshot": [stream],
        }
        return [
            ujson.dumps(request, escape_forward_slashes=False)
            for request in (unsubscribe, subscribe)
        ]

    def drops(self, stream: str, data: Any) -> bool:
        """Whether a frame of ``stream`` with ``data`` is dropped: it was sent
        before the snapshot of a resync.  The snapshot, a top-N frame or a
        gap notice ends the resync of its stream."""
        if stream not in self._streams:
            return False
        if is_snapshot_data(data) or (
            isinstance(data, dict) and data.get("e") in (DEPTH_TOP, "gap")
        ):
            self._streams.discard(stream)
            return False
        return True

    def clear(self) -> None:
        """A new connection: what it subscribes comes fresh (the client asks
        for the snapshot of every stream it was starting over)."""
        self._streams.clear()
