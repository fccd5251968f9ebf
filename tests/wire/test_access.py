"""Stream access (wire/access.py), called directly: user streams for their
owner only, protected streams, and what the ``channels`` claim grants."""

from hypothesis import given, strategies as st

from marketstream.wire.access import (
    MAX_USER,
    Access,
    Grant,
    compile_patterns,
    split_user_stream,
    valid_user,
)
from marketstream.wire.requests import StreamRules


def test_user_part_rules():
    assert split_user_stream("a.b#c#d") == ("a.b", "c#d")
    assert valid_user("x" * MAX_USER) and not valid_user("x" * (MAX_USER + 1))
    for bad in ("", "a b", "a#b", "a{b", "a}b", 'a"b', "a\\b", "a/b", "é", "a\tb"):
        assert not valid_user(bad), bad


NAMES = st.text(alphabet="abcAB_.#{}/ 12", min_size=1, max_size=20)
SUBS = st.text(alphabet="ab1 #{", min_size=1, max_size=4)


@given(NAMES, st.one_of(st.none(), SUBS))
def test_a_user_stream_is_only_ever_its_owners(name, sub):
    access = Access(StreamRules(), protected=["trade.*"])
    grant = None if sub is None else Grant(sub, channels=compile_patterns(["*"]))
    refusal = access.refusal(name, grant)
    base, user = split_user_stream(name)
    if user is not None and refusal is None:
        assert grant is not None and grant.sub == user and valid_user(user)
    if refusal is None and grant is None:
        assert user is None and not base.startswith("trade.")


def test_channels_grant_beyond_the_allow_lists_only():
    access = Access(StreamRules(), protected=[])
    grant = Grant("1", channels=compile_patterns(["raw.*", "*"]))
    assert access.refusal("raw.SOL_USDC", grant) is None
    assert access.refusal("raw.SOL_USDC", Grant("1"))[0] == "unknown_type"
    assert access.refusal("raw.SOL USDC", grant)[0] == "unknown_type"  # not a channel name
    assert access.refusal("nodot", grant)[0] == "invalid_name"  # shape rules still apply
    assert access.refusal("a.b#2", grant)[0] == "user_stream"


def test_a_protected_stream_protects_the_streams_derived_from_it():
    from marketstream.wire.derived import DerivedRules

    access = Access(StreamRules(derived=DerivedRules()), protected=["depth.*"])
    for name in ("depth.BTC_USDT", "depth10.BTC_USDT", "depth.BTC_USDT@100ms"):
        assert access.refusal(name, None)[0] == "protected", name
        assert access.refusal(name, Grant("7")) is None, name
    assert access.refusal("trade.BTC_USDT", None) is None
