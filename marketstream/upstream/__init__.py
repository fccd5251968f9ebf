"""The Redis side: URLs, clients, the pub/sub links, history and publishing.

- :mod:`~marketstream.upstream.urls`: ``REDIS_URL`` in its three forms
  (one server, Sentinel, Cluster), parsed and redacted for logs;
- :mod:`~marketstream.upstream.clients`: redis-py clients for a URL
  (Sentinel pools that follow a failover), ``check_redis`` and
  ``REDIS_ERRORS``, what a call to Redis raises;
- :mod:`~marketstream.upstream.link`: the one pub/sub connection
  implementation (``PubSubConnection``: connect, backoff, PING, wide reads)
  and the link to one server (``PubSubLink``);
- :mod:`~marketstream.upstream.links`: the link(s) a URL needs behind one
  interface (``make_link``: one server, Sentinel, Cluster);
- :mod:`~marketstream.upstream.cluster`: asking Cluster nodes and sentinels
  (topology, the primary, ``+switch-master``);
- :mod:`~marketstream.upstream.slots`: the Cluster slot table (no I/O);
- :mod:`~marketstream.upstream.placement`: which channel is subscribed on
  which shard, as sans-I/O state (events in, commands out);
- :mod:`~marketstream.upstream.shards`: the Cluster link, one ``SSUBSCRIBE``
  connection per primary, carrying the placement out;
- :mod:`~marketstream.upstream.confirmations`: futures waiting for Redis to
  confirm subscriptions (the server's acknowledgements);
- :mod:`~marketstream.upstream.history`: reading positions, history and
  snapshots back;
- :mod:`~marketstream.upstream.publisher`: recoverable publishing
  (``Publisher``, ``AsyncPublisher``; also ``marketstream.publisher``).

Imports: :mod:`marketstream.wire`, :mod:`marketstream.loglimit`, redis-py;
never the fan-out core or the server (and no Tornado).  What the links
report goes to a listener they are given (the server's ChannelManager).
"""
