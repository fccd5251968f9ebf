"""What the WebSocket handlers of one process share: :class:`Context`.

One context per process, made at start-up and handed to every
:class:`~marketstream.server.handlers.StreamHandler` through Tornado's
``initialize`` keyword arguments::

    context = Context(settings, manager)
    app = tornado.web.Application([(r"/ws", StreamHandler, {"context": context})])
"""

from __future__ import annotations

import logging
from marketstream.fanout.counters import Counters
from marketstream.loglimit import LogLimiter
from marketstream.server.admission import Admission
from marketstream.server.auth import Sessions
from marketstream.server.channels import ChannelManager
from marketstream.server.config import LimitsSettings, Settings
from marketstream.server.net.tornado_compat import WebSocketParams
from marketstream.wire import requests

__all__ = ["Context"]

#: The handlers' logger: what a connection does, and what its client caused.
log = logging.getLogger("marketstream.server.handlers")


class Context:
    """What the handlers of one process share: settings, the manager, the
    counters, admission and the stream rules.

    >>> context = Context(settings, manager)  # doctest: +SKIP
    >>> context.limits.max_streams_per_connection  # doctest: +SKIP
    100
    """

    def __init__(self, settings: Settings, manager: ChannelManager | None = None) -> None:
        self.settings = settings
        self.manager: ChannelManager = manager or ChannelManager.instance()
        self.counters: Counters = self.manager.counters
        self.admission = Admission(
            settings.server, self.counters, lambda: len(self.manager.connections)
        )
        self.rules = requests.StreamRules.from_settings(settings.protocol, settings.books.rules())
        self.acks: bool = settings.protocol.acks
        self.log_limit = LogLimiter(log)  # for what a client can cause (refused streams)
        self.limits: LimitsSettings = settings.limits
        self.xheaders: bool = settings.server.xheaders
        self.snapshot_types = frozenset(settings.recovery.snapshot_types)
        # Tornado's protocol parameters, made at the first handshake.
        self.ws_params: WebSocketParams | None = None
        # Lines a client can cause: at most one per cause per second.
        self.log_limiter = LogLimiter(log)
        self.auth = Sessions(settings.auth, self.rules, self.counters, self.log_limiter)
        # permessage-deflate offered to clients (see server/compression.py).
        self.compression: bool = (
            settings.server.compression and self.manager.core.compressing.deflater is not None
        )
