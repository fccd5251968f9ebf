"""Where each sharded channel is subscribed: the placement, as sans-I/O state.

A :class:`Placement` knows the channels wanted, the slot table, the shard
links (up or not) and the commands each link has pending.  Events go in
(channels wanted or not, a shard's replies, a link up or lost, a new slot
table); what to do comes out, as records: ``SSUBSCRIBE``/``SUNSUBSCRIBE``
to send on a link (one command per slot: a multi-channel ``SSUBSCRIBE``
must stay inside one slot), read the topology again, open or close a link,
and what the listener must hear (a channel confirmed, channels back after an
interruption)::

    placement = Placement()
    placement.apply(SlotTable.from_ranges({("10.0.0.1", 7000): [(0, 16383)]}))
    # [Open(("10.0.0.1", 7000))]
    placement.link_up(("10.0.0.1", 7000))
    placement.want(["trade.SOL_USDC"])
    placement.place()
    # [Send(("10.0.0.1", 7000), (("SSUBSCRIBE", "trade.SOL_USDC"),))]
    placement.on_reply(("10.0.0.1", 7000), [b"ssubscribe", b"trade.SOL_USDC", 1])
    # [Subscribed("trade.SOL_USDC")]

No I/O, no clock, no event loop: :class:`~marketstream.upstream.shards.ShardedSubscriber`
carries the records out.  Every way a channel leaves its link (the link
lost, the shard gave the slot up, the shard refused, the owner changed)
goes through one operation, :meth:`Placement._unassign`, which queues the
channel again if it is still wanted.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterable

from redis.exceptions import MovedError, ResponseError

from marketstream.upstream.slots import Address, SlotTable, key_slot
from marketstream.upstream.urls import node_label

__all__ = [
    "Close",
    "Open",
    "Output",
    "Placement",
    "Refresh",
    "Resubscribed",
    "Send",
    "Shard",
    "Subscribed",
]

log = logging.getLogger(__name__)

MAX_MOVED = 3  # MOVED followed in a row for one slot before reading the topology instead


@dataclasses.dataclass(frozen=True, slots=True)
class Send:
    """Send these commands on the link to ``node``."""

    node: Address
    commands: tuple[tuple[str, ...], ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Refresh:
    """Read the topology again (the driver backs off)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Open:
    """A new primary: open a link to it."""

    node: Address


@dataclasses.dataclass(frozen=True, slots=True)
class Close:
    """No longer a primary: close its link."""

    node: Address


@dataclasses.dataclass(frozen=True, slots=True)
class Subscribed:
    """The listener's event: a shard confirmed ``name``."""

    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class Resubscribed:
    """The listener's event: ``names`` were interrupted (slot moved, shard
    failed over or unreachable) and ``node`` confirmed them again."""

    node: Address
    names: tuple[str, ...]


Output = Send | Refresh | Open | Close | Subscribed | Resubscribed


@dataclasses.dataclass(slots=True)
class Pending:
    """A command sent on a link whose replies have not all come back."""

    kind: str  # "ssubscribe", "sunsubscribe" or "ping"
    slot: int | None
    names: set[str]
    left: int  # replies still to come (one per channel, one for PING)
    resubscribed: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(slots=True, eq=False)
class Shard:
    """What the placement knows of one primary's link."""

    addr: Address
    up: bool = False
    assigned: dict[str, int] = dataclasses.field(default_factory=dict)  # channel -> slot
    bnames: set[bytes] = dataclasses.field(default_factory=set)  # the same, as the reader's filter
    pending: collections.deque[Pending] = dataclasses.field(default_factory=collections.deque)

    @property
    def label(self) -> str:
        return node_label(self.addr)


