"""``marketstream-tail``: print a stream's live messages as JSON lines.

::

    marketstream-tail trade.SOL_USDC depth.SOL_USDC
    marketstream-tail depth.SOL_USDC --snapshot --count 1          # the book, then exit
    marketstream-tail trade.SOL_USDC --since trade.SOL_USDC:1042   # resume after 1042
    marketstream-tail ticker.BTC_USDT --url ws://example.com/ws --count 5 --timeout 10
    marketstream-tail depth.SOL_USDC --snapshot --compression      # snapshots come compressed
    marketstream-tail 'account.orders#42' --token "$TOKEN"       # a private stream
    python -m marketstream.client.tail --help

Every frame the server sends is printed on one line of standard output,
exactly as received (``{"stream":...,"data":...,"seq":...}``), so the output
can be piped into ``jq`` or checked by a script.  When the connection drops
the command reconnects and resumes each recoverable stream after the last
position it printed; a gap the client notices itself (a plain stream after
a reconnection, a position that jumps) is printed as a gap notice line of
the same shape as the server's.  Connection states go to standard error,
with the reason of each disconnection (the server's close code and reason,
or the connection error); so do the streams the server refuses, with its
reason (``marketstream-tail trades.BTC_USDT``: ``unknown stream type
'trades'``), and the command exits at once.

Exit codes: 0 after ``--count`` lines, at the end of ``--timeout`` when no
``--count`` was given, or on Ctrl-C; 1 when ``--timeout`` ends before
``--count`` lines; 2 for bad arguments or a stream the server refused.
On exit the connection is closed with a close frame (1000).

Private streams need a token: ``--token JWT`` or the environment variable
``MARKETSTREAM_TOKEN`` (sent as ``Authorization: Bearer``), or
``--token-file FILE``, read again at every (re)connect and before the
token's ``exp`` (then sent with ``AUTH``), so a token that something else
rotates in that file keeps a long tail connected.
"""

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import TextIO

from marketstream.client.auth import TokenSource
from marketstream.client.client import Client, StreamsRefused

__all__ = ["build_parser", "main", "tail"]

DEFAULT_URL = "ws://127.0.0.1:4000/ws"


def _since(text: str) -> tuple[str, int]:
    stream, sep, position = text.rpartition(":")
    if not sep or not stream:
        raise argparse.ArgumentTypeError("expected STREAM:POSITION, not %r" % text)
    try:
        value = int(position)
    except ValueError:
        raise argparse.ArgumentTypeError("position must be an integer in %r" % text) from None
    if value < 0:
        raise argparse.ArgumentTypeError("position must be >= 0 in %r" % text)
    return stream, value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer, not %r" % text)
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number, not %r" % text)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marketstream-tail",
        description="Print live messages of marketstream streams as JSON lines, one line "
        "per frame as received; reconnects and resumes by itself.",
    )
    parser.add_argument(
        "streams",
        nargs="+",
        metavar="STREAM",
        help="stream names, e.g. trade.SOL_USDC depth.BTC_USDT",
    )
    parser.add_argument(
        "--url", default=DEFAULT_URL, help="WebSocket URL of the server (default: %(default)s)"
    )
    parser.add_argument(
        "--snapshot",
        action="store_true",
        help="ask for each stream's snapshot first (streams that have one)",
    )
    parser.add_argument(
        "--since",
        type=_since,
        action="append",
        default=[],
        metavar="STREAM:POSITION",
        help="resume STREAM after POSITION (repeatable)",
    )
    parser.add_argument(
        "--count", type=_positive_int, metavar="N", help="exit after printing N lines"
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        metavar="SECONDS",
        help="exit after this many seconds (status 1 if --count was not reached)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("MARKETSTREAM_TOKEN") or None,
        metavar="JWT",
        help="a token for private streams (default: $MARKETSTREAM_TOKEN)",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="read the token from FILE at every (re)connect and refresh (overrides --token)",
    )
    parser.add_argument(
        "--compression",
        action="store_true",
        help="offer permessage-deflate (large messages, such as snapshots, come compressed)",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="do not report connection states on standard error",
    )
    return parser


async def tail(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the command with parsed ``args``; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr

    def on_state(state: str) -> None:
        why = client.disconnect_reason if state == "disconnected" else None
        print(
            "marketstream-tail: %s %s%s" % (state, args.url, ": " + why if why else ""),
            file=err,
            flush=True,
        )

    client = Client(
        args.url,
        args.streams,
        snapshot=args.snapshot,
        since=dict(args.since),
        on_state=None if args.quiet else on_state,
        token=_token_source(args),
        compression=args.compression,
    )
    printed = 0
    refused: list[StreamsRefused] = []

    async def run() -> None:
        nonlocal printed
        try:
            async for message in client:
                out.write(message.raw + "\n")
                out.flush()
                printed += 1
                if args.count is not None and printed >= args.count:
                    return
        except StreamsRefused as exc:
            refused.append(exc)
            for name, reason in exc.refused.items():
                print(
                    "marketstream-tail: the server refused %s: %s" % (name, reason),
                    file=err,
                    flush=True,
                )

    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(run())
    stopped: list[bool] = []

    def interrupt() -> None:
        stopped.append(True)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, interrupt)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    try:
        await asyncio.wait_for(task, args.timeout)
    except asyncio.TimeoutError:
        return 1 if args.count is not None else 0
    except asyncio.CancelledError:
        if not stopped:
            raise
    finally:
        await client.close()
    return 2 if refused else 0


def _token_source(args: argparse.Namespace) -> TokenSource | None:
    """The token of ``--token-file`` (read anew at each call), or ``--token``."""
    path = getattr(args, "token_file", None)
    if path:

        def read() -> str:
            with open(path, encoding="utf-8") as handle:
                return handle.read().strip()

        return read
    token: str | None = getattr(args, "token", None)
    return token


def main(argv: list[str] | None = None) -> None:
    """The ``marketstream-tail`` command."""
    args = build_parser().parse_args(argv)
    if not args.quiet:  # what the client says of the server's other errors
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("marketstream-tail: %(message)s"))
        client_log = logging.getLogger("marketstream.client")
        client_log.addHandler(handler)
        client_log.setLevel(logging.WARNING)
    try:
        code = asyncio.run(tail(args))
    except KeyboardInterrupt:
        code = 0
    except BrokenPipeError:  # e.g. piped into `head`
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
