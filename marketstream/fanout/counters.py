"""The process's counters: one object, bumped on the hot path, read by
``/metrics`` and ``/health``.

Plain attributes and small dicts, so a bump costs one attribute store:

>>> counters = Counters()
>>> counters.deliveries += 50
>>> counters.closed["slow_consumer"] += 1
>>> counters.as_dict()["deliveries"], counters.as_dict()["closed"]["slow_consumer"]
(50, 1)

The metrics exporter turns them into Prometheus series once a second
(draining ``batch_sizes``, ``batch_latencies`` and ``publish_latencies``);
``/health`` shows :meth:`as_dict`.
"""

from __future__ import annotations

from marketstream.wire.access import FAILURE_CAUSES

__all__ = [
    "Counters",
    "CLOSE_CAUSES",
    "REFUSAL_CAUSES",
    "IGNORED_CAUSES",
    "REJECT_CAUSES",
    "AUTH_CAUSES",
]

#: Why the server closed a client.
CLOSE_CAUSES = ("rate_limit", "slow_consumer", "ping_timeout", "frame_rate_limit", "token_expired")
#: Why a handshake was refused.
REFUSAL_CAUSES = (
    "origin",
    "max_connections",
    "max_connections_per_ip",
    "handshake_timeout",
    "body_too_large",
    "unauthorized",
    "max_connections_per_user",
)
#: Why part of a client request was ignored (or answered with an error).
IGNORED_CAUSES = ("bad_since", "bad_snapshot")
#: Why a stream a client asked for was refused (``rejected_streams`` by cause).
REJECT_CAUSES = (
    "invalid_name",
    "unknown_type",
    "unknown_market",
    "too_many_streams",
    "max_channels",
    "user_stream",
    "protected",
    "unknown_speed",
    "not_a_book",
    "no_speed",
    "no_book",
)
#: Why a token was refused (at connect: ``auth_refused``; in an AUTH
#: message: ``auth_failed``), from :mod:`marketstream.wire.tokens`.
AUTH_CAUSES = FAILURE_CAUSES


class Counters:
    """Everything the process counts (monotonic, except the lists the
    exporter drains)."""

    TOTALS = (
        "messages_in",
        "deliveries",
        "bytes_sent",
        "batches",
        "dropped_malformed",
        "dropped_no_listener",
        "reconnects",
        "invalid_frames",
        "rejected_streams",
        "replayed",
        "snapshots_sent",
        "gap_notices",
        "dropped_wrong_stream",
        "auth_accepted",
        "auth_refreshed",
        "deflated_messages",
        "deflate_bytes_in",
        "deflate_bytes_out",
        "books_started",
        "book_resyncs",
        "slow_reader_fallbacks",
    )
    __slots__ = TOTALS + (
        "batch_sizes",
        "closed",
        "refused",
        "ignored",
        "rejected",
        "batch_latencies",
        "publish_latencies",
        "auth_refused",
        "auth_failed",
    )

    # The totals, set to 0 in __init__ (declared for type checkers).
    messages_in: int
    deliveries: int
    bytes_sent: int
    batches: int
    dropped_malformed: int
    dropped_no_listener: int
    reconnects: int
    invalid_frames: int
    rejected_streams: int
    replayed: int
    snapshots_sent: int
    gap_notices: int
    dropped_wrong_stream: int
    auth_accepted: int  # tokens accepted at connect
    auth_refreshed: int  # tokens accepted in AUTH messages
    # permessage-deflate: messages compressed (each once, for every
    # compressing client), and their frames' bytes before and after.
    deflated_messages: int
    deflate_bytes_in: int
    deflate_bytes_out: int
    # Server books: started from a snapshot; started again after a gap or
    # data they could not read; connections moved to snapshots when slow.
    books_started: int
    book_resyncs: int
    slow_reader_fallbacks: int

    def __init__(self) -> None:
        for name in self.TOTALS:
            setattr(self, name, 0)
        self.batch_sizes: list[int] = []  # messages per batch since the exporter last looked
        # Seconds per batch (see ChannelManager._flush), drained the same way.
        self.batch_latencies: list[float] = []
        self.publish_latencies: list[float] = []
        self.closed = dict.fromkeys(CLOSE_CAUSES, 0)
        self.refused = dict.fromkeys(REFUSAL_CAUSES, 0)
        self.ignored = dict.fromkeys(IGNORED_CAUSES, 0)
        self.rejected = dict.fromkeys(REJECT_CAUSES, 0)  # rejected_streams by cause
        self.auth_refused = dict.fromkeys(AUTH_CAUSES, 0)  # bad tokens at connect
        self.auth_failed = dict.fromkeys(AUTH_CAUSES, 0)  # bad tokens in AUTH messages

    def as_dict(self) -> dict[str, object]:
        """A snapshot for ``/health``."""
        totals: dict[str, object] = {name: getattr(self, name) for name in self.TOTALS}
        totals.update(
            closed=dict(self.closed),
            refused=dict(self.refused),
            ignored=dict(self.ignored),
            rejected=dict(self.rejected),
            auth_refused=dict(self.auth_refused),
            auth_failed=dict(self.auth_failed),
        )
        return totals
