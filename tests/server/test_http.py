"""The HTTP endpoints beside the WebSocket ones (marketstream.server.http):
/health, /metrics, the static files, and the URL map."""

import pytest
import tornado.httpclient
import ujson

from marketstream.server.handlers import StreamHandler
from marketstream.server.http import HealthHandler, MetricsHandler, routes, ws_paths
from tests.helpers import make_settings


@pytest.mark.gen_test
async def test_health_answers_json(server):
    client = tornado.httpclient.AsyncHTTPClient()
    response = await client.fetch("http://127.0.0.1:%d/health" % server.settings.port)
    body = ujson.loads(response.body)
    assert response.code == 200 and body["status"] == "ok"
    assert body["redis"]["connected"] is True
    assert response.headers["Content-Type"] == "application/json"


@pytest.mark.gen_test
async def test_metrics_and_static_files_are_served(server):
    client = tornado.httpclient.AsyncHTTPClient()
    base = "http://127.0.0.1:%d" % server.settings.port
    metrics = await client.fetch(base + "/metrics")
    assert metrics.headers["Content-Type"].startswith("text/plain")
    assert b"marketstream_connections " in metrics.body
    script = await client.fetch(base + "/static/marketstream.js")
    assert b"export class MarketStream" in script.body
    missing = await client.fetch(base + "/static/nothing.js", raise_error=False)
    assert missing.code == 404


def test_the_url_map(redis_url):
    settings = make_settings(redis_url, server__listen="ws://127.0.0.1:4000/feed")
    assert ws_paths(settings) == ["/", "/ws", "/stream", "/feed"]

    class Context:  # what routes() reads of one
        pass

    context = Context()
    context.settings = settings
    table = {path: handler for path, handler, _ in routes(context, exporter=object())}
    assert all(table[path] is StreamHandler for path in ws_paths(settings))
    assert table["/health"] is HealthHandler and table["/metrics"] is MetricsHandler
    assert "/metrics" not in {path for path, _, _ in routes(context)}
