"""Prometheus metrics, through prometheus_client.

The hot path only bumps plain integers (one
:class:`~marketstream.fanout.counters.Counters` object per process).  An
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
``deflated_messages_total``            messages compressed (permessage-deflate), each
                                       once for every compressing client
``deflate_input_bytes_total``          bytes of those messages' frames before ...
``deflate_output_bytes_total``         ... and after compression
``batches_total``                      delivery batches (one write per client each)
``batch_size``                         histogram: messages per delivery batch
``batch_latency_seconds``              histogram: first message of a batch read from
                                       Redis -> the batch written (one per batch)
``publish_latency_seconds``            histogram: the publisher's ``E`` -> written
                                       (the first message of a batch, if it has one)
``dropped_total{cause}``               malformed_payload, invalid_frame,
                                       rejected_stream, slow_consumer, rate_limit,
                                       ping_timeout, bad_since, bad_snapshot,
                                       wrong_stream, frame_rate_limit, token_expired
``redis_reconnects_total``             reconnections of the pub/sub connection
``refused_handshakes_total{cause}``    origin, max_connections, max_connections_per_ip,
                                       handshake_timeout, body_too_large, unauthorized,
                                       max_connections_per_user
``rejected_streams_total{cause}``      streams refused to clients: invalid_name,
                                       unknown_type, unknown_market, too_many_streams,
                                       max_channels, user_stream, protected,
                                       unknown_speed, not_a_book, no_speed, no_book
``books``                              order books the server keeps
``books_started_total``                server books started from a snapshot
``book_resyncs_total``                 server books started again after a gap
``slow_reader_fallbacks_total``        slow connections moved to book snapshots
``auth_total{stage}``                  tokens accepted: connect (at the handshake),
                                       message (AUTH)
``auth_failures_total{stage,cause}``   tokens refused: missing, malformed,
                                       bad_signature, expired, not_yet_valid,
                                       audience, issuer, algorithm, bad_claims,
                                       wrong_sub, disabled
=====================================  ==========================================
"""

import bisect
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)

if TYPE_CHECKING:
    import tornado.ioloop

    from marketstream.server.channels import ChannelManager
    from marketstream.fanout.counters import Counters

__all__ = [
    "Exporter",
    "enable_multiprocess",
    "disable_multiprocess",
    "mark_process_dead",
    "observe_all",
    "CONTENT_TYPE_LATEST",
]

# The *_created series (a timestamp per counter) are noise on a dashboard.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated in prometheus_client

BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
#: Seconds: in-server waits are ~0.1-1 ms, publish -> delivery adds Redis and
#: the network; the top buckets catch a stalled server or a skewed clock.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: The plain counters, each the copy of one of the hot path's integers:
#: (name after ``marketstream_``, help, the attribute of ``Counters``).
COUNTERS = (
    ("redis_messages", "Messages read from Redis", "messages_in"),
    ("deliveries", "Frames queued to clients (messages x subscribers)", "deliveries"),
    ("bytes_sent", "Bytes of market data written to clients", "bytes_sent"),
    (
        "deflated_messages",
        "Messages compressed (permessage-deflate), once for every compressing client",
        "deflated_messages",
    ),
    (
        "deflate_input_bytes",
        "Bytes of the compressed messages' frames before compression",
        "deflate_bytes_in",
    ),
    (
        "deflate_output_bytes",
        "Bytes of the compressed messages' frames after compression",
        "deflate_bytes_out",
    ),
    ("batches", "Delivery batches (one write per client each)", "batches"),
    ("redis_reconnects", "Reconnections of the Redis pub/sub connection", "reconnects"),
    ("recovery_replayed", "Messages replayed from history to resuming clients", "replayed"),
    ("recovery_snapshots", "Snapshots sent to subscribing clients", "snapshots_sent"),
    ("gap_notices", "Gap notices sent to clients (updates missed)", "gap_notices"),
    ("books_started", "Server books started from their stream's snapshot", "books_started"),
    (
        "book_resyncs",
        "Server books started again: a diff that did not follow, or data they could not read",
        "book_resyncs",
    ),
    (
        "slow_reader_fallbacks",
        "Connections whose book streams fell back to snapshots because they read slowly",
        "slow_reader_fallbacks",
    ),
)


