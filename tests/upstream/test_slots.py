"""The Cluster slot table (marketstream.upstream.slots), pure: built from
ranges and from CLUSTER SHARDS / CLUSTER SLOTS replies as redis-py returns
them, and back to ranges."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketstream.upstream.slots import SLOTS, SlotTable, key_slot

NODES = [("10.0.0.%d" % i, 7000 + i) for i in range(1, 6)]


@st.composite
def layouts(draw):
    """{primary: [(start, end)]}: the slots cut into runs, each run given to
    a primary (or to nobody)."""
    cuts = sorted(draw(st.sets(st.integers(1, SLOTS - 1), max_size=12)))
    bounds = [0, *cuts, SLOTS]
    ranges = {}
    for start, stop in zip(bounds, bounds[1:]):
        owner = draw(st.sampled_from([*NODES, None]))
        if owner is not None:
            ranges.setdefault(owner, []).append((start, stop - 1))
    return ranges


def merged(ranges):
    """Adjacent runs of one owner as one run (what ranges() returns)."""
    out = {}
    for addr, runs in ranges.items():
        merged_runs = []
        for start, end in sorted(runs):
            if merged_runs and merged_runs[-1][1] + 1 == start:
                merged_runs[-1] = (merged_runs[-1][0], end)
            else:
                merged_runs.append((start, end))
        out[addr] = merged_runs
    return out


def shards_reply(ranges, replicas=()):
    """A CLUSTER SHARDS reply (RESP2: flat key/value lists, bytes)."""
    reply = []
    for addr, runs in ranges.items():
        slots = [x for run in runs for x in run]
        nodes = [[b"ip", addr[0].encode(), b"port", addr[1], b"role", b"master"]]
        nodes += [[b"ip", h.encode(), b"port", p, b"role", b"replica"] for h, p in replicas]
        reply.append([b"slots", slots, b"nodes", nodes])
    return reply


def slots_reply(ranges):
    """A CLUSTER SLOTS reply: [start, end, [host, port, id], replicas...]."""
    return [
        [start, end, [addr[0].encode(), addr[1], b"id"]]
        for addr, runs in ranges.items()
        for start, end in runs
    ]


@given(layouts())
def test_ranges_round_trip(ranges):
    table = SlotTable.from_ranges(ranges)
    assert table.ranges() == merged(ranges)
    assert table.primaries == set(ranges)
    for addr, runs in ranges.items():
        for start, end in runs:
            assert table.owner(start) == addr and table.owner(end) == addr


@given(layouts())
def test_shards_and_slots_replies_give_the_same_table(ranges):
    expected = SlotTable.from_ranges(ranges)
    assert SlotTable.from_shards(shards_reply(ranges), ("10.0.0.9", 7000)) == expected
    assert SlotTable.from_slots(slots_reply(ranges), ("10.0.0.9", 7000)) == expected


def test_nodes_are_every_node_seen_once_replicas_too():
    ranges = {NODES[0]: [(0, 8191)], NODES[1]: [(8192, SLOTS - 1)]}
    table = SlotTable.from_shards(shards_reply(ranges, replicas=[NODES[2]]), NODES[0])
    assert table.nodes == [NODES[0], NODES[2], NODES[1]]
    assert table.primaries == {NODES[0], NODES[1]}


def test_a_node_without_a_host_is_the_node_asked():
    reply = [
        [b"slots", [0, SLOTS - 1], b"nodes", [[b"ip", b"?", b"port", 7000, b"role", b"master"]]]
    ]
    assert SlotTable.from_shards(reply, ("10.9.9.9", 1)).owner(5) == ("10.9.9.9", 7000)
    assert SlotTable.from_slots([[0, SLOTS - 1, [b"", 7001]]], ("10.9.9.9", 1)).owner(5) == (
        "10.9.9.9",
        7001,
    )


def test_tls_port_when_the_link_is_tls():
    node = [b"ip", b"h", b"port", 7000, b"tls-port", 7443, b"role", b"master"]
    reply = [[b"slots", [0, SLOTS - 1], b"nodes", [node]]]
    assert SlotTable.from_shards(reply, ("h", 1), tls=True).owner(0) == ("h", 7443)
    assert SlotTable.from_shards(reply, ("h", 1)).owner(0) == ("h", 7000)


def test_set_owner_corrects_one_slot():
    table = SlotTable.from_ranges({NODES[0]: [(0, SLOTS - 1)]})
    slot = key_slot("trade.SOL_USDC")
    table.set_owner(slot, NODES[1])
    assert table.owner(slot) == NODES[1] and table.owner(slot - 1) == NODES[0]
    table.set_owner(slot, None)
    assert table.owner(slot) is None
    assert table != SlotTable.from_ranges({NODES[0]: [(0, SLOTS - 1)]})


def test_a_table_has_every_slot():
    assert SlotTable.empty().primaries == set()
    with pytest.raises(ValueError):
        SlotTable([None] * 10)
