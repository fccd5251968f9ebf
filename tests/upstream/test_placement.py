"""The placement of sharded channels (marketstream.upstream.placement), pure:
events in (wanted, replies, links up or lost, slot tables), commands and
listener events out; no Redis, no event loop."""

from hypothesis import given, settings
from hypothesis import strategies as st
from redis.exceptions import MovedError, ResponseError

from marketstream.upstream.placement import (
    Close,
    Open,
    Placement,
    Refresh,
    Resubscribed,
    Send,
    Subscribed,
)
from marketstream.upstream.slots import SLOTS, SlotTable, key_slot

A, B, C = ("10.0.0.1", 7000), ("10.0.0.2", 7000), ("10.0.0.3", 7000)
HALVES = {A: [(0, 8191)], B: [(8192, SLOTS - 1)]}


def on(node, count, prefix="trade"):
    """``count`` channel names whose slots the HALVES layout gives ``node``."""
    table = SlotTable.from_ranges(HALVES)
    names, i = [], 0
    while len(names) < count:
        name = "%s.N%d_USDT" % (prefix, i)
        if table.owner(key_slot(name)) == node:
            names.append(name)
        i += 1
    return names


def started(layout=HALVES):
    placement = Placement()
    out = placement.apply(SlotTable.from_ranges(layout))
    assert out == [Open(addr) for addr in sorted(layout)]
    for addr in layout:
        placement.link_up(addr)
    return placement


def sends(out):
    return [o for o in out if isinstance(o, Send)]


def answer(placement, out, live=None):
    """What the shards reply to every Send in ``out`` (a reply per channel,
    in order); returns the events.  ``live``: which channels a shard holds."""
    live = live if live is not None else {}
    events = []
    for send in sends(out):
        held = live.setdefault(send.node, set())
        for command, *names in send.commands:
            kind = command.lower().encode()
            for name in names:
                (held.add if command == "SSUBSCRIBE" else held.discard)(name)
                events += placement.on_reply(send.node, [kind, name.encode(), len(held)])
    return events


def test_one_ssubscribe_per_slot_and_one_confirmation_per_channel():
    placement = started()
    names = on(A, 20) + on(B, 20)
    assert placement.want(names) == names
    assert placement.want(names) == []
    out = placement.place()
    for send in sends(out):
        for command, *chunk in send.commands:
            assert command == "SSUBSCRIBE"
            assert len({key_slot(n) for n in chunk}) == 1  # one slot per command
            assert {SlotTable.from_ranges(HALVES).owner(key_slot(n)) for n in chunk} == {send.node}
    events = answer(placement, out)
    assert sorted(e.name for e in events) == sorted(names)
    assert all(isinstance(e, Subscribed) for e in events)
    assert placement.confirmed == set(names) and not placement.stranded
    assert placement.place() == []  # nothing left to do


def test_a_lost_link_places_its_channels_again_and_names_them_once_back():
    placement = started()
    lost, kept = on(A, 3), on(B, 3)
    placement.want(lost + kept)
    answer(placement, placement.place())
    assert placement.link_lost(A) == [Refresh()]
    assert placement.stranded == set(lost) and placement.confirmed == set(kept)
    assert sends(placement.place()) == []  # A is down: nowhere to go yet
    # The replica is promoted: a new table gives A's slots to C.
    out = placement.apply(SlotTable.from_ranges({C: [(0, 8191)], B: [(8192, SLOTS - 1)]}))
    assert out == [Open(C), Close(A)]
    placement.link_up(C)
    out = placement.place()
    assert [s.node for s in sends(out)] == [C]
    events = answer(placement, out)
    # One event per SSUBSCRIBE (per slot), once its last reply is in.
    assert all(isinstance(e, Resubscribed) and e.node == C for e in events)
    assert len(events) == len({key_slot(n) for n in lost})
    assert sorted(n for e in events for n in e.names) == sorted(lost)
    assert placement.node_of(lost[0]) == C and placement.node_of(kept[0]) == B


def test_unprompted_sunsubscribe_means_the_slot_moved():
    placement = started()
    name = on(A, 1)[0]
    placement.want([name])
    answer(placement, placement.place())
    out = placement.on_reply(A, [b"sunsubscribe", name.encode(), 0])
    assert out == [Refresh()]
    assert placement.table.owner(key_slot(name)) is None
    assert placement.node_of(name) is None and name in placement.stranded
    placement.apply(SlotTable.from_ranges({B: [(0, SLOTS - 1)]}))
    out = placement.place()
    assert answer(placement, out) == [Resubscribed(B, (name,))]


def test_unwanted_channels_are_released_and_their_replies_expected():
    placement = started()
    names = on(A, 4)
    placement.want(names)
    answer(placement, placement.place())
    assert placement.unwant(names[:2]) == names[:2]
    out = placement.place()
    assert [c[0] for s in sends(out) for c in s.commands] == ["SUNSUBSCRIBE"] * len(
        {key_slot(n) for n in names[:2]}
    )
    assert answer(placement, out) == []  # the replies answer the command: no refresh
    assert placement.confirmed == set(names[2:])
    assert not placement.shards[A].pending


