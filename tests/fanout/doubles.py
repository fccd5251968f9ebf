"""Test doubles for the fan-out core's tests: fake connections that decode
what they were sent, and :class:`Feed`, a model of a recoverable
publisher's stored stream that builds the :class:`History` exactly as the
shell does (``ChannelManager._read`` over ``history.read_recent``).

Every write a connection would get is taken from :meth:`Core.take_batch`,
split back into WebSocket frames and decoded, so the assertions are about
what a client would see.
"""

from __future__ import annotations

import json
from collections import deque


from marketstream.fanout.core import Core, History, Read, Want
from marketstream.fanout.counters import Counters
from marketstream.testing import read_frames
from marketstream.wire.frames import OP_TEXT

S = "trade.SOL_USDC"


T = "depth.BTC_USDT"


class Conn:
    """A fake connection: what it was sent, decoded, in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.writes: list[bytes] = []
        self.got: list[dict] = []

    def write_frames(self, data: bytes) -> None:
        self.writes.append(data)
        self.got.extend(json.loads(frame) for frame in split_frames(data))

    def __repr__(self) -> str:
        return f"Conn({self.name})"

    def labels(self, stream: str | None = None) -> list:
        """What arrived, one label per frame: a position, ``"gap"``,
        ``("snap", N)`` or ``("plain", i)``."""
        return [label(m) for m in self.got if stream is None or m["stream"] == stream]

    def reasons(self) -> list[str]:
        """The ``data.reason`` of each gap notice that arrived."""
        return [m["data"]["reason"] for m in self.got if m["data"].get("e") == "gap"]

    def positions(self, stream: str | None = None) -> list[int]:
        """The positions that arrived (the snapshot counts as its own)."""
        out = []
        for item in self.labels(stream):
            if isinstance(item, int):
                out.append(item)
            elif isinstance(item, tuple) and item[0] == "snap":
                out.append(item[1])
        return out


def label(message: dict):
    data = message["data"]
    if data.get("e") == "gap":
        assert "seq" not in message  # a gap notice carries no position
        return "gap"
    if data.get("e") == "snap":
        assert message["seq"] == data["at"]
        return ("snap", message["seq"])
    if "seq" in message:
        assert data["i"] == message["seq"]
        return message["seq"]
    return ("plain", data["i"])


def split_frames(data: bytes) -> list[bytes]:
    """The payloads of the unmasked text frames in ``data`` (nothing else)."""
    frames, rest = read_frames(data)
    assert rest == b"" and all(opcode == OP_TEXT for opcode, _ in frames)
    return [payload for _, payload in frames]


def flush(core: Core) -> dict:
    """Write the batch out as the shell does; returns it."""
    batch = core.take_batch()
    for conn, data in batch.items():
        conn.write_frames(data)
    return batch


class Feed:
    """One stream as a recoverable publisher leaves it in Redis: positions
    from ``base`` up by one, a history capped at ``history`` entries and an
    optional snapshot, stored after every ``snapshot_every``-th position."""

    def __init__(
        self, name: str = S, base: int = 1, history: int = 10_000, snapshot_every: int | None = None
    ) -> None:
        self.name = name
        self.base = base
        self.cap = history
        self.snapshot_every = snapshot_every
        self.latest: int | None = None
        self.log: deque[tuple[int, bytes]] = deque()
        self.snapshot: tuple[int, bytes] | None = None
        self.plain_count = 0

    def frame(self, seq: int) -> bytes:
        return b'{"stream":"%s","data":{"i":%d},"seq":%d}' % (self.name.encode(), seq, seq)

    def publish(self) -> tuple[int, bytes]:
        """Publish the next message: (its position, the published payload)."""
        seq = self.base if self.latest is None else self.latest + 1
        self.latest = seq
        frame = self.frame(seq)
        self.log.append((seq, frame))
        while len(self.log) > self.cap:
            self.log.popleft()
        if self.snapshot_every and seq % self.snapshot_every == 0:
            self.store_snapshot(seq)
        return seq, b"@%d " % seq + frame

    def publish_plain(self) -> bytes:
        """A plain PUBLISH (no position): the envelope itself."""
        self.plain_count += 1
        return b'{"stream":"%s","data":{"i":%d}}' % (self.name.encode(), self.plain_count)

    def store_snapshot(self, seq: int) -> None:
        self.snapshot = (
            seq,
            b'{"stream":"%s","data":{"e":"snap","at":%d},"seq":%d}'
            % (self.name.encode(), seq, seq),
        )

    def trim(self, keep: int) -> None:
        while len(self.log) > keep:
            self.log.popleft()

    def read(self, read: Read, max_replay: int) -> History:
        """The History the shell builds for ``read`` (``ChannelManager._read``
        over ``history.read_recent``): the snapshot unless it is larger than
        ``read.max_bytes``; the newest messages after the floor (``since``,
        or the snapshot's position if lower), at most ``max_replay``, until
        their stored bytes reach ``read.max_bytes``."""
        assert read.stream == self.name
        latest = self.latest
        if latest is None:
            return History(None, None, [])
        snapshot, skipped = None, False
        if read.snapshot and self.snapshot is not None:
            if stored_size(*self.snapshot) > read.max_bytes:
                skipped = True
            else:
                snapshot = self.snapshot
        floor = read.after
        if snapshot is not None:
            floor = snapshot[0] if floor is None else min(floor, snapshot[0])
        entries: list[tuple[int, bytes]] = []
        if floor is not None and max_replay and (read.after is not None or read.snapshot):
            size = 0
            for seq, frame in reversed(self.log):
                if seq > latest:
                    continue
                if seq <= floor or len(entries) >= max_replay or size >= read.max_bytes:
                    break
                entries.append((seq, frame))
                size += stored_size(seq, frame)
            entries.reverse()
        oldest = None
        after = read.after
        if after is not None and after < latest and not (entries and entries[0][0] <= after + 1):
            oldest = self.log[0][0] if self.log else None
        return History(latest, snapshot, entries, oldest, skipped)


def stored_size(seq: int, frame: bytes) -> int:
    """Bytes of a message as the recovery script stores it."""
    return len(b"@%d " % seq) + len(frame)


def finish(core: Core, read: Read, history: History) -> bool:
    """Hand a finished read to the core (one place, should its API change)."""
    return core.read_done(read.stream, history, read.token)


def asked(read: Read) -> tuple:
    """What a read asks for: (stream, after, snapshot)."""
    return (read.stream, read.after, read.snapshot)


def fail(core: Core, read: Read) -> None:
    core.read_failed(read.stream, read.token)


def make_core(**kwargs) -> Core:
    return Core(Counters(), **kwargs)


def live(core: Core, feed: Feed, count: int = 1) -> list[int]:
    """Publish ``count`` messages and hand each to the core at once."""
    seqs = []
    for _ in range(count):
        seq, payload = feed.publish()
        core.on_message(feed.name.encode(), payload)
        seqs.append(seq)
    return seqs


def subscribed(core: Core, conn: Conn, name: str = S, want: Want | None = None) -> None:
    """``conn`` subscribes ``name`` (with ``want``) on a confirmed channel."""
    core.register(conn)
    core.subscribe(conn, [name], {name: want} if want else None)
    core.upstream_confirmed(name)


def one_read(core: Core) -> Read:
    reads = core.start_reads()
    assert len(reads) == 1, reads
    return reads[0]


def outage(core: Core, name: str = S) -> Read:
    """The link lost and back, ``name`` confirmed again: the read that
    repairs it."""
    core.link_lost()
    core.link_restored({name})
    core.upstream_confirmed(name)
    return one_read(core)


def big_feed(name: str, count: int, size: int = 400, **kwargs) -> Feed:
    """A feed whose frames are ``size`` bytes or so."""
    feed = Feed(name, **kwargs)
    pad = b"x" * size
    feed.frame = lambda seq: (
        b'{"stream":"%s","data":{"i":%d,"x":"%s"},"seq":%d}' % (name.encode(), seq, pad, seq)
    )
    for _ in range(count):
        feed.publish()
    return feed
