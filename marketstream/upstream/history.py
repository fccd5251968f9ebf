"""Reading what recoverable publishers stored: positions, history, snapshots.

The server side of ``marketstream/wire/recovery.lua`` (see
:mod:`marketstream.upstream.publisher`; the format is
:mod:`marketstream.wire.positions`).
Every function takes a ``redis.asyncio`` client, a plain ``Redis`` or a
``RedisCluster`` (a stream's keys share its name as hash tag, so each call
touches one slot)::

    seq, frame = split_position(payload)          # per live message, no JSON parse
    frames, covered = await read_after(client, "trade.SOL_USDC", 1042, limit=1000)
    latest, snapshot, frames, skipped = await read_recent(
        client, "depth.SOL_USDC", 1042, True, limit=1000, max_bytes=65536)  # what the server reads
    if not covered:
        ...                                       # gap notice, then the snapshot:
    snapshot = await read_snapshot(client, "depth.SOL_USDC")   # (seq, frame) or None
    latest = await latest_position(client, "trade.SOL_USDC")   # int or None

Frames are returned as bytes exactly as clients receive them:
``{"stream":S,"data":...,"seq":N}``.  What is stored has the published
form ``@<seq> <frame>``, split by
:func:`marketstream.wire.positions.split_position`::

    >>> split_position(b'@1042 {"stream":"t.A_B","data":{},"seq":1042}')
    (1042, b'{"stream":"t.A_B","data":{},"seq":1042}')
    >>> split_position(b'@oops {}')
    (None, b'@oops {}')
"""

from __future__ import annotations

from marketstream.upstream.clients import AsyncClient, Reply
from marketstream.wire.positions import split_position, stream_keys

__all__ = ["latest_position", "oldest_position", "read_after", "read_recent", "read_snapshot"]

#: Bytes a stored message is taken to have before any was read (it sizes
#: the first page of :func:`read_recent`).
FIRST_GUESS = 256


def _bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _entries(raw: list[Reply], latest: int) -> list[tuple[int, bytes]]:
    """History entries as ``(seq, frame)``, up to ``latest``."""
    frames = []
    for entry_id, fields in raw:
        seq = int(_bytes(entry_id).split(b"-", 1)[0])
        if seq > latest:
            break
        payload = fields.get(b"p")
        if payload is None:
            payload = fields.get("p", b"")
        frames.append((seq, split_position(_bytes(payload))[1]))
    return frames


async def read_after(
    client: AsyncClient, stream: str, after_seq: int, limit: int
) -> tuple[list[tuple[int, bytes]], bool]:
    """The messages of ``stream`` after position ``after_seq``, and whether
    they are complete.

    Returns ``(frames, covered)``; ``frames`` is a list of ``(seq, frame)``
    in order, all with ``after_seq < seq <= latest``, where ``latest`` is the
    stream's position read in the same transaction as the history.

    ``covered`` is True when delivering ``frames`` and then live messages
    (``seq > latest``) loses nothing:

    - ``after_seq >= latest`` (the client is up to date, or ahead): covered,
      ``frames`` is empty -- live only;
    - else covered iff ``latest - after_seq <= limit`` and the history holds
      every position ``after_seq + 1 .. latest``; ``frames`` are those
      messages.

    ``covered`` is False when

    - the stream has no position key (never published recoverably, expired,
      or lost in a Redis restart): ``frames`` is empty.  A caller that wants
      to treat such a stream as plain can check :func:`latest_position`;
    - the history no longer reaches back to ``after_seq + 1`` (trimmed,
      ``history=0``, or reset: positions then jumped forward past
      ``after_seq + 1``);
    - more than ``limit`` messages are missing.

    In these cases ``frames`` holds the newest messages the history still
    has after ``after_seq`` (at most ``limit``, contiguous up to
    ``latest``), for a client that has no snapshot to start from.

    Costs one round trip (GET + XRANGE ... COUNT limit+1 in MULTI), plus one
    XREVRANGE only when more than ``limit`` messages are missing.
    """
    if after_seq < 0 or limit < 0:
        raise ValueError("after_seq and limit must be >= 0")
    seq_key, log_key, _ = stream_keys(stream)
    async with client.pipeline(transaction=True) as pipe:
        pipe.get(seq_key)
        pipe.xrange(log_key, min="%d-0" % (after_seq + 1), max="+", count=limit + 1)
        latest_raw, raw = await pipe.execute()
    if latest_raw is None:
        return [], False
    latest = int(latest_raw)
    if after_seq >= latest:
        return [], True
    frames = _entries(raw, latest)
    missing = latest - after_seq
    if missing <= limit:
        covered = (
            len(frames) == missing and frames[0][0] == after_seq + 1 and frames[-1][0] == latest
        )
        return frames, covered
    if limit == 0:
        return [], False
    # Reply: redis-py types an XRANGE reply as Optional; Redis answers an array.
    newest: Reply = await client.xrevrange(
        log_key, max="%d-0" % latest, min="%d-0" % (after_seq + 1), count=limit
    )
    newest.reverse()
    return _entries(newest, latest), False


