"""One pub/sub connection (marketstream.upstream.link.PubSubLink) against a
real Redis: it subscribes what its listener wants, delivers, syncs changes,
reports a lost connection and its return, PINGs, and reads in large
batches."""

import asyncio
import time

import pytest

from marketstream.server.channels import ChannelManager
from marketstream.upstream.link import PubSubLink
from marketstream.testing import async_wait_until
from tests.helpers import released, subscribed


class Listener:
    """What a link reports to (the ChannelManager's side), recorded."""

    def __init__(self, *wanted):
        self.channels = set(wanted)
        self.changes = {}
        self.messages = []
        self.subscribed = []
        self.unsubscribed = []
        self.lost = 0
        self.restored = []

    def want(self, name, wanted=True):
        if wanted:
            self.channels.add(name)
        else:
            self.channels.discard(name)
        self.changes[name] = wanted

    def wanted(self):
        return set(self.channels)

    def take_changes(self):
        changes, self.changes = self.changes, {}
        return changes

    def on_message(self, channel, payload):
        self.messages.append((channel, payload))

    def on_subscribed(self, name):
        self.subscribed.append(name)

    def on_unsubscribed(self, name):
        self.unsubscribed.append(name)

    def on_lost(self):
        self.lost += 1

    def on_restored(self, channels):
        self.restored.append(channels)


@pytest.mark.gen_test(timeout=30)
async def test_the_link_holds_what_its_listener_wants_and_delivers(redis_url, redis_client):
    listener = Listener("trade.LINK_A")
    link = PubSubLink(redis_url, listener)
    await link.start()
    try:
        assert link.node == "127.0.0.1:%d" % redis_client.connection_pool.connection_kwargs["port"]
        await subscribed(redis_client, "trade.LINK_A")
        await async_wait_until(lambda: listener.subscribed == ["trade.LINK_A"])
        redis_client.publish("trade.LINK_A", b"one")
        await async_wait_until(lambda: listener.messages == [(b"trade.LINK_A", b"one")])
        # A change costs what changed: B subscribed, A released.
        listener.want("trade.LINK_B")
        listener.want("trade.LINK_A", False)
        link.changed()
        await subscribed(redis_client, "trade.LINK_B")
        await released(redis_client, "trade.LINK_A")
        await async_wait_until(lambda: listener.unsubscribed == ["trade.LINK_A"])
        await async_wait_until(lambda: link.healthy and link.links == {link.node: True})
    finally:
        await link.stop()
    assert not link.connected
    await released(redis_client, "trade.LINK_B")


@pytest.mark.gen_test(timeout=30)
async def test_a_killed_connection_is_reported_and_subscribed_again(redis_url, redis_client):
    listener = Listener("trade.LINK_K")
    link = PubSubLink(redis_url, listener, backoff_max=0.2)
    await link.start()
    try:
        await subscribed(redis_client, "trade.LINK_K")
        assert redis_client.client_kill_filter(_type="pubsub") >= 1
        await async_wait_until(lambda: listener.restored, 10, message="the link restored")
        assert listener.lost == 1 and link.reconnects == 1
        assert listener.restored == [{"trade.LINK_K"}]
        await subscribed(redis_client, "trade.LINK_K")
        redis_client.publish("trade.LINK_K", b"after")
        await async_wait_until(lambda: (b"trade.LINK_K", b"after") in listener.messages)
    finally:
        await link.stop()
    await released(redis_client, "trade.LINK_K")


@pytest.mark.gen_test(timeout=20)
async def test_idle_bridge_stays_healthy(redis_url):
    # PING on a connection subscribed to nothing gets a plain PONG reply, not
    # a pub/sub one: it must count as alive all the same.
    # Sixty PINGs, and a PONG that did not count would show within a second
    # (interval + timeout); a busy machine may hold a round trip up that long.
    manager = ChannelManager(redis_url, ping_interval=0.05, ping_timeout=1.0)
    await manager.start()
    try:
        start = time.monotonic()
        while time.monotonic() - start < 3.0:
            assert manager.healthy
            await asyncio.sleep(0.05)
        assert manager.counters.reconnects == 0
    finally:
        await manager.stop()


@pytest.mark.gen_test
async def test_the_pubsub_link_reads_in_large_batches(server):
    """Under load a batch is what one read returned: the link widens the
    reads past asyncio's 256 KB (private attributes; if a library renames
    them, this says so before the benchmark does)."""
    assert server.manager.link.widened