def observe_all(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(value)`` for each of ``values`` (an unlabelled
    histogram), in one pass: counted per bucket, then one increment per
    bucket and one of the sum.

    observe() costs ~1 us a value, ~3.6 us in multiprocess mode, where
    every increment writes to a shared file: with a value per batch in
    each of three histograms, ~11 us per batch.  Counting first costs
    ~0.15 us a value (1000 values: 3.6 ms -> 0.14 ms).  The per-bucket
    values are prometheus_client's private attributes (checked with 0.26);
    without them this falls back to observe() per value.  A test checks
    that both give the same exposition.

    >>> h = Histogram("h", "h", buckets=(1, 2), registry=CollectorRegistry())
    >>> observe_all(h, [0.5, 1, 1.5, 7])
    >>> [(s.labels.get("le"), s.value) for s in h.collect()[0].samples]
    [('1.0', 2.0), ('2.0', 3.0), ('+Inf', 4.0), (None, 4.0), (None, 10.0)]
    """
    try:
        bounds, buckets, total = histogram._upper_bounds, histogram._buckets, histogram._sum
    except AttributeError:
        bounds = None
    if bounds is None or len(bounds) != len(buckets) or bounds[-1] != math.inf:
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    where = bisect.bisect_left  # the first bound >= value, as observe() picks
    for value in values:
        counts[where(bounds, value)] += 1
    for bucket, count in zip(buckets, counts):
        if count:
            bucket.inc(count)
    if values:
        total.inc(math.fsum(values))


def _multiprocess() -> bool:
    return bool(os.environ.get(_MULTIPROC_ENV))


def enable_multiprocess() -> str:
    """Switch prometheus_client to multiprocess mode with a fresh directory
    (call in the parent before forking workers); returns the directory."""
    directory = tempfile.mkdtemp(prefix="marketstream-metrics-")
    os.environ[_MULTIPROC_ENV] = directory
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]  # as above
    return directory


def disable_multiprocess(directory: str) -> None:
    """Leave multiprocess mode and remove its directory."""
    os.environ.pop(_MULTIPROC_ENV, None)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]  # as above
    shutil.rmtree(directory, ignore_errors=True)


def mark_process_dead(pid: int) -> None:
    """Forget the live gauges of a worker that exited."""
    if _multiprocess():
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]  # as above


class Exporter:
    """Copies the process's counters into Prometheus metrics."""

    def __init__(self, manager: "ChannelManager", counters: "Counters") -> None:
        self.manager = manager
        self.counters = counters
        self.registry = CollectorRegistry()
        self._seen: dict[str, int] = {}
        self._nodes: set[str] = set()
        r = self.registry
        self._add_gauges(r)
        #: The plain counters by their ``Counters`` attribute (see :data:`COUNTERS`).
        self.plain = {
            attribute: Counter("marketstream_" + name, help_text, registry=r)
            for name, help_text, attribute in COUNTERS
        }
        self.books = Gauge(
            "marketstream_books",
            "Order books the server keeps (book streams someone reads)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._add_histograms(r)
        self.dropped = Counter(
            "marketstream_dropped", "Messages dropped, by cause", ["cause"], registry=r
        )
        self.refused = Counter(
            "marketstream_refused_handshakes",
            "WebSocket handshakes refused, by cause",
            ["cause"],
            registry=r,
        )
        for cause in counters.refused:
            self.refused.labels(cause)
        self.rejected = Counter(
            "marketstream_rejected_streams",
            "Streams refused to clients (not subscribed), by cause",
            ["cause"],
            registry=r,
        )
        for cause in counters.rejected:
            self.rejected.labels(cause)
        for cause in self._drop_counts():
            self.dropped.labels(cause)
        self.auth = Counter(
            "marketstream_auth",
            "Tokens accepted, at connect or in AUTH messages",
            ["stage"],
            registry=r,
        )
        self.auth_failures = Counter(
            "marketstream_auth_failures",
            "Tokens refused (HTTP 401 at connect, an error reply to AUTH), by cause",
            ["stage", "cause"],
            registry=r,
        )
        for stage in ("connect", "message"):
            self.auth.labels(stage)
            for cause in counters.auth_refused:
                self.auth_failures.labels(stage, cause)
        self._timer: tornado.ioloop.PeriodicCallback | None = None

    def _add_gauges(self, r: CollectorRegistry) -> None:
        """The gauges: connections, subscriptions, Redis channels and links."""
        self.connections = Gauge(
            "marketstream_connections",
            "Open client connections",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.subscriptions = Gauge(
            "marketstream_subscriptions",
            "Connection-stream subscriptions",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream = Gauge(
            "marketstream_upstream_channels",
            "Redis channels subscribed",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.redis_connected = Gauge(
            "marketstream_redis_connected",
            "1 while the Redis pub/sub connection is live",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.link_up = Gauge(
            "marketstream_redis_link_up",
            "1 while the pub/sub link to this Redis node is live (one per Cluster primary)",
            ["node"],
            registry=r,
            multiprocess_mode="livemin",
        )

    def _add_histograms(self, r: CollectorRegistry) -> None:
        """The histograms of the delivery batches: sizes and latencies."""
        self.batch_size = Histogram(
            "marketstream_batch_size",
            "Messages per delivery batch",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_latency = Histogram(
            "marketstream_batch_latency_seconds",
            "Seconds from the first message of a delivery batch read from Redis (or queued "
            "from history) to the end of the flush that wrote the batch to the clients' "
            "sockets: one observation per batch, the wait of its oldest message, not "
            "weighted by the batch's messages",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.publish_latency = Histogram(
            "marketstream_publish_latency_seconds",
            "Seconds from the publisher's timestamp (the payload's E, microseconds since "
            "the epoch) to the end of the flush that wrote the message to the clients' "
            "sockets: one sample per batch, its first message, when that carries E "
            "(includes Redis, the network and any clock skew; a clock ahead counts as 0)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

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
            "wrong_stream": counters.dropped_wrong_stream,
            "token_expired": counters.closed["token_expired"],
        }

    def _advance(self, key: str, counter: Counter, value: int) -> None:
        delta = value - self._seen.get(key, 0)
        if delta > 0:
            counter.inc(delta)
            self._seen[key] = value

    def _drain(self, name: str, histogram: Histogram) -> None:
        """Observe the values the hot path collected in the counters' list
        ``name`` since the last sync, and start a new list."""
        values = getattr(self.counters, name)
        setattr(self.counters, name, [])
        observe_all(histogram, values)

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
        for attribute, counter in self.plain.items():
            self._advance(attribute, counter, getattr(stats, attribute))
        self.books.set(len(manager.core.books.streams))
        self._drain("batch_sizes", self.batch_size)
        self._drain("batch_latencies", self.batch_latency)
        self._drain("publish_latencies", self.publish_latency)
        for cause, value in self._drop_counts().items():
            self._advance("dropped." + cause, self.dropped.labels(cause), value)
        for cause, value in stats.refused.items():
            self._advance("refused." + cause, self.refused.labels(cause), value)
        for cause, value in stats.rejected.items():
            self._advance("rejected." + cause, self.rejected.labels(cause), value)
        self._sync_auth(stats)

    def _sync_auth(self, stats: "Counters") -> None:
        """The token counters (see :mod:`marketstream.server.auth`)."""
        self._advance("auth.connect", self.auth.labels("connect"), stats.auth_accepted)
        self._advance("auth.message", self.auth.labels("message"), stats.auth_refreshed)
        for stage, counts in (("connect", stats.auth_refused), ("message", stats.auth_failed)):
            for cause, value in counts.items():
                key = "auth_failures.%s.%s" % (stage, cause)
                self._advance(key, self.auth_failures.labels(stage, cause), value)

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
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # as above
            return generate_latest(registry)
        return generate_latest(self.registry)
