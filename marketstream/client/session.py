"""The client's protocol without I/O: a :class:`Session` says what to send
on each (re)connection, what each received frame means and how long to
wait before the next attempt; it never touches a socket, a clock it was
not given, or an event loop.  :class:`marketstream.client.Client` is the
thin asyncio shell that connects, sends what the session says, feeds it
the frames it reads and sleeps the delays it gives.

Driven by hand, one connection looks like this:

>>> import random
>>> session = Session(["trade.SOL_USDC"], rng=random.Random(1))
>>> session.next_delay() is None     # the first attempt waits for nothing
True
>>> session.connecting()
>>> session.connected()              # the request to send on the new connection
'{"method":"SUBSCRIBE","params":["trade.SOL_USDC"],"id":1,"acks":true}'
>>> session.receive('{"result":null,"id":1}')     # the acknowledgement
>>> session.receive('{"stream":"trade.SOL_USDC","data":{"t":1},"seq":7}')
>>> session.receive('{"stream":"trade.SOL_USDC","data":{"t":1},"seq":7}')  # a repeat
>>> session.receive('{"stream":"trade.SOL_USDC","data":{"t":3},"seq":9}')  # 8 is missing
>>> [(m.kind, m.seq) for m in session.events()]
[('message', 7), ('gap', None), ('message', 9)]
>>> session.duplicates, session.gaps
(1, 1)

After a lost connection the next request resumes after the last position
yielded, and the delay follows the backoff:

>>> session.connection_lost("connection lost (no close frame)")
>>> 0.05 <= session.next_delay() <= 0.1
True
>>> session.connecting()
>>> session.connected()
'{"method":"SUBSCRIBE","params":["trade.SOL_USDC"],"id":2,"acks":true,"since":{"trade.SOL_USDC":9}}'
"""

import collections
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator

import ujson

from marketstream.client.messages import GAP, MESSAGE, SNAPSHOT, Message, is_snapshot_data
from marketstream.client.resync import Resyncs, positions_skip

__all__ = ["Session", "ConnectionLost", "StreamsRefused", "why_closed"]

log = logging.getLogger(__name__)

#: The states a session goes through, in the order of a connection's life.
STATES = ("idle", "connecting", "connected", "disconnected", "closed")


class ConnectionLost(ConnectionError):
    """The connection dropped and the client was made with ``reconnect=False``."""


class StreamsRefused(ValueError):
    """The server refused some of the streams (a name it does not serve, or
    too many streams): ``refused`` maps each to the server's reason.

    The client goes on with the other streams (iterate again), and does not
    ask for the refused ones again.

    >>> str(StreamsRefused({"trades.X_Y": "unknown stream type 'trades'"}))
    "the server refused trades.X_Y: unknown stream type 'trades'"
    """

    def __init__(self, refused: dict[str, str]) -> None:
        super().__init__(
            "the server refused %s" % "; ".join("%s: %s" % item for item in refused.items())
        )
        self.refused = refused


def why_closed(
    close_code: int | None, close_reason: str | None, failure: BaseException | None
) -> str:
    """Why a connection ended, for people: the close code and reason, or the
    error, or neither.

    >>> why_closed(1001, "server shutting down", None)
    'closed by the server: 1001 server shutting down'
    >>> why_closed(None, None, None)
    'connection lost (no close frame)'
    """
    if close_code is not None:
        return "closed by the server: %d %s" % (close_code, close_reason or "")
    if failure is not None:
        return "connection failed: %s" % (str(failure) or type(failure).__name__)
    return "connection lost (no close frame)"


