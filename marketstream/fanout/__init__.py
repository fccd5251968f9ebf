"""The fan-out core: who gets what, without any I/O.

- :mod:`~marketstream.fanout.core`: the ``Core`` -- who listens to what,
  the batch of frames per connection, the channels the Redis link must
  hold, the resubscribe and gap bookkeeping, and the recovery merge
  (history, snapshot and buffered live messages, by position);
- :mod:`~marketstream.fanout.compressing`: the connections that negotiated
  permessage-deflate, kept apart per stream, and their frames (each message
  compressed once for all of them);
- :mod:`~marketstream.fanout.counters`: the process's ``Counters``, bumped
  on the hot path and read by ``/metrics`` and ``/health``.

No sockets, no ``await``: the server's ChannelManager feeds it what Redis
said and writes out what it produced, and its tests drive it directly.
Imports: :mod:`marketstream.wire` and :mod:`marketstream.loglimit` (no
Tornado, no redis-py).
"""
