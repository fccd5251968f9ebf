"""The token bucket (marketstream.wire.rates)."""

from hypothesis import given
from hypothesis import strategies as st

from marketstream.wire import rates, requests
from marketstream.wire.rates import take_token


def test_token_bucket():
    allowed, tokens = take_token(2.0, 0.0, 0.0, rate=1, burst=2)
    assert allowed and tokens == 1.0
    allowed, tokens = take_token(tokens, 0.0, 0.0, rate=1, burst=2)
    assert allowed and tokens == 0.0
    assert take_token(tokens, 0.0, 0.5, rate=1, burst=2) == (False, 0.5)
    assert take_token(0.0, 0.0, 100.0, rate=1, burst=2) == (True, 1.0)  # refill capped at burst


@given(
    st.floats(0, 10),
    st.floats(0, 100),
    st.floats(0, 100),
    st.floats(0.1, 1000),
    st.floats(1, 100),
)
def test_the_bucket_never_holds_more_than_its_burst_nor_less_than_nothing(
    tokens, last, later, rate, burst
):
    tokens = min(tokens, burst)
    allowed, left = take_token(tokens, last, last + later, rate, burst)
    assert 0.0 <= left <= burst
    assert allowed == (min(burst, tokens + later * rate) >= 1.0)


def test_requests_still_exports_the_bucket():
    assert requests.take_token is rates.take_token
