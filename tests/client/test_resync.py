"""Starting one stream over on an open connection (marketstream.client.resync)."""

import doctest
import json

import marketstream.client.resync
from marketstream.client.resync import Resyncs, positions_skip


def test_docstring_examples():
    result = doctest.testmod(marketstream.client.resync)
    assert result.attempted > 5 and result.failed == 0


def test_the_requests_unsubscribe_then_subscribe_with_the_snapshot():
    ids = iter(range(1, 10))
    texts = Resyncs().start("depth.A/B", lambda: next(ids))
    requests = [json.loads(text) for text in texts]
    assert requests == [
        {"method": "UNSUBSCRIBE", "params": ["depth.A/B"], "id": 1},
        {"method": "SUBSCRIBE", "params": ["depth.A/B"], "id": 2, "snapshot": ["depth.A/B"]},
    ]


def test_frames_are_dropped_until_a_snapshot_a_top_n_frame_or_a_gap_notice():
    for ending in ({"e": "depthSnapshot"}, {"e": "depthTop"}, {"e": "gap", "reason": "x"}):
        resyncs = Resyncs()
        resyncs.start("s", lambda: 1)
        assert resyncs.drops("s", {"e": "depth"}) and resyncs.drops("s", None)
        assert not resyncs.drops("s", ending)
        assert not resyncs.drops("s", {"e": "depth"})


def test_a_new_connection_ends_every_resync():
    resyncs = Resyncs()
    resyncs.start("s", lambda: 1)
    resyncs.clear()
    assert not resyncs.drops("s", {"e": "depth"})


def test_derived_streams_skip_positions():
    assert positions_skip("depth20.A_B") and positions_skip("ticker.A_B@1000ms")
    assert not positions_skip("trade.A_B") and not positions_skip("depth.A_B")
