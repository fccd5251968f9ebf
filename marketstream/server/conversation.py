"""Requests and replies of a :class:`~marketstream.server.handlers.StreamHandler`.

A client's text frames are requests (:mod:`marketstream.wire.requests`):
each takes a token from the message budget, is carried out at once, and
its reply (:mod:`marketstream.wire.replies`) goes out in the order of the
requests, an acknowledgement waiting for Redis to confirm a subscription
in a task of its own while the next requests are read::

    {"method": "SUBSCRIBE", "params": ["trade.SOL_USDC"], "id": 1}
    -> {"result": "subscribed", "streams": ["trade.SOL_USDC"], "id": 1, ...}
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable

from marketstream.fanout.core import Want
from marketstream.server import compression
from marketstream.server.context import log
from marketstream.server.delivery import Delivery
from marketstream.wire import books, replies, requests
from marketstream.wire.frames import CLOSE_POLICY

__all__ = ["Conversation"]


class Conversation(Delivery):
    """A client's requests, its budgets, and the replies in order."""

    def on_message(self, message: str | bytes) -> None:
        if self.ws_connection is None:
            return None  # closing (on Tornado's own protocol, which reads on)
        ctx = self.context
        now = time.monotonic()
        allowed, self._tokens = requests.take_token(
            self._tokens,
            self._tokens_at,
            now,
            ctx.limits.messages_per_second,
            ctx.limits.messages_burst,
        )
        self._tokens_at = now
        if not allowed:
            ctx.counters.closed["rate_limit"] += 1
            ctx.log_limiter.log(
                logging.WARNING, "rate_limit", "closing %s: rate limit exceeded", self.identity
            )
            self.close(CLOSE_POLICY, "rate limit exceeded")
            return None
        request = requests.parse_request(message)
        if isinstance(request, requests.Invalid):
            ctx.counters.invalid_frames += 1
            log.debug("ignored frame from %s: %s", self.identity, request.reason)
            if self._acks:
                self._answer(replies.encode_error(request.id, request.code, request.reason))
            return None
        if request.acks and not self._acks:
            self._acks = True  # asked for on this connection, from this request on
        if request.method == requests.AUTH:
            ctx.auth.on_auth(self, request)  # always answered
            return None
        self._handle(request, reply=bool(self._acks))

    def frames_exceeded(self) -> None:
        """The client sent more frames than ``[limits] frames_per_second``
        allows (its protocol keeps the count): close with 1008."""
        ctx = self.context
        ctx.counters.closed["frame_rate_limit"] += 1
        ctx.log_limiter.log(
            logging.WARNING, "frame_rate_limit", "closing %s: frame rate exceeded", self.identity
        )
        ctx.manager.remove(self)  # nothing more for it
        self.close_for(CLOSE_POLICY, "frame rate exceeded", reset=True)

    def _handle(self, request: requests.Request, reply: bool) -> None:
        """Carry out a valid request; acknowledgements never hold up reading
        (a SUBSCRIBE's ack waits for Redis in a task of its own)."""
        ctx = self.context
        manager = ctx.manager
        if request.method == requests.LIST_SUBSCRIPTIONS:
            self._answer(replies.encode_result(request.id, manager.subscriptions(self)))
            return
        valid: list[str] = []
        refused: list[tuple[str, str]] = []
        for name in request.params:
            refusal = ctx.auth.refusal(self, name)
            base = manager.books.bookless(name) if refusal is None else None
            if base is not None:
                refusal = "no_book", books.no_book_reason(name, base)
            if refusal is None:
                valid.append(name)
            else:
                self._refuse(name, refusal[0], refusal[1], refused)
        valid = list(dict.fromkeys(valid))
        if request.method == requests.UNSUBSCRIBE:
            manager.unsubscribe(self, valid)
            if reply:
                self._answer(replies.encode_outcome(request.id, "unsubscribed", valid, refused, []))
            return
        new, valid = self._within_limits(valid, refused)
        problems = []
        for cause, text in request.problems:
            ctx.counters.ignored[cause] += 1
            problems.append(text)
        manager.subscribe(self, new, self._wants(request, new))
        if reply:
            pending = self._acks
            self._later(
                self._ack_when_subscribed(
                    pending if isinstance(pending, asyncio.Future) else None,
                    request.id,
                    new,
                    valid,
                    refused,
                    problems,
                )
            )

    def _within_limits(
        self, valid: list[str], refused: list[tuple[str, str]]
    ) -> tuple[list[str], list[str]]:
        """Of the ``valid`` streams of a SUBSCRIBE, ``(new, kept)``: those to
        add, and those the reply lists as subscribed; the rest go to
        ``refused`` (``[limits] max_streams_per_connection``, ``max_channels``)."""
        ctx = self.context
        manager = ctx.manager
        current = manager.connections.get(self, {})
        new = [name for name in valid if name not in current]
        limit = ctx.limits.max_streams_per_connection
        room = max(limit - len(current), 0)
        if len(new) > room:
            over = new[room:]
            for name in over:
                self._refuse(
                    name, "too_many_streams", "too many streams (limit %d)" % limit, refused
                )
            new = new[:room]
            dropped = frozenset(over)
            valid = [name for name in valid if name not in dropped]
        capped = manager.over_channel_cap(new)
        if capped:
            # Refused like an invalid name: the process has all the Redis
            # channels it may ([limits] max_channels).
            for name in capped:
                self._refuse(name, "max_channels", "too many streams on this server", refused)
            gone = frozenset(capped)
            new = [name for name in new if name not in gone]
            valid = [name for name in valid if name not in gone]
        return new, valid

    def _refuse(self, name: str, cause: str, reason: str, refused: list[tuple[str, str]]) -> None:
        """Count and log (rate-limited) a stream not subscribed; add it to
        ``refused`` for the reply."""
        ctx = self.context
        ctx.counters.rejected_streams += 1
        ctx.counters.rejected[cause] += 1
        ctx.log_limit.log(
            logging.INFO,
            "rejected_stream",
            "refused stream %.100r from %s: %s",
            name,
            self.identity,
            reason,
        )
        refused.append((name, reason))

    def _answer(self, text: str) -> None:
        """Reply now, or after the replies still waiting for Redis."""
        pending = self._acks
        if isinstance(pending, asyncio.Future):
            self._later(self._reply_after(pending, text))
        else:
            self._reply(text)

    def _later(self, reply: Awaitable[None]) -> None:
        """Run ``reply`` (which waits for the one before it) as the last
        reply in flight; the handler holds it (the event loop holds tasks
        only weakly), and each holds the one before it."""
        task = asyncio.ensure_future(reply)
        self._acks = task
        task.add_done_callback(self._ack_done)

    def _ack_done(self, task: asyncio.Future[None]) -> None:
        if self._acks is task:
            self._acks = True  # nothing in flight: acks stay on

    async def _reply_after(self, previous: asyncio.Future[None], text: str) -> None:
        await asyncio.wait([previous])
        if self._ws is not None:
            self._reply(text)

    def _wants(self, request: requests.Request, names: list[str]) -> dict[str, Want]:
        """What to recover on each of ``names``: the request's ``since`` and
        ``snapshot``, else the snapshot default of ``[recovery]``."""
        since = request.since or {}
        snapshot = request.snapshot
        default = self.context.snapshot_types
        wants = {}
        for name in names:
            if snapshot is None:
                wanted = bool(default) and name.partition(".")[0] in default
            else:
                wanted = snapshot is True or (snapshot is not False and name in snapshot)
            position = since.get(name)
            if position is not None or wanted:
                wants[name] = Want(position, wanted)
        return wants

    async def _ack_when_subscribed(
        self,
        previous: asyncio.Future[None] | None,
        request_id: requests.RequestId,
        names: list[str],
        subscribed: list[str],
        refused: list[tuple[str, str]],
        problems: list[str],
    ) -> None:
        if not await self.context.manager.wait_subscribed(names):
            problems = problems + [
                "Redis has not confirmed the subscription yet (the "
                "streams are delivered once it does)"
            ]
        if previous is not None:
            await asyncio.wait([previous])
        if self._ws is not None:
            self._reply(
                replies.encode_outcome(request_id, "subscribed", subscribed, refused, problems)
            )

    def _reply(self, text: str) -> None:
        self.write_frames(compression.reply_frame(self.context, self._ws, text.encode()))
