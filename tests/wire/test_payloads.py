"""Payloads from Redis (marketstream.wire.payloads): the JSON object check,
the channel's own stream, the recovery script's frames, the data format's
wrapping."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketstream.wire.payloads import (
    MALFORMED,
    WRONG_STREAM,
    envelope_problem,
    frame_problem,
    is_json_object,
    wrap_data,
)
from marketstream.wire.positions import MAX_POSITION
from tests.wire.strategies import FUZZ, JSON_VALUES, strict_json


@pytest.mark.parametrize(
    "stream, payload",
    [
        (b"trade.SOL_USDC", b'{"e":"trade","p":"101.5"}'),
        (b"depth.BTC_USDT", b'{ "b" : [["1.10","0"]], "a":[] , "E":1.000}'),  # not re-encoded
        (b"kline.1m.SOL_USDC", b"{}"),
        (b"ticker.ETH_USDT", '{"s":"\u00e9\u20ac"}'.encode()),
    ],
)
def test_wrap_data_is_byte_exact(stream, payload):
    wrapped = wrap_data(stream, payload)
    assert wrapped == b'{"stream":"' + stream + b'","data":' + payload + b"}"
    assert json.loads(wrapped) == {"stream": stream.decode(), "data": json.loads(payload)}
    assert is_json_object(wrapped)


@FUZZ
@given(
    st.sampled_from(["trade.SOL_USDC", "kline.1m.A_B"]),
    st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=4),
)
def test_fuzz_wrap_data(stream, data):
    payload = json.dumps(data).encode()
    wrapped = wrap_data(stream.encode(), payload)
    assert wrapped.endswith(payload + b"}")
    assert json.loads(wrapped) == {"stream": stream, "data": data}


@pytest.mark.parametrize(
    "payload",
    [
        b"{}",
        b'{"e":"trade"}',
        b' \n{"a": [1, 2, {"b": null}]}\t',
        '{"s":"\u00e9"}'.encode(),
        b'{"a":1,"a":2}',
        b'{"big":123456789012345678901234567890}',
    ],
)
def test_is_json_object_true(payload):
    assert is_json_object(payload) is True


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b" ",
        b"[]",
        b'[{"a":1}]',
        b"1",
        b"-2.5",
        b'"text"',
        b"null",
        b"true",
        b'{"a":1',
        b'{"a":',
        b"{",
        b'{"a":1}}',
        b'{"a":1}{"b":2}',
        b'{"a":1} x',
        b"\xff\xfe",
        b'{"a":"\xff"}',
        b'{"a":"\xc3"}',
        b"{'a':1}",
        b'{"a":1,}',
        b"{a:1}",
        b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}",
    ],
)
def test_is_json_object_false(payload):
    assert is_json_object(payload) is False


@pytest.mark.parametrize(
    "payload",
    [
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":-Infinity}',
        b'{"a":01}',
        b'{"a":-01}',
        b'{"a":[00]}',
        b'{"a":1.}',
        b'{"a":"\x01"}',
    ],
)
def test_is_json_object_rejects_what_json_does_not_allow(payload):
    """These are forwarded to clients as they are, and JSON.parse throws on
    them: they are not JSON objects."""
    with pytest.raises(ValueError):
        strict_json(payload)
    assert is_json_object(payload) is False


@FUZZ
@given(JSON_VALUES)
def test_fuzz_is_json_object(value):
    assert is_json_object(json.dumps(value).encode()) is isinstance(value, dict)


@FUZZ
@given(st.binary(max_size=40))
def test_fuzz_is_json_object_on_bytes(data):
    if is_json_object(data):
        assert isinstance(strict_json(data.decode("utf-8")), dict)


def standard_verdict(payload):
    try:
        return isinstance(strict_json(payload.decode("utf-8")), dict)
    except (ValueError, RecursionError):
        return False


@pytest.mark.parametrize(
    "payload",
    [
        b'{"a":"\\ud800"}',
        b'{"a":"\\udc00x"}',
        b'{"a":1e400}',
        b'{"a":-1e999}',
        b'{"a":123456789012345678901234567890}',
        b"\xef\xbb\xbf{}",
        b'{"a":"\xed\xa0\x80"}',
        b'{"a":' + b"[" * 2000 + b"]" * 2000 + b"}",
        b'{"a":1}\n',
        b'\t{"a":"\\u00e9"} ',
    ],
)
def test_is_json_object_gives_the_standard_librarys_verdict(payload):
    """The fast reader (orjson) refuses a few texts the standard library
    takes; the standard library's verdict stands either way."""
    assert is_json_object(payload) is standard_verdict(payload)


