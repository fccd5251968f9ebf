"""What the client yields (marketstream.client.messages)."""

import pytest

from marketstream.client.messages import GAP, MESSAGE, SNAPSHOT, Message, is_snapshot_data


@pytest.mark.parametrize(
    "data, snapshot",
    [
        ({"e": "depthSnapshot", "u": 1, "b": [], "a": []}, True),
        ({"e": "klineSnapshot"}, True),
        ({"e": "depth", "U": 1, "u": 2}, False),
        ({"e": "ticker"}, False),  # tickers are their own snapshots: plain messages
        ({}, False),
        ([], False),
        (None, False),
        ("depthSnapshot", False),
    ],
)
def test_snapshot_data_is_told_by_its_event_type(data, snapshot):
    assert is_snapshot_data(data) is snapshot


def test_a_message_is_a_named_tuple_of_its_frame():
    message = Message("trade.A_B", {"e": "trade"}, 7, MESSAGE, '{"stream":"trade.A_B"}')
    stream, data, seq, kind, raw = message
    assert (
        (message.stream, message.seq, message.kind)
        == (stream, seq, kind)
        == ("trade.A_B", 7, "message")
    )
    assert len({MESSAGE, SNAPSHOT, GAP}) == 3
