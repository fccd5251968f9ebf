"""The link a REDIS_URL needs (marketstream.upstream.links.make_link): one
PubSubLink for one server, one that follows the sentinels for Sentinel, a
the sharded subscriber for Cluster; and the one interface
the ChannelManager uses, on a real Redis."""

import pytest

from marketstream.upstream.link import PubSubLink
from marketstream.upstream.links import SentinelLink, make_link
from marketstream.upstream.shards import ShardedSubscriber
from marketstream.testing import async_wait_until
from tests.helpers import released, subscribed
from tests.upstream.test_link import Listener


@pytest.mark.parametrize(
    "url, kind",
    [
        ("redis://:secret@127.0.0.1:6390/0", PubSubLink),
        ("unix://:secret@/run/redis.sock", PubSubLink),
        ("redis+sentinel://:secret@127.0.0.1:26390,127.0.0.1:26391/prices", SentinelLink),
        ("redis+cluster://:secret@127.0.0.1:7090,127.0.0.1:7091", ShardedSubscriber),
    ],
)
def test_each_url_form_gets_its_link_and_hides_its_password(url, kind):
    link = make_link(url, Listener())
    assert type(link) is kind
    assert "secret" not in link.redacted_url() and "***" in link.redacted_url()
    assert not link.connected and not link.healthy and link.reconnects == 0


@pytest.mark.gen_test(timeout=30)
async def test_the_link_interface_on_one_server(redis_url, redis_client):
    listener = Listener("trade.LINKS_A")
    link = make_link(redis_url, listener, ping_interval=0.1, ping_timeout=1.0)
    await link.start()
    try:
        await subscribed(redis_client, "trade.LINKS_A")
        await async_wait_until(lambda: link.healthy)
        health = link.health()
        assert health["connected"] and health["node"] in link.links
        listener.want("trade.LINKS_A", False)
        link.changed()
        await released(redis_client, "trade.LINKS_A")
    finally:
        await link.stop()
    assert not link.connected
