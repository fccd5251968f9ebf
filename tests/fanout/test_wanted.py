"""The channels the Redis link must hold (:mod:`marketstream.fanout.wanted`):
what changed, lingering, the channel cap; directly and through the core.
"""

from __future__ import annotations


from marketstream.fanout.wanted import WantedChannels
from tests.fanout.doubles import (
    S,
    T,
    Conn,
    make_core,
)


def test_subscribe_changes_wanted_only_for_a_new_channel():
    core = make_core()
    a, b = Conn("a"), Conn("b")
    core.register(a)
    core.register(b)
    assert core.wanted() == set() and not core.wanted_changed
    assert core.subscribe(a, [S, T]) == [S, T]
    assert core.wanted() == {S, T}
    assert core.wanted_changed
    core.wanted_changed = False
    assert core.subscribe(b, [S]) == [S]  # a second listener: no upstream change
    assert not core.wanted_changed
    assert core.subscribe(a, [S]) == []  # a duplicate is ignored
    assert core.subscriptions(a) == [S, T]
    assert core.subscriptions(Conn("stranger")) == []


def test_unsubscribe_and_remove_change_wanted_when_the_last_listener_goes():
    core = make_core()
    a, b = Conn("a"), Conn("b")
    core.subscribe(a, [S, T])
    core.subscribe(b, [S])
    core.wanted_changed = False
    assert core.unsubscribe(a, [S, "unknown.X_Y"]) == [S]
    assert core.wanted() == {S, T} and not core.wanted_changed
    assert core.unsubscribe(a, [S]) == []  # already gone
    assert core.unsubscribe(Conn("stranger"), [S]) == []
    core.remove(b)
    assert core.wanted() == {T} and core.wanted_changed
    core.wanted_changed = False
    core.remove(a)
    assert core.wanted() == set() and core.wanted_changed
    assert core.connections == {} and core.streams == {}
    core.remove(a)  # twice is harmless


def test_a_subscribe_and_unsubscribe_the_link_has_not_seen_cost_it_nothing():
    core = make_core(linger=True)
    a = Conn("a")
    core.subscribe(a, [S])
    core.unsubscribe(a, [S])  # before the link took the change
    assert core.wanted() == set() and core.lingering == {}
    assert core.take_changes() == {S: False}  # the link has nothing to unsubscribe


def test_a_channel_whose_last_listener_left_lingers_until_the_second_sweep():
    core = make_core(linger=True)
    a, b = Conn("a"), Conn("b")
    core.subscribe(a, [S, T])
    assert core.take_changes() == {S: True, T: True}
    core.upstream_confirmed(S)
    core.unsubscribe(a, [S])
    core.remove(a)
    assert core.wanted() == {S, T} and list(core.lingering) == [S, T]
    assert core.take_changes() == {}  # nothing for Redis to do yet
    core.subscribe(b, [S])  # back within the moment
    assert core.take_changes() == {} and list(core.lingering) == [T]
    assert core.is_wanted(S) and S in core.confirmed  # an acknowledgement needs no wait
    core.release_lingering()  # T lingered since before no sweep
    assert core.wanted() == {S, T}
    core.release_lingering()
    assert core.wanted() == {S} and core.take_changes() == {T: False}
    assert core.lingering == {}


def test_churn_within_one_sweep_asks_redis_for_nothing():
    core = make_core(linger=True)
    a = Conn("a")
    names = ["trade.C%d_USDT" % i for i in range(50)]
    core.subscribe(a, names)
    assert len(core.take_changes()) == 50
    for _ in range(100):
        core.unsubscribe(a, names)
        core.subscribe(a, names)
    assert core.take_changes() == {}
    assert core.wanted() == set(names) and core.lingering == {}


def test_the_channel_cap_refuses_new_channels_and_lingering_ones_give_way():
    core = make_core(max_channels=3, linger=True)
    a, b = Conn("a"), Conn("b")
    names = ["trade.K%d_USDT" % i for i in range(5)]
    assert core.over_channel_cap(names) == names[3:]
    core.subscribe(a, names[:3])
    core.take_changes()
    assert core.over_channel_cap([names[0]]) == []  # an existing channel needs no room
    assert core.over_channel_cap(names[3:]) == names[3:]
    core.unsubscribe(a, names[:2])  # two lingering channels
    assert len(core.wanted()) == 3
    assert core.over_channel_cap([names[3]]) == []  # the oldest lingering one gives way
    assert core.wanted() == {names[1], names[2]}
    assert core.take_changes() == {names[0]: False}
    core.subscribe(b, [names[3]])
    assert core.over_channel_cap([names[4]]) == []
    assert core.wanted() == {names[2], names[3]}
    core.subscribe(b, [names[4]])
    assert core.over_channel_cap(["trade.KX_USDT"]) == ["trade.KX_USDT"]
    assert make_core().over_channel_cap(names) == []  # 0: no cap


# --- the channels, directly ---------------------------------------------------------


def test_a_channel_wanted_and_unwanted_before_the_link_looked_cancels_out():
    channels = WantedChannels(linger=True)
    channels.want(S)
    channels.unwanted(S)  # not taken yet: released at once, lingering or not
    assert channels.channels == set() and channels.lingering == {}
    assert channels.take_changes() == {S: False}  # the link, which never saw it, does nothing


def test_a_lingering_channel_wanted_again_stays_without_a_change():
    channels = WantedChannels(linger=True)
    channels.want(S)
    channels.take_changes()
    channels.changed = False
    channels.unwanted(S)
    channels.want(S)
    assert channels.lingering == {} and channels.channels == {S}
    assert channels.take_changes() == {} and not channels.changed
    channels.release_lingering()
    channels.release_lingering()
    assert channels.channels == {S}  # it was wanted again: not released


def test_without_linger_an_unwanted_channel_goes_at_once():
    channels = WantedChannels()
    channels.want(S)
    channels.take_changes()
    channels.unwanted(S)
    assert channels.channels == set() and channels.take_changes() == {S: False}


def test_the_cap_releases_the_oldest_lingering_channels_first():
    channels = WantedChannels(max_channels=2, linger=True)
    for name in (S, T):
        channels.want(name)
    channels.take_changes()
    channels.unwanted(S)
    channels.unwanted(T)
    assert channels.over_cap(["kline.A_B"]) == []
    assert channels.channels == {T} and list(channels.lingering) == [T]
    assert channels.over_cap(["kline.A_B", "kline.C_D", "kline.E_F"]) == ["kline.E_F"]
    assert channels.channels == set() and channels.take_changes() == {S: False, T: False}
    assert WantedChannels().over_cap([S] * 5) == []  # no cap
