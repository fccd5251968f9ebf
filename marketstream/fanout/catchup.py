"""The catch-up merge, as pure functions: what one connection is sent when
its stream's history read ends, before it joins the live listeners.

:func:`catch_up` takes what the connection wants (:class:`Want`), what the
read found (:class:`History`, its frames already WebSocket frames, see
:func:`frame_history`), the live messages buffered during the read and the
connection's byte share, and returns a :class:`CatchUp`: the bytes to
queue, the position the connection then holds, and what to count.  It
changes nothing; the caller queues the bytes and adds the counts::

    history = frame_history(b"trade.SOL_USDC", found, on_dropped)
    done = catch_up(Want(since=1042), history, buffered, share,
                    max_replay=1000, had_positions=True, gap=gap_frame)
    counters.replayed += done.replayed
    batch.queue(conn, [done.data], done.frames)

Each message reaches the connection once and in order: the history's
entries after the position asked for (or the snapshot and what follows
it), then the buffered live messages beyond the last position sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from marketstream.fanout.records import History, Want
from marketstream.wire import payloads, replies
from marketstream.wire.frames import text_frame

__all__ = [
    "CatchUp",
    "Checksums",
    "catch_up",
    "frame_history",
    "gap_frames",
    "gap_reason",
    "covers",
]


class CatchUp(NamedTuple):
    """One connection's catch-up: ``data`` (``frames`` WebSocket frames:
    the history's, then the buffered live ones), the position it then holds
    (0: none), what it counts, and ``size``, the bytes of the history part
    alone (what its byte share pays for)."""

    data: bytes
    frames: int
    position: int
    replayed: int
    snapshots: int
    gap_notices: int
    size: int


class _Part(NamedTuple):
    """The history part of a catch-up: its frames, the position reached,
    the counts (replayed, snapshots, gap notices) and its bytes."""

    frames: list[bytes]
    position: int
    counts: tuple[int, int, int]
    size: int


#: A frame builder for gap notices: ``gap(reason)`` is the notice's frame.
GapFrame = Callable[[str], bytes]


def catch_up(
    want: Want,
    history: History,
    live: Sequence[tuple[int | None, bytes]],
    share: int | None,
    *,
    max_replay: int,
    had_positions: bool,
    gap: GapFrame,
) -> CatchUp:
    """What a connection that wants ``want`` is sent when the read that
    found ``history`` ends: the history part in at most ``share`` bytes
    (None: no bound), then each frame of ``live`` (``(position, frame)``
    buffered during the read, oldest first) not already sent.

    ``max_replay`` bounds the newest messages sent when the history cannot
    take the connection all the way; ``had_positions``: this process has
    delivered positions on the stream before (a history with no position
    now was lost); ``gap(reason)`` is the gap notice's frame.

    >>> found = History(3, None, [(2, b"two"), (3, b"three")])
    >>> done = catch_up(Want(since=1), found, [(3, b"three"), (4, b"four")], None,
    ...                 max_replay=1000, had_positions=True, gap=lambda reason: b"gap")
    >>> done.data, done.position, done.replayed
    (b'twothreefour', 4, 2)
    """
    part = _history_part(want, history, share, max_replay, had_positions, gap)
    frames = part.frames  # a new list: the live frames join it
    last = part.position
    for seq, frame in live:
        if seq is None or seq > last:
            frames.append(frame)
            if seq is not None:
                last = seq
    replayed, snapshots, notices = part.counts
    return CatchUp(b"".join(frames), len(frames), last, replayed, snapshots, notices, part.size)


def _history_part(
    want: Want,
    history: History,
    share: int | None,
    max_replay: int,
    had_positions: bool,
    gap: GapFrame,
) -> _Part:
    """The history part of :func:`catch_up`.  In order of preference: every
    message after ``want.since``; else the gap notice (if it resumed), the
    snapshot and every message after it; else the gap notice and the newest
    messages (at most ``max_replay``; none for a plain snapshot request)."""
    latest, snapshot, entries, oldest, skipped = history
    if latest is None:
        # No position in Redis.  A stream this process has seen positions
        # on lost its history (a Redis restart, expired keys): what was
        # missed is gone.  Otherwise it is a plain stream, and a resume or
        # a snapshot asks for nothing that exists.
        if want.since is not None and had_positions:
            notice = gap("history_lost")
            return _Part([notice], 0, (0, 0, 1), len(notice))
        return _Part([], 0, (0, 0, 0), 0)
    covered = False
    since = want.since
    if since is not None and (
        covers(entries, since, latest)
        if since < latest
        # A position ahead of the latest one is not from this history:
        # positions went back (a failover lost writes), and what the client
        # holds says nothing of what it missed.
        else since == latest
    ):
        resumed = _resumed(entries, since, share)
        if resumed is not None:
            return resumed
        covered = True  # the history has it all, but not the room to send it
    head = [] if since is None else [gap(gap_reason(want, latest, oldest, covered, max_replay))]
    if snapshot is not None and (snapshot[0] >= latest or covers(entries, snapshot[0], latest)):
        after = [frame for seq, frame in entries if seq > snapshot[0] and frame]
        out = head + [snapshot[1]] + after
        size = sum(map(len, out))
        if share is None or size <= share:
            last = max(snapshot[0], entries[-1][0]) if entries else snapshot[0]
            return _Part(out, last, (len(after), 1, len(head)), size)
        skipped = True  # a usable snapshot that does not fit
    if since is None:
        # A plain "from now on" subscribe; a snapshot that did not fit (or
        # was too large to read) is announced by the gap notice.
        if skipped:
            notice = gap("snapshot_too_large")
            return _Part([notice], latest, (0, 0, 1), len(notice))
        return _Part([], latest, (0, 0, 0), 0)
    if since > latest:
        # Positions went back: the history after them is not what the
        # clients missed; the gap notice says so, live follows.
        return _Part(head, latest, (0, 0, 1), len(head[0]))
    return _newest(head[0], entries, share, max_replay)


def _resumed(entries: list[tuple[int, bytes]], since: int, share: int | None) -> _Part | None:
    """Every entry after ``since`` (which the entries cover), or None if
    they do not fit in ``share`` bytes."""
    out = [frame for seq, frame in entries if seq > since and frame]
    size = sum(map(len, out))
    if share is not None and size > share:
        return None
    last = entries[-1][0] if entries and entries[-1][0] > since else since
    return _Part(out, last, (len(out), 0, 0), size)


def _newest(
    notice: bytes, entries: list[tuple[int, bytes]], share: int | None, max_replay: int
) -> _Part:
    """The gap ``notice`` and the newest entries, as many as fit in
    ``share`` bytes (at most ``max_replay``)."""
    room = (share if share is not None else -1) - len(notice)
    newest: list[bytes] = []
    last = 0
    for seq, frame in reversed(entries[-max_replay:] if max_replay else []):
        if share is not None and len(frame) > room:
            break
        if frame:
            newest.append(frame)
            room -= len(frame)
        last = max(last, seq)
    newest.reverse()
    return _Part([notice] + newest, last, (len(newest), 0, 1), len(notice) + sum(map(len, newest)))


def gap_reason(want: Want, latest: int, oldest: int | None, covered: bool, max_replay: int) -> str:
    """Why the history cannot take ``want.since`` to ``latest``
    (``covered``: what was read holds every message, but too many bytes
    for the connection's share of its send buffer).

    >>> gap_reason(Want(since=10), latest=5, oldest=None, covered=False, max_replay=1000)
    'since_ahead'
    >>> gap_reason(Want(since=10), latest=5000, oldest=3, covered=False, max_replay=1000)
    'max_replay'
    """
    since = want.since
    assert since is not None
    if since > latest:
        return "lost_writes" if want.repair else "since_ahead"
    if covered or (oldest is not None and oldest <= since + 1):
        # The history has it all, but it is too much to replay.
        return "max_replay" if latest - since > max_replay else "replay_too_large"
    return "history_trimmed"


def covers(entries: list[tuple[int, bytes]], after: int, latest: int) -> bool:
    """Whether ``entries`` hold every position after ``after`` up to
    ``latest``.

    >>> covers([(3, b""), (4, b"")], after=2, latest=4), covers([(4, b"")], 2, 4)
    (True, False)
    """
    if after >= latest:
        return True
    return bool(entries) and entries[0][0] <= after + 1 and entries[-1][0] >= latest


class Checksums(Protocol):
    """What adds a book stream's checksums to a read's frames (see
    :class:`marketstream.fanout.bookkeeper.Chain`): the snapshot first,
    then the entries, oldest first."""

    def snapshot(self, seq: int, frame: bytes) -> bytes: ...

    def entry(self, seq: int, frame: bytes) -> bytes: ...


def frame_history(
    channel: bytes,
    history: History,
    dropped: Callable[[bytes, bytes, str], object],
    checksums: Checksums | None = None,
) -> History:
    """``history`` with WebSocket frames; a stored frame that is not the
    recovery script's for ``channel`` is dropped and reported as
    ``dropped(channel, frame, problem)``, like a live one (an entry keeps
    its position, with no frame).  With ``checksums`` (a book stream),
    each checked frame gets its book's checksum.

    >>> found = History(7, None, [(6, b"junk"), (7, b'{"stream":"t.A_B","data":{},"seq":7}')])
    >>> frame_history(b"t.A_B", found, lambda *why: None).entries
    [(6, b''), (7, b'\\x81${"stream":"t.A_B","data":{},"seq":7}')]
    """
    latest, snapshot, entries, oldest, skipped = history
    framed_snapshot = None
    if snapshot is not None:
        seq, data = snapshot
        problem = payloads.frame_problem(channel, seq, data)
        if problem is None:
            if checksums is not None:
                data = checksums.snapshot(seq, data)
            framed_snapshot = (seq, text_frame(data))
        else:
            dropped(channel, data, problem)
    checked: list[tuple[int, bytes]] = []
    for seq, data in entries:
        problem = payloads.frame_problem(channel, seq, data)
        if problem is None:
            if checksums is not None:
                data = checksums.entry(seq, data)
            checked.append((seq, text_frame(data)))
        else:
            dropped(channel, data, problem)
            checked.append((seq, b""))
    return History(latest, framed_snapshot, checked, oldest, skipped)


def gap_frames(stream: str) -> GapFrame:
    """The gap notice's frame of ``stream`` by reason, each built once (a
    read that serves a thousand connections builds it once).

    >>> gap = gap_frames("trade.SOL_USDC")
    >>> gap("history_trimmed") is gap("history_trimmed")
    True
    """
    built: dict[str, bytes] = {}

    def gap(reason: str) -> bytes:
        notice = built.get(reason)
        if notice is None:
            notice = built[reason] = text_frame(replies.gap_notice(stream, reason=reason))
        return notice

    return gap
