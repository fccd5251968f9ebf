"""Who listens to what, without any I/O: :class:`Registry`, the
connections of one process and their subscriptions, and what each
subscription holds -- a live listener's place, a recovery, a derived
stream's place, a book kept, the Redis channel.

The core makes it and binds its methods (``core.subscribe`` is
``registry.subscribe``)::

    registry.register(conn)
    registry.subscribe(conn, ["trade.SOL_USDC"], {})            # a live listener
    registry.subscribe(conn, ["depth.SOL_USDC"], {"depth.SOL_USDC": Want(snapshot=True)})
    registry.subscribe(conn, ["depth10.SOL_USDC"])              # a derived stream
    registry.remove(conn)                                       # everything it held goes

A channel is wanted while the stream has live listeners, a recovery, or a
*tap* (something that reads the stream's messages first: its server book,
or the latest message for an update speed); when the last goes, the
channel goes (after lingering, see :mod:`~marketstream.fanout.wanted`).
"""

from __future__ import annotations

from marketstream.fanout.batching import Batch
from marketstream.fanout.bookkeeper import BookKeeper, Tap
from marketstream.fanout.budgets import ReplayBudgets
from marketstream.fanout.compressing import Compressing
from marketstream.fanout.dedupe import LivePositions
from marketstream.fanout.records import Connection, Want
from marketstream.fanout.recovery import Recoveries
from marketstream.fanout.speeds import DerivedStreams
from marketstream.fanout.wanted import WantedChannels

__all__ = ["Registry"]