def gap_message(stream: str, reason: str, msg: str, now: float, **extra: int) -> Message:
    """A gap the client noticed itself, as a :class:`Message` whose ``raw``
    has the shape of the server's gap notice (``now``: seconds since the
    epoch, for ``data["E"]``).

    >>> gap_message("trade.A_B", "reconnected", "...", 1.5).raw
    '{"stream":"trade.A_B","data":{"e":"gap","s":"A_B","E":1500000,"reason":"reconnected","msg":"..."}}'
    """
    data: dict[str, object] = {
        "e": "gap",
        "s": stream.rsplit(".", 1)[-1],
        "E": int(now * 1_000_000),
        "reason": reason,
        "msg": msg,
    }
    data.update(extra)
    raw = ujson.dumps({"stream": stream, "data": data}, escape_forward_slashes=False)
    return Message(stream, data, None, GAP, raw)


class Session:
    """What a client says and what it makes of what it hears, without I/O.

    ``streams``, ``snapshot``, ``since``, ``reconnect`` and ``backoff`` are
    :class:`~marketstream.client.Client`'s arguments of the same names;
    ``on_state`` is called with each new :attr:`state`; ``rng`` draws the
    backoff's jitter, ``clock`` (seconds since the epoch) stamps the gap
    messages the session makes, ``logger`` says what the server answered
    besides data and ``url`` names the server in errors.

    The shell calls, in the order of a connection's life:
    :meth:`next_delay` (how long to sleep first; raises
    :class:`ConnectionLost` when the session may not reconnect),
    :meth:`connecting`, then :meth:`connected` (returns the request to send)
    or :meth:`connect_failed`; :meth:`receive` for each text frame, and
    :meth:`events` to take what they meant; :meth:`connection_lost` when
    the connection ends, :meth:`resync` when the user asks to start a
    stream over (the requests to send on the open connection) and
    :meth:`close` then :meth:`finish_close` at the end.

    Counters: ``connects``, ``reconnects`` (connections after the first),
    ``resumes`` (reconnections that asked for a replay), ``gaps`` (gap
    messages queued), ``duplicates`` (frames dropped as already seen),
    ``attempts`` (failed attempts since the last connection).
    ``last_seq`` maps each stream to the last position queued.
    """

    def __init__(
        self,
        streams: Iterable[str],
        snapshot: bool | Iterable[str] | None = False,
        reconnect: bool = True,
        backoff: tuple[float, float] = (0.1, 5.0),
        since: dict[str, int] | None = None,
        on_state: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        logger: logging.Logger = log,
        url: str = "the server",
    ) -> None:
        self.url = url
        self.streams = list(dict.fromkeys(streams))
        if not self.streams:
            raise ValueError("no streams")
        if snapshot is True:
            self.snapshot_streams = set(self.streams)
        elif snapshot is False or snapshot is None:
            self.snapshot_streams = set()
        else:
            self.snapshot_streams = set(snapshot)
        self.reconnect = reconnect
        self.backoff = (float(backoff[0]), float(backoff[1]))
        self.on_state = on_state
        self.last_seq: dict[str, int] = dict(since or {})
        self.state = "idle"
        self.closed = False
        self.connects = 0
        self.reconnects = 0
        self.resumes = 0
        self.gaps = 0
        self.duplicates = 0
        self.attempts = 0
        self.refused: dict[str, str] = {}  # streams the server refused -> its reason
        self.disconnect_reason: str | None = None
        self._random = rng or random.Random()
        self._clock = clock
        self._log = logger
        self._refusal: StreamsRefused | None = None  # the next event, once
        self._request_id = 0
        self._pending: collections.deque[Message] = collections.deque()
        self._after_gap: set[str] = set()
        self._seen: set[str] = set()  # streams that delivered something
        self._plain: set[str] = set()  # streams whose last message had no seq
        self._resyncs = Resyncs()  # streams started over on this connection

    # -- states ---------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        self.state = state
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:  # a faulty callback must not break the stream
                self._log.exception("state callback failed")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before reconnection attempt ``attempt`` (0-based):
        ``min(backoff[1], backoff[0] * 2 ** attempt)`` scaled by a random
        factor in [0.5, 1].  Any number of attempts (a server away for
        hours) stays at the ceiling:

        >>> Session(["trade.A_B"], backoff=(0.1, 5.0)).delay(5000) <= 5.0
        True
        """
        low, high = self.backoff
        # 2.0 ** 1024 overflows; a hundred doublings pass any ceiling.
        return min(high, low * 2.0 ** min(attempt, 100)) * self._random.uniform(0.5, 1.0)

    def next_delay(self) -> float | None:
        """Seconds to wait before the next connection attempt: None before
        the first, the backoff after a failure or a lost connection.  Raises
        :class:`ConnectionLost` when a connection was lost and the session
        may not reconnect."""
        if self.connects and not self.reconnect:
            raise ConnectionLost("connection to %s lost" % self.url)
        if self.attempts or self.connects:
            return self.delay(self.attempts)
        return None

    def connecting(self) -> None:
        """An attempt starts."""
        self._set_state("connecting")

    def connect_failed(self, error: BaseException) -> bool:
        """The attempt failed with ``error``; True if the session tries
        again (else the shell raises ``error``)."""
        self.attempts += 1
        if not self.reconnect:
            return False
        self.disconnect_reason = "cannot connect: %s" % (str(error) or type(error).__name__)
        self._set_state("disconnected")
        return True

    def connected(self) -> str:
        """A connection is open: the request to send on it (subscribe with
        acknowledgements, ``since`` the last position of each stream that
        has one, ``snapshot`` for the others that want it).  On a
        reconnection each plain stream that delivered before gets a gap
        message: what was published meanwhile is lost."""
        first = self.connects == 0
        self.connects += 1
        self.attempts = 0
        since = {s: self.last_seq[s] for s in self.streams if s in self.last_seq}
        snapshot = [s for s in self.streams if s in self.snapshot_streams and s not in since]
        request: dict[str, object] = {
            "method": "SUBSCRIBE",
            "params": self.streams,
            "id": self._next_id(),
            "acks": True,  # a refused stream is reported on this connection
        }
        if since:
            request["since"] = since
        if snapshot:
            request["snapshot"] = snapshot
        self._after_gap = set()
        self._resyncs.clear()
        if not first:
            self.reconnects += 1
            if since:
                self.resumes += 1
            for stream in self.streams:
                if stream in self._seen and stream not in since and stream not in snapshot:
                    self._report_gap(
                        stream,
                        "reconnected",
                        "reconnected; updates published meanwhile may have been missed",
                    )
        text = ujson.dumps(request, escape_forward_slashes=False)
        self._set_state("connected")
        return text

    def connection_lost(self, reason: str | None = None) -> None:
        """The connection ended (``reason``: :func:`why_closed`'s words)."""
        if not self.closed:
            self.disconnect_reason = reason
            self._set_state("disconnected")

    def resync(self, stream: str) -> list[str] | None:
        """Start ``stream`` over from its snapshot: forget its position, ask
        for its snapshot and drop its queued messages.  Returns the requests
        to send on the open connection (unsubscribe, then subscribe with its
        snapshot; its frames are dropped until the snapshot comes), or none
        while disconnected (the next connection asks for the snapshot); None,
        and nothing done, for a plain stream (the server has no snapshot of
        it)."""
        if stream in self._plain:
            return None
        self.last_seq.pop(stream, None)
        self.snapshot_streams.add(stream)
        self._pending = collections.deque(m for m in self._pending if m.stream != stream)
        if self.state != "connected":
            return []
        return self._resyncs.start(stream, self._next_id)

    def _next_id(self) -> int:
        self._request_id += 1
        return self._request_id

    def close(self) -> None:
        """The user closes: no more connections, no more states but the last."""
        self.closed = True

    def finish_close(self) -> None:
        """The connection is closed for good."""
        self._set_state("closed")

    # -- frames ------------------------------------------------------------------

    def next_event(self) -> Message | StreamsRefused | None:
        """What the next iteration yields (a :class:`Message`) or raises
        (:class:`StreamsRefused`, before any message); None when nothing is
        queued."""
        if self._refusal is not None:
            refusal, self._refusal = self._refusal, None
            return refusal
        if self._pending:
            return self._pending.popleft()
        return None

    def events(self) -> Iterator[Message | StreamsRefused]:
        """Every queued event, in :meth:`next_event`'s order."""
        while (event := self.next_event()) is not None:
            yield event

    def receive(self, frame: str) -> None:
        """One text frame from the server: queue the message it carries (if
        new), a gap message (a server's notice, or a position that jumped),
        or a refusal; replies that mean nothing to the user are dropped."""
        try:
            obj: object = ujson.loads(frame)
        except ValueError:
            self._log.warning("ignoring a frame that is not JSON: %.80r", frame)
            return
        if not isinstance(obj, dict):
            return
        stream = obj.get("stream")
        if not isinstance(stream, str):
            if isinstance(obj.get("error"), dict):
                self._on_error(obj["error"])
            return  # {"result": null, "id": n}: subscribed
        self._seen.add(stream)
        data, seq = obj.get("data"), obj.get("seq")
        if self._resyncs.drops(stream, data):
            return  # sent before the snapshot of a resync
        if isinstance(data, dict) and data.get("e") == "unsubscribed" and seq is None:
            # The server ended the stream (derived from a book stream it
            # keeps no book for): a refusal, like one in a reply.
            self._on_error({"refused": {stream: str(data.get("msg") or data.get("reason"))}})
        elif isinstance(data, dict) and data.get("e") == "gap" and seq is None:
            self._after_gap.add(stream)
            # Positions may start over after a gap (history lost): the next
            # one is the new base, whatever its value.
            self.last_seq.pop(stream, None)
            self._report(Message(stream, data, None, GAP, frame))
        elif not isinstance(seq, int) or isinstance(seq, bool):
            self._plain.add(stream)
            self._pending.append(Message(stream, data, None, MESSAGE, frame))
        else:
            self._plain.discard(stream)
            self._positioned(stream, data, seq, frame)

    def _positioned(self, stream: str, data: object, seq: int, frame: str) -> None:
        """A frame with a position: a snapshot is a new base; a repeat is
        dropped; a jump the server did not announce is a gap."""
        last = self.last_seq.get(stream)
        if is_snapshot_data(data):
            self._after_gap.discard(stream)
            self.last_seq[stream] = seq
            self._pending.append(Message(stream, data, seq, SNAPSHOT, frame))
            return
        if last is not None and seq <= last:
            self.duplicates += 1
            return
        if (
            last is not None
            and seq != last + 1
            and stream not in self._after_gap
            and not positions_skip(stream)  # depth10.X, X@100ms: positions skip
        ):
            self._report_gap(
                stream,
                "positions_missing",
                "positions %d to %d missing" % (last + 1, seq - 1),
                **{"from": last + 1, "to": seq - 1},
            )
        self._after_gap.discard(stream)
        self.last_seq[stream] = seq
        self._pending.append(Message(stream, data, seq, MESSAGE, frame))

    def _report(self, message: Message) -> None:
        self.gaps += 1
        self._pending.append(message)

    def _report_gap(self, stream: str, reason: str, msg: str, **extra: int) -> None:
        self._report(gap_message(stream, reason, msg, self._clock(), **extra))

    def _on_error(self, error: dict[str, object]) -> None:
        """An error reply: refused streams are dropped and become the next
        event; anything else is logged."""
        refused = error.get("refused")
        if isinstance(refused, dict) and refused:
            reasons = {str(name): str(reason) for name, reason in refused.items()}
            self.refused.update(reasons)
            self.streams = [s for s in self.streams if s not in reasons]
            self._refusal = StreamsRefused(reasons)
            if error.get("refused_more"):
                self._log.warning("the server refused %s more streams", error["refused_more"])
            return
        self._log.warning("the server answered: %s", error.get("msg", error))
