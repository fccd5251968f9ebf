"""Which stream names may be subscribed: ``<type>.<MARKET>`` with optional
middle parts, checked against allow-lists of types and markets (the
``[protocol]`` settings).

>>> rules = StreamRules(markets=("SOL_USDC",))
>>> rules.refusal("trade.SOL_USDC") is None
True
>>> rules.refusal("trade.BTC_USDT")
('unknown_market', "unknown market 'BTC_USDT'")
>>> rules.check("orders.SOL_USDC")
"unknown stream type 'orders' (allowed: depth, trade, ticker, bookTicker, kline)"
"""

import re
from collections.abc import Iterable
from typing import Protocol

from marketstream.wire.derived import DerivedRules, Refused

__all__ = ["MAX_STREAM_NAME", "ACCEPTED_CACHE", "RuleSettings", "StreamRules"]

#: The longest stream name, in characters.
MAX_STREAM_NAME = 200


class RuleSettings(Protocol):
    """What :meth:`StreamRules.from_settings` reads (the ``[protocol]`` section)."""

    @property
    def stream_types(self) -> tuple[str, ...]: ...

    @property
    def markets(self) -> tuple[str, ...]: ...

    @property
    def market_pattern(self) -> re.Pattern[str]: ...


_MIDDLE_PART = re.compile(r"[A-Za-z0-9]+")
#: Stream names a :class:`StreamRules` remembers as accepted, at most.
ACCEPTED_CACHE = 65536


class StreamRules:
    """Which stream names may be subscribed.

    A name is ``<type>.<MARKET>`` with optional middle parts
    (``kline.1m.SOL_USDC``, ``depth.200ms.SOL_USDC``).  ``types`` is an
    allow-list of stream types; ``markets`` an allow-list of markets, or empty
    to accept any market matching ``market_pattern``.

    >>> StreamRules().refusal("trades.BTC_USDT")[1]
    "unknown stream type 'trades' (allowed: depth, trade, ticker, bookTicker, kline)"
    >>> StreamRules().refusal("btcusdt@trade")[0]
    'invalid_name'

    With ``derived`` (:class:`~marketstream.wire.derived.DerivedRules`),
    derived names (``depth10.BTC_USDT``, ``depth.BTC_USDT@100ms``) are
    accepted when their base stream is; their refusals have the causes of
    ``DerivedRules.CAUSES``:

    >>> from marketstream.wire.derived import DerivedRules
    >>> rules = StreamRules(derived=DerivedRules())
    >>> rules.refusal("depth10.BTC_USDT") is None
    True
    >>> rules.refusal("trade.BTC_USDT@100ms")[0]
    'no_speed'
    >>> rules.refusal("depth.btc@100ms")[0]
    'unknown_market'
    """

    #: Why a name is refused (the ``cause`` of :meth:`refusal`), as counted
    #: in ``marketstream_rejected_streams_total``.
    CAUSES = ("invalid_name", "unknown_type", "unknown_market")

    def __init__(
        self,
        types: Iterable[str] = ("depth", "trade", "ticker", "bookTicker", "kline"),
        markets: Iterable[str] = (),
        market_pattern: str | re.Pattern[str] = r"^[A-Z0-9]+_[A-Z0-9]+$",
        derived: DerivedRules | None = None,
    ) -> None:
        self.derived = derived
        types = tuple(types)
        self.types = frozenset(types)
        self.markets = frozenset(markets)
        self.market_pattern = (
            re.compile(market_pattern) if isinstance(market_pattern, str) else market_pattern
        )
        self._allowed_types = ", ".join(dict.fromkeys(types))
        # Names accepted before (at most ACCEPTED_CACHE): a client that
        # subscribes the same 1024 streams again and again costs a set
        # lookup per name, not a parse.
        self._accepted: set[str] = set()

    @classmethod
    def from_settings(
        cls, protocol: "RuleSettings", derived: DerivedRules | None = None
    ) -> "StreamRules":
        """The rules of the ``[protocol]`` settings section
        (:class:`marketstream.server.config.ProtocolSettings`), with the
        derived names of ``derived`` (``[books]``)."""
        return cls(protocol.stream_types, protocol.markets, protocol.market_pattern, derived)

    def check(self, name: str) -> str | None:
        """None if ``name`` is an acceptable stream, else the reason it is not."""
        refusal = self.refusal(name)
        return None if refusal is None else refusal[1]

    def refusal(self, name: str) -> tuple[str, str] | None:
        """None if ``name`` is an acceptable stream, else ``(cause, reason)``:
        the cause one of :attr:`CAUSES`, the reason a sentence for the client."""
        if name in self._accepted:
            return None
        if not name or len(name) > MAX_STREAM_NAME:
            return "invalid_name", "invalid stream name (1 to %d characters)" % MAX_STREAM_NAME
        derived = self.derived
        if derived is not None and ("@" in name or name.startswith("depth")) and "." in name:
            spec = derived.parse(name)
            if isinstance(spec, Refused):
                return spec.cause, spec.reason
            if spec is not None:
                refusal = self.refusal(spec.base)
                if refusal is None:
                    self._accept(name)
                return refusal
        parts = name.split(".")
        if len(parts) < 2:
            return "invalid_name", "stream name must be <type>.<MARKET>, e.g. trade.BTC_USDT"
        if parts[0] not in self.types:
            return "unknown_type", "unknown stream type %r (allowed: %s)" % (
                parts[0],
                self._allowed_types,
            )
        market = parts[-1]
        if self.markets:
            if market not in self.markets:
                return "unknown_market", "unknown market %r" % market
        elif not self.market_pattern.fullmatch(market):
            return "unknown_market", "invalid market %r (must match %s)" % (
                market,
                self.market_pattern.pattern,
            )
        for middle in parts[1:-1]:
            if not _MIDDLE_PART.fullmatch(middle):
                return "invalid_name", "invalid stream name"
        self._accept(name)
        return None

    def _accept(self, name: str) -> None:
        if len(self._accepted) >= ACCEPTED_CACHE:
            self._accepted.clear()
        self._accepted.add(name)
