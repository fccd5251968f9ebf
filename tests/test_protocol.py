"""The sans-I/O protocol module: client frames, stream names, server frames.

No server and no Redis: every function is called directly.  The WebSocket
frame builder is also checked against Tornado's own frame parser over a
local TCP connection.
"""

import asyncio
import base64
import hashlib
import json
import re
import struct
import time

import pytest
import tornado.websocket
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from marketstream import protocol
from marketstream.config import load_settings
from marketstream.protocol import (
    ERROR_INVALID_JSON,
    ERROR_INVALID_REQUEST,
    GAP_REASONS,
    LIST_SUBSCRIPTIONS,
    METHODS,
    SUBSCRIBE,
    UNSUBSCRIBE,
    Invalid,
    Request,
    StreamRules,
    encode_error,
    encode_result,
    envelope_problem,
    frame_problem,
    gap_notice,
    is_json_object,
    parse_request,
    text_frame,
    wrap_data,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frame(**fields):
    return json.dumps(fields)


def strict_json(data):
    """json.loads that refuses NaN / Infinity (not JSON, and JSON.parse in a
    browser throws on them)."""
    def reject(constant):
        raise ValueError("not JSON: %s" % constant)
    return json.loads(data, parse_constant=reject)


# --- parse_request: valid requests ---------------------------------------------


def test_subscribe_keeps_every_param_in_order():
    streams = ["trade.SOL_USDC", "depth.BTC_USDT", "ticker.ETH_USDT", "kline.1m.SOL_USDC"]
    assert parse_request(frame(method="SUBSCRIBE", params=streams, id=1)) == \
        Request(SUBSCRIBE, tuple(streams), 1)


def test_unsubscribe_keeps_every_param_in_order():
    streams = ["depth.BTC_USDT", "trade.SOL_USDC"]
    request = parse_request(frame(method="UNSUBSCRIBE", params=streams, id="abc"))
    assert request == Request(UNSUBSCRIBE, ("depth.BTC_USDT", "trade.SOL_USDC"), "abc")
    assert isinstance(request.params, tuple)


def test_duplicate_params_are_kept_for_the_caller_to_handle():
    request = parse_request(frame(method="SUBSCRIBE", params=["trade.A_B", "trade.A_B"], id=2))
    assert request == Request(SUBSCRIBE, ("trade.A_B", "trade.A_B"), 2)


@pytest.mark.parametrize("text, expected", [
    ('{"method":"LIST_SUBSCRIPTIONS","id":3}', Request(LIST_SUBSCRIPTIONS, (), 3)),
    ('{"method":"LIST_SUBSCRIPTIONS","params":[],"id":4}', Request(LIST_SUBSCRIPTIONS, (), 4)),
    ('{"method":"LIST_SUBSCRIPTIONS","params":["x"],"id":5}', Request(LIST_SUBSCRIPTIONS, ("x",), 5)),
])
def test_list_subscriptions_with_and_without_params(text, expected):
    assert parse_request(text) == expected


@pytest.mark.parametrize("request_id", [0, -1, 7, 2 ** 40, 1.5, "req-1", "", None])
def test_accepted_ids(request_id):
    request = parse_request(frame(method="SUBSCRIBE", params=["trade.A_B"], id=request_id))
    assert isinstance(request, Request)
    assert request.id == request_id and type(request.id) is type(request_id)


@pytest.mark.parametrize("method", [SUBSCRIBE, UNSUBSCRIBE])
def test_a_request_without_id_is_served_like_id_null(method):
    # Backpack's SDK sends {"method":"SUBSCRIBE","params":[...]} with no id.
    assert parse_request('{"method":"%s","params":["trade.SOL_USDC"]}' % method) == \
        Request(method, ("trade.SOL_USDC",), None)


def test_whitespace_and_key_order_do_not_matter():
    text = ' \n{ "id" : 9 ,\t"params" : [ "trade.A_B" ] , "method" : "SUBSCRIBE" }\n '
    assert parse_request(text) == Request(SUBSCRIBE, ("trade.A_B",), 9)


def test_unknown_extra_keys_are_ignored():
    request = parse_request(frame(method="SUBSCRIBE", params=["trade.A_B"], id=1, extra={"x": 1}))
    assert request == Request(SUBSCRIBE, ("trade.A_B",), 1)


# --- parse_request: invalid frames -----------------------------------------------

P = ["trade.A_B"]


@pytest.mark.parametrize("text, reason, code, request_id", [
    # not JSON at all
    ("hello", "invalid JSON", ERROR_INVALID_JSON, None),
    ("", "invalid JSON", ERROR_INVALID_JSON, None),
    ('{"method":"SUBSCRIBE"', "invalid JSON", ERROR_INVALID_JSON, None),
    ("{'method':'SUBSCRIBE','params':['trade.A_B'],'id':1}", "invalid JSON", ERROR_INVALID_JSON, None),
    ('{"method":"SUBSCRIBE","params":["trade.A_B"],"id":1} trailing', "invalid JSON",
     ERROR_INVALID_JSON, None),
    # JSON, but not an object
    ("[1,2]", "not a JSON object", ERROR_INVALID_REQUEST, None),
    ('[{"method":"SUBSCRIBE","params":["trade.A_B"],"id":1}]', "not a JSON object",
     ERROR_INVALID_REQUEST, None),
    ("42", "not a JSON object", ERROR_INVALID_REQUEST, None),
    ("-1.5", "not a JSON object", ERROR_INVALID_REQUEST, None),
    ('"SUBSCRIBE"', "not a JSON object", ERROR_INVALID_REQUEST, None),
    ("null", "not a JSON object", ERROR_INVALID_REQUEST, None),
    ("true", "not a JSON object", ERROR_INVALID_REQUEST, None),
    # method
    (frame(params=P, id=1), "missing or invalid method", ERROR_INVALID_REQUEST, 1),
    (frame(method=7, params=P, id=1), "missing or invalid method", ERROR_INVALID_REQUEST, 1),
    (frame(method=None, params=P, id=1), "missing or invalid method", ERROR_INVALID_REQUEST, 1),
    (frame(method=["SUBSCRIBE"], params=P, id="a"), "missing or invalid method",
     ERROR_INVALID_REQUEST, "a"),
    (frame(method="DELETE", params=P, id=1), "unknown method 'DELETE'", ERROR_INVALID_REQUEST, 1),
    (frame(method="subscribe", params=P, id=1), "unknown method 'subscribe'", ERROR_INVALID_REQUEST, 1),
    (frame(method="", params=P, id=2), "unknown method ''", ERROR_INVALID_REQUEST, 2),
    # params
    (frame(method="SUBSCRIBE", id=1), "params must be an array of strings", ERROR_INVALID_REQUEST, 1),
    (frame(method="UNSUBSCRIBE", id=1), "params must be an array of strings", ERROR_INVALID_REQUEST, 1),
    (frame(method="SUBSCRIBE", params="trade.A_B", id=1), "params must be an array of strings",
     ERROR_INVALID_REQUEST, 1),
    (frame(method="SUBSCRIBE", params={"0": "trade.A_B"}, id=1), "params must be an array of strings",
     ERROR_INVALID_REQUEST, 1),
    (frame(method="SUBSCRIBE", params=None, id=1), "params must be an array of strings",
     ERROR_INVALID_REQUEST, 1),
    (frame(method="SUBSCRIBE", params=["trade.A_B", 1], id=1), "params must be an array of strings",
     ERROR_INVALID_REQUEST, 1),
    (frame(method="SUBSCRIBE", params=[None], id=1), "params must be an array of strings",
     ERROR_INVALID_REQUEST, 1),
    (frame(method="SUBSCRIBE", params=[["trade.A_B"]], id=1), "params must be an array of strings",
     ERROR_INVALID_REQUEST, 1),
    (frame(method="LIST_SUBSCRIPTIONS", params="x", id=1), "params must be an array of strings",
     ERROR_INVALID_REQUEST, 1),
    (frame(method="SUBSCRIBE", params=[], id=1), "params must not be empty", ERROR_INVALID_REQUEST, 1),
    (frame(method="UNSUBSCRIBE", params=[], id="u"), "params must not be empty",
     ERROR_INVALID_REQUEST, "u"),
    # id
    (frame(method="SUBSCRIBE", params=P, id=True), "invalid id", ERROR_INVALID_REQUEST, None),
    (frame(method="SUBSCRIBE", params=P, id=False), "invalid id", ERROR_INVALID_REQUEST, None),
    (frame(method="SUBSCRIBE", params=P, id={}), "invalid id", ERROR_INVALID_REQUEST, None),
    (frame(method="SUBSCRIBE", params=P, id={"n": 1}), "invalid id", ERROR_INVALID_REQUEST, None),
    (frame(method="SUBSCRIBE", params=P, id=[1]), "invalid id", ERROR_INVALID_REQUEST, None),
])
def test_invalid_frames(text, reason, code, request_id):
    result = parse_request(text)
    assert isinstance(result, Invalid)
    assert result == Invalid(reason, code, request_id)


@pytest.mark.parametrize("data", [b"", b"\x00binary", b'{"method":"SUBSCRIBE","params":["trade.A_B"],"id":1}',
                                  bytearray(b"{}"), memoryview(b"{}")])
def test_binary_frames_are_invalid(data):
    assert parse_request(data) == Invalid("binary frame", ERROR_INVALID_JSON, None)


def test_unknown_method_reason_is_bounded():
    result = parse_request(frame(method="X" * 10000, params=P, id=1))
    assert isinstance(result, Invalid) and result.id == 1
    assert result.reason.startswith("unknown method") and len(result.reason) < 100


def test_deeply_nested_json_is_invalid_not_an_error():
    assert isinstance(parse_request("[" * 100000), Invalid)
    assert isinstance(parse_request('{"a":' * 100000), Invalid)
    assert isinstance(parse_request("[" * 5000 + "]" * 5000), Invalid)


def _reply(result):
    if isinstance(result, Request):
        return encode_result(result.id, list(result.params))
    return encode_error(result.id, result.code, result.reason)


@pytest.mark.parametrize("text", [
    '{"method":"LIST_SUBSCRIPTIONS","id":NaN}',
    '{"method":"LIST_SUBSCRIPTIONS","id":Infinity}',
    '{"method":"LIST_SUBSCRIPTIONS","id":-Infinity}',
    '{"method":"LIST_SUBSCRIPTIONS","id":1e999}',
    '{"method":"SUBSCRIBE","params":[],"id":NaN}',
    '{"method":"LIST_SUBSCRIPTIONS","id":"\\ud800"}',
    '{"method":"SUBSCRIBE","params":[],"id":"\\udc00x"}',
    '{"method":"NOPE","id":"\\ud83d"}',
])
def test_the_reply_to_any_frame_is_strict_utf8_json(text):
    """Whatever parse_request returns, its reply (LIST_SUBSCRIPTIONS is
    always answered; errors when acks are on) must encode: the handler sends
    ``reply.encode()``, and clients run JSON.parse on it.  Rejecting such
    ids in parse_request is as good as encoding them safely."""
    result = parse_request(text)
    reply = _reply(result)
    decoded = strict_json(reply.encode("utf-8"))
    assert decoded["id"] == result.id or result.id is None


# --- parse_request: fuzzing ----------------------------------------------------------

def check_result(result):
    assert isinstance(result, (Request, Invalid))
    if isinstance(result, Request):
        assert result.method in METHODS
        assert isinstance(result.params, tuple)
        assert all(isinstance(p, str) for p in result.params)
        if result.method in (SUBSCRIBE, UNSUBSCRIBE):
            assert result.params
        assert result.id is None or (isinstance(result.id, (int, float, str))
                                     and not isinstance(result.id, bool))
    else:
        assert isinstance(result.reason, str) and result.reason
        assert result.code in (ERROR_INVALID_REQUEST, ERROR_INVALID_JSON)


@FUZZ
@given(st.text())
def test_fuzz_text_never_raises(text):
    check_result(parse_request(text))


@FUZZ
@given(st.binary())
def test_fuzz_bytes_never_raise(data):
    result = parse_request(data)
    assert result == Invalid("binary frame", ERROR_INVALID_JSON)


SCALARS = (st.none() | st.booleans() | st.integers(min_value=-10 ** 30, max_value=10 ** 30)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20)


@FUZZ
@given(JSON_VALUES)
def test_fuzz_json_values_never_raise(value):
    result = parse_request(json.dumps(value))
    check_result(result)
    if not isinstance(value, dict):
        assert result == Invalid("not a JSON object")


@FUZZ
@given(st.text(alphabet='{}[]",:0123456789.eE+-truefalsnNIiy \\u', max_size=60))
def test_fuzz_json_like_text_never_raises(text):
    check_result(parse_request(text))


STREAMS = st.sampled_from(["trade.SOL_USDC", "depth.BTC_USDT", "kline.1m.SOL_USDC", "", "x"]) | st.text(max_size=12)
METHOD_VALUES = st.sampled_from(sorted(METHODS)) | st.sampled_from(["subscribe", "", "LIST"]) | JSON_VALUES
PARAM_VALUES = st.lists(STREAMS, max_size=4) | st.lists(JSON_VALUES, max_size=3) | JSON_VALUES
ID_VALUES = (st.none() | st.booleans() | st.integers(min_value=-10 ** 30, max_value=10 ** 30)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10)
             | st.dictionaries(st.text(max_size=3), SCALARS, max_size=2) | st.lists(SCALARS, max_size=2))
