"""Compressing listeners, kept apart: each message deflated once for all.

The :class:`~marketstream.fanout.core.Core` delivers a message as one frame
shared by every listener (:mod:`~marketstream.fanout.batching`).  Clients
that negotiated permessage-deflate (:mod:`marketstream.wire.deflate`) get a
second frame, deflated once per message and shared the same way; plain
clients get the plain frame::

    compressing = Compressing(Deflater(min_bytes=512), batch, core.streams)
    compressing.register(conn, True)              # it negotiated compression
    if compressing.connections:                   # the core's one branch
        compressing.deliver("depth.X", listeners, payload)
    else:
        batch.enqueue(listeners, text_frame(payload))

:meth:`Compressing.kinds` splits a stream's listeners once and keeps the
split until the core says the stream's listeners changed
(:meth:`Compressing.changed`): per message it is one dict lookup, per
subscriber nothing.  With no compressing connection in the process the
core does not call it at all.  A catch-up's frames are compressed once for
every compressing reader of the read (:meth:`Compressing.reframed`).

Without a :class:`~marketstream.wire.deflate.Deflater` (compression off)
no connection is ever kept as compressing, so everyone gets plain frames.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from marketstream.fanout.batching import Batch
from marketstream.fanout.catchup import GapFrame
from marketstream.fanout.records import Connection, History
from marketstream.wire import replies
from marketstream.wire.deflate import Deflater
from marketstream.wire.frames import text_frame

__all__ = ["Compressing"]

_Listeners = dict[Connection, None]
_Frames = Sequence[tuple[int | None, bytes]]


class Compressing:
    """The process's compressing connections, the per-stream split of
    listeners by kind, and the compressed frames (counted)."""

    __slots__ = ("deflater", "batch", "streams", "counters", "connections", "_split")

    def __init__(
        self, deflater: Deflater | None, batch: Batch, streams: dict[str, _Listeners]
    ) -> None:
        self.deflater = deflater  # None: compression off
        self.batch = batch
        self.streams = streams  # the core's live listeners per stream (never replaced)
        self.counters = batch.counters
        # Those that negotiated compression (never replaced: the core binds it).
        self.connections: set[Connection] = set()
        # stream -> (its listeners dict, (plain, deflating) or None); valid
        # while the stream's listeners are that dict, unchanged.
        self._split: dict[str, tuple[_Listeners, tuple[_Listeners, _Listeners] | None]] = {}

    def register(self, conn: Connection, compressing: bool) -> None:
        """A new connection (before it subscribes); ``compressing``: it
        negotiated permessage-deflate (ignored with compression off)."""
        if compressing and self.deflater is not None:
            self.connections.add(conn)

    def discard(self, conn: Connection) -> None:
        self.connections.discard(conn)

    def changed(self, name: str) -> None:
        """The listeners of ``name`` changed: split them again when needed."""
        self._split.pop(name, None)

    def kinds(self, name: str, listeners: _Listeners) -> tuple[_Listeners, _Listeners] | None:
        """``listeners`` of ``name`` as (plain, deflating), or None when none
        of them compresses.  When ``listeners`` is the stream's own dict
        (not a subset) the split is kept until :meth:`changed`."""
        keep = listeners is self.streams.get(name)
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

    def deliver(self, name: str, listeners: _Listeners, payload: bytes) -> bool:
        """Queue ``payload`` for ``listeners`` of ``name``: its plain frame,
        and to those that negotiated compression the compressed frame, built
        once for all of them (True: queued).  Called only when some
        connection compresses."""
        frame = text_frame(payload)
        kinds = self.kinds(name, listeners)
        if kinds is None:
            self.batch.enqueue(listeners, frame)
            return True
        plain, deflating = kinds
        self.batch.enqueue(plain, frame)
        self.batch.enqueue(deflating, self.frame(payload, frame))
        self.batch.messages -= 1  # one message
        return True

    def notice(self, name: str, listeners: _Listeners, reason: str) -> None:
        """Queue ``name``'s gap notice for ``reason`` for its ``listeners``,
        compressed for those that negotiated it like any message, and count
        them."""
        if not self.connections:
            self.batch.notice(listeners, name, reason)
            return
        self.counters.gap_notices += len(listeners)
        self.deliver(name, listeners, replies.gap_notice(name, reason=reason))

    def frame(self, payload: bytes, plain: bytes) -> bytes:
        """The frame of ``payload`` for compressing clients: deflated once,
        or ``plain`` (small or incompressible; compression off); counted."""
        if self.deflater is None:
            return plain
        return self._counted(plain, self.deflater.frame(payload, plain))

    def _counted(self, plain: bytes, frame: bytes) -> bytes:
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
            if not plain or deflater is None:
                return plain
            known = done.get(id(plain))
            if known is not None and known[0] is plain:
                return known[1]
            frame = self._counted(plain, deflater.reframe(plain))
            done[id(plain)] = (plain, frame)
            return frame

        return reframe

    def reframed(
        self, history: History, live: _Frames, gap: GapFrame
    ) -> tuple[History, list[tuple[int | None, bytes]], GapFrame]:
        """A read's frames (its framed ``history``, the ``live`` frames
        buffered meanwhile, the ``gap`` notice's builder) as compressing
        connections get them: each frame compressed once for all of them.
        What :func:`~marketstream.fanout.catchup.catch_up` then merges."""
        reframe = self.reframer()
        latest, snapshot, entries, oldest, skipped = history
        return (
            History(
                latest,
                None if snapshot is None else (snapshot[0], reframe(snapshot[1])),
                [(seq, reframe(frame)) for seq, frame in entries],
                oldest,
                skipped,
            ),
            [(seq, reframe(frame)) for seq, frame in live],
            lambda reason: reframe(gap(reason)),
        )
