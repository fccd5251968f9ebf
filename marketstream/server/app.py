"""One marketstream process: start-up, serving and shutdown.

:class:`Server` joins the pieces of one process -- the
:class:`~marketstream.server.channels.ChannelManager` (Redis to clients),
the Tornado application (:func:`make_app`: the WebSocket handler, ``/health``,
``/metrics``, the page), the keepalive timer and the HTTP server on the
listening sockets::

    server = Server(load_settings())
    await server.run()          # start, serve until SIGTERM or SIGINT, stop

Redis unreachable at start-up is waited for: the server serves (``/health``
answers 503), logs that it waits and retries until Redis answers, or stops
after ``[redis] startup_timeout`` seconds if that is set
(:class:`RedisUnavailable`).  The command line is :mod:`marketstream.server.cli`.
"""

import asyncio
import gc
import os
import resource
import signal
import socket
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any

import tornado.web

from marketstream import __version__
from marketstream.fanout.counters import Counters
from marketstream.loglimit import LogLimiter
from marketstream.server.channels import ChannelManager
from marketstream.server.config import Settings
from marketstream.server.handlers import Context, StreamHandler
from marketstream.server.http import log_request, routes, ws_paths
from marketstream.server.keepalive import Keepalive, Pingable
from marketstream.server.metrics import Exporter
from marketstream.server.net import tornado_compat as compat
from marketstream.server.net.listen import bind_listeners
from marketstream.server.net.upgrade import MAX_BODY_BYTES, StreamServer
from marketstream.server.net.workers import worker_id
from marketstream.upstream.clients import REDIS_ERRORS
from marketstream.wire.frames import CLOSE_GOING_AWAY

__all__ = [
    "make_app",
    "Server",
    "RedisUnavailable",
    "run_loop",
    "listening_sockets",
    "bound_port",
    "EXIT_CANNOT_START",
    "GC_THRESHOLDS",
]

log = logging.getLogger(__name__)


class StreamApplication(tornado.web.Application):
    """The Tornado application, with what its handlers share."""

    context: Context
    exporter: Exporter


def make_app(settings: Settings, manager: ChannelManager | None = None) -> StreamApplication:
    """The Tornado application for ``settings`` (the manager defaults to the
    installed :class:`ChannelManager`); ``app.context`` is what its handlers
    share."""
    context = Context(settings, manager)
    exporter = Exporter(context.manager, context.counters)
    app = StreamApplication(
        routes(context, exporter),
        websocket_max_message_size=settings.limits.max_frame_bytes,
        log_function=log_request,
    )
    app.context = context
    app.exporter = exporter
    return app


def listening_sockets(settings: Settings, count: int = 1) -> list[list[socket.socket]]:
    """One group of listening sockets per worker on the server's address,
    balanced by the kernel (``SO_REUSEPORT``; see
    :func:`~marketstream.server.net.listen.bind_listeners`).  Raises OSError naming the
    address when it cannot be bound."""
    return bind_listeners(settings.host, settings.port, count)


def bound_port(settings: Settings, sockets: list[socket.socket]) -> Settings:
    """Settings with the port the sockets really got (for ``port 0``)."""
    port: int = sockets[0].getsockname()[1]
    if port == settings.port:
        return settings
    return settings.replace("server", listen=(settings.host, port, settings.ws_path))