class Placement:
    """Sharded channels placed on the links of their slots' owners (see the
    module docstring)."""

    def __init__(self) -> None:
        self.table = SlotTable.empty()
        self.shards: dict[Address, Shard] = {}
        self.confirmed: set[str] = set()  # channels a shard confirmed
        self.stranded: set[str] = set()  # wanted, owner unknown or unreachable
        self._wanted: dict[str, int] = {}  # channel -> slot
        self._assigned: dict[str, Shard] = {}  # channel -> shard SSUBSCRIBE went to
        self._unassigned: dict[str, None] = {}  # wanted, not yet sent anywhere
        self._drops: dict[str, None] = {}  # not wanted, maybe still on a shard
        self._interrupted: set[str] = set()  # confirmed once, lost since
        self._moved: dict[int, int] = {}  # slot -> MOVED hops in a row
        self._rescan = False  # owners changed: check every assignment

    # --- what is asked ----------------------------------------------------------

    def want(self, names: Iterable[str]) -> list[str]:
        """Want these channels; returns those newly wanted."""
        added = []
        for name in names:
            if name not in self._wanted:
                self._wanted[name] = key_slot(name)
                self._drops.pop(name, None)
                if name not in self._assigned:
                    self._unassigned[name] = None
                added.append(name)
        return added

    def unwant(self, names: Iterable[str]) -> list[str]:
        """Stop wanting these channels; returns those no longer wanted."""
        removed = []
        for name in names:
            if self._wanted.pop(name, None) is not None:
                self._unassigned.pop(name, None)
                self.stranded.discard(name)
                self._interrupted.discard(name)
                if name in self._assigned:
                    self._drops[name] = None
                removed.append(name)
        return removed

    def node_of(self, name: str) -> Address | None:
        """The node ``name`` was sent to (None while it is not)."""
        shard = self._assigned.get(name)
        return shard.addr if shard is not None else None

    # --- the topology and the links ------------------------------------------------

    def apply(self, table: SlotTable) -> list[Output]:
        """A slot table was read: open links to new primaries, close the others."""
        if table != self.table:
            self._rescan = True
        self.table = table
        primaries = table.primaries
        out: list[Output] = []
        for addr in sorted(primaries - set(self.shards)):
            self.shards[addr] = Shard(addr)
            out.append(Open(addr))
        for addr in [a for a in self.shards if a not in primaries]:
            self._release(self.shards.pop(addr))
            out.append(Close(addr))
        return out

    def link_up(self, addr: Address) -> None:
        """The link to ``addr`` is connected (nothing subscribed on it)."""
        shard = self.shards.get(addr)
        if shard is not None:
            shard.up = True
            shard.pending.clear()

    def link_lost(self, addr: Address) -> list[Output]:
        """The link to ``addr`` is gone: its channels are placed again."""
        shard = self.shards.get(addr)
        if shard is None:
            return []
        shard.up = False
        self._release(shard)
        return [Refresh()]

    def pinged(self, addr: Address) -> None:
        """A PING was sent on the link to ``addr`` (its reply comes in turn)."""
        shard = self.shards.get(addr)
        if shard is not None:
            shard.pending.append(Pending("ping", None, set(), 1))

    def _unassign(self, shard: Shard, name: str) -> int:
        """``name`` leaves ``shard`` (returns its slot); if still wanted it
        is queued to be placed again, and a confirmed one counts as
        interrupted until confirmed again."""
        del self._assigned[name]
        slot = shard.assigned.pop(name)
        shard.bnames.discard(name.encode())
        if name in self.confirmed:
            self.confirmed.discard(name)
            if name in self._wanted:
                self._interrupted.add(name)
        if name in self._wanted:
            self._unassigned[name] = None
            self.stranded.add(name)
        return slot

    def _release(self, shard: Shard) -> None:
        for name in list(shard.assigned):
            if self._assigned.get(name) is shard:
                self._unassign(shard, name)
        shard.assigned.clear()
        shard.bnames.clear()
        shard.pending.clear()

    # --- placing ---------------------------------------------------------------------

    def place(self) -> list[Output]:
        """SUNSUBSCRIBE/SSUBSCRIBE so that every wanted channel is on the
        link of its slot's owner, one command per slot; :class:`Refresh`
        if a channel's owner is unknown or its link down."""
        unsub: dict[Shard, dict[int, list[str]]] = {}
        sub: dict[Shard, dict[int, list[str]]] = {}
        for name in self._drops:
            shard = self._assigned.get(name)
            if shard is not None and name not in self._wanted:
                self._queue(unsub, shard, self._unassign(shard, name), name)
        self._drops = {}
        if self._rescan:
            self._rescan = False
            for name, shard in list(self._assigned.items()):
                if self.table.owner(shard.assigned[name]) != shard.addr:
                    self._queue(unsub, shard, self._unassign(shard, name), name)
        self.stranded = set()
        waiting: dict[str, None] = {}
        for name in self._unassigned:
            slot = self._wanted[name]
            owner = self.table.owner(slot)
            shard = self.shards.get(owner) if owner is not None else None
            if shard is None or not shard.up:
                waiting[name] = None
                self.stranded.add(name)
                continue
            self._assigned[name] = shard
            shard.assigned[name] = slot
            shard.bnames.add(name.encode())
            sub.setdefault(shard, {}).setdefault(slot, []).append(name)
        self._unassigned = waiting
        out: list[Output] = []
        for shard in dict.fromkeys([*unsub, *sub]):
            commands: list[tuple[str, ...]] = []
            for slot, names in unsub.get(shard, {}).items():
                shard.pending.append(Pending("sunsubscribe", slot, set(names), len(names)))
                commands.append(("SUNSUBSCRIBE", *names))
            for slot, names in sub.get(shard, {}).items():
                shard.pending.append(Pending("ssubscribe", slot, set(names), len(names)))
                commands.append(("SSUBSCRIBE", *names))
            out.append(Send(shard.addr, tuple(commands)))
        if self.stranded:
            out.append(Refresh())
        return out

    @staticmethod
    def _queue(
        unsub: dict[Shard, dict[int, list[str]]], shard: Shard, slot: int, name: str
    ) -> None:
        if shard.up:
            unsub.setdefault(shard, {}).setdefault(slot, []).append(name)

    # --- what a shard answers ----------------------------------------------------------

    def on_reply(self, addr: Address, reply: object) -> list[Output]:
        """A reply (not a message) read on the link to ``addr``."""
        shard = self.shards.get(addr)
        if shard is None:
            return []
        pending = shard.pending
        head = pending[0] if pending else None
        if type(reply) is not list:
            if reply == b"PONG" and head is not None and head.kind == "ping":
                pending.popleft()
            return []
        kind = reply[0]
        if kind == b"ssubscribe":
            return self._subscribed(shard, reply[1].decode())
        if kind == b"sunsubscribe":
            return self._unsubscribed(shard, reply[1].decode())
        if kind == b"pong" and head is not None and head.kind == "ping":
            pending.popleft()
        return []

    def _subscribed(self, shard: Shard, name: str) -> list[Output]:
        head = shard.pending[0] if shard.pending else None
        if head is None or head.kind != "ssubscribe":
            log.warning("%s: unexpected ssubscribe reply for %r", shard.label, name)
            return []
        head.left -= 1
        out: list[Output] = []
        if self._assigned.get(name) is shard and name not in self.confirmed:
            self.confirmed.add(name)
            if head.slot is not None:
                self._moved.pop(head.slot, None)
            if name in self._interrupted:
                self._interrupted.discard(name)
                head.resubscribed.append(name)
            else:
                out.append(Subscribed(name))
        if head.left == 0:
            shard.pending.popleft()
            if head.resubscribed:
                out.append(Resubscribed(shard.addr, tuple(head.resubscribed)))
        return out

    def _unsubscribed(self, shard: Shard, name: str) -> list[Output]:
        head = shard.pending[0] if shard.pending else None
        if head is not None and head.kind == "sunsubscribe" and name in head.names:
            head.names.discard(name)
            head.left -= 1
            if head.left == 0:
                shard.pending.popleft()
            return []
        if self._assigned.get(name) is not shard:
            return []
        # Unprompted: the shard lost this channel's slot.
        slot = self._unassign(shard, name)
        log.info("%s gave up slot %d (sunsubscribe of %r)", shard.label, slot, name)
        if self.table.owner(slot) == shard.addr:
            self.table.set_owner(slot, None)
        return [Refresh()]

    def on_error(self, addr: Address, exc: ResponseError) -> list[Output]:
        """An error reply on the link to ``addr``: it answers the oldest
        command pending there."""
        shard = self.shards.get(addr)
        if shard is None:
            return []
        if not shard.pending:
            log.warning("%s: error reply with nothing pending: %s", shard.label, exc)
            return []
        entry = shard.pending.popleft()
        if entry.kind != "ssubscribe" or entry.slot is None:
            return []  # SUNSUBSCRIBE of a slot it no longer has; PING while loading
        slot = entry.slot
        for name in entry.names:
            if self._assigned.get(name) is shard:
                self._unassign(shard, name)
        if isinstance(exc, MovedError):
            hops = self._moved[slot] = self._moved.get(slot, 0) + 1
            if hops <= MAX_MOVED:
                target = (exc.host or addr[0], int(exc.port))
                log.info("slot %d moved from %s to %s", slot, shard.label, node_label(target))
                self.table.set_owner(slot, target)
                out: list[Output] = [Refresh()]  # learn the rest of the new layout too
                if target not in self.shards:
                    self.shards[target] = Shard(target)
                    out.insert(0, Open(target))
                return out
        log.warning(
            "%s refused SSUBSCRIBE for slot %d (%s); reading the topology again",
            shard.label,
            slot,
            exc,
        )
        self.table.set_owner(slot, None)
        return [Refresh()]
