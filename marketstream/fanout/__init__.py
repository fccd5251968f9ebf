"""The fan-out core: who gets what, without any I/O.

- :mod:`~marketstream.fanout.core`: the ``Core`` -- who listens to what,
  the resubscribe and gap bookkeeping after outages, and the coordination
  of the modules below (the shell calls only the ``Core``);
- :mod:`~marketstream.fanout.records`: what the core and the shell
  exchange (``Connection``, ``Want``, ``Read``, ``History``);
- :mod:`~marketstream.fanout.batching`: the frames queued per connection,
  joined into one write per flush (the hot path);
- :mod:`~marketstream.fanout.wanted`: the channels the Redis link must
  hold, what changed, lingering, the channel cap;
- :mod:`~marketstream.fanout.recovery`: recoveries in progress (who waits
  for which history read) and serving a finished read;
- :mod:`~marketstream.fanout.catchup`: the catch-up merge (history,
  snapshot and buffered live messages, by position), pure functions;
- :mod:`~marketstream.fanout.budgets`: the bytes of catch-up each
  connection may still be sent;
- :mod:`~marketstream.fanout.dedupe`: the positions streams and
  connections hold, and which listeners a live message skips;
- :mod:`~marketstream.fanout.books`: the server's order books (diffs
  applied once per message, checksums, top-N snapshots, merged diffs);
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
