"""The Tornado server: start-up, the WebSocket handler, the HTTP endpoints,
the bridge from Redis to the clients, and what bounds a client.

- :mod:`~marketstream.server.cli`: the ``marketstream`` command;
- :mod:`~marketstream.server.app`: one process (``Server``), the Tornado
  application, start-up and shutdown;
- :mod:`~marketstream.server.config`: settings from INI files, the
  environment and flags;
- :mod:`~marketstream.server.channels`: the ``ChannelManager``, one per
  process: the fan-out core, the Redis link(s), one flush per batch,
  history reads, acknowledgements;
- :mod:`~marketstream.server.handlers`: the WebSocket handler
  (``StreamHandler``) and what the handlers share (``Context``);
- :mod:`~marketstream.server.compression`: permessage-deflate at the
  handshake (both accept paths), Tornado's inflater, replies compressed;
- :mod:`~marketstream.server.http`: ``/health``, ``/metrics``, the URL map;
- :mod:`~marketstream.server.admission`, :mod:`~marketstream.server.keepalive`:
  connection limits, trusted proxies and origins; one ping timer per process;
- :mod:`~marketstream.server.metrics`: Prometheus exposition of the counters;
- :mod:`~marketstream.server.embedded`: the private redis-server used when
  no Redis is configured;
- :mod:`marketstream.server.net`: sockets below Tornado (listening,
  accepting, the handshake shortcut, Tornado's private names, workers);
- ``static/``: the browser client and the live market page.

Imports: :mod:`marketstream.wire`, :mod:`marketstream.fanout`,
:mod:`marketstream.upstream`, :mod:`marketstream.loglimit`, and
:mod:`marketstream.demo` (the ``--demo`` flag runs its feed); Tornado,
redis-py, prometheus_client.  Nothing below imports the server.
"""
