"""Sockets below Tornado, one step of a connection's path each.

- :mod:`~marketstream.server.net.listen`: the listening sockets (one
  ``SO_REUSEPORT`` group per worker, a large backlog);
- :mod:`~marketstream.server.net.accept`: accepting all the kernel holds at
  once, handshakes in slices between live work;
- :mod:`~marketstream.server.net.upgrade`: the handshake shortcut (a plain
  WebSocket upgrade answered without Tornado's general HTTP handling) and
  the HTTP server around it;
- :mod:`~marketstream.server.net.tornado_compat`: every private Tornado
  name used, checked at import; ``LeanIOStream``;
- :mod:`~marketstream.server.net.workers`: worker processes on one port,
  and ``die_with_parent``.

Imports: Tornado, the standard library, :mod:`marketstream.loglimit` and
the server's admission (what a connection may do); never the handlers.
"""