# Texts near JSON: objects with a byte changed, inserted or dropped.
NEAR_JSON = st.builds(
    lambda value, at, byte, how: (
        lambda text: (
            text[:at] + bytes([byte]) + text[at + (how == "change") :]
            if how != "drop"
            else text[:at] + text[at + 1 :]
        )
    )(json.dumps(value).encode()),
    st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3),
    st.integers(0, 30),
    st.integers(0, 255),
    st.sampled_from(["change", "insert", "drop"]),
)


@FUZZ
@given(st.one_of(NEAR_JSON, st.binary(max_size=40)))
def test_fuzz_is_json_object_agrees_with_the_standard_library(payload):
    assert is_json_object(payload) is standard_verdict(payload)


# --- payloads from Redis: the channel's own stream ------------------------------

CHANNEL = "trade.SOL_USDC"


def script_frame(data: bytes, seq: int, stream: str = CHANNEL) -> bytes:
    """What recovery.lua publishes after the ``@<seq> `` prefix."""
    return b'{"stream":"%s","data":%s,"seq":%d}' % (stream.encode(), data, seq)


def top_level_streams(payload: bytes) -> list:
    pairs = json.loads(payload.decode("utf-8"), object_pairs_hook=lambda pairs: pairs)
    return [value for key, value in pairs if key == "stream"] if isinstance(pairs, list) else None


@FUZZ
@given(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4), st.integers(1, MAX_POSITION))
def test_fuzz_every_frame_the_script_writes_passes(data, seq):
    payload = json.dumps(data, ensure_ascii=False).encode()
    assert frame_problem(CHANNEL.encode(), seq, script_frame(payload, seq)) is None


def envelope_verdict(payload: bytes, stream: str):
    """The model: one object whose last top-level "stream" (the one
    JSON.parse takes) is ``stream``, and no second one unless only one of
    them is spelled without escapes; else why not."""
    if not standard_verdict(payload):
        return MALFORMED
    streams = top_level_streams(payload)
    if not streams or streams[-1] != stream:
        return WRONG_STREAM
    if len(streams) > 1 and payload.count(b'"stream"') > 1:
        return WRONG_STREAM
    return None


# Payloads near a script frame: a byte changed, inserted or dropped, or a
# second "stream" spliced in, or another stream's name.
NEAR_FRAME = st.builds(
    lambda data, seq, at, piece, how: (
        lambda text: (
            text[:at] + piece + text[at:]
            if how == "insert"
            else text[:at] + text[at + len(piece) :]
            if how == "drop"
            else text[:at] + piece + text[at + len(piece) :]
        )
    )(script_frame(json.dumps(data).encode(), seq)),
    st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3),
    st.integers(1, 10**6),
    st.integers(0, 60),
    st.sampled_from(
        [
            b",",
            b'"',
            b"}",
            b"{",
            b"\xff",
            b'"stream":"depth.X_Y",',
            b',"stream":"x"',
            b"0",
            b"7",
            b" ",
            b"\\u0041",
            b'"seq":1,',
        ]
    ),
    st.sampled_from(["change", "insert", "drop"]),
)


@FUZZ
@given(NEAR_FRAME, st.integers(1, 10**6))
def test_fuzz_a_frame_that_passes_is_the_channels_own_with_its_position(frame, seq):
    """Whatever frame_problem lets through is one strict JSON object with
    exactly the keys stream (the channel, once), data (an object) and seq
    (the position): what a browser's JSON.parse reads as this stream's."""
    if frame_problem(CHANNEL.encode(), seq, frame) is None:
        pairs = json.loads(
            frame.decode("utf-8"), object_pairs_hook=lambda pairs: pairs, parse_constant=float
        )
        assert [key for key, _ in pairs] == ["stream", "data", "seq"]
        assert pairs[0][1] == CHANNEL and pairs[2][1] == seq
        assert isinstance(pairs[1][1], list)  # an object (as pairs)
        assert standard_verdict(frame)


