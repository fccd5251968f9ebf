"""Compressing listeners, kept apart: each message deflated once for all.

The :class:`~marketstream.fanout.core.Core` delivers a message as one frame
shared by every listener.  Clients that negotiated permessage-deflate
(:mod:`marketstream.wire.deflate`) get a second frame, deflated once per
message and shared the same way; plain clients get the plain frame::

    compressing = Compressing(Deflater(min_bytes=512), counters)
    compressing.add(conn)                         # it negotiated compression
    kinds = compressing.kinds("depth.X", listeners)
    if kinds is None:                             # no compressing listener
        ...                                       # the plain frame to all
    else:
        plain, deflating = kinds                  # two dicts, each looped tightly
        frame = compressing.frame(payload, text_frame(payload))

:meth:`Compressing.kinds` splits a stream's listeners once and keeps the
split until the core says the stream's listeners changed
(:meth:`Compressing.changed`): per message it is one dict lookup, per
subscriber nothing.  With no compressing connection in the process the
core does not call it at all.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from marketstream.fanout.counters import Counters
from marketstream.wire.deflate import Deflater

__all__ = ["Compressing"]

_Listeners = dict[Any, None]


class Compressing:
    """The process's compressing connections, the per-stream split of
    listeners by kind, and the compressed frames (counted)."""

    __slots__ = ("deflater", "counters", "connections", "_split")

    def __init__(self, deflater: Deflater, counters: Counters) -> None:
        self.deflater = deflater
        self.counters = counters
        self.connections: set[Hashable] = set()  # those that negotiated compression
        # stream -> (its listeners dict, (plain, deflating) or None); valid
        # while the stream's listeners are that dict, unchanged.
        self._split: dict[str, tuple[_Listeners, tuple[_Listeners, _Listeners] | None]] = {}

    def add(self, conn: Hashable) -> None:
        """``conn`` negotiated compression (before it subscribes)."""
        self.connections.add(conn)

    def discard(self, conn: Hashable) -> None:
        self.connections.discard(conn)

    def changed(self, name: str) -> None:
        """The listeners of ``name`` changed: split them again when needed."""
        self._split.pop(name, None)

    def kinds(
        self, name: str, listeners: _Listeners, keep: bool = True
    ) -> tuple[_Listeners, _Listeners] | None:
        """``listeners`` of ``name`` as (plain, deflating), or None when none
        of them compresses.  ``keep``: ``listeners`` is the stream's own
        dict (the split is kept until :meth:`changed`), not a subset."""
        if keep:
            cached = self._split.get(name)
            if cached is not None and cached[0] is listeners:
                return cached[1]
        deflating = self.connections
        mine = {conn: None for conn in listeners if conn in deflating}
        split = None
        if mine:
            split = ({conn: None for conn in listeners if conn not in mine}, mine)
        if keep:
            self._split[name] = (listeners, split)
        return split

    def frame(self, payload: bytes, plain: bytes) -> bytes:
        """The frame of ``payload`` for compressing clients: deflated once,
        or ``plain`` (small or incompressible); counted."""
        frame = self.deflater.frame(payload, plain)
        if frame is not plain:
            counters = self.counters
            counters.deflated_messages += 1
            counters.deflate_bytes_in += len(plain)
            counters.deflate_bytes_out += len(frame)
        return frame

    def reframer(self) -> Callable[[bytes], bytes]:
        """A function from plain frames to the frames compressing clients
        get, each frame compressed once however often it is asked for
        (a catch-up's frames are shared by many connections)."""
        done: dict[int, tuple[bytes, bytes]] = {}
        deflater = self.deflater

        def reframe(plain: bytes) -> bytes:
            if not plain:
                return plain
            known = done.get(id(plain))
            if known is not None and known[0] is plain:
                return known[1]
            frame = deflater.reframe(plain)
            if frame is not plain:
                counters = self.counters
                counters.deflated_messages += 1
                counters.deflate_bytes_in += len(plain)
                counters.deflate_bytes_out += len(frame)
            done[id(plain)] = (plain, frame)
            return frame

        return reframe
