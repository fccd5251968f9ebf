"""Reading the recovery keys: read_after's coverage cases, snapshots and latest positions, on a plain Redis and on a
one-node Redis Cluster."""

import asyncio
import doctest

import pytest
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import ujson

import marketstream.upstream.history
import marketstream.upstream.publisher
import marketstream.upstream.urls
from marketstream.publisher import Publisher
from marketstream.upstream.history import latest_position, read_after, read_recent, read_snapshot
from tests.upstream.test_publisher import cluster7, r7, redis7_server  # noqa: F401 (fixtures)

S = "trade.A_B"


@pytest.mark.parametrize(
    "module",
    [marketstream.upstream.history, marketstream.upstream.publisher, marketstream.upstream.urls],
)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted and not result.failed


def run(coro_fn, port, cluster=False):
    async def scenario():
        client = (
            redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=port)
            if cluster
            else redis.asyncio.Redis(port=port)
        )
        try:
            return await coro_fn(client)
        finally:
            await client.aclose()

    return asyncio.run(scenario())


def published(r7, count, history=1000, stream=S):
    pub = Publisher(r7, history=history)
    return pub.publish_many([(stream, {"i": i}) for i in range(count)])


def data_of(frames):
    return [ujson.loads(frame)["data"]["i"] for _, frame in frames]


def test_covered_resume_returns_every_later_message(r7, redis7_server):
    seqs = published(r7, 20)
    frames, covered = run(lambda c: read_after(c, S, seqs[4], 100), redis7_server.port)
    assert covered
    assert [s for s, _ in frames] == seqs[5:]
    assert data_of(frames) == list(range(5, 20))
    assert all(
        ujson.loads(f)["seq"] == s and f.startswith(b'{"stream":"trade.A_B"') for s, f in frames
    )
    # Exactly `limit` behind is still covered.
    frames, covered = run(lambda c: read_after(c, S, seqs[4], 15), redis7_server.port)
    assert covered and len(frames) == 15


def test_up_to_date_or_ahead_is_covered_live_only(r7, redis7_server):
    seqs = published(r7, 3)
    for after in (seqs[-1], seqs[-1] + 1, seqs[-1] + 10**9):
        assert run(lambda c, after=after: read_after(c, S, after, 100), redis7_server.port) == (
            [],
            True,
        )


def test_trimmed_history_is_not_covered_and_returns_what_is_left(r7, redis7_server):
    seqs = published(r7, 20, history=5)
    frames, covered = run(lambda c: read_after(c, S, seqs[2], 100), redis7_server.port)
    assert not covered
    assert [s for s, _ in frames] == seqs[-5:]
    # Just inside the history: covered again.
    frames, covered = run(lambda c: read_after(c, S, seqs[14], 100), redis7_server.port)
    assert covered and [s for s, _ in frames] == seqs[-5:]


def test_missing_keys_are_not_covered(r7, redis7_server):
    assert run(lambda c: read_after(c, S, 1042, 100), redis7_server.port) == ([], False)
    assert run(lambda c: latest_position(c, S), redis7_server.port) is None
    assert run(lambda c: read_snapshot(c, S), redis7_server.port) is None


def test_more_than_limit_behind_is_not_covered_and_returns_the_newest(r7, redis7_server):
    seqs = published(r7, 30)
    frames, covered = run(lambda c: read_after(c, S, seqs[0], 10), redis7_server.port)
    assert not covered
    assert [s for s, _ in frames] == seqs[-10:]
    assert run(lambda c: read_after(c, S, seqs[0], 0), redis7_server.port) == ([], False)
    assert run(lambda c: read_after(c, S, seqs[-1], 0), redis7_server.port) == ([], True)


def test_reset_history_is_not_covered(r7, redis7_server):
    old = published(r7, 5)
    r7.flushall()
    new = published(r7, 3)
    assert new[0] > old[-1]
    frames, covered = run(lambda c: read_after(c, S, old[-1], 100), redis7_server.port)
    assert not covered and [s for s, _ in frames] == new


def test_no_history_is_not_covered(r7, redis7_server):
    seqs = published(r7, 5, history=0)
    assert run(lambda c: read_after(c, S, seqs[1], 100), redis7_server.port) == ([], False)
    assert run(lambda c: read_after(c, S, seqs[-1], 100), redis7_server.port) == ([], True)


def test_snapshot_and_latest_position(r7, redis7_server):
    pub = Publisher(r7)
    seq = pub.publish("depth.A_B", {"e": "depth"}, snapshot={"e": "depthSnapshot", "u": 7})
    later = pub.publish("depth.A_B", {"e": "depth"})
    snapshot = run(lambda c: read_snapshot(c, "depth.A_B"), redis7_server.port)
    assert snapshot == (
        seq,
        b'{"stream":"depth.A_B","data":{"e":"depthSnapshot","u":7},"seq":%d}' % seq,
    )
    assert run(lambda c: latest_position(c, "depth.A_B"), redis7_server.port) == later


def test_bad_arguments(redis7_server):
    with pytest.raises(ValueError):
        run(lambda c: read_after(c, S, -1, 10), redis7_server.port)
    with pytest.raises(ValueError):
        run(lambda c: read_after(c, S, 1, -1), redis7_server.port)


