"""LogLimiter: one line per cause per interval, with the count held back."""

import logging

from marketstream.loglimit import LogLimiter


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_one_line_per_cause_per_second_with_the_count_held_back(caplog):
    clock = Clock()
    limiter = LogLimiter(logging.getLogger("marketstream.test"), clock=clock)
    caplog.set_level(logging.INFO, "marketstream.test")
    for _ in range(300):
        limiter.log(logging.WARNING, "bad_close", "closing %s: bad close frame", "1.2.3.4:5")
        clock.now += 0.001
    assert [r.getMessage() for r in caplog.records] == ["closing 1.2.3.4:5: bad close frame"]
    clock.now += 1.0
    assert limiter.log(logging.WARNING, "bad_close", "closing %s", "x")
    assert caplog.records[-1].getMessage() == "closing x (299 more since the last line)"
    assert len(caplog.records) == 2


def test_causes_are_limited_apart(caplog):
    clock = Clock()
    limiter = LogLimiter(logging.getLogger("marketstream.test"), clock=clock)
    caplog.set_level(logging.INFO, "marketstream.test")
    assert limiter.log(logging.INFO, "a", "first a")
    assert limiter.log(logging.INFO, "b", "first b")
    assert not limiter.log(logging.INFO, "a", "second a")
    assert [r.getMessage() for r in caplog.records] == ["first a", "first b"]


def test_a_disabled_level_costs_nothing_and_counts_nothing(caplog):
    clock = Clock()
    limiter = LogLimiter(logging.getLogger("marketstream.test"), clock=clock)
    caplog.set_level(logging.WARNING, "marketstream.test")
    assert not limiter.log(logging.INFO, "a", "quiet")
    assert limiter.log(logging.WARNING, "a", "loud")
    assert [r.getMessage() for r in caplog.records] == ["loud"]
