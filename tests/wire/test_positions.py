"""The recovery format (marketstream.wire.positions): the position prefix,
and the keys and frames of the recovery script, checked against the script
run by a real Redis."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketstream.publisher import Publisher
from marketstream.wire.positions import (
    FRAME_DATA,
    FRAME_END,
    FRAME_START,
    MAX_POSITION,
    split_position,
    stream_keys,
)


@given(st.integers(min_value=0, max_value=2**53), st.binary())
def test_split_position_reads_any_position(seq, frame):
    assert split_position(b"@%d %s" % (seq, frame)) == (seq, frame)


@given(st.one_of(st.binary(), st.binary().map(lambda b: b"@" + b)))
def test_split_position_other_payloads(payload):
    seq, rest = split_position(payload)
    if seq is None:
        assert rest == payload
    else:
        digits = payload[1 : payload.index(b" ")]
        assert digits.isdigit() and int(digits) == seq
        assert payload == b"@" + digits + b" " + rest
    if payload[:1] != b"@":
        assert seq is None


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"@",
        b"@ x",
        b"@12",
        b"@12x {}",
        b"@-1 {}",
        b"@" + b"9" * 30 + b" {}",
        b'{"stream":"a"}',
    ],
)
def test_split_position_malformed(payload):
    assert split_position(payload) == (None, payload)


def test_the_script_writes_the_keys_and_frames_this_module_describes(redis_client):
    """What recovery.lua publishes and stores is the format described here:
    the keys of stream_keys, the prefix split_position reads, the frame of
    FRAME_START, FRAME_DATA and FRAME_END."""
    stream = "trade.POSITIONS_X"
    pubsub = redis_client.pubsub()
    pubsub.subscribe(stream)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    seq = Publisher(redis_client, history=10, ttl=60).publish(stream, '{"p":"1.5"}', snapshot=True)
    assert 0 < seq <= MAX_POSITION
    published = pubsub.get_message(timeout=5)["data"]
    frame = FRAME_START + stream.encode() + FRAME_DATA + b'{"p":"1.5"}' + FRAME_END % seq
    assert split_position(published) == (seq, frame)
    seq_key, log_key, snap_key = stream_keys(stream)
    assert int(redis_client.get(seq_key)) == seq
    assert split_position(redis_client.get(snap_key)) == (seq, frame)
    ((entry_id, fields),) = redis_client.xrange(log_key)
    assert entry_id == b"%d-0" % seq and split_position(fields[b"p"]) == (seq, frame)
    pubsub.close()
    redis_client.delete(seq_key, log_key, snap_key)