REQUEST_LIKE = st.fixed_dictionaries(
    {}, optional={"method": METHOD_VALUES, "params": PARAM_VALUES, "id": ID_VALUES,
                  "extra": JSON_VALUES})


def expected_outcome(message):
    """An independent model of parse_request for a dict: None if invalid, else
    (method, params, id)."""
    request_id = message.get("id")  # absent: served like null
    if isinstance(request_id, bool) or not (request_id is None or isinstance(request_id, (int, float, str))):
        return None
    if isinstance(request_id, int) and not -2 ** 63 <= request_id < 2 ** 64:
        return None  # not echoed as a JSON number exactly: refused
    method = message.get("method")
    if method not in (SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS):
        return None
    params = message.get("params", [] if method == LIST_SUBSCRIPTIONS else None)
    if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
        return None
    if method != LIST_SUBSCRIPTIONS and not params:
        return None
    return method, tuple(params), request_id


@FUZZ
@given(REQUEST_LIKE)
def test_fuzz_request_shaped_objects_match_a_model(message):
    result = parse_request(json.dumps(message))
    check_result(result)
    expected = expected_outcome(message)
    if expected is None:
        assert isinstance(result, Invalid)
        if result.id is not None:  # an id is only reported when it was a valid one
            assert result.id == pytest.approx(message["id"], rel=1e-15, abs=0) \
                if isinstance(result.id, float) else result.id == message["id"]
    else:
        assert isinstance(result, Request)
        method, params, request_id = expected
        assert (result.method, result.params) == (method, params)
        if isinstance(request_id, float):
            assert result.id == pytest.approx(request_id, rel=1e-15, abs=0)
        else:
            assert result.id == request_id and type(result.id) is type(request_id)


