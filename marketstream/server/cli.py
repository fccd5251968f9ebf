"""The ``marketstream`` command: the command line, logging, the demo banner,
and one process or several workers (:mod:`marketstream.server.app` runs each).

::

    marketstream                         # embedded Redis, port 4000
    marketstream --demo                  # ... plus the demo feed
    REDIS_URL=redis://10.0.0.5:6379/0 WS_STREAM_URL=0.0.0.0:4000 marketstream
    marketstream --config conf/marketstream.ini --set protocol.acks=true

Redis unreachable at start-up is waited for: the server serves (``/health``
answers 503), logs that it waits and retries until Redis answers, or exits
after ``[redis] startup_timeout`` seconds if that is set.

Exit codes: 0 after a clean shutdown (SIGTERM, SIGINT), 1 when the server
cannot start (a port in use; Redis unreachable for ``[redis]
startup_timeout``), 2 for a configuration error.
"""

import argparse
import asyncio
import logging
import logging.config
import os
import socket
import sys
import time
from collections.abc import Mapping

from marketstream import __version__
from marketstream.loglimit import LimitFilter
from marketstream.server import metrics
from marketstream.server.app import (
    EXIT_CANNOT_START,
    RedisUnavailable,
    Server,
    bound_port,
    listening_sockets,
    run_loop,
)
from marketstream.server.config import ConfigError, Settings, load_settings
from marketstream.server.embedded import RedisServer
from marketstream.server.net.workers import supervise
from marketstream.upstream.clients import REDIS_ERRORS

__all__ = ["main", "build_parser", "settings_from_args", "configure_logging"]

log = logging.getLogger(__name__)


#: The end of ``marketstream --help``: every form of ``REDIS_URL``.
REDIS_URL_FORMS = """\
Redis URL forms (--redis-url, REDIS_URL or [redis] url):
  redis://[[user]:password@]host[:port][/db]       one server
  rediss://[[user]:password@]host[:port][/db]      one server, TLS
  unix://[[user]:password@]/path/to/redis.sock[?db=N]
                                                   one server on a Unix socket
  redis+sentinel://[[user]:password@]host:port[,host:port...]/<service_name>[/db]
                                                   the primary that the sentinels
                                                   name, followed through failovers
                                                   (?sentinel_password=... for the
                                                   sentinels' own)
  rediss+sentinel://...                            the same, TLS
  redis+cluster://[[user]:password@]host:port[,host:port...]
                                                   Redis Cluster (7 or newer),
                                                   sharded pub/sub
  rediss+cluster://...                             the same, TLS
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``marketstream`` command line."""
    parser = argparse.ArgumentParser(
        prog="marketstream",
        description="Stream market data from Redis pub/sub to WebSocket clients.",
        epilog=REDIS_URL_FORMS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="INI file (default: $MARKETSTREAM_CONFIG, else built-in defaults)",
    )
    parser.add_argument(
        "--listen",
        metavar="ADDR",
        help="host:port or ws://host:port/path (overrides WS_STREAM_URL)",
    )
    parser.add_argument(
        "--redis-url",
        metavar="URL",
        help="Redis to read from, in any of the forms below (overrides "
        "REDIS_URL); empty: start an embedded redis-server",
    )
    parser.add_argument("--processes", metavar="N", help="worker processes (0: one per core)")
    parser.add_argument(
        "--acks", action="store_const", const="true", help="reply to requests Binance-style"
    )
    parser.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="set any configuration key (repeatable)",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="run with an embedded Redis and the demo feed, on "
        "127.0.0.1:4000 unless --listen, WS_STREAM_URL or the config "
        "file says where",
    )
    parser.add_argument("--version", action="version", version="marketstream " + __version__)
    return parser


