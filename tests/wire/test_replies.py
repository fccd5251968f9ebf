"""Replies and gap notices (marketstream.wire.replies)."""

import re
import time

import pytest

from marketstream.wire.payloads import is_json_object
from marketstream.wire.replies import GAP_REASONS, encode_error, encode_result, gap_notice
from tests.wire.strategies import strict_json


@pytest.mark.parametrize(
    "request_id, result, expected",
    [
        (1, None, {"result": None, "id": 1}),
        ("abc", None, {"result": None, "id": "abc"}),
        (None, None, {"result": None, "id": None}),
        (
            7,
            ["trade.SOL_USDC", "depth.BTC_USDT"],
            {"result": ["trade.SOL_USDC", "depth.BTC_USDT"], "id": 7},
        ),
        (8, [], {"result": [], "id": 8}),
    ],
)
def test_encode_result(request_id, result, expected):
    text = encode_result(request_id, result)
    assert isinstance(text, str)
    assert strict_json(text) == expected
    assert list(strict_json(text)) == ["result", "id"]


def test_encode_result_default_is_null():
    assert strict_json(encode_result(3)) == {"result": None, "id": 3}


@pytest.mark.parametrize(
    "request_id, code, msg",
    [
        (1, 2, "params must not be empty"),
        ("x", 3, "invalid JSON"),
        (None, 2, "trade.sol: invalid market 'sol'; unknown method \"X\""),
        (5, 2, "caf\u00e9 \u20ac \\ / \n"),
    ],
)
def test_encode_error(request_id, code, msg):
    text = encode_error(request_id, code, msg)
    assert isinstance(text, str)
    assert strict_json(text) == {"error": {"code": code, "msg": msg}, "id": request_id}
    text.encode("utf-8")


@pytest.mark.parametrize(
    "stream, market",
    [
        ("trade.SOL_USDC", "SOL_USDC"),
        ("kline.1m.BTC_USDT", "BTC_USDT"),
        ("depth.200ms.X1_Y2", "X1_Y2"),
    ],
)
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