# --- StreamRules -------------------------------------------------------------------

DEFAULT_TYPES = ("depth", "trade", "ticker", "bookTicker", "kline")


@pytest.mark.parametrize("name", [
    "trade.SOL_USDC", "depth.BTC_USDT", "ticker.ETH_USDT", "bookTicker.X1_Y2",
    "kline.1m.SOL_USDC", "depth.200ms.SOL_USDC", "kline.1m.extra.A_B",
    "trade." + "A" * 96 + "_" + "B" * 97,  # exactly 200 characters
])
def test_default_rules_accept(name):
    assert StreamRules().check(name) is None


@pytest.mark.parametrize("name", [
    "", "trade", "SOL_USDC", "trade.", ".SOL_USDC", "orders.SOL_USDC", "Trade.SOL_USDC",
    "trade.sol_usdc", "trade.Sol_Usdc", "trade.SOLUSDC", "trade.SOL_", "trade._USDC", "trade.SOL_USDC_X",
    "kline..SOL_USDC", "kline.1m..SOL_USDC", "kline.1-m.SOL_USDC", "trade.SOL_USDC.",
    "trade." + "A" * 97 + "_" + "B" * 97,  # 201 characters
    "trade." + "A" * 1000 + "_USDC",
    "trade.SOL USDC", "trade. SOL_USDC", " trade.SOL_USDC", "trade.SOL_USDC ", "trade .SOL_USDC",
    "trade.*", "*.SOL_USDC", "trade.SOL_*", "trade.?", "kline.*.SOL_USDC", "trade.SOL_USD\u0660",
    "trade.SOL_USDC\x00", "kline.\uff11m.SOL_USDC",
])
def test_default_rules_reject(name):
    reason = StreamRules().check(name)
    assert isinstance(reason, str) and reason


