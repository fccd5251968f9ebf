"""For users of the server: a Python client that reconnects, resumes and
keeps order books, and ``marketstream-tail``.

:class:`Client` is an asyncio client that subscribes to streams, reconnects
with jittered exponential backoff when the connection drops, and resumes
every recoverable stream where it left off (``since``: the last position it
got), so that a bot sees each message once and in order::

    import asyncio
    from marketstream.client import BookGap, Client, OrderBook

    async def main():
        book = OrderBook()
        async with Client("ws://127.0.0.1:4000/ws",
                          ["trade.SOL_USDC", "depth.SOL_USDC"],
                          snapshot=["depth.SOL_USDC"]) as client:
            async for msg in client:
                if msg.stream == "depth.SOL_USDC":
                    try:
                        book.apply_message(msg)   # snapshot, diffs and gaps
                    except BookGap:
                        await client.resync(msg.stream)   # a fresh snapshot
                        continue
                    if book.synced:
                        print("best bid", book.bids(1), "best ask", book.asks(1))
                elif msg.kind == "gap":
                    print("missed updates on", msg.stream, msg.data["reason"])
                else:
                    print(msg.stream, msg.seq, msg.data)

    asyncio.run(main())

Each message is a :class:`Message` with ``stream``, ``data``, ``seq`` (the
stream's position, None on plain streams), ``kind`` (``"message"``,
``"snapshot"`` or ``"gap"``) and ``raw`` (the frame's text as received).

:class:`OrderBook` does no I/O: it applies a depth snapshot and then
Binance-style diffs, checks their continuity and the server's book
checksum, and raises :class:`BookGap` when an update is missing or the
checksum does not match (``client.resync(stream)`` then starts that stream
over on the same connection).

:class:`Client` is a thin asyncio shell around a :class:`Session`, which
holds the protocol without any I/O (what to send on each connection, what
each frame means, the backoff): drive a session directly to use the
protocol under another event loop or to test against it.

The modules: :mod:`~marketstream.client.client` (the asyncio client),
:mod:`~marketstream.client.session` (the protocol, sans I/O),
:mod:`~marketstream.client.messages` (what it yields),
:mod:`~marketstream.client.book` (order books),
:mod:`~marketstream.client.resync` (one stream started over) and
:mod:`~marketstream.client.tail` (the ``marketstream-tail`` command).
Imports: :mod:`marketstream.wire`, :mod:`marketstream.loglimit` and
Tornado's WebSocket client; never the server's or Redis's side.
"""

from marketstream.client.book import BookGap, OrderBook
from marketstream.client.client import NORMAL_CLOSURE, Client, ConnectionLost, StreamsRefused
from marketstream.client.messages import GAP, MESSAGE, SNAPSHOT, Message
from marketstream.client.session import Session

__all__ = [
    "Client",
    "Message",
    "Session",
    "OrderBook",
    "BookGap",
    "ConnectionLost",
    "StreamsRefused",
    "MESSAGE",
    "SNAPSHOT",
    "GAP",
    "NORMAL_CLOSURE",
]