def settings_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings for parsed command-line ``args``; raises ConfigError."""
    overrides: dict[str, str] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError("command line: --set expects SECTION.KEY=VALUE, got %r" % item)
        overrides[key.strip()] = value
    flags = {
        "server.listen": args.listen,
        "redis.url": args.redis_url,
        "server.processes": args.processes,
        "protocol.acks": args.acks,
        "logging.level": args.log_level,
    }
    overrides.update({key: value for key, value in flags.items() if value is not None})
    environ = dict(os.environ if environ is None else environ)
    if args.demo:
        # The demo always runs on its own embedded Redis.
        environ.pop("REDIS_URL", None)
        overrides["redis.url"] = ""
        overrides.setdefault("server.demo_page", "true")
    settings = load_settings(args.config, environ, overrides)
    if args.demo and settings.sources["server.listen"] == "default":
        # A demo stays on this machine unless --listen, WS_STREAM_URL or a
        # config file says otherwise (the default, 0.0.0.0, is for servers).
        settings = settings.replace("server", listen=("127.0.0.1",) + settings.server.listen[1:])
    if args.demo and settings.sources["auth.jwt_key"] == "default":
        # Private streams in the demo: a published secret (the banner says it).
        settings = settings.replace("auth", jwt_key=DEMO_JWT_KEY)
    return settings


def configure_logging(settings: Settings) -> None:
    """Logging as ``[logging]`` says: a config file, or a level and format."""
    if settings.logging.config_file:
        logging.config.fileConfig(settings.logging.config_file, disable_existing_loggers=False)
        _limit_tornado_logs()
        return
    logging.basicConfig(
        level=settings.logging.level, format=settings.logging.format, stream=sys.stderr, force=True
    )
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    _limit_tornado_logs()


def _limit_tornado_logs() -> None:
    """Tornado logs a line per malformed request, body timeout or failing
    callback, which a client can cause at will: one per message per second."""
    LimitFilter.install("tornado.general", "tornado.application", "tornado.access")


def _demo_banner(settings: Settings) -> None:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    base = "%s:%d" % ("[%s]" % host if ":" in host else host, settings.port)
    ws_url = "ws://%s%s" % (base, settings.ws_path or "/ws")
    page = ("  Page:      http://%s/\n" % base) if settings.server.demo_page else ""
    print(
        "\nmarketstream demo is running.\n"
        "%s"
        "  WebSocket: %s\n"
        '  Subscribe: {"method":"SUBSCRIBE","params":["trade.BTC_USDT",'
        '"depth.BTC_USDT","ticker.BTC_USDT"],"id":1}\n'
        "  Health:    http://%s/health\n"
        "  Redis:     %s\n"
        "  Publish:   export REDIS_URL=%s   (in another shell, for the README's examples)\n"
        "  Check it:  python scripts/smoke_test.py --ws-url %s --redis-url %s\n"
        "%s"
        "Press Ctrl-C to stop.\n"
        % (
            page,
            ws_url,
            base,
            settings.redis.url,
            settings.redis.url,
            ws_url,
            settings.redis.url,
            _demo_token_lines(settings),
        ),
        flush=True,
    )


#: The demo's HS256 secret for private streams: public, so never for production.
DEMO_JWT_KEY = "marketstream-demo-secret-not-for-production"


def _demo_token_lines(settings: Settings) -> str:
    """The banner's lines on private streams: the demo secret and a token
    for user 42 (a day long), when the demo runs with that secret."""
    if settings.auth.jwt_key != DEMO_JWT_KEY:
        return ""
    import jwt

    token = jwt.encode({"sub": "42", "exp": int(time.time()) + 86400}, DEMO_JWT_KEY, "HS256")
    return (
        "  Tokens:    HS256 with the demo secret %s (private streams, e.g. account.orders#42)\n"
        "  Token:     export MARKETSTREAM_TOKEN=%s   (user 42, for a day)\n" % (DEMO_JWT_KEY, token)
    )


async def _serve(
    settings: Settings, demo: bool = False, sockets: list[socket.socket] | None = None
) -> None:
    server = Server(settings)
    if demo:
        from marketstream.demo.feed import run_feed

        server.add_task(run_feed(settings.redis.url))
    run = asyncio.ensure_future(server.run(sockets))
    if demo:
        while not run.done() and server.http_server is None:
            await asyncio.sleep(0.05)
        if not run.done():
            _demo_banner(server.settings)
    await run


def main(argv: list[str] | None = None) -> None:
    """The ``marketstream`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print("marketstream: configuration error: %s" % exc, file=sys.stderr)
        sys.exit(2)
    configure_logging(settings)

    embedded = None
    code = 0
    try:
        # The port first: a port in use must not cost an embedded Redis start.
        processes = settings.server.processes or os.cpu_count() or 1
        groups = listening_sockets(settings, processes)
        settings = bound_port(settings, groups[0])
        if not settings.redis.url:
            embedded = RedisServer().start()
            settings = settings.replace("redis", url=embedded.url)
            log.warning(
                "no Redis configured: started an embedded redis-server at %s "
                "(publish there; set REDIS_URL in production)",
                embedded.url,
            )
        if processes == 1:
            run_loop(settings, _serve(settings, args.demo, groups[0]))
        else:
            metrics_dir = metrics.enable_multiprocess()

            def worker(index: int) -> int:
                try:
                    run_loop(settings, _serve(settings, args.demo and index == 0, groups[index]))
                except RedisUnavailable:
                    return EXIT_CANNOT_START  # logged; the supervisor stops the others
                return 0

            try:
                code = supervise(
                    processes,
                    worker,
                    grace=settings.server.shutdown_timeout,
                    on_exit=metrics.mark_process_dead,
                    listeners=groups,
                    fatal=EXIT_CANNOT_START,
                )
            finally:
                metrics.disable_multiprocess(metrics_dir)
    except RedisUnavailable:
        code = 1  # logged where it was decided
    except (*REDIS_ERRORS, RuntimeError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        code = 1
    finally:
        if embedded is not None:
            embedded.stop()
    sys.exit(code)


if __name__ == "__main__":
    main()