@pytest.mark.parametrize("name", ["trade.SOL_USDC\n", "kline.1m\n.SOL_USDC", "trade.SOL_USDC\r\n"])
def test_default_rules_reject_trailing_newlines(name):
    """A Python ``$`` also matches before a final newline: the market and
    middle-part checks must not accept "SOL_USDC\\n"."""
    assert StreamRules().check(name) is not None


def test_accepted_names_are_remembered_within_a_bound(monkeypatch):
    monkeypatch.setattr(protocol, "ACCEPTED_CACHE", 100)
    rules = StreamRules()
    for i in range(250):
        assert rules.check("trade.M%d_USDT" % i) is None
        assert len(rules._accepted) <= 100
    assert rules.check("trade.M249_USDT") is None and "trade.M249_USDT" in rules._accepted
    assert rules.check("trade.bad") is not None and "trade.bad" not in rules._accepted


def test_markets_allow_list_restricts_markets():
    rules = StreamRules(markets=("SOL_USDC", "BTC_USDT"))
    assert rules.check("trade.SOL_USDC") is None
    assert rules.check("kline.1m.BTC_USDT") is None
    assert rules.check("trade.ETH_USDT") is not None
    assert rules.check("trade.sol_usdc") is not None
    assert rules.check("orders.SOL_USDC") is not None


