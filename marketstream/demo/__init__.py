"""The demo market: what ``marketstream --demo`` and ``marketstream-feed``
publish.

- :mod:`~marketstream.demo.simulator`: markets that trade, move their books
  and tick, without any I/O (seeded, so a run can be replayed);
- :mod:`~marketstream.demo.feed`: the loop that publishes a simulator's
  messages to Redis (plain ``PUBLISH``, or with positions through the
  recovery script), and the ``marketstream-feed`` command.

Imports: :mod:`marketstream.upstream` (the publisher, Redis clients),
:mod:`marketstream.wire`, :mod:`marketstream.loglimit`; never the server or
the client.
"""
