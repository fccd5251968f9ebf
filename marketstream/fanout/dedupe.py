"""Live dedupe: the positions each stream and connection holds, and which
listeners a live message must skip.

A connection caught up from a stream's history holds the position the
catch-up took it to.  The history read and the pub/sub link are two Redis
connections, so a live message at or below that position may still be on
its way: it was delivered from the history, and that connection skips it.
Once the live stream passes a connection's position, the holding is
forgotten and live messages go to every listener again::

    positions = LivePositions()
    positions.hold("trade.SOL_USDC", conn, 1042)       # caught up to 1042
    holding = positions.holding["trade.SOL_USDC"]
    positions.skip("trade.SOL_USDC", holding, listeners, 1042)  # without conn
    positions.skip("trade.SOL_USDC", holding, listeners, 1043)  # everyone

The core reads :attr:`~LivePositions.holding` and
:attr:`~LivePositions.live` on its hot path: these dicts (and
:attr:`~LivePositions.delivered`) are created once and never replaced.
"""

from __future__ import annotations

from marketstream.fanout.records import Connection

__all__ = ["LivePositions"]


class LivePositions:
    """Per stream: the last position delivered live (:attr:`delivered`,
    where an outage's repair resumes), the last position seen on the link
    (:attr:`live`), and the connections that hold a position from a
    catch-up (:attr:`holding`)."""

    __slots__ = ("delivered", "live", "holding")

    def __init__(self) -> None:
        self.delivered: dict[str, int] = {}
        self.live: dict[str, int] = {}
        self.holding: dict[str, dict[Connection, int]] = {}

    def hold(self, name: str, conn: Connection, position: int) -> None:
        """``conn`` was caught up on ``name`` to ``position``."""
        self.holding.setdefault(name, {})[conn] = position

    def let_go(self, name: str, conn: Connection) -> None:
        """``conn`` no longer listens to ``name``."""
        holding = self.holding.get(name)
        if holding is not None:
            holding.pop(conn, None)

    def drop_holdings(self, name: str) -> None:
        """No connection holds a position on ``name`` any more (its last
        listener left, or its positions started over)."""
        self.holding.pop(name, None)

    def forget(self, name: str) -> None:
        """Nobody listens to ``name``: its positions mean nothing now."""
        self.delivered.pop(name, None)
        self.live.pop(name, None)

    def read_ended(self, name: str, caught_up: int) -> None:
        """A read took its connections to ``caught_up`` (0: to no position):
        the live stream is there for the next outage's repair, and if
        positions went back and the catch-up said so, the next live
        position is not another restart."""
        held = max(self.delivered.get(name, 0), caught_up)
        if held:
            self.delivered[name] = held
        if 0 < caught_up < self.live.get(name, 0):
            self.live[name] = caught_up

    def skip(
        self, name: str, holding: dict[Connection, int], listeners: dict[Connection, None], seq: int
    ) -> dict[Connection, None]:
        """``listeners`` without those that already hold position ``seq``
        (``holding`` is ``self.holding[name]``); forgets the holdings the
        live stream has passed."""
        for conn, position in list(holding.items()):
            if position < seq:
                del holding[conn]
        if not holding:
            del self.holding[name]
            return listeners
        return {conn: None for conn in listeners if conn not in holding}
