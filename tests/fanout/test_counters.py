"""The process's counters (marketstream.fanout.counters)."""

import pytest

from marketstream.fanout.counters import (
    CLOSE_CAUSES,
    IGNORED_CAUSES,
    REFUSAL_CAUSES,
    REJECT_CAUSES,
    Counters,
)
from marketstream.wire.requests import StreamRules


def test_every_cause_the_stream_rules_give_is_counted():
    counters = Counters()
    for cause in StreamRules.CAUSES:
        counters.rejected[cause] += 1  # a KeyError here would fail a refusal on the hot path
    assert set(StreamRules.CAUSES) <= set(REJECT_CAUSES)


def test_as_dict_is_a_snapshot_of_every_total_and_cause():
    counters = Counters()
    counters.deliveries += 5
    counters.closed["slow_consumer"] += 1
    snapshot = counters.as_dict()
    counters.deliveries += 1
    counters.closed["slow_consumer"] += 1
    assert snapshot["deliveries"] == 5 and snapshot["closed"]["slow_consumer"] == 1
    assert set(Counters.TOTALS) <= set(snapshot)
    assert set(snapshot["closed"]) == set(CLOSE_CAUSES)
    assert set(snapshot["refused"]) == set(REFUSAL_CAUSES)
    assert set(snapshot["ignored"]) == set(IGNORED_CAUSES)
    assert set(snapshot["rejected"]) == set(REJECT_CAUSES)


def test_a_bump_is_an_attribute_store_on_slots():
    counters = Counters()
    assert not hasattr(counters, "__dict__")
    with pytest.raises(AttributeError):
        counters.delivered = 1  # a misspelt total fails at once instead of counting nowhere
