"""The Redis Cluster slot table: which primary owns which slot (no I/O).

Built from a ``CLUSTER SHARDS`` or ``CLUSTER SLOTS`` reply (RESP2, as
redis-py returns it) or from ranges, and corrected in place when a shard
answers ``MOVED`` or gives a slot up::

    table = SlotTable.from_ranges({("10.0.0.1", 7000): [(0, 8191)],
                                   ("10.0.0.2", 7000): [(8192, 16383)]})
    table.owner(key_slot("trade.SOL_USDC"))     # ("10.0.0.2", 7000)
    table.primaries                             # {("10.0.0.1", 7000), ("10.0.0.2", 7000)}
    table.set_owner(100, ("10.0.0.2", 7000))    # MOVED said so
    table.set_owner(100, None)                  # nobody known

>>> table = SlotTable.from_ranges({("a", 1): [(0, 99), (200, 16383)], ("b", 2): [(100, 199)]})
>>> table.owner(150), table.ranges()[("a", 1)]
(('b', 2), [(0, 99), (200, 16383)])
"""

from __future__ import annotations

from collections.abc import Iterable
from redis.crc import key_slot as _key_slot

from marketstream.upstream.clients import Reply

__all__ = ["Address", "Ranges", "SLOTS", "SlotTable", "key_slot"]

Address = tuple[str, int]
Ranges = dict[Address, list[tuple[int, int]]]  # primary -> its slot ranges [(start, end)]
SLOTS = 16384


def key_slot(name: str | bytes) -> int:
    """The Redis Cluster slot of a key or sharded channel::

    >>> key_slot("trade.SOL_USDC") == key_slot("{trade.SOL_USDC}:seq")
    True
    """
    return _key_slot(name.encode() if isinstance(name, str) else name)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(flat: list[Reply]) -> dict[str, Reply]:
    """``[k1, v1, k2, v2, ...]`` (a RESP2 map) as a dict of text keys."""
    return dict(zip(map(_text, flat[::2]), flat[1::2]))


class SlotTable:
    """Which primary owns each of the 16384 slots, and every node seen."""

    __slots__ = ("_owners", "nodes")

    def __init__(self, owners: list[Address | None], nodes: Iterable[Address] = ()) -> None:
        if len(owners) != SLOTS:
            raise ValueError("a slot table has %d slots, not %d" % (SLOTS, len(owners)))
        self._owners = owners
        self.nodes: list[Address] = list(dict.fromkeys(nodes))  # every node seen, in order

    @classmethod
    def empty(cls) -> SlotTable:
        """No slot owned (before the first topology)."""
        return cls([None] * SLOTS)

    @classmethod
    def from_ranges(cls, primaries: Ranges, nodes: Iterable[Address] = ()) -> SlotTable:
        """From ``{primary: [(start, end), ...]}`` (ends included)."""
        owners: list[Address | None] = [None] * SLOTS
        for addr, ranges in primaries.items():
            for start, end in ranges:
                owners[start : end + 1] = [addr] * (end - start + 1)
        return cls(owners, list(nodes) or list(primaries))

    @classmethod
    def from_shards(cls, reply: list[Reply], asked: Address, tls: bool = False) -> SlotTable:
        """From a ``CLUSTER SHARDS`` reply of the node ``asked`` (which
        stands for a node that names no host of its own)."""
        primaries: Ranges = {}
        nodes: list[Address] = []
        for shard in map(_fields, reply):
            slots = [int(x) for x in shard.get("slots", ())]
            for info in map(_fields, shard.get("nodes", ())):
                host = _text(info.get("endpoint") or b"") or _text(info.get("ip") or b"")
                if host in ("", "?"):
                    host = asked[0]
                port = int(info["tls-port"]) if tls and info.get("tls-port") else int(info["port"])
                nodes.append((host, port))
                if _text(info.get("role")) == "master" and slots:
                    primaries.setdefault((host, port), []).extend(zip(slots[::2], slots[1::2]))
        return cls.from_ranges(primaries, nodes)

    @classmethod
    def from_slots(cls, reply: list[Reply], asked: Address) -> SlotTable:
        """From a ``CLUSTER SLOTS`` reply (Redis < 7) of the node ``asked``."""
        primaries: Ranges = {}
        nodes: list[Address] = []
        for entry in reply:
            start, end = int(entry[0]), int(entry[1])
            for i, node in enumerate(entry[2:]):
                host = _text(node[0]) or asked[0]
                addr = (asked[0] if host == "?" else host, int(node[1]))
                nodes.append(addr)
                if i == 0:
                    primaries.setdefault(addr, []).append((start, end))
        return cls.from_ranges(primaries, nodes)

    def owner(self, slot: int) -> Address | None:
        """The primary owning ``slot`` (None: not known)."""
        return self._owners[slot]

    def set_owner(self, slot: int, addr: Address | None) -> None:
        """A shard said who owns ``slot`` now (``MOVED``), or gave it up (None)."""
        self._owners[slot] = addr

    @property
    def primaries(self) -> set[Address]:
        """Every node owning a slot."""
        return {addr for addr in self._owners if addr is not None}

    def ranges(self) -> Ranges:
        """``{primary: sorted [(start, end)]}``, the inverse of :meth:`from_ranges`."""
        out: Ranges = {}
        start = 0
        for slot in range(1, SLOTS + 1):
            if slot == SLOTS or self._owners[slot] != self._owners[start]:
                addr = self._owners[start]
                if addr is not None:
                    out.setdefault(addr, []).append((start, slot - 1))
                start = slot
        return out

    def __eq__(self, other: object) -> bool:
        """Equal when every slot has the same owner (the nodes seen aside)."""
        return isinstance(other, SlotTable) and self._owners == other._owners

    __hash__ = None  # type: ignore[assignment]  # mutable: not hashable
