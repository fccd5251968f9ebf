"""Prometheus metrics, through prometheus_client.

The hot path only bumps plain integers (one
:class:`~marketstream.counters.Counters` object per process).  An
:class:`Exporter` copies them into prometheus_client metrics once a second
and right before every scrape, so a message costs no metric calls at all.

With several worker processes, prometheus_client's multiprocess mode
aggregates the workers (``enable_multiprocess`` must run in the parent before
the workers start), so ``/metrics`` is correct whichever worker answers it.

Metrics (all prefixed ``marketstream_``):

=====================================  ==========================================
``connections``                        open client connections
``subscriptions``                      connection-stream subscriptions
``upstream_channels``                  Redis channels subscribed
``redis_connected``                    1 while the pub/sub connection is live
``redis_messages_total``               messages read from Redis
``deliveries_total``                   frames queued to clients (message x subscriber)
``bytes_sent_total``                   bytes of market data written to clients
``batches_total``                      delivery batches (one write per client each)
``batch_size``                         histogram: messages per delivery batch
``dropped_total{cause}``               malformed_payload, invalid_frame,
                                       rejected_stream, slow_consumer, rate_limit,
                                       ping_timeout, frame_rate_limit
``redis_reconnects_total``             reconnections of the pub/sub connection
``refused_handshakes_total{cause}``    origin, max_connections, max_connections_per_ip,
                                       handshake_timeout, body_too_large
=====================================  ==========================================
"""

import os
import shutil
import tempfile
from typing import TYPE_CHECKING

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, disable_created_metrics, generate_latest,
                               multiprocess, values)

if TYPE_CHECKING:
    import tornado.ioloop

    from marketstream.channels import ChannelManager
    from marketstream.counters import Counters

__all__ = ["Exporter", "enable_multiprocess", "disable_multiprocess", "mark_process_dead",
           "CONTENT_TYPE_LATEST"]

# The *_created series (a timestamp per counter) are noise on a dashboard.
disable_created_metrics()

BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _multiprocess() -> bool:
    return bool(os.environ.get(_MULTIPROC_ENV))


def enable_multiprocess() -> str:
    """Switch prometheus_client to multiprocess mode with a fresh directory
    (call in the parent before forking workers); returns the directory."""
    directory = tempfile.mkdtemp(prefix="marketstream-metrics-")
    os.environ[_MULTIPROC_ENV] = directory
    values.ValueClass = values.get_value_class()
    return directory


def disable_multiprocess(directory: str) -> None:
    """Leave multiprocess mode and remove its directory."""
    os.environ.pop(_MULTIPROC_ENV, None)
    values.ValueClass = values.get_value_class()
    shutil.rmtree(directory, ignore_errors=True)


def mark_process_dead(pid: int) -> None:
    """Forget the live gauges of a worker that exited."""
    if _multiprocess():
        multiprocess.mark_process_dead(pid)


