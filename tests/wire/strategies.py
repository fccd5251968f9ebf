"""What the wire tests share: hypothesis settings, JSON values, a strict
JSON reader."""

import json

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def strict_json(data):
    """json.loads that refuses NaN / Infinity (not JSON, and JSON.parse in a
    browser throws on them)."""

    def reject(constant):
        raise ValueError("not JSON: %s" % constant)

    return json.loads(data, parse_constant=reject)


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