def test_on_a_cluster(cluster7):
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster7.port)
    client.flushall()
    pub = Publisher(client, history=5)
    seqs = pub.publish_many([(S, {"i": i}, i == 7) for i in range(8)])
    client.close()

    async def check(c):
        covered = await read_after(c, S, seqs[4], 100)
        trimmed = await read_after(c, S, seqs[0], 100)
        behind = await read_after(c, S, seqs[3], 2)
        return covered, trimmed, behind, await read_snapshot(c, S), await latest_position(c, S)

    covered, trimmed, behind, snapshot, latest = run(check, cluster7.port, cluster=True)
    assert covered[1] and [s for s, _ in covered[0]] == seqs[5:]
    assert not trimmed[1] and [s for s, _ in trimmed[0]] == seqs[3:]
    assert not behind[1] and [s for s, _ in behind[0]] == seqs[6:]
    assert snapshot[0] == seqs[7] == latest


# --- read_recent: what the server reads, newest first and bounded in bytes ------------


def stored(r7, stream=S):
    """Every stored payload of ``stream``'s history, oldest first, as (seq, bytes)."""
    return [
        (int(entry_id.split(b"-")[0]), fields[b"p"])
        for entry_id, fields in r7.xrange("{%s}:log" % stream)
    ]


def test_read_recent_covers_a_small_resume_in_one_round_trip(r7, redis7_server):
    seqs = published(r7, 20)
    before = r7.info("commandstats").get("cmdstat_xrevrange", {}).get("calls", 0)
    latest, snapshot, frames, skipped = run(
        lambda c: read_recent(c, S, seqs[14], False, 1000, 65536), redis7_server.port
    )
    assert (latest, snapshot, skipped) == (seqs[-1], None, False)
    assert [s for s, _ in frames] == seqs[15:]
    assert data_of(frames) == list(range(15, 20))
    assert r7.info("commandstats")["cmdstat_xrevrange"]["calls"] == before + 1


@pytest.mark.parametrize("max_bytes", [1, 100, 1000, 5000, 100_000])
def test_read_recent_stops_once_the_bytes_are_reached(r7, redis7_server, max_bytes):
    """A client far behind costs what it may be sent: the newest messages
    until their stored bytes reach max_bytes (that one included)."""
    pub = Publisher(r7)
    seqs = pub.publish_many([(S, {"i": i, "x": "y" * (i % 7) * 30}) for i in range(300)])
    payloads = stored(r7)
    want, size = [], 0
    for seq, payload in reversed(payloads):
        if size >= max_bytes or len(want) >= 250:
            break
        want.append(seq)
        size += len(payload)
    _, _, frames, _ = run(lambda c: read_recent(c, S, 0, False, 250, max_bytes), redis7_server.port)
    assert [s for s, _ in frames] == want[::-1]
    assert frames[-1][0] == seqs[-1]


def test_read_recent_snapshot_floor_and_a_snapshot_too_large(r7, redis7_server):
    pub = Publisher(r7)
    seqs = [
        pub.publish(S, {"i": i}, snapshot={"book": "z" * 200} if i == 5 else None)
        for i in range(10)
    ]
    # The floor is the snapshot's position when it is lower than since.
    latest, snapshot, frames, skipped = run(
        lambda c: read_recent(c, S, seqs[8], True, 1000, 65536), redis7_server.port
    )
    assert latest == seqs[-1] and snapshot[0] == seqs[5] and not skipped
    assert [s for s, _ in frames] == seqs[6:]
    # Snapshot only: from the snapshot on.
    _, snapshot, frames, _ = run(
        lambda c: read_recent(c, S, None, True, 1000, 65536), redis7_server.port
    )
    assert snapshot[0] == seqs[5] and [s for s, _ in frames] == seqs[6:]
    # A snapshot larger than max_bytes is not read (beyond max_bytes + 1 bytes).
    latest, snapshot, frames, skipped = run(
        lambda c: read_recent(c, S, seqs[8], True, 1000, 100), redis7_server.port
    )
    assert snapshot is None and skipped
    assert [s for s, _ in frames] == seqs[9:]
    # Nothing asked: the position only.
    assert run(lambda c: read_recent(c, S, None, False, 1000, 65536), redis7_server.port) == (
        seqs[-1],
        None,
        [],
        False,
    )
    assert (
        run(lambda c: read_recent(c, S, 0, True, 0, 65536), redis7_server.port)[2] == []
    )  # max_replay 0
    assert run(lambda c: read_recent(c, "trade.NONE_X", 0, True, 10, 100), redis7_server.port) == (
        None,
        None,
        [],
        False,
    )


def test_read_recent_pages_through_a_long_history(r7, redis7_server):
    seqs = published(r7, 2000, history=5000)
    latest, _, frames, _ = run(
        lambda c: read_recent(c, S, seqs[99], False, 5000, 10**7), redis7_server.port
    )
    assert [s for s, _ in frames] == seqs[100:] and latest == seqs[-1]
    _, _, frames, _ = run(lambda c: read_recent(c, S, 0, False, 1000, 10**7), redis7_server.port)
    assert [s for s, _ in frames] == seqs[-1000:]


def test_read_recent_on_a_cluster(cluster7):
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster7.port)
    client.flushall()
    pub = Publisher(client, history=5)
    seqs = pub.publish_many([(S, {"i": i}, i == 6) for i in range(8)])
    client.close()
    latest, snapshot, frames, skipped = run(
        lambda c: read_recent(c, S, seqs[0], True, 100, 65536), cluster7.port, cluster=True
    )
    assert latest == seqs[-1] and snapshot[0] == seqs[6] and not skipped
    assert [s for s, _ in frames] == seqs[3:]