class Exporter:
    """Copies the process's counters into Prometheus metrics."""

    def __init__(self, manager: "ChannelManager", counters: "Counters") -> None:
        self.manager = manager
        self.counters = counters
        self.registry = CollectorRegistry()
        self._seen: dict[str, int] = {}
        self._nodes: set[str] = set()
        r = self.registry
        self.connections = Gauge("marketstream_connections", "Open client connections",
                                 registry=r, multiprocess_mode="livesum")
        self.subscriptions = Gauge("marketstream_subscriptions",
                                   "Connection-stream subscriptions", registry=r,
                                   multiprocess_mode="livesum")
        self.upstream = Gauge("marketstream_upstream_channels", "Redis channels subscribed",
                              registry=r, multiprocess_mode="livesum")
        self.redis_connected = Gauge("marketstream_redis_connected",
                                     "1 while the Redis pub/sub connection is live",
                                     registry=r, multiprocess_mode="livemin")
        self.link_up = Gauge("marketstream_redis_link_up",
                             "1 while the pub/sub link to this Redis node is live "
                             "(one per Cluster primary)", ["node"], registry=r,
                             multiprocess_mode="livemin")
        self.messages = Counter("marketstream_redis_messages", "Messages read from Redis",
                                registry=r)
        self.deliveries = Counter("marketstream_deliveries",
                                  "Frames queued to clients (messages x subscribers)", registry=r)
        self.bytes_sent = Counter("marketstream_bytes_sent",
                                  "Bytes of market data written to clients", registry=r)
        self.batches = Counter("marketstream_batches",
                               "Delivery batches (one write per client each)", registry=r)
        self.batch_size = Histogram("marketstream_batch_size", "Messages per delivery batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.dropped = Counter("marketstream_dropped", "Messages dropped, by cause",
                               ["cause"], registry=r)
        self.reconnects = Counter("marketstream_redis_reconnects",
                                  "Reconnections of the Redis pub/sub connection", registry=r)
        self.replayed = Counter("marketstream_recovery_replayed",
                                "Messages replayed from history to resuming clients", registry=r)
        self.snapshots = Counter("marketstream_recovery_snapshots",
                                 "Snapshots sent to subscribing clients", registry=r)
        self.gap_notices = Counter("marketstream_gap_notices",
                                   "Gap notices sent to clients (updates missed)", registry=r)
        self.refused = Counter("marketstream_refused_handshakes",
                               "WebSocket handshakes refused, by cause", ["cause"], registry=r)
        for cause in counters.refused:
            self.refused.labels(cause)
        for cause in self._drop_counts():
            self.dropped.labels(cause)
        self._timer: tornado.ioloop.PeriodicCallback | None = None

    def _drop_counts(self) -> dict[str, int]:
        counters = self.counters
        return {
            "malformed_payload": counters.dropped_malformed,
            "invalid_frame": counters.invalid_frames,
            "rejected_stream": counters.rejected_streams,
            "slow_consumer": counters.closed["slow_consumer"],
            "rate_limit": counters.closed["rate_limit"],
            "ping_timeout": counters.closed["ping_timeout"],
            "frame_rate_limit": counters.closed["frame_rate_limit"],
            "bad_since": counters.ignored["bad_since"],
            "bad_snapshot": counters.ignored["bad_snapshot"],
        }

    def _advance(self, key: str, counter: Counter, value: int) -> None:
        delta = value - self._seen.get(key, 0)
        if delta > 0:
            counter.inc(delta)
            self._seen[key] = value

    def sync(self) -> None:
        """Bring the Prometheus metrics up to date with the counters."""
        manager, stats = self.manager, self.counters
        self.connections.set(len(manager.connections))
        self.subscriptions.set(sum(len(streams) for streams in manager.connections.values()))
        self.upstream.set(len(manager.upstream_channels))
        self.redis_connected.set(1 if manager.healthy else 0)
        links = manager.link.links
        for node in self._nodes - links.keys():
            self.link_up.remove(node)  # no longer a primary
        self._nodes = set(links)
        for node, up in links.items():
            self.link_up.labels(node).set(1 if up else 0)
        self._advance("messages", self.messages, stats.messages_in)
        self._advance("deliveries", self.deliveries, stats.deliveries)
        self._advance("bytes", self.bytes_sent, stats.bytes_sent)
        self._advance("batches", self.batches, stats.batches)
        self._advance("reconnects", self.reconnects, stats.reconnects)
        self._advance("replayed", self.replayed, stats.replayed)
        self._advance("snapshots", self.snapshots, stats.snapshots_sent)
        self._advance("gap_notices", self.gap_notices, stats.gap_notices)
        sizes, stats.batch_sizes = stats.batch_sizes, []
        for size in sizes:
            self.batch_size.observe(size)
        for cause, value in self._drop_counts().items():
            self._advance("dropped." + cause, self.dropped.labels(cause), value)
        for cause, value in stats.refused.items():
            self._advance("refused." + cause, self.refused.labels(cause), value)

    def start(self, interval: float = 1.0) -> None:
        """Sync every ``interval`` seconds on the running IOLoop."""
        import tornado.ioloop
        self._timer = tornado.ioloop.PeriodicCallback(self.sync, interval * 1000)
        self._timer.start()

    def stop(self) -> None:
        """Stop the timer, after a last sync."""
        if self._timer is not None:
            self._timer.stop()
        self.sync()

    def render(self) -> bytes:
        """The exposition text (all workers' metrics in multiprocess mode)."""
        self.sync()
        if _multiprocess():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