def test_types_allow_list():
    rules = StreamRules(types=("trade",))
    assert rules.check("trade.SOL_USDC") is None
    assert rules.check("depth.SOL_USDC") is not None


def test_custom_market_pattern():
    rules = StreamRules(market_pattern=r"^[a-z]+-[a-z]+$")
    assert rules.check("trade.sol-usdc") is None
    assert rules.check("trade.SOL_USDC") is not None
    compiled = StreamRules(market_pattern=re.compile(r"^[A-Z]{3}$"))
    assert compiled.check("trade.SOL") is None
    assert compiled.check("trade.SOL_USDC") is not None


def test_from_settings_defaults():
    rules = StreamRules.from_settings(load_settings(environ={}).protocol)
    for name in ("trade.SOL_USDC", "bookTicker.X1_Y2", "depth.200ms.SOL_USDC"):
        assert rules.check(name) is None
    for name in ("trade.sol_usdc", "orders.SOL_USDC", "trade.*"):
        assert rules.check(name) is not None


def test_from_settings_with_overrides():
    settings_ = load_settings(environ={}, overrides={
        "protocol.stream_types": "trade, depth", "protocol.markets": "SOL_USDC"})
    rules = StreamRules.from_settings(settings_.protocol)
    assert rules.check("trade.SOL_USDC") is None
    assert rules.check("depth.SOL_USDC") is None
    assert rules.check("ticker.SOL_USDC") is not None
    assert rules.check("trade.BTC_USDT") is not None
    pattern = load_settings(environ={}, overrides={"protocol.market_pattern": "^[a-z]+$"})
    rules = StreamRules.from_settings(pattern.protocol)
    assert rules.check("trade.sol") is None and rules.check("trade.SOL_USDC") is not None


MARKET_RULE = re.compile(r"[A-Z0-9]+_[A-Z0-9]+", re.ASCII)
MIDDLE_RULE = re.compile(r"[A-Za-z0-9]+", re.ASCII)


def model_accepts(name):
    if not name or len(name) > 200:
        return False
    parts = name.split(".")
    return (len(parts) >= 2 and parts[0] in DEFAULT_TYPES
            and MARKET_RULE.fullmatch(parts[-1]) is not None
            and all(MIDDLE_RULE.fullmatch(p) for p in parts[1:-1]))


PART = (st.sampled_from(DEFAULT_TYPES + ("SOL_USDC", "BTC_USDT", "X1_Y2", "1m", "200ms", "", "*", "sol_usdc"))
        | st.text(max_size=8)
        | st.builds(lambda base, junk: base + junk, st.sampled_from(["SOL_USDC", "1m", "trade"]),
                    st.text(max_size=2)))
NAMES = st.lists(PART, min_size=1, max_size=5).map(".".join) | st.text()


@FUZZ
@given(NAMES)
@example("trade.SOL_USDC\n")
def test_fuzz_stream_rules(name):
    reason = StreamRules().check(name)
    assert reason is None or (isinstance(reason, str) and reason)
    assert (reason is None) == model_accepts(name), (name, reason)


@FUZZ
@given(st.text())
def test_fuzz_stream_rules_on_arbitrary_text(name):
    reason = StreamRules().check(name)
    if reason is None:
        assert model_accepts(name), name


# --- server frames -----------------------------------------------------------------


@pytest.mark.parametrize("request_id, result, expected", [
    (1, None, {"result": None, "id": 1}),
    ("abc", None, {"result": None, "id": "abc"}),
    (None, None, {"result": None, "id": None}),
    (7, ["trade.SOL_USDC", "depth.BTC_USDT"], {"result": ["trade.SOL_USDC", "depth.BTC_USDT"], "id": 7}),
    (8, [], {"result": [], "id": 8}),
])
def test_encode_result(request_id, result, expected):
    text = encode_result(request_id, result)
    assert isinstance(text, str)
    assert strict_json(text) == expected
    assert list(strict_json(text)) == ["result", "id"]


def test_encode_result_default_is_null():
    assert strict_json(encode_result(3)) == {"result": None, "id": 3}


@pytest.mark.parametrize("request_id, code, msg", [
    (1, 2, "params must not be empty"),
    ("x", 3, "invalid JSON"),
    (None, 2, "trade.sol: invalid market 'sol'; unknown method \"X\""),
    (5, 2, "caf\u00e9 \u20ac \\ / \n"),
])
def test_encode_error(request_id, code, msg):
    text = encode_error(request_id, code, msg)
    assert isinstance(text, str)
    assert strict_json(text) == {"error": {"code": code, "msg": msg}, "id": request_id}
    text.encode("utf-8")


