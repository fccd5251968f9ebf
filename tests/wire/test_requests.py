"""Client requests (marketstream.wire.requests): parsing client frames.
No server and no Redis: every function is called directly, and fuzzed."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketstream.wire.replies import encode_error, encode_result
from marketstream.wire.requests import (
    AUTH,
    ERROR_INVALID_JSON,
    ERROR_INVALID_REQUEST,
    LIST_SUBSCRIPTIONS,
    METHODS,
    SUBSCRIBE,
    UNSUBSCRIBE,
    Invalid,
    Request,
    parse_request,
)
from tests.wire.strategies import FUZZ, JSON_VALUES, SCALARS, strict_json


def frame(**fields):
    return json.dumps(fields)


# --- parse_request: valid requests ---------------------------------------------


def test_subscribe_keeps_every_param_in_order():
    streams = ["trade.SOL_USDC", "depth.BTC_USDT", "ticker.ETH_USDT", "kline.1m.SOL_USDC"]
    assert parse_request(frame(method="SUBSCRIBE", params=streams, id=1)) == Request(
        SUBSCRIBE, tuple(streams), 1
    )


def test_unsubscribe_keeps_every_param_in_order():
    streams = ["depth.BTC_USDT", "trade.SOL_USDC"]
    request = parse_request(frame(method="UNSUBSCRIBE", params=streams, id="abc"))
    assert request == Request(UNSUBSCRIBE, ("depth.BTC_USDT", "trade.SOL_USDC"), "abc")
    assert isinstance(request.params, tuple)


def test_duplicate_params_are_kept_for_the_caller_to_handle():
    request = parse_request(frame(method="SUBSCRIBE", params=["trade.A_B", "trade.A_B"], id=2))
    assert request == Request(SUBSCRIBE, ("trade.A_B", "trade.A_B"), 2)


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"method":"LIST_SUBSCRIPTIONS","id":3}', Request(LIST_SUBSCRIPTIONS, (), 3)),
        ('{"method":"LIST_SUBSCRIPTIONS","params":[],"id":4}', Request(LIST_SUBSCRIPTIONS, (), 4)),
        (
            '{"method":"LIST_SUBSCRIPTIONS","params":["x"],"id":5}',
            Request(LIST_SUBSCRIPTIONS, ("x",), 5),
        ),
    ],
)
def test_list_subscriptions_with_and_without_params(text, expected):
    assert parse_request(text) == expected


@pytest.mark.parametrize("request_id", [0, -1, 7, 2**40, 1.5, "req-1", "", None])
def test_accepted_ids(request_id):
    request = parse_request(frame(method="SUBSCRIBE", params=["trade.A_B"], id=request_id))
    assert isinstance(request, Request)
    assert request.id == request_id and type(request.id) is type(request_id)


@pytest.mark.parametrize("method", [SUBSCRIBE, UNSUBSCRIBE])
def test_a_request_without_id_is_served_like_id_null(method):
    # Backpack's SDK sends {"method":"SUBSCRIBE","params":[...]} with no id.
    assert parse_request('{"method":"%s","params":["trade.SOL_USDC"]}' % method) == Request(
        method, ("trade.SOL_USDC",), None
    )


def test_whitespace_and_key_order_do_not_matter():
    text = ' \n{ "id" : 9 ,\t"params" : [ "trade.A_B" ] , "method" : "SUBSCRIBE" }\n '
    assert parse_request(text) == Request(SUBSCRIBE, ("trade.A_B",), 9)


def test_unknown_extra_keys_are_ignored():
    request = parse_request(frame(method="SUBSCRIBE", params=["trade.A_B"], id=1, extra={"x": 1}))
    assert request == Request(SUBSCRIBE, ("trade.A_B",), 1)


# --- parse_request: invalid frames -----------------------------------------------

P = ["trade.A_B"]


@pytest.mark.parametrize(
    "text, reason, code, request_id",
    [
        # not JSON at all
        ("hello", "invalid JSON", ERROR_INVALID_JSON, None),
        ("", "invalid JSON", ERROR_INVALID_JSON, None),
        ('{"method":"SUBSCRIBE"', "invalid JSON", ERROR_INVALID_JSON, None),
        (
            "{'method':'SUBSCRIBE','params':['trade.A_B'],'id':1}",
            "invalid JSON",
            ERROR_INVALID_JSON,
            None,
        ),
        (
            '{"method":"SUBSCRIBE","params":["trade.A_B"],"id":1} trailing',
            "invalid JSON",
            ERROR_INVALID_JSON,
            None,
        ),
        # JSON, but not an object
        ("[1,2]", "not a JSON object", ERROR_INVALID_REQUEST, None),
        (
            '[{"method":"SUBSCRIBE","params":["trade.A_B"],"id":1}]',
            "not a JSON object",
            ERROR_INVALID_REQUEST,
            None,
        ),
        ("42", "not a JSON object", ERROR_INVALID_REQUEST, None),
        ("-1.5", "not a JSON object", ERROR_INVALID_REQUEST, None),
        ('"SUBSCRIBE"', "not a JSON object", ERROR_INVALID_REQUEST, None),
        ("null", "not a JSON object", ERROR_INVALID_REQUEST, None),
        ("true", "not a JSON object", ERROR_INVALID_REQUEST, None),
        # method
        (frame(params=P, id=1), "missing or invalid method", ERROR_INVALID_REQUEST, 1),
        (frame(method=7, params=P, id=1), "missing or invalid method", ERROR_INVALID_REQUEST, 1),
        (frame(method=None, params=P, id=1), "missing or invalid method", ERROR_INVALID_REQUEST, 1),
        (
            frame(method=["SUBSCRIBE"], params=P, id="a"),
            "missing or invalid method",
            ERROR_INVALID_REQUEST,
            "a",
        ),
        (
            frame(method="DELETE", params=P, id=1),
            "unknown method 'DELETE'",
            ERROR_INVALID_REQUEST,
            1,
        ),
        (
            frame(method="subscribe", params=P, id=1),
            "unknown method 'subscribe'",
            ERROR_INVALID_REQUEST,
            1,
        ),
        (frame(method="", params=P, id=2), "unknown method ''", ERROR_INVALID_REQUEST, 2),
        # params
        (
            frame(method="SUBSCRIBE", id=1),
            "params must be an array of strings",
            ERROR_INVALID_REQUEST,
            1,
        ),
        (
            frame(method="UNSUBSCRIBE", id=1),
            "params must be an array of strings",
            ERROR_INVALID_REQUEST,
            1,
        ),
        (
            frame(method="SUBSCRIBE", params="trade.A_B", id=1),
            "params must be an array of strings",
            ERROR_INVALID_REQUEST,
            1,
        ),
        (
            frame(method="SUBSCRIBE", params={"0": "trade.A_B"}, id=1),
            "params must be an array of strings",
            ERROR_INVALID_REQUEST,
            1,
        ),
        (
            frame(method="SUBSCRIBE", params=None, id=1),
            "params must be an array of strings",
            ERROR_INVALID_REQUEST,
            1,
        ),
        (
            frame(method="SUBSCRIBE", params=["trade.A_B", 1], id=1),
            "params must be an array of strings",
            ERROR_INVALID_REQUEST,
            1,
        ),
        (
            frame(method="SUBSCRIBE", params=[None], id=1),
            "params must be an array of strings",
            ERROR_INVALID_REQUEST,
            1,
        ),
        (
            frame(method="SUBSCRIBE", params=[["trade.A_B"]], id=1),
            "params must be an array of strings",
            ERROR_INVALID_REQUEST,
            1,
        ),
        (
            frame(method="LIST_SUBSCRIPTIONS", params="x", id=1),
            "params must be an array of strings",
            ERROR_INVALID_REQUEST,
            1,
        ),
        (
            frame(method="SUBSCRIBE", params=[], id=1),
            "params must not be empty",
            ERROR_INVALID_REQUEST,
            1,
        ),
        (
            frame(method="UNSUBSCRIBE", params=[], id="u"),
            "params must not be empty",
            ERROR_INVALID_REQUEST,
            "u",
        ),
        # id
        (frame(method="SUBSCRIBE", params=P, id=True), "invalid id", ERROR_INVALID_REQUEST, None),
        (frame(method="SUBSCRIBE", params=P, id=False), "invalid id", ERROR_INVALID_REQUEST, None),
        (frame(method="SUBSCRIBE", params=P, id={}), "invalid id", ERROR_INVALID_REQUEST, None),
        (
            frame(method="SUBSCRIBE", params=P, id={"n": 1}),
            "invalid id",
            ERROR_INVALID_REQUEST,
            None,
        ),
        (frame(method="SUBSCRIBE", params=P, id=[1]), "invalid id", ERROR_INVALID_REQUEST, None),
    ],
)
def test_invalid_frames(text, reason, code, request_id):
    result = parse_request(text)
    assert isinstance(result, Invalid)
    assert result == Invalid(reason, code, request_id)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00binary",
        b'{"method":"SUBSCRIBE","params":["trade.A_B"],"id":1}',
        bytearray(b"{}"),
        memoryview(b"{}"),
    ],
)
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


@pytest.mark.parametrize(
    "text",
    [
        '{"method":"LIST_SUBSCRIPTIONS","id":NaN}',
        '{"method":"LIST_SUBSCRIPTIONS","id":Infinity}',
        '{"method":"LIST_SUBSCRIPTIONS","id":-Infinity}',
        '{"method":"LIST_SUBSCRIPTIONS","id":1e999}',
        '{"method":"SUBSCRIBE","params":[],"id":NaN}',
        '{"method":"LIST_SUBSCRIPTIONS","id":"\\ud800"}',
        '{"method":"SUBSCRIBE","params":[],"id":"\\udc00x"}',
        '{"method":"NOPE","id":"\\ud83d"}',
    ],
)
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
        assert result.id is None or (
            isinstance(result.id, (int, float, str)) and not isinstance(result.id, bool)
        )
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


STREAMS = st.sampled_from(
    ["trade.SOL_USDC", "depth.BTC_USDT", "kline.1m.SOL_USDC", "", "x"]
) | st.text(max_size=12)
METHOD_VALUES = (
    st.sampled_from(sorted(METHODS)) | st.sampled_from(["subscribe", "", "LIST"]) | JSON_VALUES
)
PARAM_VALUES = st.lists(STREAMS, max_size=4) | st.lists(JSON_VALUES, max_size=3) | JSON_VALUES
ID_VALUES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
    | st.dictionaries(st.text(max_size=3), SCALARS, max_size=2)
    | st.lists(SCALARS, max_size=2)
)
REQUEST_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "method": METHOD_VALUES,
        "params": PARAM_VALUES,
        "id": ID_VALUES,
        "extra": JSON_VALUES,
    },
)


def expected_outcome(message):
    """An independent model of parse_request for a dict: None if invalid, else
    (method, params, id)."""
    request_id = message.get("id")  # absent: served like null
    if isinstance(request_id, bool) or not (
        request_id is None or isinstance(request_id, (int, float, str))
    ):
        return None
    if isinstance(request_id, int) and not -(2**63) <= request_id < 2**64:
        return None  # not echoed as a JSON number exactly: refused
    method = message.get("method")
    if method not in (SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS, AUTH):
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
            assert (
                result.id == pytest.approx(message["id"], rel=1e-15, abs=0)
                if isinstance(result.id, float)
                else result.id == message["id"]
            )
    else:
        assert isinstance(result, Request)
        method, params, request_id = expected
        assert (result.method, result.params) == (method, params)
        if isinstance(request_id, float):
            assert result.id == pytest.approx(request_id, rel=1e-15, abs=0)
        else:
            assert result.id == request_id and type(result.id) is type(request_id)
