"""The records the core and its shell exchange: the :class:`Connection` the
core delivers to, what a connection asks of a stream's past (:class:`Want`),
the history read the shell must do (:class:`Read`) and what it found
(:class:`History`).

>>> Want(since=1042)
Want(since=1042, snapshot=False, repair=False)
>>> Want().recovers, Want(snapshot=True).recovers
(False, True)
>>> History(latest=7, snapshot=None, entries=[(7, b"...")])
History(latest=7, snapshot=None, entries=[(7, b'...')], oldest=None, snapshot_skipped=False)
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import NamedTuple, Protocol

__all__ = ["Connection", "Want", "Read", "History"]


class Connection(Hashable, Protocol):
    """What the core delivers to (the WebSocket handler)."""

    def write_frames(self, data: bytes) -> None: ...


class Want(NamedTuple):
    """What a connection asked for when subscribing a stream."""

    since: int | None = None  # resume after this position
    snapshot: bool = False  # start from the stream's snapshot
    repair: bool = False  # the server's own catch-up after a link outage

    @property
    def recovers(self) -> bool:
        """Whether the stream's history must be read first (a resume or a
        snapshot); else it is a plain "from now on" subscribe."""
        return self.since is not None or self.snapshot


class Read(NamedTuple):
    """A history read the shell must do for one stream: everything after
    ``after`` (None: from the snapshot on, or nothing), and the snapshot if
    ``snapshot``."""

    stream: str
    after: int | None
    snapshot: bool
    token: int = 0  # pass it back to read_done / read_failed
    max_bytes: int = 0  # read about this many bytes of history and snapshot at most


class History(NamedTuple):
    """What a history read found: the stream's latest position (None for a
    stream without positions), its snapshot as (position, frame), and the
    entries after the asked position, oldest first, as (position, frame).
    ``oldest``: the oldest position the history holds, read only when the
    entries do not reach back to the asked position (it tells a history
    that was trimmed from a resume that asked for too much).
    ``snapshot_skipped``: the stream has a snapshot larger than the read's
    ``max_bytes``, which was not read."""

    latest: int | None
    snapshot: tuple[int, bytes] | None
    entries: list[tuple[int, bytes]]
    oldest: int | None = None
    snapshot_skipped: bool = False