@pytest.mark.parametrize("stream, payload", [
    (b"trade.SOL_USDC", b'{"e":"trade","p":"101.5"}'),
    (b"depth.BTC_USDT", b'{ "b" : [["1.10","0"]], "a":[] , "E":1.000}'),  # not re-encoded
    (b"kline.1m.SOL_USDC", b"{}"),
    (b"ticker.ETH_USDT", '{"s":"\u00e9\u20ac"}'.encode()),
])
def test_wrap_data_is_byte_exact(stream, payload):
    wrapped = wrap_data(stream, payload)
    assert wrapped == b'{"stream":"' + stream + b'","data":' + payload + b"}"
    assert json.loads(wrapped) == {"stream": stream.decode(), "data": json.loads(payload)}
    assert is_json_object(wrapped)


@FUZZ
@given(st.sampled_from(["trade.SOL_USDC", "kline.1m.A_B"]),
       st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=4))
def test_fuzz_wrap_data(stream, data):
    payload = json.dumps(data).encode()
    wrapped = wrap_data(stream.encode(), payload)
    assert wrapped.endswith(payload + b"}")
    assert json.loads(wrapped) == {"stream": stream, "data": data}


@pytest.mark.parametrize("payload", [
    b"{}", b'{"e":"trade"}', b' \n{"a": [1, 2, {"b": null}]}\t', '{"s":"\u00e9"}'.encode(),
    b'{"a":1,"a":2}', b'{"big":123456789012345678901234567890}',
])
def test_is_json_object_true(payload):
    assert is_json_object(payload) is True


@pytest.mark.parametrize("payload", [
    b"", b" ", b"[]", b'[{"a":1}]', b"1", b"-2.5", b'"text"', b"null", b"true",
    b'{"a":1', b'{"a":', b"{", b'{"a":1}}', b'{"a":1}{"b":2}', b'{"a":1} x',
    b"\xff\xfe", b'{"a":"\xff"}', b'{"a":"\xc3"}', b"{'a':1}", b'{"a":1,}', b'{a:1}',
    b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}",
])
def test_is_json_object_false(payload):
    assert is_json_object(payload) is False


@pytest.mark.parametrize("payload", [b'{"a":NaN}', b'{"a":Infinity}', b'{"a":-Infinity}', b'{"a":01}',
                                     b'{"a":-01}', b'{"a":[00]}', b'{"a":1.}', b'{"a":"\x01"}'])
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


@pytest.mark.parametrize("payload", [
    b'{"a":"\\ud800"}', b'{"a":"\\udc00x"}', b'{"a":1e400}', b'{"a":-1e999}',
    b'{"a":123456789012345678901234567890}', b"\xef\xbb\xbf{}", b'{"a":"\xed\xa0\x80"}',
    b'{"a":' + b"[" * 2000 + b"]" * 2000 + b"}", b'{"a":1}\n', b'\t{"a":"\\u00e9"} ',
])
def test_is_json_object_gives_the_standard_librarys_verdict(payload):
    """The fast reader (orjson) refuses a few texts the standard library
    takes; the standard library's verdict stands either way."""
    assert is_json_object(payload) is standard_verdict(payload)


# Texts near JSON: objects with a byte changed, inserted or dropped.
NEAR_JSON = st.builds(
    lambda value, at, byte, how: (
        lambda text: text[:at] + bytes([byte]) + text[at + (how == "change"):] if how != "drop"
        else text[:at] + text[at + 1:])(json.dumps(value).encode()),
    st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3),
    st.integers(0, 30), st.integers(0, 255), st.sampled_from(["change", "insert", "drop"]))


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
@given(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4),
       st.integers(1, protocol.MAX_POSITION))
def test_fuzz_every_frame_the_script_writes_passes(data, seq):
    payload = json.dumps(data, ensure_ascii=False).encode()
    assert frame_problem(CHANNEL.encode(), seq, script_frame(payload, seq)) is None


def envelope_verdict(payload: bytes, stream: str):
    """The model: one object whose last top-level "stream" (the one
    JSON.parse takes) is ``stream``, and no second one unless only one of
    them is spelled without escapes; else why not."""
    if not standard_verdict(payload):
        return protocol.MALFORMED
    streams = top_level_streams(payload)
    if not streams or streams[-1] != stream:
        return protocol.WRONG_STREAM
    if len(streams) > 1 and payload.count(b'"stream"') > 1:
        return protocol.WRONG_STREAM
    return None


