"""One process (marketstream.server.app): start-up on the port it was given
(or any free one), the connection limit fitted to the open-file limit, and
a shutdown that closes every client with 1001."""

import asyncio
import logging
import resource

import pytest
import ujson

from marketstream.server.app import Server, _fit_connection_limit
from tests.helpers import connect, make_settings, read, send


@pytest.mark.gen_test(timeout=30)
async def test_port_zero_serves_on_the_port_it_got(redis_url):
    server = Server(make_settings(redis_url, server__listen="127.0.0.1:0"))
    await server.start()
    try:
        assert server.settings.port > 0
        ws = await connect(server)
        await send(ws, "LIST_SUBSCRIPTIONS")
        assert ujson.loads(await read(ws)) == {"result": [], "id": 1}
    finally:
        await server.stop()


@pytest.mark.gen_test(timeout=30)
async def test_stop_closes_every_client_with_1001(server_factory):
    server = await server_factory()
    clients = [await connect(server) for _ in range(3)]
    await server.stop()
    for ws in clients:
        assert await asyncio.wait_for(ws.read_message(), 10) is None
        assert (ws.close_code, ws.close_reason) == (1001, "server shutting down")
    assert not server.manager.connections


def test_max_connections_is_lowered_below_the_open_file_limit(redis_url, monkeypatch, caplog):
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1000, 1000))
    settings = make_settings(redis_url, server__max_connections=10000)
    with caplog.at_level(logging.WARNING):
        fitted = _fit_connection_limit(settings)
    assert fitted.server.max_connections == 1000 - 64
    assert "max_connections lowered from 10000 to 936" in caplog.text
    roomy = make_settings(redis_url, server__max_connections=500)
    assert _fit_connection_limit(roomy) is roomy
