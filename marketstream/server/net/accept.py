"""Taking connections off the listening sockets: at once, whatever comes next.

In a reconnect storm (an instance restart behind nginx, a network blip)
thousands of clients connect within a second.  The kernel's accept queue
holds at most the listen backlog (``net.core.somaxconn``); once it is full,
new SYNs are dropped and each of those clients retries only after 1 s, then
3 s, then 7 s.  A server that accepts only as fast as it completes
handshakes (Tornado accepts a batch and runs every handshake in it before
it looks again) lets the queue overflow, and the storm takes seconds longer
than its handshakes do.

:class:`Acceptor` separates the two.  When a listening socket is readable it
accepts everything the kernel holds (a few microseconds each) into a queue
of its own, so the kernel queue never overflows; then it hands the accepted
connections to ``callback`` in slices, one per turn of the event loop, so
that live delivery to every other client runs between two slices of
handshakes.  A slice is at least ``batch`` connections; beyond that it goes
on for as long as the rest of the loop's last turn took, times the queue's
length over :data:`FULL_SHARE_QUEUE` or the oldest connection's wait over
:data:`FULL_SHARE_WAIT`, whichever is more (at most 1), and never longer than
:data:`MAX_SLICE` times that share (at least 1), at most :data:`STORM_SLICE`.
So however busy live delivery is, a large storm gets up to half of the
process (thousands of clients waiting for a handshake wait less), while a
small one mostly takes the batch per turn and leaves live delivery its time.
Once thousands of clients are served, live delivery to them takes 100 ms and
more a turn: a large storm's slices grow with it (up to :data:`STORM_SLICE`
once 4 x 2048 wait or the oldest waited 2 s), so that its handshakes still
get half of the process.  Live delivery then gets less than it would take,
and the clients already served get their messages later while the storm
lasts; a long slice still empties the kernel's queues every
:data:`MAX_SLICE`.  The README's Performance section and
``docs/performance.md`` (Connect storms) have the figures.
Out of file descriptors (``EMFILE``), it warns (at most once a minute) and
stops accepting for a moment instead of spinning::

    acceptor = Acceptor(server._handle_connection, batch=16)
    for sock in sockets:
        acceptor.add(sock)
    ...
    acceptor.close()   # stops listening; closes what was accepted but not handed over

>>> import asyncio, socket
>>> async def demo():
...     listener = socket.socket()
...     listener.bind(("127.0.0.1", 0)); listener.listen(64); listener.setblocking(False)
...     handed = []
...     acceptor = Acceptor(lambda conn, address: handed.append(conn), batch=2)
...     acceptor.add(listener)
...     clients = [socket.create_connection(listener.getsockname()) for _ in range(5)]
...     while len(handed) < 5:
...         await asyncio.sleep(0.01)
...     acceptor.close()
...     for sock in handed + clients:
...         sock.close()
...     return len(handed), acceptor.accepted, listener.fileno()
>>> asyncio.run(demo())
(5, 5, -1)
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, TypeAlias

__all__ = ["Acceptor", "ACCEPT_BATCH", "ACCEPT_PER_WAKE", "Address"]

log = logging.getLogger(__name__)

#: A peer's address as accept(2) gives it: (host, port) over IPv4, (host,
#: port, flowinfo, scope_id) over IPv6, a path over a Unix socket.  Any:
#: typeshed types ``socket.accept()``'s address as Any (``_RetAddress``),
#: and Tornado's ``handle_stream`` takes a bare ``tuple``.
Address: TypeAlias = Any

#: Accepted connections handed to the callback (the handshake) per event-loop
#: turn, at least.
ACCEPT_BATCH = 16
#: Seconds one turn's slice of handshakes may take at a full share, at most
#: (a larger share allows proportionally more, up to :data:`STORM_SLICE`).
MAX_SLICE = 0.030
#: Seconds one turn's slice may take in a large storm, at most.  Longer
#: slices end a storm sooner and delay live delivery to the clients already
#: served more (10,000 clients: 0.03 s, 0.06 s, 0.12 s: the last served after
#: 7.1, 6.8, 5.5 s; the served clients' messages 0.60, 0.78, 1.16 s late at
#: the 99th percentile during the storm).
STORM_SLICE = 0.120
#: Connections waiting at which a slice is as long as the rest of the
#: loop's turn (handshakes get half the process); fewer waiting earn a
#: proportionally shorter slice.
FULL_SHARE_QUEUE = 2048
#: Seconds the oldest connection has waited at which a slice is as long as
#: the rest of the loop's turn, however few wait: under a heavy live load a
#: short queue must not starve.
FULL_SHARE_WAIT = 0.5
#: Connections taken off one listening socket per wake-up, at most (the
#: socket is level-triggered: the next turn takes the rest).
ACCEPT_PER_WAKE = 1024
#: Seconds without accepting after the process ran out of descriptors or memory.
PAUSE_ON_ERROR = 0.1

# accept(2) errors that say "not now" for the whole process, not "this connection".
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Acceptor:
    """Accepts connections on listening sockets and hands them to
    ``callback(connection, address)``, ``batch`` per event-loop turn.

    ``limit`` bounds the connections accepted but not yet handed over; at
    the limit the acceptor stops reading the listening sockets until the
    queue is empty again (the kernel's queue holds the rest meanwhile).
    ``accepted`` counts the connections accepted.
    """

    def __init__(
        self,
        callback: Callable[[socket.socket, Address], None],
        batch: int = ACCEPT_BATCH,
        limit: int = 65536,
    ) -> None:
        if batch < 1 or limit < 1:
            raise ValueError("batch and limit must be at least 1")
        self.callback = callback
        self.batch = batch
        self.limit = limit
        self.accepted = 0
        self._loop = asyncio.get_event_loop()
        self._sockets: list[socket.socket] = []
        # (connection, address, loop time of its accept)
        self._queue: deque[tuple[socket.socket, Address, float]] = deque()
        self._reading = True
        self._scheduled = False
        self._closed = False
        self._warned_at: float | None = None
        self._slice_end = 0.0

    @property
    def queued(self) -> int:
        """Connections accepted and not yet handed over."""
        return len(self._queue)

    def add(self, sock: socket.socket) -> None:
        """Start accepting on ``sock`` (listening and non-blocking)."""
        self._sockets.append(sock)
        if self._reading:
            self._loop.add_reader(sock, self._readable, sock)

    def close(self) -> None:
        """Stop accepting, close the listening sockets and every connection
        accepted but not handed over."""
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        for sock in self._sockets:
            sock.close()
        while self._queue:
            self._queue.popleft()[0].close()

    # --- the listening side --------------------------------------------------

    def _readable(self, sock: socket.socket) -> None:
        queue = self._queue
        room = min(ACCEPT_PER_WAKE, self.limit - len(queue))
        now = self._loop.time()
        accepted = 0
        while accepted < room:
            try:
                connection, address = sock.accept()
            except BlockingIOError:
                break
            except ConnectionAbortedError:
                continue  # gone while it waited in the kernel's queue
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    raise
                self._out_of_resources(exc)
                break
            queue.append((connection, address, now))
            accepted += 1
        self.accepted += accepted
        if len(queue) >= self.limit:
            self._stop_reading()
        if queue and not self._scheduled:
            self._scheduled = True
            # A new storm: the first slice measures the rest of the loop
            # from here, not from the last slice of an earlier one.
            self._slice_end = now
            self._loop.call_soon(self._hand_over)

    def _poll(self) -> None:
        """Empty the kernel's queues in the middle of a long slice (a large
        storm's), as often as between two slices of :data:`MAX_SLICE`: a
        storm still arriving must not overflow them meanwhile."""
        if not self._reading:
            return
        self._scheduled = True  # the slice in progress takes them
        try:
            for sock in list(self._sockets):
                self._readable(sock)
        except Exception:  # what asyncio logs when _readable runs as a reader
            log.exception("error while accepting connections")
        finally:
            self._scheduled = False

    def _out_of_resources(self, exc: OSError) -> None:
        now = self._loop.time()
        if self._warned_at is None or now - self._warned_at >= 60:
            self._warned_at = now
            log.warning(
                "cannot accept connections: %s; pausing %.1f s at a time until "
                "connections close (raise the open-file limit or lower "
                "[server] max_connections)",
                exc.strerror,
                PAUSE_ON_ERROR,
            )
        self._stop_reading()
        self._loop.call_later(PAUSE_ON_ERROR, self._resume)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            for sock in self._sockets:
                self._loop.remove_reader(sock)

    def _resume(self) -> None:
        if not self._reading and not self._closed and len(self._queue) < self.limit:
            self._reading = True
            for sock in self._sockets:
                self._loop.add_reader(sock, self._readable, sock)

    # --- the handshake side --------------------------------------------------

    def _hand_over(self) -> None:
        self._scheduled = False
        queue = self._queue
        if not queue:
            return  # closed meanwhile
        callback = self.callback
        clock = self._loop.time
        start = clock()
        # As long as the rest of the loop took since the last slice, times
        # the share the queue's length earns, capped.
        rest = max(0.0, start - self._slice_end)
        share = max(len(queue) / FULL_SHARE_QUEUE, (start - queue[0][2]) / FULL_SHARE_WAIT)
        cap = min(STORM_SLICE, MAX_SLICE * max(1.0, share))
        deadline = start + min(cap, rest * min(1.0, share))
        poll_at = start + MAX_SLICE
        count = 0
        while queue:
            connection, address, _ = queue.popleft()
            try:
                callback(connection, address)
            except Exception:
                log.exception("error while setting up a connection from %r", address)
                connection.close()
            count += 1
            if count >= self.batch:
                now = clock()
                if now >= deadline:
                    break
                if now >= poll_at:
                    poll_at = now + MAX_SLICE
                    self._poll()
        self._slice_end = clock()
        if queue:
            self._scheduled = True
            self._loop.call_soon(self._hand_over)
        elif not self._reading and not self._closed:
            self._resume()
