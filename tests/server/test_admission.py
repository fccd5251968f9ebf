"""Admission (marketstream.server.admission): connection limits, handshaking
connections, trusted proxies and origins; directly, then through a server."""

import pytest
import tornado.httpclient
import tornado.websocket

from marketstream.fanout.counters import Counters
from marketstream.server.admission import HTTP_RESERVE, Admission
from marketstream.server.config import load_settings
from marketstream.testing import async_wait_until
from tests.helpers import abort, connect, ws_url


def admission(open_connections=0, **overrides):
    flat = {"server." + key: str(value) for key, value in overrides.items()}
    settings = load_settings(environ={}, overrides=flat)
    return Admission(settings.server, Counters(), lambda: open_connections)


def test_handshaking_connections_count_toward_max_connections():
    gate = admission(open_connections=2, max_connections=3)
    assert gate.refusal("10.0.0.1") is None
    assert gate.admit("a", "10.0.0.1", deadline=5.0) is None
    assert gate.refusal("10.0.0.2") == (503, "too many connections", "max_connections")
    assert gate.refusal("10.0.0.1", key="a") is None  # not against itself
    gate.handshake_done("a")
    assert gate.refusal("10.0.0.2") is None


def test_plain_requests_keep_a_reserve_past_max_connections():
    gate = admission(open_connections=3, max_connections=3)
    for index in range(HTTP_RESERVE):
        assert gate.admit(index, "10.0.0.%d" % index, deadline=5.0) is None
    assert gate.admit("one more", "10.0.0.99", deadline=5.0)[2] == "max_connections"


def test_per_ip_counts_come_and_go():
    gate = admission(max_connections_per_ip=2)
    gate.enter("10.0.0.1")
    gate.enter("10.0.0.1")
    assert gate.refusal("10.0.0.1")[0] == 429 and gate.refusal("10.0.0.2") is None
    gate.leave("10.0.0.1")
    gate.leave("10.0.0.1")
    assert gate.per_ip == {}
    assert admission(max_connections_per_ip=0).per_ip == {}


def test_trusted_proxies_addresses_networks_and_mapped_ipv4():
    gate = admission(trusted_proxies="127.0.0.1, 10.1.0.0/16, ::1", xheaders="true")
    assert gate.trusted("127.0.0.1") and gate.trusted("10.1.200.3") and gate.trusted("::1")
    assert gate.trusted("::ffff:10.1.0.7")
    assert not gate.trusted("10.2.0.1") and not gate.trusted("not an address")
    assert gate.proxied("10.1.0.9")
    assert not admission(xheaders="false").proxied("127.0.0.1")


def test_expired_handshakes_are_handed_back_oldest_first():
    gate = admission(max_connections_per_ip=5)
    gate.admit("a", "10.0.0.1", deadline=1.0)
    gate.admit("b", "10.0.0.1", deadline=2.0)
    gate.admit("c", None, deadline=3.0)  # behind a proxy: no IP yet
    assert gate.expired(now=2.5) == ["a", "b"]
    assert gate.handshaking == 1 and gate.per_ip == {}
    gate.refused("handshake_timeout")
    assert gate.counters.refused["handshake_timeout"] == 1


@pytest.mark.gen_test
async def test_connection_limits(server_factory):
    server = await server_factory(server__max_connections=3)
    clients = [await connect(server) for _ in range(3)]
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await connect(server)
    assert refused.value.code == 503
    clients[0].close()
    await async_wait_until(lambda: len(server.manager.connections) == 2)
    clients[0] = await connect(server)  # room again

    server = await server_factory(server__max_connections_per_ip=2)
    clients = [await connect(server) for _ in range(2)]
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await connect(server)
    assert refused.value.code == 429
    assert server.counters.refused["max_connections_per_ip"] == 1
    abort(clients[1])
    await async_wait_until(lambda: len(server.manager.connections) == 1)
    await connect(server)
    assert server.app.context.admission.per_ip == {"127.0.0.1": 2}


@pytest.mark.gen_test
async def test_allowed_origins(server_factory):
    server = await server_factory(
        server__allowed_origins="https://exchange.example, https://app.example"
    )

    def request(origin):
        headers = {"Origin": origin} if origin else {}
        return tornado.httpclient.HTTPRequest(ws_url(server), headers=headers)

    await tornado.websocket.websocket_connect(request("https://exchange.example"))
    await tornado.websocket.websocket_connect(request(None))  # bots send no Origin
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await tornado.websocket.websocket_connect(request("https://evil.example"))
    assert refused.value.code == 403

    open_server = await server_factory()
    await tornado.websocket.websocket_connect(
        tornado.httpclient.HTTPRequest(
            ws_url(open_server), headers={"Origin": "https://anywhere.example"}
        )
    )
