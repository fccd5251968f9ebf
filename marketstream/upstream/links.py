"""The pub/sub links a ``REDIS_URL`` needs, behind one interface.

* ``redis://``, ``rediss://``, ``unix://``: one
  :class:`~marketstream.upstream.link.PubSubLink`.
* ``redis+sentinel://``: one :class:`~marketstream.upstream.link.PubSubLink`
  that asks the sentinels for the primary at every (re)connect, plus a
  :class:`~marketstream.upstream.cluster.SentinelWatcher` that drops the
  link when a sentinel announces ``+switch-master`` for the service, so the
  link follows a failover at once (a failed link or a silent one is followed
  too: it reconnects and asks again).
* ``redis+cluster://``: a :class:`~marketstream.upstream.shards.ShardedSubscriber`,
  one SSUBSCRIBE connection per primary.

::

    link = make_link("redis+cluster://10.0.0.1:7000", manager, ping_interval=1.0)
    await link.start()
    link.changed()          # manager.wanted() changed
    link.healthy, link.links   # {"10.0.0.1:7000": True, ...}
    await link.stop()

Every link reports to the listener (the ChannelManager) the same way; a
cluster link also calls ``listener.on_interrupted(channels)`` when a slot
moved or a shard failed over and those channels are subscribed again on
their new owner.
"""

from __future__ import annotations

import logging
from typing import Protocol

from marketstream.upstream.cluster import SentinelWatcher, sentinel_primary
from marketstream.upstream.link import Listener, PubSubLink
from marketstream.upstream.shards import ClusterListener, ShardedSubscriber
from marketstream.upstream.urls import ConnectionOptions, RedisURL, parse_redis_url

__all__ = ["make_link", "ClusterListener", "Link", "SentinelLink"]

log = logging.getLogger(__name__)


class Link(Protocol):
    """The interface every link offers the ChannelManager."""

    @property
    def reconnects(self) -> int: ...

    @property
    def connected(self) -> bool: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def links(self) -> dict[str, bool]: ...

    async def start(self, timeout: float = 10.0) -> None: ...

    async def stop(self) -> None: ...

    def changed(self) -> None: ...

    def health(self) -> dict[str, object]: ...

    def redacted_url(self) -> str: ...


def make_link(
    url: str,
    listener: ClusterListener,
    ping_interval: float = 1.0,
    ping_timeout: float = 2.0,
    backoff_min: float = 0.05,
    backoff_max: float = 1.0,
) -> Link:
    """The link for ``url`` (see the module docstring)."""
    desc = parse_redis_url(url)
    if desc.mode == "cluster":
        return ShardedSubscriber.from_url(
            desc,
            listener,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            backoff_min=backoff_min,
            backoff_max=min(backoff_max, 0.5),
        )
    if desc.mode == "sentinel":
        return SentinelLink(
            desc,
            listener,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            backoff_min=backoff_min,
            backoff_max=backoff_max,
        )
    return PubSubLink(
        url,
        listener,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        backoff_min=backoff_min,
        backoff_max=backoff_max,
    )


class SentinelLink(PubSubLink):
    """A pub/sub link to the primary the sentinels name."""

    def __init__(
        self,
        desc: RedisURL,
        listener: Listener,
        ping_interval: float = 1.0,
        ping_timeout: float = 2.0,
        backoff_min: float = 0.05,
        backoff_max: float = 1.0,
    ) -> None:
        super().__init__(
            desc.url,
            listener,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            backoff_min=backoff_min,
            backoff_max=backoff_max,
            resolve=self._primary,
        )
        self.desc = desc
        self.watch = SentinelWatcher(
            desc.seeds,
            desc.service_name or "",
            self._switched,
            sentinel_kwargs=desc.sentinel_kwargs(),
        )
        self._announced: tuple[str, int] | None = None

    def _switched(self, primary: tuple[str, int]) -> None:
        log.warning(
            "sentinels name a new primary for %s: %s:%d; moving there",
            self.desc.service_name,
            primary[0],
            primary[1],
        )
        # Connect to the announced primary: a sentinel asked right now may
        # not have heard of the switch yet, and after a forced failover the
        # old primary still answers as a primary for seconds.
        self._announced = primary
        self.reconnect()

    async def _primary(self) -> ConnectionOptions:
        desc = self.desc
        if self._announced is not None:
            (host, port), self._announced = self._announced, None
        else:
            host, port = await sentinel_primary(
                desc.seeds,
                desc.service_name or "",
                sentinel_kwargs=desc.sentinel_kwargs(),
                **desc.connection_kwargs(),
            )
        kwargs = desc.connection_kwargs()
        kwargs.update(host=host, port=port, db=desc.db)
        return kwargs

    async def start(self, timeout: float = 10.0) -> None:
        await super().start(timeout)
        await self.watch.start()

    async def stop(self) -> None:
        await self.watch.stop()
        await super().stop()