async def read_recent(
    client: AsyncClient, stream: str, after: int | None, snapshot: bool, limit: int, max_bytes: int
) -> tuple[int | None, tuple[int, bytes] | None, list[tuple[int, bytes]], bool]:
    """What a catch-up needs, read newest first and bounded in bytes:
    ``(latest, snapshot, frames, snapshot_skipped)``.

    - ``latest``: the stream's position (None: it has none; then the rest
      is empty);
    - ``snapshot``: with ``snapshot``, the stream's snapshot as ``(seq,
      frame)``, unless it is larger than ``max_bytes`` (then only its first
      ``max_bytes + 1`` bytes were read, and ``snapshot_skipped`` is True);
    - ``frames``: ``(seq, frame)`` oldest first, all after the floor and up
      to ``latest``: the floor is ``after``, or the snapshot's position if
      that is lower (or ``after`` is None).  They are the newest such
      messages: at most ``limit``, and no more once their stored bytes
      reach ``max_bytes`` (the message that reaches it is included), so a
      client far behind costs what it can be sent, not what is stored.

    The position, the snapshot and the newest messages come from one
    transaction (GET, GETRANGE, XREVRANGE); older pages follow while more is
    wanted, sized by the messages read so far.
    """
    seq_key, log_key, snap_key = stream_keys(stream)
    entries_wanted = limit > 0 and (after is not None or snapshot)
    count = min(limit, max_bytes // FIRST_GUESS + 1)
    async with client.pipeline(transaction=True) as pipe:
        pipe.get(seq_key)
        if snapshot:
            pipe.getrange(snap_key, 0, max_bytes)
        if entries_wanted:
            # The snapshot's position is not known yet: from the newest down.
            lowest = "-" if snapshot or after is None else "%d-0" % (after + 1)
            pipe.xrevrange(log_key, max="+", min=lowest, count=count)
        replies = await pipe.execute()
    if replies[0] is None:
        return None, None, [], False
    latest = int(replies[0])
    found = None
    skipped = False
    if snapshot:
        stored = _bytes(replies[1])
        if len(stored) > max_bytes:
            skipped = True
        elif stored:
            seq, frame = split_position(stored)
            found = None if seq is None else (seq, frame)
    floor = after
    if found is not None:
        floor = found[0] if floor is None else min(floor, found[0])
    frames: list[tuple[int, bytes]] = []  # newest first
    if not entries_wanted or floor is None or floor >= latest:
        return latest, found, frames, skipped
    page = replies[-1]
    size = 0
    while True:
        for entry_id, fields in page:
            seq = int(_bytes(entry_id).split(b"-", 1)[0])
            if seq > latest:
                continue
            if seq <= floor:
                break
            payload = _bytes(fields.get(b"p", fields.get("p", b"")))
            frames.append((seq, split_position(payload)[1]))
            size += len(payload)
            if len(frames) >= limit or size >= max_bytes:
                break
        else:
            if len(page) == count and frames:  # more may be there
                count = min(
                    limit - len(frames), (max_bytes - size) * len(frames) // max(1, size) + 1
                )
                page = await client.xrevrange(
                    log_key, max="%d-0" % (frames[-1][0] - 1), min="%d-0" % (floor + 1), count=count
                )
                continue
        break
    frames.reverse()
    return latest, found, frames, skipped


async def read_snapshot(client: AsyncClient, stream: str) -> tuple[int, bytes] | None:
    """The stream's snapshot as ``(seq, frame)``: the state after message
    ``seq``; None if it has none (or it expired)."""
    payload = await client.get(stream_keys(stream)[2])
    if payload is None:
        return None
    seq, frame = split_position(_bytes(payload))
    return None if seq is None else (seq, frame)


async def latest_position(client: AsyncClient, stream: str) -> int | None:
    """The position of the stream's last message, or None if it has none."""
    value = await client.get(stream_keys(stream)[0])
    return None if value is None else int(value)


async def oldest_position(client: AsyncClient, stream: str) -> int | None:
    """The position of the oldest message the history holds, or None if it
    holds none."""
    # Reply: as in read_after.
    raw: Reply = await client.xrange(stream_keys(stream)[1], min="-", max="+", count=1)
    if not raw:
        return None
    return int(_bytes(raw[0][0]).split(b"-", 1)[0])
