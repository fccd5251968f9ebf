"""The channels the Redis link must hold: the streams with listeners or
recoveries, plus lingering ones; what changed since the link last looked;
the channel cap.

A subscribe and an unsubscribe of a channel the link never saw cancel out.
With ``linger``, a channel whose last listener left stays subscribed until
the second :meth:`WantedChannels.release_lingering` after that (the shell
calls it every half second), so that churn costs Redis nothing;
``max_channels`` caps the channels, and lingering ones give way first:

>>> channels = WantedChannels(linger=True)
>>> channels.want("trade.SOL_USDC"); channels.take_changes()
{'trade.SOL_USDC': True}
>>> channels.unwanted("trade.SOL_USDC"); channels.release_lingering()
>>> sorted(channels.channels), list(channels.lingering)
(['trade.SOL_USDC'], ['trade.SOL_USDC'])
>>> channels.release_lingering(); channels.take_changes()
{'trade.SOL_USDC': False}
"""

from __future__ import annotations

from itertools import islice

__all__ = ["WantedChannels"]


class WantedChannels:
    """The link's channels (see the module docstring)."""

    __slots__ = ("channels", "changes", "lingering", "changed", "linger", "max_channels", "_sweep")

    def __init__(self, max_channels: int = 0, linger: bool = False) -> None:
        self.max_channels = max_channels  # 0: no cap
        self.linger = linger
        # channels and lingering are never replaced (the core binds them).
        self.channels: set[str] = set()  # what the link must hold
        self.changes: dict[str, bool] = {}  # channel -> wanted, since the link last took them
        self.lingering: dict[str, int] = {}  # unwanted channels kept a moment -> their sweep
        self.changed = False  # the shell syncs upstream when set
        self._sweep = 0

    def take_changes(self) -> dict[str, bool]:
        """The channels wanted (True) or unwanted (False) since the last call."""
        changes, self.changes = self.changes, {}
        return changes

    def want(self, name: str) -> None:
        """``name`` has a listener or a recovery."""
        if name in self.channels:
            self.lingering.pop(name, None)
            return
        self.channels.add(name)
        self.changes[name] = True
        self.changed = True

    def unwanted(self, name: str) -> None:
        """Nobody listens to ``name`` any more: release its channel (at
        once if the link has not taken it yet, else after lingering)."""
        if self.linger and not self.changes.get(name):
            self.lingering[name] = self._sweep
        else:
            self.release(name)

    def release(self, name: str) -> None:
        """Release ``name``'s channel now."""
        self.channels.discard(name)
        self.lingering.pop(name, None)
        self.changes[name] = False
        self.changed = True

    def release_lingering(self) -> None:
        """Release the channels that have lingered since before the
        previous call (the shell calls this periodically)."""
        sweep = self._sweep
        self._sweep += 1
        for name, since in list(self.lingering.items()):  # oldest first
            if since >= sweep:
                break
            self.release(name)

    def over_cap(self, names: list[str]) -> list[str]:
        """The streams of ``names`` (distinct) that would need a channel
        beyond ``max_channels``; lingering channels are released to make
        room first, oldest first.

        >>> channels = WantedChannels(max_channels=2)
        >>> channels.want("trade.A_B")
        >>> channels.over_cap(["trade.A_B", "trade.C_D", "trade.E_F"])
        ['trade.E_F']
        """
        if not self.max_channels:
            return []
        new = [name for name in names if name not in self.channels]
        over = len(self.channels) + len(new) - self.max_channels
        if over <= 0:
            return []
        for name in list(islice(self.lingering, over)):
            self.release(name)
        return new[max(0, self.max_channels - len(self.channels)) :]
