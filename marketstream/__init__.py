"""marketstream: stream live market data from Redis pub/sub to WebSocket clients.

The package by layer and audience, lowest first; a layer imports only the
layers listed for it (``tests/test_layers.py`` checks every module, and
that there are no import cycles)::

    loglimit     leaf utility: at most one log line per cause per second
                 imports nothing of marketstream
    wire/        what bytes mean, sans-I/O: frames, requests, replies,
                 payload checks, the recovery format (positions, recovery.lua),
                 tokens (JWT, PyJWT) and access (who may subscribe what)
                 imports nothing of marketstream; no Tornado, no redis-py
    fanout/      the core: who gets what, batches, catch-up, counters; no I/O
                 imports wire, loglimit
    upstream/    the Redis side: URLs, clients, pub/sub links, Cluster and
                 Sentinel, history, the publisher
                 imports wire, loglimit (never fanout or server; no Tornado)
    client/      for users of the server: Client, OrderBook, marketstream-tail
                 imports wire, loglimit (and Tornado's WebSocket client)
    demo/        the demo market: simulator, feed
                 imports upstream, wire, loglimit
    server/      the Tornado server: command, app, ChannelManager, handlers,
                 HTTP endpoints, admission, keepalive, metrics, embedded Redis
                 imports wire, fanout, upstream, demo (--demo), loglimit
      server/net/  sockets below Tornado: listen, accept, upgrade,
                 tornado_compat, workers
                 imports wire, fanout, loglimit and the server's admission
                 and config only
    publisher    the public name of upstream.publisher (Publisher, AsyncPublisher)
    testing      the test and benchmark toolkit; nothing in the package imports it
                 imports wire, server
    __main__     ``python -m marketstream``: server.cli

One message runs one way: Redis -> ``upstream.link`` -> ``server.channels``
-> ``fanout.core`` -> the flush -> ``server.handlers`` -> the socket (the
README's Design section follows it file by file).
"""

__version__ = "0.1.0"
