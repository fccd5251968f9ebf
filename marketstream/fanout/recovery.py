"""Recoveries in progress: per stream, the connections waiting for a
history read, those whose read is in flight, the live messages buffered
meanwhile, and each reader's byte share.

A connection that subscribes with ``since`` or ``snapshot`` waits here
instead of joining the stream's listeners; one read per stream serves
everyone waiting when it starts (:meth:`Recoveries.start`), and its answer
is taken for the read in flight only (a token tells a stale one)::

    recoveries = Recoveries(budgets, batch, positions, counters, 1000, on_dropped)
    recoveries.hold("trade.SOL_USDC", conn, Want(since=1042))   # True: a new recovery
    [read] = recoveries.start(confirmed={"trade.SOL_USDC"})
    recovery = recoveries.in_flight(read.stream, read.token)   # None if stale
    recoveries.serve(read.stream, recovery, history, listeners)  # the read ended

:meth:`Recoveries.serve` queues each reader's catch-up (what
:func:`marketstream.fanout.catchup.catch_up` decides), counts it, hands
back what its byte share did not use, notes the position it holds
(:class:`~marketstream.fanout.dedupe.LivePositions`) and makes it a
listener.  The core decides when a stream's channel is released.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass, field
from functools import partial

from marketstream.fanout.batching import Batch
from marketstream.fanout.budgets import ReplayBudgets
from marketstream.fanout.catchup import (
    CatchUp,
    Checksums,
    GapFrame,
    catch_up,
    frame_history,
    gap_frames,
)
from marketstream.fanout.compressing import Compressing
from marketstream.fanout.counters import Counters
from marketstream.fanout.dedupe import LivePositions
from marketstream.fanout.records import Connection, History, Read, Want
from marketstream.wire.frames import text_frame

__all__ = ["Recovery", "Recoveries", "MAX_WAITING"]

#: Live messages buffered for connections whose read has not started yet,
#: at most (the read usually starts in the same turn of the event loop).
MAX_WAITING = 10_000


@dataclass
class Recovery:
    """One stream's recovery."""

    waiting: dict[Connection, Want] = field(default_factory=dict)  # read not started
    reading: dict[Connection, Want] = field(default_factory=dict)  # read in flight
    # Live messages since the connections began waiting (at most MAX_WAITING
    # before their read starts): those of a plain stream are in no history.
    buffer: list[tuple[int | None, bytes]] = field(default_factory=list)
    in_flight: bool = False
    token: int = 0  # which read is in flight
    shares: dict[Connection, int] = field(default_factory=dict)  # bytes each reader may be sent

    @property
    def idle(self) -> bool:
        """Nobody waits for it any more and no read is in flight."""
        return not (self.waiting or self.reading or self.in_flight)


