"""The protocol module, directly: no sockets."""

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marketstream import protocol
from marketstream.config import load_settings
from marketstream.protocol import Invalid, Request, StreamRules, parse_request

# --- parse_request -------------------------------------------------------------


def test_valid_requests():
    assert parse_request('{"method":"SUBSCRIBE","params":["trade.A_B","depth.C_D"],"id":1}') == \
        Request("SUBSCRIBE", ("trade.A_B", "depth.C_D"), 1)
    assert parse_request('{"method":"UNSUBSCRIBE","params":["trade.A_B"],"id":"x"}') == \
        Request("UNSUBSCRIBE", ("trade.A_B",), "x")
    assert parse_request('{"method":"LIST_SUBSCRIPTIONS","id":3}') == Request("LIST_SUBSCRIPTIONS", (), 3)


@pytest.mark.parametrize("frame, reason, code", [
    (b"\x00binary", "binary frame", 3),
    ("not json", "invalid JSON", 3),
    ("[1,2]", "not a JSON object", 2),
    ("42", "not a JSON object", 2),
    ("null", "not a JSON object", 2),
    ('{"params":["trade.A_B"],"id":1}', "missing or invalid method", 2),
    ('{"method":7,"params":["trade.A_B"],"id":1}', "missing or invalid method", 2),
    ('{"method":"DELETE","params":["trade.A_B"],"id":1}', "unknown method 'DELETE'", 2),
    ('{"method":"SUBSCRIBE","id":1}', "params must be an array of strings", 2),
    ('{"method":"SUBSCRIBE","params":"trade.A_B","id":1}', "params must be an array of strings", 2),
    ('{"method":"SUBSCRIBE","params":[1],"id":1}', "params must be an array of strings", 2),
    ('{"method":"SUBSCRIBE","params":[],"id":1}', "params must not be empty", 2),
    ('{"method":"SUBSCRIBE","params":["trade.A_B"]}', "missing or invalid id", 2),
    ('{"method":"SUBSCRIBE","params":["trade.A_B"],"id":true}', "missing or invalid id", 2),
    ('{"method":"SUBSCRIBE","params":["trade.A_B"],"id":{}}', "missing or invalid id", 2),
])
def test_invalid_frames(frame, reason, code):
    result = parse_request(frame)
    assert isinstance(result, Invalid)
    assert (result.reason, result.code) == (reason, code)


def test_invalid_frame_keeps_a_readable_id():
    assert parse_request('{"method":"NOPE","params":[],"id":9}').id == 9


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=15)
request_like = st.fixed_dictionaries({}, optional={
    "method": st.sampled_from(["SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "subscribe", ""]) | json_values,
    "params": st.lists(st.text(max_size=30), max_size=5) | json_values,
    "id": st.integers() | st.text(max_size=5) | json_values,
})


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                 json_values.map(json.dumps), request_like.map(json.dumps)))
def test_parse_request_never_raises(frame):
    result = parse_request(frame)
    assert isinstance(result, (Request, Invalid))
    if isinstance(result, Request):
        assert result.method in protocol.METHODS
        assert isinstance(result.params, tuple) and all(isinstance(p, str) for p in result.params)
        if result.method != protocol.LIST_SUBSCRIPTIONS:
            assert result.params


# --- stream names ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["trade.SOL_USDC", "depth.BTC_USDT", "ticker.ETH_USDT",
                                  "bookTicker.X1_Y2", "kline.1m.SOL_USDC", "depth.200ms.SOL_USDC"])
def test_default_rules_accept(name):
    assert StreamRules().check(name) is None


@pytest.mark.parametrize("name", ["", "trade", "nope.SOL_USDC", "trade.sol_usdc", "trade.SOLUSDC",
                                  "trade..SOL_USDC", "trade.*", "trade.SOL USDC",
                                  "kline.1 m.SOL_USDC", "depth." + "A" * 300 + "_B"])
def test_default_rules_reject(name):
    assert StreamRules().check(name) is not None


def test_market_allow_list_and_pattern():
    rules = StreamRules(markets=("SOL_USDC",))
    assert rules.check("trade.SOL_USDC") is None
    assert "unknown market" in rules.check("trade.BTC_USDT")
    assert StreamRules(market_pattern=r"^[a-z]+$").check("trade.abc") is None
    rules = StreamRules.from_settings(load_settings(environ={}, overrides={
        "protocol.stream_types": "trade", "protocol.markets": "A_B, C_D"}).protocol)
    assert rules.check("trade.C_D") is None and rules.check("depth.C_D") is not None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_stream_rules_never_raise(name):
    reason = StreamRules().check(name)
    if reason is None:
        parts = name.split(".")
        assert parts[0] in StreamRules().types
        assert StreamRules().market_pattern.match(parts[-1])


# --- encoders ----------------------------------------------------------------------

def test_binance_shapes():
    assert json.loads(protocol.encode_result(1)) == {"result": None, "id": 1}
    assert json.loads(protocol.encode_result(2, ["trade.A_B"])) == {"result": ["trade.A_B"], "id": 2}
    assert json.loads(protocol.encode_error(3, 2, "bad")) == {"error": {"code": 2, "msg": "bad"}, "id": 3}


def test_wrap_data_is_byte_exact():
    wrapped = protocol.wrap_data(b"trade.A_B", b'{ "e" : "trade" }')
    assert wrapped == b'{"stream":"trade.A_B","data":{ "e" : "trade" }}'
    assert json.loads(wrapped)["data"] == {"e": "trade"}


@pytest.mark.parametrize("payload, expected", [
    (b'{"a":1}', True), (b"[1]", False), (b"1", False), (b'{"a":', False), (b"", False),
    (b"\xff\xfe", False), (b'"s"', False)])
def test_is_json_object(payload, expected):
    assert protocol.is_json_object(payload) is expected


def test_gap_notice():
    notice = json.loads(protocol.gap_notice("depth.200ms.SOL_USDC", now=1.5))
    assert notice["stream"] == "depth.200ms.SOL_USDC"
    assert notice["data"]["e"] == "gap" and notice["data"]["s"] == "SOL_USDC"
    assert notice["data"]["E"] == 1_500_000


# --- frames ------------------------------------------------------------------------

def decode_frame(frame):
    """A reference decoder for an unmasked server frame (RFC 6455 5.2)."""
    first, second = frame[0], frame[1]
    assert first == 0x81 and not second & 0x80  # FIN, text, unmasked
    length, offset = second & 0x7F, 2
    if length == 126:
        length, offset = struct.unpack("!H", frame[2:4])[0], 4
    elif length == 127:
        length, offset = struct.unpack("!Q", frame[2:10])[0], 10
    assert len(frame) == offset + length
    return frame[offset:]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_lengths(size):
    payload = b"x" * size
    frame = protocol.text_frame(payload)
    assert decode_frame(frame) == payload
    assert len(frame) - size == (2 if size < 126 else 4 if size < 65536 else 10)


def test_token_bucket():
    allowed, tokens = protocol.take_token(2.0, 0.0, 0.0, rate=1, burst=2)
    assert allowed and tokens == 1.0
    allowed, tokens = protocol.take_token(tokens, 0.0, 0.0, rate=1, burst=2)
    assert allowed and tokens == 0.0
    assert protocol.take_token(tokens, 0.0, 0.5, rate=1, burst=2) == (False, 0.5)
    assert protocol.take_token(0.0, 0.0, 100.0, rate=1, burst=2) == (True, 1.0)  # capped at burst