def test_moved_is_followed_at_once_then_the_topology_is_read():
    placement = started()
    name = on(A, 1)[0]
    placement.want([name])
    placement.place()
    exc = MovedError("%d 10.0.0.3:7000" % key_slot(name))
    assert placement.on_error(A, exc) == [Open(C), Refresh()]
    assert placement.table.owner(key_slot(name)) == C
    assert sends(placement.place()) == []  # C's link is not up yet
    placement.link_up(C)
    out = placement.place()
    assert [s.node for s in sends(out)] == [C]
    assert answer(placement, out) == [Subscribed(name)]


def test_moved_in_a_loop_gives_up_and_reads_the_topology():
    placement = started()
    name = on(A, 1)[0]
    placement.want([name])
    placement.place()
    moved = MovedError("%d 10.0.0.2:7000" % key_slot(name))
    back = MovedError("%d 10.0.0.1:7000" % key_slot(name))
    outs = []
    for i in range(4):
        outs.append(placement.on_error(A if i % 2 == 0 else B, moved if i % 2 == 0 else back))
        placement.place()
    assert outs[-1] == [Refresh()] and placement.table.owner(key_slot(name)) is None


def test_another_error_forgets_the_owner():
    placement = started()
    name = on(A, 1)[0]
    placement.want([name])
    placement.place()
    assert placement.on_error(A, ResponseError("CLUSTERDOWN")) == [Refresh()]
    assert placement.table.owner(key_slot(name)) is None and name in placement.stranded


def test_a_pong_answers_the_ping_in_its_turn():
    placement = started()
    name = on(A, 1)[0]
    placement.pinged(A)
    placement.want([name])
    out = placement.place()
    assert placement.on_reply(A, [b"pong", b""]) == []
    assert answer(placement, out) == [Subscribed(name)]
    assert not placement.shards[A].pending


def test_a_new_layout_moves_channels_between_links():
    placement = started()
    name = on(A, 1)[0]
    placement.want([name])
    live = {}
    answer(placement, placement.place(), live)
    slot = key_slot(name)
    layout = {A: [(0, slot - 1), (slot + 1, 8191)], B: [(slot, slot), (8192, SLOTS - 1)]}
    placement.apply(SlotTable.from_ranges(layout))
    out = placement.place()
    assert [(s.node, s.commands[0][0]) for s in sends(out)] == [
        (A, "SUNSUBSCRIBE"),
        (B, "SSUBSCRIBE"),
    ]
    assert answer(placement, out, live) == [Resubscribed(B, (name,))]
    assert live == {A: set(), B: {name}}


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("want"), st.integers(0, 11)),
        st.tuples(st.just("unwant"), st.integers(0, 11)),
        st.tuples(st.just("lose"), st.sampled_from([A, B])),
        st.tuples(st.just("up"), st.sampled_from([A, B])),
        st.tuples(st.just("place"), st.just(None)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_whatever_happens_every_wanted_channel_ends_once_on_its_owner(ops):
    placement = started()
    names = on(A, 6) + on(B, 6)
    live = {}  # what each shard holds, as Redis would
    confirmations = {}  # name -> Subscribed events since it was last wanted
    wanted = set()

    def run(out):
        for event in answer(placement, out, live):
            if isinstance(event, Subscribed):
                confirmations[event.name] = confirmations.get(event.name, 0) + 1

    for op, arg in ops:
        if op == "want":
            if placement.want([names[arg]]):
                confirmations[names[arg]] = 0
            wanted.add(names[arg])
        elif op == "unwant":
            placement.unwant([names[arg]])
            wanted.discard(names[arg])
        elif op == "lose":
            placement.link_lost(arg)
            live[arg] = set()  # a new connection holds nothing
        elif op == "up":
            if not placement.shards[arg].up:
                placement.link_up(arg)
        else:
            run(placement.place())
    for addr in (A, B):
        if not placement.shards[addr].up:
            placement.link_up(addr)
    run(placement.place())
    run(placement.place())
    assert placement.confirmed == wanted and not placement.stranded
    table = SlotTable.from_ranges(HALVES)
    for name in names:
        owner = table.owner(key_slot(name))
        holders = {addr for addr, held in live.items() if name in held}
        assert holders == ({owner} if name in wanted else set()), name
        if name in wanted:
            assert placement.node_of(name) == owner
            assert confirmations[name] <= 1  # one Subscribed per time wanted


def test_nothing_of_a_lost_link_passes_its_filter_and_the_new_owner_is_announced_first():
    """The ways a message could come twice across a failover, closed: a
    lost link's filter (what its reader delivers) is emptied at once, so
    whatever the dead shard's socket still held is dropped; the channel is
    announced back (Resubscribed, the listener's catch-up) with the last
    reply of its SSUBSCRIBE, before the reader reads the new owner's first
    message, which Redis sends after that reply."""
    placement = started()
    name = on(A, 1)[0]
    placement.want([name])
    answer(placement, placement.place())
    assert placement.shards[A].bnames == {name.encode()}
    placement.link_lost(A)
    assert placement.shards[A].bnames == set()
    placement.apply(SlotTable.from_ranges({B: [(0, SLOTS - 1)]}))
    out = placement.place()
    assert placement.shards[B].bnames == {name.encode()}
    assert answer(placement, out) == [Resubscribed(B, (name,))]
    # A second loss before the answer: announced once, by the link that answers.
    placement.link_lost(B)
    placement.link_up(B)
    out = placement.place()
    assert answer(placement, out) == [Resubscribed(B, (name,))]
