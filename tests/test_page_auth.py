"""The browser client (marketstream.js) with tokens, in headless Chromium
against a real server process: ``?token=`` on every (re)connect, a fresh
token sent with AUTH before each ``exp`` so that the connection outlives
several tokens, and a user stream delivered all along."""

import time

import jwt
import pytest

from marketstream.testing import wait_until
from tests.helpers import ServerProcess, numsub
from tests.test_page import driver, js, open_page, page  # noqa: F401  (fixtures)

SECRET = "page-test-secret-of-at-least-32-bytes"


@pytest.fixture
def auth_server(redis_url):
    server = ServerProcess(
        "--redis-url",
        redis_url,
        "--set",
        "server.demo_page=true",
        "--set",
        "auth.jwt_key=" + SECRET,
        "--set",
        "auth.leeway=0",
    )
    server.wait_healthy()
    yield server
    server.stop()


def test_the_browser_client_refreshes_its_token_across_expiries(page, auth_server, redis_client):  # noqa: F811
    now = time.time()
    # Tokens of 3 s, each one 3 s later than the one before: the page's token
    # function hands them out in turn.
    tokens = [
        jwt.encode({"sub": "42", "exp": int(now + 4 + 3 * i)}, SECRET, "HS256") for i in range(12)
    ]
    open_page(page, auth_server, "?markets=AUTH_TEST")
    wait_until(lambda: js(page, "return window.marketstream.connected"), 10, message="page")
    page.execute_async_script(
        """
        const [tokens, done] = [arguments[0], arguments[arguments.length - 1]];
        import("/static/marketstream.js").then(({MarketStream}) => {
          let next = 0;
          const client = window.privateClient = new MarketStream({
            token: () => Promise.resolve(tokens[next++]),
          });
          window.privateGot = [];
          client.addEventListener("message", (e) => window.privateGot.push(e.detail.data.n));
          client.connect(`ws://${location.host}/ws`);
          client.subscribe(["account.fills#42"]);
          done();
        });""",
        tokens,
    )
    wait_until(lambda: numsub(redis_client, "account.fills#42") == 1, 10, message="subscribed")
    sent = 0
    started = time.time()
    while time.time() - started < 10:  # past three token lifetimes
        sent += 1
        redis_client.publish(
            "account.fills#42", '{"stream":"account.fills#42","data":{"e":"fill","n":%d}}' % sent
        )
        time.sleep(0.5)
    wait_until(lambda: len(js(page, "return window.privateGot")) == sent, 10, message="all")
    assert js(page, "return window.privateGot") == list(range(1, sent + 1))
    state = js(
        page,
        "const c = window.privateClient;"
        "return {state: c.state, reconnects: c.reconnects, refreshes: c.tokenRefreshes,"
        " lastClose: c.lastClose}",
    )
    assert state["state"] == "open" and state["reconnects"] == 0, state
    assert state["lastClose"] is None and state["refreshes"] >= 3, state
    assert "token expired" not in auth_server.output
