"""The batch: the frames queued for each connection since the last flush,
joined into one write per connection.

Each message is framed once; the same bytes are appended to every
listener's list, and :meth:`Batch.take` joins each list into one write::

    batch = Batch(Counters())
    batch.enqueue({conn: None, other: None}, text_frame(b'{"stream":...}'))
    batch.queue(conn, [gap_frame, snapshot_frame], 2)   # a catch-up
    for conn, data in batch.take().items():              # one write each
        conn.write_frames(data)

This is the delivery hot path: :meth:`enqueue` runs once per message and
loops over its listeners, :meth:`take` once per flush.
"""

from __future__ import annotations

from typing import cast

from marketstream.fanout.counters import Counters
from marketstream.fanout.records import Connection
from marketstream.wire import replies
from marketstream.wire.frames import text_frame

__all__ = ["Batch", "MAX_BATCH_SIZES"]

#: ``Counters.batch_sizes`` grows to at most this many entries between two
#: looks of the metrics exporter.
MAX_BATCH_SIZES = 100_000


class Batch:
    """The frames of the current batch, per connection, in arrival order."""

    __slots__ = ("pending", "messages", "counters")

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.pending: dict[Connection, list[bytes]] = {}
        self.messages = 0  # messages in the batch (for Counters.batch_sizes)

    def enqueue(self, listeners: dict[Connection, None], frame: bytes) -> None:
        """Queue one message's ``frame`` for each of ``listeners``."""
        pending = self.pending
        for conn in listeners:
            frames = pending.get(conn)
            if frames is None:
                pending[conn] = [frame]
            else:
                frames.append(frame)
        self.counters.deliveries += len(listeners)
        self.messages += 1

    def queue(self, conn: Connection, frames: list[bytes], count: int) -> None:
        """Queue ``frames`` (holding ``count`` WebSocket frames) for ``conn``."""
        pending = self.pending.get(conn)
        if pending is None:
            self.pending[conn] = list(frames)
        else:
            pending.extend(frames)
        self.counters.deliveries += count

    def notice(self, listeners: dict[Connection, None], stream: str, reason: str) -> None:
        """Queue ``stream``'s gap notice for ``reason`` for each of
        ``listeners`` (one frame for all), and count them."""
        self.counters.gap_notices += len(listeners)
        self.enqueue(listeners, text_frame(replies.gap_notice(stream, reason=reason)))

    def drop(self, conn: Connection) -> None:
        """Forget what was queued for a departed connection."""
        self.pending.pop(conn, None)

    def take(self) -> dict[Connection, bytes]:
        """Each connection's frames of this batch, joined into one write;
        the next batch starts empty."""
        pending, self.pending = self.pending, {}
        counters = self.counters
        counters.batches += 1
        if len(counters.batch_sizes) < MAX_BATCH_SIZES:
            counters.batch_sizes.append(self.messages)
        self.messages = 0
        sent = 0
        # The lists become their joined bytes, in place (no second dict).
        batch = cast("dict[Connection, bytes]", pending)
        for conn, frames in pending.items():
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            sent += len(data)
            batch[conn] = data
        counters.bytes_sent += sent
        return batch
