"""marketstream.server.context: what the handlers of one process share,
made from the typed settings and the process's ChannelManager."""

import pytest

from marketstream.server.channels import ChannelManager
from marketstream.server.context import Context
from tests.helpers import make_settings


class Conn:
    """A registered connection: the manager only writes to it."""

    def write_frames(self, data):
        pass


def test_a_context_reads_the_settings_and_counts_the_managers_connections(redis_url):
    settings = make_settings(
        redis_url,
        server__max_connections="2",
        protocol__acks="true",
        recovery__snapshot_types="depth, ticker",
    )
    manager = ChannelManager(redis_url)  # never started: no Redis connection
    context = Context(settings, manager)
    assert context.counters is manager.counters and context.limits is settings.limits
    assert context.acks is True and context.snapshot_types == {"depth", "ticker"}
    assert context.rules.refusal("trade.SOL_USDC") is None
    assert context.rules.refusal("nope.SOL_USDC") is not None
    assert context.admission.refusal("10.0.0.1") is None
    manager.register(Conn())
    manager.register(Conn())
    assert context.admission.refusal("10.0.0.1")[0] == 503  # max_connections, open ones


def test_without_a_manager_a_context_takes_the_installed_one(redis_url):
    settings = make_settings(redis_url)
    ChannelManager.reset()
    with pytest.raises(RuntimeError):
        Context(settings)
    manager = ChannelManager.install(ChannelManager(redis_url))
    try:
        assert Context(settings).manager is manager
    finally:
        ChannelManager.reset()
