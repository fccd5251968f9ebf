"""The token bucket that bounds a client's rate (of messages, of frames),
as a pure step: the caller keeps the bucket's level and time.

>>> allowed, tokens = take_token(tokens=1.0, last=0.0, now=0.0, rate=10, burst=5)
>>> allowed, tokens
(True, 0.0)
>>> take_token(tokens, last=0.0, now=0.05, rate=10, burst=5)  # half a token back
(False, 0.5)
"""

__all__ = ["take_token"]


def take_token(
    tokens: float, last: float, now: float, rate: float, burst: float
) -> tuple[bool, float]:
    """Token bucket step: ``(allowed, tokens)`` after one message at ``now``.

    ``tokens`` and ``last`` are the bucket's level and the time it was last
    updated; it refills at ``rate`` per second up to ``burst``.

    >>> take_token(1.0, 0.0, 0.0, rate=10, burst=5)
    (True, 0.0)
    >>> take_token(0.0, 0.0, 0.05, rate=10, burst=5)
    (False, 0.5)
    """
    tokens = min(float(burst), tokens + (now - last) * rate)
    if tokens >= 1.0:
        return True, tokens - 1.0
    return False, tokens