class Recoveries:
    """The recoveries of one process, by stream, and the connections' byte
    budgets (see the module docstring)."""

    __slots__ = (
        "streams",
        "budgets",
        "batch",
        "positions",
        "counters",
        "max_replay",
        "dropped",
        "compressing",
        "chain",
        "_reads",
    )

    def __init__(
        self,
        budgets: ReplayBudgets,
        batch: Batch,
        positions: LivePositions,
        counters: Counters,
        max_replay: int,
        dropped: Callable[[bytes, bytes, str], object],
        compressing: Compressing | None = None,
    ) -> None:
        self.streams: dict[str, Recovery] = {}  # never replaced: the core reads it per message
        self.budgets = budgets
        self.batch = batch
        self.positions = positions
        self.counters = counters
        self.max_replay = max_replay
        self.dropped = dropped  # a stored frame that fails the check: (channel, frame, problem)
        self.compressing = compressing  # catch-ups compressed for those that negotiated it
        # A book stream's checksums for a read's frames (None: not a kept book).
        self.chain: Callable[[str], Checksums | None] = lambda name: None
        self._reads = 0

    def hold(self, name: str, conn: Connection, want: Want) -> bool:
        """``conn`` waits for ``name``'s history; True if ``name`` had no
        recovery before (its channel is now wanted)."""
        recovery = self.streams.get(name)
        new = recovery is None
        if recovery is None:
            recovery = self.streams[name] = Recovery()
        recovery.waiting[conn] = want
        self.budgets.waiting(conn)
        return new

    def drop(self, name: str, conn: Connection) -> None:
        """``conn`` no longer waits for ``name`` (it left)."""
        recovery = self.streams.get(name)
        if recovery is None:
            return
        if recovery.waiting.pop(conn, None) is not None:
            self.budgets.moved(conn, -1, 0)
        if recovery.reading.pop(conn, None) is not None:
            recovery.shares.pop(conn, None)
            self.budgets.moved(conn, 0, -1)

    def forget_if_idle(self, name: str) -> bool:
        """Drop ``name``'s recovery if nobody waits for it any more; True
        if it was dropped."""
        recovery = self.streams.get(name)
        if recovery is None or not recovery.idle:
            return False
        del self.streams[name]
        return True

    def start(self, confirmed: Container[str], most: int | None = None) -> list[Read]:
        """History reads to start now (at most ``most``): one per stream
        with connections waiting whose channel is in ``confirmed``.  Each
        connection of a read gets its share of its budget (what is left of
        it, over its streams still waiting), and the read asks for the
        largest share."""
        reads: list[Read] = []
        for name, recovery in self.streams.items():
            if most is not None and len(reads) >= most:
                break
            if recovery.in_flight or not recovery.waiting or name not in confirmed:
                continue
            # A connection whose whole budget its reads in flight reserved
            # waits for them to give back what they did not use.
            ready = {c: w for c, w in recovery.waiting.items() if self.budgets.ready(c)}
            if not ready:
                continue
            recovery.in_flight = True
            self._reads += 1
            recovery.token = self._reads
            if len(ready) == len(recovery.waiting):
                recovery.reading, recovery.waiting = recovery.waiting, {}
            else:
                recovery.reading = ready
                recovery.waiting = {c: w for c, w in recovery.waiting.items() if c not in ready}
            shares = recovery.shares
            for conn in recovery.reading:
                shares[conn] = self.budgets.share(conn)
            wants = recovery.reading.values()
            sinces = [want.since for want in wants if want.since is not None]
            # A resume the history cannot cover falls back to the snapshot.
            snapshot = bool(sinces) or any(want.snapshot for want in wants)
            after = min(sinces) if sinces else None
            reads.append(Read(name, after, snapshot, recovery.token, max(shares.values())))
        return reads

    def in_flight(self, name: str, token: int | None) -> Recovery | None:
        """``name``'s recovery if the read of ``token`` (None: any) is the
        one in flight, else None (a stale answer)."""
        recovery = self.streams.get(name)
        if recovery is None or not recovery.in_flight or token not in (None, recovery.token):
            return None
        return recovery

    def back_to_waiting(self, recovery: Recovery) -> None:
        """The read in flight will not be used: its connections wait for
        the next, with their shares back (and what was buffered: a plain
        stream's messages are in no history)."""
        for conn in recovery.reading:
            self.budgets.moved(conn, 1, -1, recovery.shares.get(conn, 0))
        recovery.waiting.update(recovery.reading)
        recovery.reading.clear()
        recovery.shares.clear()
        recovery.in_flight = False

    def failed(self, name: str, token: int | None) -> bool:
        """The read of ``token`` (None: any) for ``name`` failed: its
        connections wait for the next.  False if it is not the read in
        flight (a stale answer, or none)."""
        recovery = self.in_flight(name, token)
        if recovery is not None:
            self.back_to_waiting(recovery)
        return recovery is not None

    def link_lost(self) -> None:
        """Every read in flight is void, and what was buffered for it."""
        for recovery in self.streams.values():
            self.back_to_waiting(recovery)
            recovery.buffer.clear()

    def serve(
        self, name: str, recovery: Recovery, history: History, listeners: dict[Connection, None]
    ) -> bool:
        """The read in flight for ``name`` found ``history``: queue each
        reader's catch-up, make it one of ``listeners`` (the stream's), and
        end the read; True if frames were queued.  What was read is framed
        once, and each catch-up built once per kind of request and of
        client (compressing or plain, each frame compressed once): in a
        reconnect storm a thousand clients ask for the same."""
        recovery.in_flight = False
        readers, shares = recovery.reading, recovery.shares
        recovery.reading, recovery.shares = {}, {}
        buffered = recovery.buffer
        # Those still waiting (joined during the read) keep what they may miss.
        recovery.buffer = list(buffered) if recovery.waiting else []
        live = [(seq, text_frame(data)) for seq, data in buffered]
        if not readers:
            return False
        merge = partial(
            catch_up, max_replay=self.max_replay, had_positions=name in self.positions.delivered
        )
        chain = self.chain(name)
        framed = frame_history(name.encode(), history, self.dropped, chain)
        if chain is not None:  # a book stream: the buffered frames' checksums too
            live = [
                (seq, text_frame(data if seq is None else chain.entry(seq, data)))
                for seq, data in buffered
            ]
        plain = (framed, live, gap_frames(name))
        kinds: dict[bool, tuple[History, list[tuple[int | None, bytes]], GapFrame]] = {False: plain}
        compressing = self.compressing
        deflating = compressing.connections if compressing is not None else ()
        built: dict[object, CatchUp] = {}
        counters, budgets, positions = self.counters, self.budgets, self.positions
        queued = False
        caught_up = 0  # the position the read took its connections to
        for conn, want in readers.items():
            share = shares.get(conn, 0)
            allowed = budgets.allowed(conn, share)  # with what no read of its reserved
            kind = conn in deflating
            if kind not in kinds:  # the frames compressed, once for every compressing reader
                assert compressing is not None
                kinds[kind] = compressing.reframed(*plain)
            framed, buffered, gap = kinds[kind]
            done = built.get((kind, want))
            if done is None:  # what it gets if its share is enough
                done = built[kind, want] = merge(want, framed, buffered, None, gap=gap)
            if done.size > allowed:  # it is not: what fits
                key = (kind, want, allowed)
                done = built.get(key) or built.setdefault(
                    key, merge(want, framed, buffered, allowed, gap=gap)
                )
            counters.replayed += done.replayed
            counters.snapshots_sent += done.snapshots
            counters.gap_notices += done.gap_notices
            budgets.moved(conn, 0, -1, share - done.size)
            if done.data:
                self.batch.queue(conn, [done.data], done.frames)
                queued = True
            listeners[conn] = None
            if done.position:
                positions.hold(name, conn, done.position)
                caught_up = max(caught_up, done.position)
        positions.read_ended(name, caught_up)
        return queued