class Registry:
    """The subscriptions of one process (see the module docstring); the
    dicts are the core's, never replaced."""

    def __init__(
        self,
        streams: dict[str, dict[Connection, None]],
        channels: WantedChannels,
        batch: Batch,
        budgets: ReplayBudgets,
        positions: LivePositions,
        compressing: Compressing,
        recoveries: Recoveries,
    ) -> None:
        self.streams = streams  # live listeners per stream
        self.connections: dict[Connection, dict[str, None]] = {}  # streams per connection
        self.channels = channels
        self.batch = batch
        self.budgets = budgets
        self.positions = positions
        self.compressing = compressing
        self.recoveries = recoveries
        self.recovering = recoveries.streams
        # Streams whose messages something else reads first (books, latest).
        self.taps: dict[str, Tap] = {}
        self.books: BookKeeper | None = None  # set by the core, with derived
        self.derived: DerivedStreams | None = None
        # Slow readers: the streams each receives no more until it has read
        # what was queued (see park).
        self.parked: dict[Connection, dict[str, None]] = {}

    def register(self, conn: Connection, compressing: bool = False) -> None:
        """Track a new connection (``compressing``: it negotiated permessage-deflate)."""
        self.connections.setdefault(conn, {})
        self.compressing.register(conn, compressing)

    def subscribe(
        self, conn: Connection, names: list[str], wants: dict[str, Want] | None = None
    ) -> list[str]:
        """Add ``conn`` to each stream; returns the streams newly added.
        A stream with a :class:`Want` in ``wants`` is recovered first."""
        mine = self.connections.setdefault(conn, {})
        derived, books = self.derived, self.books
        assert derived is not None and books is not None
        added = []
        for name in names:
            if name in mine:
                continue
            mine[name] = None
            added.append(name)
            want = wants.get(name) if wants else None
            if derived.add(conn, name, want):
                continue
            books.keep(name)
            if want is not None and want.recovers:
                self.hold(conn, name, want)
            else:
                listeners = self.streams.get(name)
                if listeners is None:
                    self.channels.want(name)
                    self.streams[name] = {conn: None}
                else:
                    listeners[conn] = None
                self.compressing.changed(name)
        return added

    def unsubscribe(self, conn: Connection, names: list[str]) -> list[str]:
        """Remove ``conn`` from each stream; unknown names are ignored."""
        mine = self.connections.get(conn)
        if not mine:
            return []
        removed = []
        parked = self.parked.get(conn)
        for name in names:
            if mine.pop(name, 0) is None:
                self.drop_listener(name, conn)
                removed.append(name)
                if parked:  # taken again, it is a new subscription: not unparked
                    parked.pop(name, None)
        return removed

    def remove(self, conn: Connection) -> None:
        """Forget a departed connection entirely."""
        mine = self.connections.pop(conn, None)
        self.batch.drop(conn)
        if mine:
            for name in mine:
                self.drop_listener(name, conn)
        self.budgets.forget(conn)
        self.compressing.discard(conn)
        self.parked.pop(conn, None)

    def subscriptions(self, conn: Connection) -> list[str]:
        return list(self.connections.get(conn, ()))

    def drop_listener(self, name: str, conn: Connection) -> None:
        """``conn`` no longer listens to (or waits for) ``name``."""
        derived, books = self.derived, self.books
        assert derived is not None and books is not None
        if derived.drop(conn, name):
            return
        books.release(name)
        listeners = self.streams.get(name)
        if listeners is not None:
            listeners.pop(conn, None)
            self.compressing.changed(name)
            self.positions.let_go(name, conn)
            if not listeners:
                del self.streams[name]
                self.positions.drop_holdings(name)
                if name not in self.recovering and name not in self.taps:
                    self.unwanted(name)
        if name in self.recovering:
            self.recoveries.drop(name, conn)
            self.forget_if_idle(name)

    def unwanted(self, name: str) -> None:
        """Nobody listens to ``name``: its positions and channel go."""
        self.positions.forget(name)
        self.channels.unwanted(name)

    def forget_if_idle(self, name: str) -> None:
        """Drop a recovery nobody waits for any more."""
        idle = self.recoveries.forget_if_idle(name)
        if idle and name not in self.streams and name not in self.taps:
            self.unwanted(name)

    def tap(self, name: str, tap: Tap) -> None:
        """``tap`` reads each message of ``name`` first (its channel is held)."""
        self.taps[name] = tap
        self.channels.want(name)

    def untap(self, name: str) -> None:
        """``name``'s tap goes (and its channel, if nothing else holds it)."""
        if self.taps.pop(name, None) and name not in self.streams and name not in self.recovering:
            self.unwanted(name)

    def hold(self, conn: Connection, name: str, want: Want) -> None:
        """``conn`` waits for ``name``'s history read (``want``)."""
        if self.recoveries.hold(name, conn, want):
            self.channels.want(name)

    # --- slow readers ------------------------------------------------------

    def park(self, conn: Connection) -> int:
        """``conn`` reads too slowly: it stops receiving the streams whose
        state a snapshot carries (book streams the server keeps a book of,
        and derived streams) until :meth:`unpark`; the number parked."""
        derived, books = self.derived, self.books
        assert derived is not None and books is not None
        mine = self.connections.get(conn)
        if not mine or conn in self.parked:
            return 0
        parked: dict[str, None] = {}
        for name in mine:
            if derived.park(conn, name) or (books.synced(name) and self._unlisten(name, conn)):
                parked[name] = None
        if parked:
            self.parked[conn] = parked
        return len(parked)

    def _unlisten(self, name: str, conn: Connection) -> bool:
        """``conn`` stops listening to ``name`` (still subscribed; its book
        holds the channel)."""
        listeners = self.streams.get(name)
        if listeners is None or listeners.pop(conn, 0) is not None:
            return False
        self.compressing.changed(name)
        self.positions.let_go(name, conn)
        if not listeners:
            del self.streams[name]
            self.positions.drop_holdings(name)
        return True

    def unpark(self, conn: Connection) -> list[str]:
        """``conn`` has read what was queued: each stream it missed starts
        again from a snapshot (the shell queues the gap notices first);
        the streams, still subscribed, that do."""
        derived = self.derived
        assert derived is not None
        parked = self.parked.pop(conn, None)
        mine = self.connections.get(conn)
        if not parked or not mine:
            return []
        back = [name for name in parked if name in mine]
        for name in back:
            if not derived.unpark(conn, name):
                self.hold(conn, name, Want(snapshot=True))
        return back
