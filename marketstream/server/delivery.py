"""The write path of a :class:`~marketstream.server.handlers.StreamHandler`:
frames to the socket, slow consumers, closing, keepalive pings.

:meth:`Delivery.write_frames` is where the fan-out's flush ends: the frames of
one batch, built once and shared by every recipient, written in one call::

    handler.write_frames(frames)      # straight to the kernel while it keeps up
    handler.close_for(CLOSE_POLICY, "slow consumer", reset=True)
"""

from __future__ import annotations

import logging
import socket
import struct

import tornado.websocket
from tornado.concurrent import Future
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError

from marketstream.server.identity import Identity
from marketstream.server.net import tornado_compat as compat
from marketstream.server.wsprotocol import FrameSink
from marketstream.wire.frames import CLOSE_POLICY

__all__ = ["Delivery"]

_LINGER_0 = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets
_DIRECT = compat.OK  # write to the socket directly when nothing is queued
_queued_bytes = compat.queued_bytes
_PLAIN = (IOStream, compat.LeanIOStream)  # streams without TLS (their socket takes the frames)


def _send(sock: socket.socket, data: bytes | memoryview) -> int:
    """Bytes of ``data`` the kernel took from a non-blocking send; 0 when it
    took none or the socket failed (``IOStream.write`` then meets the error
    and closes the stream)."""
    try:
        return sock.send(data)
    except OSError:  # BlockingIOError and InterruptedError among them
        return 0


class Delivery(Identity):
    """The write path: what the fan-out delivers reaches the client here."""

    def write_frames(self, data: bytes | memoryview) -> None:
        """Queue complete WebSocket frames (bytes) for this client.

        The one place that writes below ``write_message``: frames are built
        once per message by the fan-out and shared by all recipients.  A
        client with more than ``max_buffer_bytes`` unsent is closed, unless
        the batch that passed the cap moved its book streams to snapshots
        (see :meth:`_over_the_cap`).

        While nothing waits in the stream's write buffer, the bytes go
        straight to the kernel, which takes them whole unless the client
        lags.  This skips the Future, callback and buffer bookkeeping of
        ``IOStream.write``, and touches two objects (the protocol and the
        socket) instead of five: it runs once per client per batch, the
        largest cost per delivery after the system call itself.
        """
        ws = self._ws
        if ws is None:
            return
        sock = ws.direct
        if sock is not None:
            try:  # _send, inline: this runs a hundred thousand times a second
                sent = sock.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            ws.direct = None  # the kernel is full: the rest, and what follows, queue
            self._queue(ws, memoryview(data)[sent:])
            return
        self._write_buffered(ws, data)

    def _write_buffered(self, ws: FrameSink, data: bytes | memoryview) -> None:
        """:meth:`write_frames` when the direct path is off: straight to the
        kernel again if the stream's buffer has emptied, else behind what
        waits there."""
        if ws.server_terminated:
            return
        stream = ws.stream
        # A closed stream has no socket (and no write buffer): the check
        # comes first, and IOStream.write below raises StreamClosedError.
        if (
            _DIRECT
            and (sock := stream.socket) is not None
            and type(stream) in _PLAIN
            and not _queued_bytes(stream)
        ):
            sent = _send(sock, data)
            if sent == len(data):
                ws.direct = sock  # the buffer is empty: go straight to the kernel again
                return
            data = memoryview(data)[sent:]
        self._queue(ws, data)

    def _queue(self, ws: FrameSink, data: bytes | memoryview) -> None:
        """Queue ``data`` in the stream's write buffer (Tornado writes it
        as the client reads)."""
        stream = ws.stream
        try:
            stream.write(data)
        except StreamClosedError:
            return  # on_close follows
        except StreamBufferFullError:
            if not self._over_the_cap(stream, data):
                self._slow_consumer()
            return
        if stream.closed():
            return  # the write failed (a reset): no buffer to measure; on_close follows
        if _queued_bytes(stream) > self.context.limits.max_buffer_bytes // 2:
            self._falling_behind(stream)

    def _over_the_cap(self, stream: IOStream, data: bytes | memoryview) -> bool:
        """``data``, one batch, would take the buffer past
        ``max_buffer_bytes`` before it passed half of it (a backlog read at
        once): if that parks book streams, the batch is queued anyway, up
        to twice the cap, once.  False: a slow consumer."""
        limit = self.context.limits.max_buffer_bytes
        books = self.context.manager.books
        if _queued_bytes(stream) + len(data) > 2 * limit or books.parked(self):
            return False
        if not books.park(self):
            return False
        stream.max_write_buffer_size = None
        try:
            stream.write(data)
        except StreamClosedError:
            return True  # on_close follows
        finally:
            stream.max_write_buffer_size = limit
        self._until_drained(stream)
        return True

    def _falling_behind(self, stream: IOStream) -> None:
        """Over half of ``max_buffer_bytes`` unsent: the book streams stop
        (the manager parks them) until what is queued now has been sent;
        then they start again from snapshots.  Only what cannot be
        conflated (trades) can still fill the buffer and close it."""
        books = self.context.manager.books
        if not books.parked(self) and books.park(self):
            self._until_drained(stream)

    def _until_drained(self, stream: IOStream) -> None:
        """Unpark once everything queued so far has been sent."""
        try:
            drained = stream.write(b"")
        except StreamClosedError:
            return
        drained.add_done_callback(self._caught_up)

    def _caught_up(self, drained: Future[None]) -> None:
        if drained.cancelled() or drained.exception() is not None or self._ws is None:
            return  # closed meanwhile: on_close removes it
        self.context.manager.books.unpark(self)

    def _slow_consumer(self) -> None:
        self.context.counters.closed["slow_consumer"] += 1
        self.context.log_limiter.log(
            logging.WARNING,
            "slow_consumer",
            "closing %s: slow consumer (over %d bytes queued)",
            self.identity,
            self.context.limits.max_buffer_bytes,
        )
        self.context.manager.remove(self)  # nothing more for it
        self.close_for(CLOSE_POLICY, "slow consumer", reset=True)

    def close_for(self, code: int, reason: str, reset: bool = False) -> None:
        """Close even when the send buffer is full (the close frame queues
        behind it; Tornado drops the TCP connection if the client has not
        answered within 5 s).

        With ``reset``, that drop is a TCP reset (``SO_LINGER`` 0): the
        kernel frees what is still queued for a client that stopped reading
        at once, instead of holding it (up to ``tcp_wmem``, megabytes) in
        FIN-WAIT-1 until the client reads or TCP gives up.  A client that
        does read gets the close frame first, as usual.
        """
        ws = self._ws
        if ws is not None and ws.stream is not None:
            ws.stream.max_write_buffer_size = None
            if reset and ws.stream.socket is not None:
                try:
                    ws.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
                except OSError:
                    pass
        self.close(code, reason)

    def send_ping(self) -> None:
        """Send a keepalive ping (see :mod:`marketstream.server.keepalive`)."""
        if self._ws is None:
            return
        try:
            self.ping()
        except (StreamClosedError, tornado.websocket.WebSocketClosedError):
            pass  # on_close follows
        except StreamBufferFullError:
            self._slow_consumer()

    def on_pong(self, data: bytes) -> None:
        self.ping_sent = 0.0