# Payloads near a script frame: a byte changed, inserted or dropped, or a
# second "stream" spliced in, or another stream's name.
NEAR_FRAME = st.builds(
    lambda data, seq, at, piece, how: (lambda text: (
        text[:at] + piece + text[at:] if how == "insert"
        else text[:at] + text[at + len(piece):] if how == "drop"
        else text[:at] + piece + text[at + len(piece):]))(
        script_frame(json.dumps(data).encode(), seq)),
    st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3), st.integers(1, 10 ** 6),
    st.integers(0, 60),
    st.sampled_from([b",", b'"', b"}", b"{", b"\xff", b'"stream":"depth.X_Y",', b',"stream":"x"',
                     b"0", b"7", b" ", b"\\u0041", b'"seq":1,']),
    st.sampled_from(["change", "insert", "drop"]))


@FUZZ
@given(NEAR_FRAME, st.integers(1, 10 ** 6))
def test_fuzz_a_frame_that_passes_is_the_channels_own_with_its_position(frame, seq):
    """Whatever frame_problem lets through is one strict JSON object with
    exactly the keys stream (the channel, once), data (an object) and seq
    (the position): what a browser's JSON.parse reads as this stream's."""
    if frame_problem(CHANNEL.encode(), seq, frame) is None:
        pairs = json.loads(frame.decode("utf-8"), object_pairs_hook=lambda pairs: pairs,
                           parse_constant=float)
        assert [key for key, _ in pairs] == ["stream", "data", "seq"]
        assert pairs[0][1] == CHANNEL and pairs[2][1] == seq
        assert isinstance(pairs[1][1], list)  # an object (as pairs)
        assert standard_verdict(frame)


@pytest.mark.parametrize("frame, problem", [
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
])
def test_frame_problem(frame, problem):
    assert frame_problem(CHANNEL.encode(), 7, frame) == problem


def test_frame_problem_refuses_positions_past_two_to_the_53():
    big = protocol.MAX_POSITION + 1
    assert frame_problem(CHANNEL.encode(), big, script_frame(b"{}", big)) == "malformed_payload"


@pytest.mark.parametrize("payload, problem", [
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
])
def test_envelope_problem(payload, problem):
    assert envelope_problem(CHANNEL, payload) == problem


NEAR_ENVELOPE = st.builds(
    lambda data, at, piece, how: (lambda text: (
        text[:at] + piece + text[at:] if how == "insert"
        else text[:at] + text[at + len(piece):]))(
        b'{"stream":"trade.SOL_USDC","data":%s}' % json.dumps(data).encode()),
    st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3), st.integers(0, 50),
    st.sampled_from([b'"stream":"depth.X_Y",', b',"stream":"trade.SOL_USDC"', b'"str\\u0065am":1,',
                     b",", b"}", b"\xff", b'"', b"x"]),
    st.sampled_from(["insert", "drop"]))


@FUZZ
@given(NEAR_ENVELOPE)
def test_fuzz_envelope_problem_matches_a_model(payload):
    assert envelope_problem(CHANNEL, payload) == envelope_verdict(payload, CHANNEL)


@pytest.mark.parametrize("stream, market", [
    ("trade.SOL_USDC", "SOL_USDC"), ("kline.1m.BTC_USDT", "BTC_USDT"), ("depth.200ms.X1_Y2", "X1_Y2"),
])
def test_gap_notice_shape(stream, market):
    notice = gap_notice(stream, now=1700000000.5)
    assert isinstance(notice, bytes) and is_json_object(notice)
    decoded = strict_json(notice)
    assert decoded["stream"] == stream
    data = decoded["data"]
    assert data["e"] == "gap" and data["s"] == market
    assert type(data["E"]) is int and data["E"] == 1700000000500000
    assert isinstance(data.get("reason"), str)


@pytest.mark.parametrize("reason", sorted(GAP_REASONS))
def test_gap_notice_carries_its_reason_code_and_words(reason):
    data = strict_json(gap_notice("trade.SOL_USDC", now=1.0, reason=reason))["data"]
    assert data["reason"] == reason and data["msg"] == GAP_REASONS[reason]
    assert re.fullmatch(r"[a-z_]+", reason) and len(data["msg"]) > 20


def test_gap_notice_default_reason_is_the_link_outage():
    assert strict_json(gap_notice("trade.SOL_USDC"))["data"]["reason"] == "link_outage"


def test_gap_notice_uses_the_clock_in_microseconds():
    before = int(time.time() * 1_000_000)
    data = strict_json(gap_notice("trade.SOL_USDC"))["data"]
    after = int(time.time() * 1_000_000)
    assert type(data["E"]) is int
    assert before - 1 <= data["E"] <= after + 1


