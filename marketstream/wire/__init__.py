"""What bytes mean, without any I/O: the wire layer.

- :mod:`~marketstream.wire.frames`: WebSocket frames as the server sends
  them, and the close codes;
- :mod:`~marketstream.wire.requests`: client requests and the ``/stream``
  query;
- :mod:`~marketstream.wire.streams`: which stream names may be subscribed;
- :mod:`~marketstream.wire.rates`: the token bucket that bounds a client's
  rate;
- :mod:`~marketstream.wire.replies`: replies to requests and gap notices;
- :mod:`~marketstream.wire.payloads`: the checks of payloads from Redis,
  the ``data`` format's wrapping, the publisher's timestamp;
- :mod:`~marketstream.wire.positions` (and ``recovery.lua`` beside it): the
  recovery format -- positions, a stream's keys, the frames the recovery
  script publishes;
- :mod:`~marketstream.wire.access`: who may subscribe to what (user
  streams ``<name>#<user>``, ``[auth] protected``, the ``channels`` claim);
- :mod:`~marketstream.wire.tokens`: JWT verification (PyJWT): keys,
  algorithms, and what each refusal is counted as;
- :mod:`~marketstream.wire.deflate`: permessage-deflate, the offers and the
  answer, and a message deflated once into an RSV1 frame;
- :mod:`~marketstream.wire.books`: the top-10 book checksum and book
  frames by bytes;
- :mod:`~marketstream.wire.derived`: derived stream names
  (``depthN.<MARKET>``, ``<stream>@<interval>``).

Imports: the standard library, orjson, ujson and PyJWT; nothing of marketstream
outside this package (no Tornado, no redis-py), so every layer may use it
and its tests call it directly.
"""
