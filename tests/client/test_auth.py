"""The Python client and marketstream-tail with tokens, against a real
server and Redis: a token on every (re)connect, refreshed with AUTH
before each exp so that the connection outlives several tokens."""

import asyncio
import io
import time

import jwt
import pytest

from marketstream.client import Client
from marketstream.client.auth import TokenKeeper, refresh_delay, token_expiry
from marketstream.client.tail import build_parser, tail
from marketstream.testing import async_wait_until
from tests.helpers import subscribed

SECRET = "test-secret-of-at-least-thirty-two-bytes"


def make_token(sub="42", lifetime=3.0):
    return jwt.encode({"sub": sub, "exp": int(time.time() + lifetime)}, SECRET, "HS256")


def test_refresh_comes_before_exp():
    token = make_token(lifetime=100)
    exp = token_expiry(token)
    assert exp is not None and abs(exp - (time.time() + 100)) < 2
    assert refresh_delay(exp, exp - 100) == 70.0
    assert refresh_delay(exp, exp + 5) == 0.0
    assert token_expiry("not a token") is None
    with pytest.raises(TypeError):
        TokenKeeper(42)


@pytest.mark.gen_test(timeout=90)
async def test_the_client_refreshes_across_several_expiries(server_factory, redis_client):
    """Tokens of 3 s; the server closes at exp (leeway 0): without the
    refresh the connection would end with 4001 within 3 s."""
    server = await server_factory(auth__jwt_key=SECRET, auth__leeway="0")
    fetched = []

    async def fresh():
        fetched.append(time.time())
        return make_token(lifetime=3)

    states = []
    client = Client(
        "ws://127.0.0.1:%d/ws" % server.settings.port,
        ["account.fills#42"],
        token=fresh,
        on_state=states.append,
    )
    received = []

    async def consume():
        async for message in client:
            received.append(message.data["n"])

    task = asyncio.ensure_future(consume())
    await async_wait_until(lambda: client.connected, timeout=20)
    await subscribed(redis_client, "account.fills#42")
    started = time.time()
    n = 0
    while time.time() - started < 10:  # three token lifetimes and more
        n += 1
        redis_client.publish(
            "account.fills#42", '{"stream":"account.fills#42","data":{"e":"fill","n":%d}}' % n
        )
        await asyncio.sleep(0.5)
    await async_wait_until(lambda: len(received) == n, timeout=20)
    assert received == list(range(1, n + 1))
    assert client.connects == 1 and "disconnected" not in states, client.disconnect_reason
    assert client.auth.refreshes >= 3
    assert server.manager.counters.closed["token_expired"] == 0
    assert server.manager.counters.auth_refreshed >= 3
    await client.close()
    await task


@pytest.mark.gen_test(timeout=60)
async def test_a_reconnection_fetches_a_fresh_token(server_factory, redis_client):
    server = await server_factory(auth__jwt_key=SECRET)
    tokens = []

    def fresh():
        tokens.append(make_token(lifetime=600))
        return tokens[-1]

    client = Client(
        "ws://127.0.0.1:%d/ws" % server.settings.port, ["account.orders#42"], token=fresh
    )
    task = asyncio.ensure_future(client.__anext__())
    await async_wait_until(lambda: client.connected)
    for conn in list(server.manager.connections):
        conn.close(1001, "going away")
    await async_wait_until(lambda: client.connects == 2, timeout=20)
    assert len(tokens) == 2
    await client.close()
    task.cancel()


@pytest.mark.gen_test(timeout=60)
async def test_tail_follows_a_private_stream_with_a_token(server_factory, redis_client, tmp_path):
    server = await server_factory(auth__jwt_key=SECRET, auth__required="true")
    url = "ws://127.0.0.1:%d/ws" % server.settings.port
    path = tmp_path / "token"
    path.write_text(make_token(lifetime=600) + "\n")
    for option in (["--token", make_token(lifetime=600)], ["--token-file", str(path)]):
        args = build_parser().parse_args(
            ["account.orders#42", "--url", url, "--count", "1", "--timeout", "20", *option]
        )
        out, err = io.StringIO(), io.StringIO()
        run = asyncio.ensure_future(tail(args, out, err))
        await subscribed(redis_client, "account.orders#42")
        payload = '{"stream":"account.orders#42","data":{"e":"order"}}'
        while not run.done():
            redis_client.publish("account.orders#42", payload)
            await asyncio.sleep(0.2)
        assert run.result() == 0, err.getvalue()
        assert out.getvalue().splitlines()[0] == payload
        await async_wait_until(lambda: not server.manager.connections)
    # Without a token: refused (401) and retried, never printing.
    args = build_parser().parse_args(["account.orders#42", "--url", url, "--timeout", "1"])
    err = io.StringIO()
    assert await tail(args, io.StringIO(), err) == 0
    assert "401" in err.getvalue()


def test_tail_takes_the_token_from_the_environment(monkeypatch):
    monkeypatch.setenv("MARKETSTREAM_TOKEN", "abc")
    assert build_parser().parse_args(["trade.A_B"]).token == "abc"
