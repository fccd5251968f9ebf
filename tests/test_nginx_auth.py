"""Private streams through the shipped nginx site, two instances on one
Redis: a token as ``Authorization: Bearer`` and as ``?token=`` reaches the
servers, a bad one is answered 401 through nginx, and a user stream
(``%23`` in the URL) resumes from history and goes live on both
instances."""

import asyncio
import time

import jwt
import pytest
import tornado.httpclient
import tornado.websocket
import ujson

from marketstream.publisher import Publisher
from tests.helpers import ServerProcess, numsub
from tests.test_nginx import NGINX, nginx_factory  # noqa: F401  (the fixture)

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")

SECRET = "nginx-test-secret-of-at-least-32-bytes"
STREAM = "account.fills#u7"


def token(sub="u7"):
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, "HS256")


@pytest.fixture
def instances(redis_url):
    servers = [
        ServerProcess(
            "--redis-url",
            redis_url,
            "--set",
            "auth.jwt_key=" + SECRET,
            "--set",
            "auth.required=true",
        )
        for _ in range(2)
    ]
    try:
        for server in servers:
            server.wait_healthy()
        yield servers
    finally:
        for server in servers:
            server.stop()


def test_tokens_and_user_streams_through_nginx(redis_url, redis_client, instances, nginx_factory):  # noqa: F811
    port = nginx_factory([server.port for server in instances])
    base = "ws://127.0.0.1:%d" % port
    publisher = Publisher(redis_url)
    first = publisher.publish(STREAM, {"e": "fill", "n": 1})
    publisher.publish(STREAM, {"e": "fill", "n": 2})

    async def scenario():
        # A bad token: nginx passes on the server's 401 and its reason.
        for request in (
            tornado.httpclient.HTTPRequest(base + "/ws?token=forged"),
            tornado.httpclient.HTTPRequest(
                base + "/ws", headers={"Authorization": "Bearer " + token()[:-4] + "AAAA"}
            ),
            tornado.httpclient.HTTPRequest(base + "/ws"),  # required: no token, no connection
        ):
            with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
                await tornado.websocket.websocket_connect(request)
            assert refused.value.code == 401
        # Good tokens, both ways; least_conn spreads the four over both instances.
        path = "/stream?streams=account.fills%%23u7&since=account.fills%%23u7:%d" % (first - 1)
        clients = []
        for index in range(4):
            if index % 2:
                request = tornado.httpclient.HTTPRequest(base + path + "&token=" + token())
            else:
                request = tornado.httpclient.HTTPRequest(
                    base + path, headers={"Authorization": "Bearer " + token()}
                )
            clients.append(await tornado.websocket.websocket_connect(request))
        for ws in clients:  # the history, from both instances
            got = [ujson.loads(await asyncio.wait_for(ws.read_message(), 10)) for _ in range(2)]
            assert [(m["stream"], m["data"]["n"]) for m in got] == [(STREAM, 1), (STREAM, 2)]
        deadline = time.monotonic() + 20
        while numsub(redis_client, STREAM) < 2:  # one channel per instance
            assert time.monotonic() < deadline, "both instances subscribed"
            await asyncio.sleep(0.05)
        live = publisher.publish(STREAM, {"e": "fill", "n": 3})
        for ws in clients:
            message = ujson.loads(await asyncio.wait_for(ws.read_message(), 10))
            assert (message["seq"], message["data"]["n"]) == (live, 3)
        # Another user through nginx: refused that stream.
        other = await tornado.websocket.websocket_connect(
            tornado.httpclient.HTTPRequest(base + "/ws?token=" + token("u8"))
        )
        await other.write_message(
            ujson.dumps({"method": "SUBSCRIBE", "params": [STREAM], "id": 1, "acks": True})
        )
        answer = ujson.loads(await asyncio.wait_for(other.read_message(), 10))
        assert "another user" in answer["error"]["msg"]
        for ws in clients + [other]:
            ws.close()

    asyncio.run(scenario())
    publisher.close()