@pytest.mark.parametrize(
    "frame, problem",
    [
        (script_frame(b'{"p":"1"}', 7), None),
        (script_frame(b'{"p":"\xff"}', 7), "malformed_payload"),
        (script_frame(b'{"p":1},"stream":"depth.X_Y"', 7), "malformed_payload"),
        (script_frame(b"[1]", 7), "malformed_payload"),
        (script_frame(b"{}", 8), "malformed_payload"),
        (script_frame(b"{}", 7)[:-1], "malformed_payload"),
        (b'{"stream": "trade.SOL_USDC","data":{},"seq":7}', "malformed_payload"),
        (b'{"data":{},"stream":"trade.SOL_USDC","seq":7}', "malformed_payload"),
        (script_frame(b"{}", 7, "depth.SOL_USDC"), "wrong_stream"),
        (script_frame(b"{}", 7, "trade.SOL_USDCX"), "wrong_stream"),
        (script_frame(b"{}", 7, "trade.SOL"), "wrong_stream"),
    ],
)
def test_frame_problem(frame, problem):
    assert frame_problem(CHANNEL.encode(), 7, frame) == problem


def test_frame_problem_refuses_positions_past_two_to_the_53():
    big = MAX_POSITION + 1
    assert frame_problem(CHANNEL.encode(), big, script_frame(b"{}", big)) == "malformed_payload"


@pytest.mark.parametrize(
    "payload, problem",
    [
        (b'{"stream":"trade.SOL_USDC","data":{}}', None),
        (b' {"data":{"stream":"x"}, "stream" : "trade.SOL_USDC"} ', None),
        (b'{"stream":"trade.SOL_USDC","data":{"s":"\\u00e9"}}', None),
        (b'{"stream":"trade.SOL_USDC","data":{"k":{"stream":1,"stream":2}}}', None),
        (b'{"stream":"depth.SOL_USDC","data":{}}', "wrong_stream"),
        (b'{"data":{}}', "wrong_stream"),
        (b'{"stream":null,"data":{}}', "wrong_stream"),
        (b'{"stream":"trade.SOL_USDC","stream":"trade.SOL_USDC","data":{}}', "wrong_stream"),
        (b'{"stream":"x","data":{},"stream":"trade.SOL_USDC"}', "wrong_stream"),
        (b'{"stream":"trade.SOL_USDC","\\u0073tream":"x"}', "wrong_stream"),
        (b'{"\\u0073tream":"x","stream":"trade.SOL_USDC"}', None),  # JSON.parse takes the last
        (b'{"stream":"trade.SOL_USDC","data":{"p":"\xff"}}', "malformed_payload"),
        (b'[{"stream":"trade.SOL_USDC"}]', "malformed_payload"),
        (b'{"stream":"trade.SOL_USDC","data":NaN}', "malformed_payload"),
        (b'{"stream":"trade.SOL_USDC","x":"\\ud800"}', None),  # the standard library's verdict
    ],
)
def test_envelope_problem(payload, problem):
    assert envelope_problem(CHANNEL, payload) == problem


NEAR_ENVELOPE = st.builds(
    lambda data, at, piece, how: (
        lambda text: (
            text[:at] + piece + text[at:]
            if how == "insert"
            else text[:at] + text[at + len(piece) :]
        )
    )(b'{"stream":"trade.SOL_USDC","data":%s}' % json.dumps(data).encode()),
    st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3),
    st.integers(0, 50),
    st.sampled_from(
        [
            b'"stream":"depth.X_Y",',
            b',"stream":"trade.SOL_USDC"',
            b'"str\\u0065am":1,',
            b",",
            b"}",
            b"\xff",
            b'"',
            b"x",
        ]
    ),
    st.sampled_from(["insert", "drop"]),
)


@FUZZ
@given(NEAR_ENVELOPE)
def test_fuzz_envelope_problem_matches_a_model(payload):
    assert envelope_problem(CHANNEL, payload) == envelope_verdict(payload, CHANNEL)