# --- text_frame ----------------------------------------------------------------

LENGTHS = [0, 1, 125, 126, 127, 65535, 65536, 70000]


def payload_of(length):
    """Valid UTF-8 of exactly ``length`` bytes, with multi-byte characters."""
    text = ("\u00e9" * (length // 2)).encode() + b"x" * (length % 2)
    assert len(text) == length
    return text


def decode_frame(data):
    """A minimal RFC 6455 5.2 decoder: (fin, opcode, masked, payload, rest)."""
    first, second = data[0], data[1]
    fin, rsv, opcode = first >> 7, (first >> 4) & 0x7, first & 0x0F
    assert rsv == 0
    masked, length = second >> 7, second & 0x7F
    offset = 2
    if length == 126:
        (length,) = struct.unpack("!H", data[2:4])
        assert length >= 126, "16-bit length must be minimal"
        offset = 4
    elif length == 127:
        (length,) = struct.unpack("!Q", data[2:10])
        assert length >> 63 == 0, "64-bit length must have its top bit clear"
        assert length > 0xFFFF, "64-bit length must be minimal"
        offset = 10
    if masked:
        key, offset = data[offset:offset + 4], offset + 4
        body = bytes(b ^ key[i % 4] for i, b in enumerate(data[offset:offset + length]))
    else:
        body = data[offset:offset + length]
    assert len(body) == length, "truncated frame"
    return bool(fin), opcode, bool(masked), body, data[offset + length:]


@pytest.mark.parametrize("length, header", [
    (0, b"\x81\x00"),
    (1, b"\x81\x01"),
    (125, b"\x81\x7d"),
    (126, b"\x81\x7e\x00\x7e"),
    (127, b"\x81\x7e\x00\x7f"),
    (65535, b"\x81\x7e\xff\xff"),
    (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    (70000, b"\x81\x7f" + struct.pack("!Q", 70000)),
])
def test_text_frame_header(length, header):
    payload = payload_of(length)
    data = text_frame(payload)
    assert data == header + payload
    fin, opcode, masked, body, rest = decode_frame(data)
    assert (fin, opcode, masked, body, rest) == (True, 0x1, False, payload, b"")


@FUZZ
@given(st.integers(min_value=0, max_value=70000))
def test_fuzz_text_frame_lengths(length):
    payload = b"a" * length
    data = text_frame(payload)
    assert decode_frame(data) == (True, 0x1, False, payload, b"")
    assert len(data) - length == (2 if length < 126 else 4 if length < 65536 else 10)


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def _tornado_reads(frames):
    """Serve a WebSocket handshake and then ``frames`` verbatim over a real
    local TCP socket; return what Tornado's client parser makes of them."""
    async def handle(reader, writer):
        request = await reader.readuntil(b"\r\n\r\n")
        key = re.search(rb"(?im)^sec-websocket-key:[ \t]*(\S+)", request).group(1)
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        writer.write(b"".join(frames))
        writer.write(b"\x88\x02\x03\xe8")  # close 1000
        await writer.drain()
        await reader.read()  # until the client has answered the close and hung up
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await tornado.websocket.websocket_connect(
            "ws://127.0.0.1:%d/" % port, max_message_size=1 << 20)
        messages = []
        while True:
            message = await client.read_message()
            if message is None:
                break
            messages.append(message)
        return messages, client.close_code
    finally:
        server.close()
        await server.wait_closed()


def test_tornado_parses_text_frames():
    payloads = [payload_of(length) for length in LENGTHS]
    messages, close_code = asyncio.run(
        asyncio.wait_for(_tornado_reads([text_frame(p) for p in payloads]), timeout=10))
    assert close_code == 1000
    assert [type(m) for m in messages] == [str] * len(payloads)
    assert [len(m.encode()) for m in messages] == LENGTHS
    assert messages == [p.decode() for p in payloads]


def test_all_exports_exist():
    for name in protocol.__all__:
        assert hasattr(protocol, name), name


def test_token_bucket():
    from marketstream.protocol import take_token
    allowed, tokens = take_token(2.0, 0.0, 0.0, rate=1, burst=2)
    assert allowed and tokens == 1.0
    allowed, tokens = take_token(tokens, 0.0, 0.0, rate=1, burst=2)
    assert allowed and tokens == 0.0
    assert take_token(tokens, 0.0, 0.5, rate=1, burst=2) == (False, 0.5)
    assert take_token(0.0, 0.0, 100.0, rate=1, burst=2) == (True, 1.0)  # refill capped at burst