def _fit_connection_limit(settings: Settings) -> Settings:
    """Lower max_connections below the open-file limit: out of descriptors,
    Tornado's accept loop spins and floods the log with EMFILE."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    except (ValueError, OSError):
        return settings
    fit = max(1, soft - 64)
    if settings.server.max_connections > fit:
        log.warning(
            "max_connections lowered from %d to %d to fit the open-file limit (%d)",
            settings.server.max_connections,
            fit,
            soft,
        )
        return settings.replace("server", max_connections=fit)
    return settings


class RedisUnavailable(RuntimeError):
    """Redis did not answer within ``[redis] startup_timeout``."""


#: Exit code of a worker that cannot start (Redis unreachable for
#: ``[redis] startup_timeout``): the supervisor stops the others instead of
#: restarting it.
EXIT_CANNOT_START = 3
#: Seconds one connection attempt to Redis may take at start-up, at most.
CONNECT_ATTEMPT = 5.0
#: Seconds between the lines saying the server still waits for Redis.
WAITING_LOG_INTERVAL = 10.0


class Server:
    """One marketstream process: its Redis bridge, HTTP server and clients."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.manager: ChannelManager | None = None
        self.http_server: StreamServer | None = None
        self.app: StreamApplication | None = None
        self.keepalive: Keepalive | None = None
        self.failure: RedisUnavailable | None = None  # why run() stopped by itself
        self._extra_tasks: list[asyncio.Future[object]] = []
        self._redis_wait: asyncio.Future[None] | None = None
        self._stop_requested: asyncio.Event | None = None

    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Connect to Redis, then start serving (on ``sockets`` if given).
        If Redis does not answer, serve all the same and keep trying in the
        background (see :meth:`_wait_for_redis`)."""
        settings = self.settings = _fit_connection_limit(self.settings)
        manager = self.manager = ChannelManager.install(
            ChannelManager(
                settings.redis.url,
                payload_format=settings.redis.format,
                ping_interval=settings.redis.health_interval,
                ping_timeout=settings.redis.health_timeout,
                backoff_max=settings.redis.reconnect_max_delay,
                min_flush_interval=settings.server.min_flush_interval,
                max_replay=settings.recovery.max_replay,
                replay_bytes=settings.limits.max_buffer_bytes // 2,
                max_channels=settings.limits.max_channels,
                books=settings.books.rules(),
                book_fields=settings.books.fields(),
                compression_min_bytes=(
                    settings.server.compression_min_bytes if settings.server.compression else None
                ),
            )
        )
        timeout = settings.redis.startup_timeout
        failed = await self._connect_redis(min(CONNECT_ATTEMPT, timeout or CONNECT_ATTEMPT))
        app = self.app = make_app(settings, manager)
        context = app.context

        def timed_out(conn: Pingable) -> None:
            context.counters.closed["ping_timeout"] += 1
            if isinstance(conn, StreamHandler):
                context.manager.remove(conn)

        keepalive = self.keepalive = Keepalive(
            lambda: context.manager.connections,
            settings.server.ping_interval,
            settings.server.ping_timeout,
            on_timeout=timed_out,
        )
        keepalive.start()
        app.exporter.start()
        websocket = None
        if settings.server.fast_handshake and compat.OK:
            websocket = (ws_paths(settings), StreamHandler, {"context": app.context})
        timeout = settings.server.handshake_timeout
        # Proxy headers: per connection, from trusted proxies (the admission
        # decides; Tornado's xheaders would trust any peer).  Tornado's own
        # timeouts bound a kept-alive connection between requests and a body.
        http_server = self.http_server = StreamServer(
            app,
            admission=context.admission,
            handshake_timeout=timeout,
            log_limiter=context.log_limiter,
            websocket=websocket,
            accept_limit=settings.server.max_connections,
            idle_connection_timeout=timeout,
            body_timeout=timeout,
            max_body_size=MAX_BODY_BYTES,
        )
        sockets = sockets or listening_sockets(settings)[0]
        settings = self.settings = bound_port(settings, sockets)
        http_server.add_sockets(sockets)
        worker = worker_id()
        log.info(
            "marketstream %s listening on ws://%s:%d%s (pid %d%s, Redis %s)",
            __version__,
            settings.host,
            settings.port,
            settings.ws_path or "/",
            os.getpid(),
            "" if worker is None else ", worker %d" % worker,
            manager.redacted_url(),
        )
        if failed is not None:
            self._redis_wait = asyncio.ensure_future(self._wait_for_redis(failed))

    async def _connect_redis(self, timeout: float) -> BaseException | None:
        """One attempt to connect the manager to Redis: None if it did,
        else the error."""
        assert self.manager is not None
        try:
            await self.manager.start(timeout)
        except REDIS_ERRORS as exc:
            return exc
        return None

    async def _wait_for_redis(self, error: BaseException) -> None:
        """Retry Redis until it answers, saying so in the log (the first
        time, then every WAITING_LOG_INTERVAL seconds), while the server
        serves; clients that subscribe meanwhile get their streams once it
        answers.  Past ``[redis] startup_timeout`` (if not 0), stop the
        server (:meth:`run` then raises :class:`RedisUnavailable`)."""
        settings = self.settings
        assert self.manager is not None
        url = self.manager.redacted_url()
        source = settings.sources.get("redis.url", "default")
        timeout = settings.redis.startup_timeout
        loop = asyncio.get_running_loop()
        began = loop.time()
        limiter = LogLimiter(log, interval=WAITING_LOG_INTERVAL)
        delay = 0.1
        while True:
            waited = loop.time() - began
            if timeout and waited >= timeout:
                self.failure = RedisUnavailable(
                    "Redis at %s (%s) did not answer within [redis] startup_timeout = %gs: %s"
                    % (url, source, timeout, error)
                )
                log.error("cannot start: %s", self.failure)
                if self._stop_requested is not None:
                    self._stop_requested.set()
                return
            limiter.log(
                logging.WARNING,
                "waiting",
                "waiting for Redis at %s (%s), retrying %s; meanwhile clients are "
                "served and /health answers 503 (%s)",
                url,
                source,
                "for up to %gs ([redis] startup_timeout)" % timeout
                if timeout
                else "until it answers",
                error,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.redis.reconnect_max_delay)
            left = timeout - (loop.time() - began) if timeout else CONNECT_ATTEMPT
            failed = await self._connect_redis(max(0.1, min(CONNECT_ATTEMPT, left)))
            if failed is None:
                log.warning(
                    "Redis at %s answers after %.1fs: serving streams", url, loop.time() - began
                )
                return
            error = failed

    @property
    def counters(self) -> Counters:
        """The process's :class:`~marketstream.fanout.counters.Counters`."""
        if self.manager is None:
            raise AttributeError("counters: the server has not started")
        return self.manager.counters

    def add_task(self, coroutine: Awaitable[object]) -> None:
        """Run a coroutine beside the server; it is cancelled on shutdown."""
        self._extra_tasks.append(asyncio.ensure_future(coroutine))

    async def stop(self) -> None:
        """Stop accepting, close every client with 1001, release Redis."""
        if self._redis_wait is not None:
            self._redis_wait.cancel()
        if self.http_server is not None:
            self.http_server.stop()
        if self.keepalive is not None:
            self.keepalive.stop()
            if self.app is not None:
                self.app.exporter.stop()
                self.app.context.auth.stop()  # the expiry timer
        clients = list(self.manager.connections) if self.manager else []
        for conn in clients:
            conn.close_for(CLOSE_GOING_AWAY, "server shutting down")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.server.shutdown_timeout
        while self.manager and self.manager.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for task in self._extra_tasks:
            task.cancel()
        if self.http_server is not None:
            try:
                await asyncio.wait_for(
                    self.http_server.close_all_connections(), max(0.1, deadline - loop.time())
                )
            except asyncio.TimeoutError:
                pass
        if self.manager is not None:
            await self.manager.stop()
            ChannelManager.reset()
        log.info("marketstream stopped (%d client(s) closed)", len(clients))

    async def run(self, sockets: list[socket.socket] | None = None) -> None:
        """Start, serve until SIGTERM or SIGINT, then stop.  Raises
        :class:`RedisUnavailable` (after stopping) when Redis did not answer
        within ``[redis] startup_timeout``."""
        loop = asyncio.get_running_loop()
        stop = self._stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start(sockets)
        await stop.wait()
        if self.failure is None:
            log.info("shutting down")
        await self.stop()
        if self.failure is not None:
            raise self.failure


#: The cyclic garbage collector's thresholds in a server process (the
#: interpreter's default is (700, 10, 10)).  A handshake allocates a few
#: hundred container objects, so by default the collector ran every few
#: handshakes, and every 70,000 allocations a full pass went over every
#: open connection's objects: in a storm of 10,000 connections those passes
#: took about a tenth of the process (measured: the storm served in 2.9-3.1 s
#: instead of 3.3-3.7 s).  Full passes now come every million allocations;
#: what a closed connection leaves in reference cycles waits that much longer.
GC_THRESHOLDS = (10_000, 10, 10)


# Any: asyncio types the coroutine a loop runs so (asyncio.run, run_until_complete).
def run_loop(settings: Settings, coroutine: Coroutine[Any, Any, None]) -> None:
    """Run ``coroutine`` on the event loop ``[server] event_loop`` names
    (with the collector's thresholds set to :data:`GC_THRESHOLDS`)."""
    gc.set_threshold(*GC_THRESHOLDS)
    if settings.server.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            coroutine.close()
            raise RuntimeError(
                "[server] event_loop = uvloop, but uvloop is not installed "
                "(pip install 'marketstream[uvloop]')"
            ) from None
        uvloop.run(coroutine)
    else:
        asyncio.run(coroutine)
