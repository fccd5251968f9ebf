"""marketstream.server.page: the live market page, shipped in the package
and served on a plain GET / with [server] demo_page on."""

import os

import pytest
import tornado.httpclient

from marketstream.server.page import STATIC_DIR, page


def test_the_page_is_the_shipped_file_read_once():
    with open(os.path.join(STATIC_DIR, "index.html"), "rb") as handle:
        assert page() == handle.read()
    assert page() is page()
    assert os.path.exists(os.path.join(STATIC_DIR, "marketstream.js"))


@pytest.mark.gen_test
async def test_get_without_upgrade_serves_the_page_only_when_asked(server_factory):
    client = tornado.httpclient.AsyncHTTPClient()
    shown = await server_factory(server__demo_page="true")
    response = await client.fetch("http://127.0.0.1:%d/" % shown.settings.port)
    assert response.body == page()
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    hidden = await server_factory()
    response = await client.fetch("http://127.0.0.1:%d/" % hidden.settings.port, raise_error=False)
    assert response.code == 426 and response.headers["Upgrade"] == "websocket"
