"""The WebSocket protocol of a :class:`~marketstream.server.handlers.StreamHandler`.

:class:`StreamProtocol` is Tornado's ``WebSocketProtocol13`` with its
frame-reading loop in a task of its own and a budget for the frames a
client sends; :class:`FrameSink` is what the handler's write path needs of
a protocol (this one, or Tornado's own where
:mod:`~marketstream.server.net.tornado_compat` turned the fast paths off)::

    ws = StreamProtocol(handler, False, compat.websocket_params(20, 20, 65536, None))
    ws.stream = stream
    ws.start_frame_loop()      # reads frames until the connection ends
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import tornado.websocket
from tornado.iostream import IOStream

from marketstream.server.context import Context
from marketstream.server.net import tornado_compat as compat
from marketstream.wire import requests
from marketstream.wire.frames import OP_CLOSE

if TYPE_CHECKING:
    # Tornado's type of a protocol's handler (private: for typing only).
    from tornado.websocket import _WebSocketDelegate
else:

    class _WebSocketDelegate(Protocol):
        """Stands for Tornado's type of a handler when not type checking."""


__all__ = ["FrameOwner", "FrameSink", "StreamProtocol"]


class FrameSink(Protocol):
    """What :meth:`StreamHandler.write_frames` reads of the WebSocket
    protocol it writes through: the socket it may write to directly (or
    None), the stream, and whether the close frame is out."""

    direct: socket.socket | None
    stream: IOStream  # None until the handshake sets it; the handler's _ws is set after
    server_terminated: bool


class FrameOwner(_WebSocketDelegate, Protocol):
    """What :class:`StreamProtocol` needs of its handler."""

    context: Context
    identity: str | None
    frame_loop: asyncio.Future[None] | None

    def frames_exceeded(self) -> None: ...


class StreamProtocol(tornado.websocket.WebSocketProtocol13):
    """Tornado's protocol with its frame-reading loop in a task of its own,
    and a budget for the frames a client sends.

    Tornado awaits the loop at the bottom of the handshake's coroutine chain
    (``_execute`` -> ``get`` -> ``accept_connection`` -> ``_accept_connection``),
    so those four frames and their locals (the parsed request headers among
    them) live as long as the connection: ~1.7 KB each.  Running the loop
    apart lets the handshake finish and be collected.

    Every frame a client sends, control frames and fragments included, takes
    a token from a bucket (``[limits] frames_per_second``, ``frames_burst``):
    past it the client is closed with 1008 "frame rate exceeded" (a flood of
    pings or empty fragments never reaches the message limit).  Once the
    close frame is sent, nothing but the client's close frame is handled;
    a client still over its budget then is not read any more (its frames
    wait in the kernel, which stops it sending) until Tornado drops the
    connection for want of the client's close frame.  Dropping it at once
    would reset the connection, and a reset can overtake the close frame.
    """

    # The budget's state in slots: the instance dict is at the size where
    # CPython still shares its keys between instances (29 attributes; one
    # more gives every connection a dict of its own, ~1.5 KB).
    __slots__ = ("frame_tokens", "frame_time", "deflate")

    handler: FrameOwner

    def __init__(self, handler: FrameOwner, mask_outgoing: bool, params: Any) -> None:
        # params: Any, as Tornado's _WebSocketParams is private (see tornado_compat).
        super().__init__(handler, mask_outgoing, params)
        self.frame_tokens = float(handler.context.limits.frames_burst)
        self.frame_time = time.monotonic()
        self.deflate: str | None = None  # the permessage-deflate agreed, if any

    async def _receive_frame_loop(self) -> None:
        self.start_frame_loop()

    def _receive_frame(self) -> Coroutine[Any, Any, None]:
        """The reading of the next frame, once the budget allows it.

        A plain function that hands the frame loop Tornado's coroutine: a
        coroutine of its own would stay suspended with it in every idle
        connection (~300 bytes each)."""
        limits = self.handler.context.limits
        now = time.monotonic()
        allowed, self.frame_tokens = requests.take_token(
            self.frame_tokens, self.frame_time, now, limits.frames_per_second, limits.frames_burst
        )
        self.frame_time = now
        if not allowed:
            if self.server_terminated:
                return self._until_closed()  # still flooding after our close frame
            self.handler.frames_exceeded()
        frame: Coroutine[Any, Any, None] = getattr(super(), compat.RECEIVE_FRAME)()
        return frame

    async def _until_closed(self) -> None:
        """Wait, reading nothing, until the stream is closed."""
        stream = self.stream
        if stream.closed():
            return
        closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def signal() -> None:
            if not closed.done():
                closed.set_result(None)

        stream.set_close_callback(signal)
        await closed

    def _handle_message(self, opcode: int, data: bytes) -> asyncio.Future[None] | None:
        if self.server_terminated and opcode != OP_CLOSE:
            return None  # our close frame is out: only the client's close counts
        if opcode == OP_CLOSE and len(data) > 2:
            try:
                data[2:].decode("utf-8")
            except UnicodeDecodeError:  # Tornado would raise in its frame loop
                self.handler.context.log_limiter.log(
                    logging.WARNING,
                    "bad_close_frame",
                    "closing %s: close frame with an invalid UTF-8 reason",
                    self.handler.identity,
                )
                self._abort()
                return None
        handled: asyncio.Future[None] | None = getattr(super(), compat.HANDLE_MESSAGE)(opcode, data)
        return handled

    def start_frame_loop(self) -> None:
        """Read frames in a task of its own."""
        # The handler keeps the task (the event loop only holds tasks weakly).
        loop = getattr(super(), compat.RECEIVE_FRAME_LOOP)
        task = self.handler.frame_loop = asyncio.ensure_future(loop())
        task.add_done_callback(self._frame_loop_done)

    def _frame_loop_done(self, task: asyncio.Future[None]) -> None:
        handler = self.handler
        handler.frame_loop = None
        error = None if task.cancelled() else task.exception()
        if error is not None:
            handler.context.log_limiter.log(
                logging.ERROR,
                "frame_loop_failed",
                "frame loop of %s failed",
                handler,
                exc_info=error,
            )
            self._abort()

    # The socket :meth:`StreamHandler.write_frames` may write to directly,
    # or None.  Set only while the stream's write buffer was empty at the
    # last check and Tornado has written nothing since (a frame of its own
    # may sit half-sent in that buffer); once Tornado has written the close
    # frame, StreamHandler._write_buffered leaves it None for good.
    direct: socket.socket | None = None

    def _write_frame(self, *args: Any, **kwargs: Any) -> Any:
        # Any: Tornado's own signature, passed through whole.
        self.direct = None  # Tornado writes: recheck its buffer before writing past it
        return super()._write_frame(*args, **kwargs)
