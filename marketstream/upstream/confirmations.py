"""Futures waiting for Redis to confirm channel subscriptions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

__all__ = ["Confirmations"]


class Confirmations:
    """Futures waiting for Redis to confirm channel subscriptions::

    confirmations = Confirmations()
    ok = await confirmations.wait(["trade.SOL_USDC"], lambda name: not confirmed(name))
    confirmations.resolve("trade.SOL_USDC")   # Redis said "subscribe"
    confirmations.fail_all()                  # the link was lost: False to everyone
    """

    def __init__(self) -> None:
        self._waiters: dict[str, list[asyncio.Future[bool]]] = {}

    async def wait(
        self, names: Iterable[str], pending: Callable[[str], bool], timeout: float = 5.0
    ) -> bool:
        """Wait until every name for which ``pending(name)`` is true now is
        resolved; False if one failed or ``timeout`` passed first."""
        loop = asyncio.get_running_loop()
        futures = []
        for name in names:
            if pending(name):
                future: asyncio.Future[bool] = loop.create_future()
                self._waiters.setdefault(name, []).append(future)
                futures.append(future)
        if not futures:
            return True
        try:
            await asyncio.wait_for(asyncio.gather(*futures), timeout)
            return all(f.result() for f in futures)
        except asyncio.TimeoutError:
            return False

    def resolve(self, name: str, ok: bool = True) -> None:
        """The subscription of ``name`` was confirmed (or, ``ok`` False, given up)."""
        for future in self._waiters.pop(name, ()):
            if not future.done():
                future.set_result(ok)

    def fail_all(self) -> None:
        """Every wait ends with False (the link was lost, or stopped)."""
        for name in list(self._waiters):
            self.resolve(name, False)
