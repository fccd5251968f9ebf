"""Reading the recovery keys: split_position (property-tested), read_after's
coverage cases, snapshots and latest positions, on a plain Redis and on a
one-node Redis Cluster."""

import asyncio
import doctest

import pytest
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import ujson
from hypothesis import given
from hypothesis import strategies as st

import marketstream.history
import marketstream.publisher
import marketstream.util
from marketstream.history import latest_position, read_after, read_snapshot, split_position
from marketstream.publisher import Publisher
from tests.test_publisher import cluster7, r7, redis7_server  # noqa: F401 (fixtures)

S = "trade.A_B"


@pytest.mark.parametrize("module", [marketstream.history, marketstream.publisher,
                                    marketstream.util])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted and not result.failed


@given(st.integers(min_value=0, max_value=2 ** 53), st.binary())
def test_split_position_reads_any_position(seq, frame):
    assert split_position(b"@%d %s" % (seq, frame)) == (seq, frame)


@given(st.one_of(st.binary(), st.binary().map(lambda b: b"@" + b)))
def test_split_position_other_payloads(payload):
    seq, rest = split_position(payload)
    if seq is None:
        assert rest == payload
    else:
        digits = payload[1:payload.index(b" ")]
        assert digits.isdigit() and int(digits) == seq
        assert payload == b"@" + digits + b" " + rest
    if payload[:1] != b"@":
        assert seq is None


@pytest.mark.parametrize("payload", [b"", b"@", b"@ x", b"@12", b"@12x {}", b"@-1 {}",
                                     b"@" + b"9" * 30 + b" {}", b'{"stream":"a"}'])
def test_split_position_malformed(payload):
    assert split_position(payload) == (None, payload)


def run(coro_fn, port, cluster=False):
    async def scenario():
        client = (redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=port) if cluster
                  else redis.asyncio.Redis(port=port))
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
    assert all(ujson.loads(f)["seq"] == s and f.startswith(b'{"stream":"trade.A_B"')
               for s, f in frames)
    # Exactly `limit` behind is still covered.
    frames, covered = run(lambda c: read_after(c, S, seqs[4], 15), redis7_server.port)
    assert covered and len(frames) == 15


def test_up_to_date_or_ahead_is_covered_live_only(r7, redis7_server):
    seqs = published(r7, 3)
    for after in (seqs[-1], seqs[-1] + 1, seqs[-1] + 10 ** 9):
        assert run(lambda c, after=after: read_after(c, S, after, 100),
                   redis7_server.port) == ([], True)


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
    assert snapshot == (seq, b'{"stream":"depth.A_B","data":{"e":"depthSnapshot","u":7},'
                             b'"seq":%d}' % seq)
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
