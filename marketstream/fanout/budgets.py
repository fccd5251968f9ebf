"""Byte budgets for catch-ups: how much history and snapshot each
connection may still be sent by the catch-ups it has in progress.

A connection with catch-ups in progress has ``replay_bytes`` in all,
shared evenly among its streams: when a stream's read starts, the
connection's share is what is left of its budget over its streams still
waiting; what a catch-up did not use comes back for the others.  A
connection's budget is forgotten when it has no stream waiting and no read
in flight:

>>> budgets = ReplayBudgets(1000)
>>> budgets.waiting("conn"); budgets.waiting("conn")  # two streams wait
>>> budgets.share("conn")   # the first read starts: half of it
500
>>> budgets.allowed("conn", 500)  # what that read may use: its share and what is left
1000
>>> budgets.moved("conn", 0, -1, bytes_back=500 - 120)  # 120 bytes sent
>>> budgets.share("conn")  # the second read: everything left
880
>>> budgets.moved("conn", 0, -1); "conn" in budgets
False
"""

from __future__ import annotations

from collections.abc import Hashable

__all__ = ["ReplayBudgets", "REPLAY_BYTES"]

#: Bytes of catch-up per connection unless told otherwise (half of the
#: default ``max_buffer_bytes``: live messages still fit behind it).
REPLAY_BYTES = 512 * 1024


class ReplayBudgets:
    """Per connection with catch-ups in progress: [bytes it may still be
    sent, streams waiting for their read, reads in flight]."""

    __slots__ = ("replay_bytes", "budgets")

    def __init__(self, replay_bytes: int = REPLAY_BYTES) -> None:
        self.replay_bytes = replay_bytes
        self.budgets: dict[Hashable, list[int]] = {}

    def __contains__(self, conn: Hashable) -> bool:
        return conn in self.budgets

    def __len__(self) -> int:
        return len(self.budgets)

    def waiting(self, conn: Hashable) -> None:
        """One more of ``conn``'s streams waits for its read."""
        budget = self.budgets.get(conn)
        if budget is None:
            self.budgets[conn] = [self.replay_bytes, 1, 0]
        else:
            budget[1] += 1

    def share(self, conn: Hashable) -> int:
        """A read of one of ``conn``'s waiting streams starts: the bytes it
        may send ``conn``, taken from the budget."""
        budget = self.budgets[conn]
        share = max(0, budget[0]) // max(1, budget[1])
        budget[0] -= share
        budget[1] -= 1
        budget[2] += 1
        return share

    def ready(self, conn: Hashable) -> bool:
        """Whether a read for ``conn`` may start now: False while its reads
        in flight hold its whole budget (they give back what they do not
        use when they end).

        >>> budgets = ReplayBudgets(1000)
        >>> budgets.waiting("conn"); budgets.share("conn")
        1000
        >>> budgets.waiting("conn"); budgets.ready("conn")   # a second SUBSCRIBE
        False
        >>> budgets.moved("conn", 0, -1, bytes_back=900); budgets.ready("conn")
        True
        """
        budget = self.budgets.get(conn)
        return budget is None or budget[0] > 0 or budget[2] <= 0

    def allowed(self, conn: Hashable, share: int) -> int:
        """What a read that ends may send ``conn``: its ``share`` and what
        no other read of ``conn`` reserved meanwhile."""
        budget = self.budgets.get(conn)
        return share + max(0, budget[0]) if budget is not None else share

    def moved(self, conn: Hashable, waiting: int, reading: int, bytes_back: int = 0) -> None:
        """``conn`` has ``waiting`` more streams waiting for their read and
        ``reading`` more reads in flight, and ``bytes_back`` of its budget
        back; its budget is forgotten once it has neither."""
        budget = self.budgets.get(conn)
        if budget is None:
            return
        budget[0] += bytes_back
        budget[1] += waiting
        budget[2] += reading
        if budget[1] <= 0 and budget[2] <= 0:
            del self.budgets[conn]

    def forget(self, conn: Hashable) -> None:
        """``conn`` is gone."""
        self.budgets.pop(conn, None)
