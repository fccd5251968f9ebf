"""Private streams end to end: tokens at connect and in AUTH, user streams,
protected streams, the channels claim, connections per user, expiry and
refresh, resume on a user stream.  A real server in the test's IOLoop,
real Redis, real sockets."""

import asyncio
import re
import time

import jwt
import pytest
import tornado.httpclient
import tornado.websocket
import ujson
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from marketstream.publisher import Publisher
from marketstream.server.config import ConfigError
from marketstream.testing import async_wait_until, handshake_request, open_socket
from tests.helpers import make_settings, read, send, subscribed, ws_url

SECRET = "test-secret-of-at-least-thirty-two-bytes"
AUTH = {"auth__jwt_key": SECRET, "protocol__acks": "true"}


def token(sub="42", exp_in=60.0, key=SECRET, algorithm="HS256", **claims):
    claims = {"sub": sub, **claims}
    if exp_in is not None:
        claims["exp"] = int(time.time() + exp_in)
    return jwt.encode(claims, key, algorithm=algorithm)


def sessions(server):
    """The server's :class:`~marketstream.server.auth.Sessions`."""
    return server.app.context.auth


async def handshake_answer(server, path="/ws", headers=None):
    """(status, body) of a raw WebSocket handshake the server refuses."""
    port = server.settings.port
    sock = await open_socket(port, handshake_request(port, path, headers))
    loop = asyncio.get_running_loop()
    data = b""
    try:
        while True:  # Tornado's path keeps the connection: read the whole response
            head, _, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            if length and len(body) >= int(length.group(1)):
                break
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
            assert chunk, data
            data += chunk
    finally:
        sock.close()
    return int(head.split()[1]), body.decode().strip()


async def connect(server, path="/ws", bearer=None):
    request = tornado.httpclient.HTTPRequest(
        ws_url(server, path),
        headers={"Authorization": "Bearer " + bearer} if bearer else None,
    )
    return await tornado.websocket.websocket_connect(request)


async def reply(ws, request_id):
    """The reply to request ``request_id`` (frames before it skipped)."""
    while True:
        message = ujson.loads(await read(ws))
        if message.get("id") == request_id and "stream" not in message:
            return message


# --- at connect ------------------------------------------------------------------


def bad_tokens():
    """(cause, reason, token) of every kind of bad token at connect."""
    rsa_key = _rsa_key()
    return [
        ("bad_signature", "bad token signature", token(key="another-secret-of-32-bytes-or-more!!")),
        ("expired", "token expired", token(exp_in=-60)),
        ("not_yet_valid", "token not yet valid", token(nbf=int(time.time()) + 600)),
        ("audience", "wrong token audience", token(aud="elsewhere")),
        ("issuer", "wrong token issuer", token(iss="elsewhere")),
        ("algorithm", "token algorithm not allowed", jwt.encode({"sub": "42"}, None, "none")),
        ("algorithm", "token algorithm not allowed", token(key=rsa_key, algorithm="RS256")),
        ("malformed", "malformed token", "not-a-jwt"),
        ("bad_claims", "the token has no sub", jwt.encode({"aud": "exchange"}, SECRET, "HS256")),
    ]


def _rsa_key():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize("fast", ["true", "false"], ids=["shortcut", "tornado"])
@pytest.mark.gen_test(timeout=60)
async def test_a_bad_token_at_connect_is_http_401_with_its_reason(server_factory, fast):
    server = await server_factory(
        server__fast_handshake=fast, auth__jwt_audience="exchange", auth__jwt_issuer="auth", **AUTH
    )
    counters = server.manager.counters
    good = token(aud="exchange", iss="auth")
    for cause, reason, bad in bad_tokens():
        if cause == "audience":
            bad = token(aud="elsewhere", iss="auth")
        elif cause == "issuer":
            bad = token(aud="exchange", iss="elsewhere")
        elif cause == "bad_claims":
            bad = jwt.encode({"aud": "exchange", "iss": "auth"}, SECRET, "HS256")
        before = counters.auth_refused[cause]
        for where in ("query", "header"):
            if where == "query":
                status, body = await handshake_answer(server, "/ws?token=" + bad)
            else:
                status, body = await handshake_answer(
                    server, headers={"Authorization": "Bearer " + bad}
                )
            assert (status, body) == (401, reason), (cause, where)
        assert counters.auth_refused[cause] == before + 2, cause
    assert not server.manager.connections
    # A good one opens, on either way of giving it.
    ws = await connect(server, "/ws?token=" + good)
    ws2 = await connect(server, bearer=good)
    await async_wait_until(lambda: len(sessions(server).grants) == 2)
    assert counters.auth_accepted == 2
    ws.close()
    ws2.close()


@pytest.mark.gen_test
async def test_required_refuses_anonymous_connections(server_factory):
    server = await server_factory(auth__required="true", **AUTH)
    assert await handshake_answer(server) == (401, "token required")
    assert server.manager.counters.auth_refused["missing"] == 1
    assert server.manager.counters.refused["unauthorized"] == 1
    ws = await connect(server, bearer=token())
    await send(ws, "LIST_SUBSCRIPTIONS")
    assert ujson.loads(await read(ws)) == {"result": [], "id": 1}


@pytest.mark.gen_test
async def test_without_auth_tokens_are_ignored_and_user_streams_refused(server, redis_client):
    ws = await connect(server, "/ws?token=whatever")
    await ws.write_message(
        ujson.dumps({"method": "SUBSCRIBE", "params": ["account.orders#42"], "id": 1, "acks": True})
    )
    answer = await reply(ws, 1)
    assert "error" in answer and "account.orders#42" in answer["error"]["msg"]
    assert server.manager.counters.rejected["user_stream"] == 1
    await send(ws, "AUTH", [token()], request_id=2)
    assert (await reply(ws, 2))["error"]["msg"] == "authentication is not configured"


@pytest.mark.gen_test
async def test_max_connections_per_user(server_factory):
    server = await server_factory(auth__max_connections_per_user="2", **AUTH)
    first = await connect(server, bearer=token("7"))
    second = await connect(server, "/ws?token=" + token("7"))
    await async_wait_until(lambda: sessions(server).per_user.get("7") == 2)
    assert await handshake_answer(server, "/ws?token=" + token("7")) == (
        429,
        "too many connections for this user",
    )
    # Another user, and an anonymous connection AUTHenticating as 7: refused too.
    other = await connect(server, bearer=token("8"))
    anonymous = await connect(server)
    await send(anonymous, "AUTH", [token("7")], request_id=5)
    assert "error" in await reply(anonymous, 5)
    assert server.manager.counters.refused["max_connections_per_user"] == 2
    first.close()
    await async_wait_until(lambda: sessions(server).per_user.get("7") == 1)
    third = await connect(server, bearer=token("7"))
    for ws in (second, third, other, anonymous):
        ws.close()


# --- user streams ----------------------------------------------------------------


@pytest.mark.gen_test
async def test_a_user_stream_goes_to_its_owner_only(server_factory, redis_client):
    server = await server_factory(**AUTH)
    owner = await connect(server, bearer=token("42"))
    other = await connect(server, bearer=token("43"))
    anonymous = await connect(server)
    request = {
        "method": "SUBSCRIBE",
        "params": ["account.orders#42", "trade.SOL_USDC"],
        "id": 1,
    }
    for ws in (owner, other, anonymous):
        await ws.write_message(ujson.dumps(request))
    assert (await reply(owner, 1)) == {"result": None, "id": 1}
    for ws, why in ((other, "belongs to another user"), (anonymous, "authenticated")):
        answer = await reply(ws, 1)
        assert why in answer["error"]["msg"], answer
        # The other stream of the request is subscribed as usual.
        await send(ws, "LIST_SUBSCRIPTIONS", request_id=2)
        assert (await reply(ws, 2))["result"] == ["trade.SOL_USDC"]
    assert server.manager.counters.rejected["user_stream"] == 2
    await subscribed(redis_client, "account.orders#42")
    payload = '{"stream":"account.orders#42","data":{"e":"order","i":1}}'
    redis_client.publish("account.orders#42", payload)
    redis_client.publish("trade.SOL_USDC", '{"stream":"trade.SOL_USDC","data":{"e":"trade"}}')
    assert await read(owner) == payload
    for ws in (other, anonymous):
        assert ujson.loads(await read(ws))["stream"] == "trade.SOL_USDC"


@pytest.mark.gen_test
async def test_user_streams_in_the_stream_url_and_resume(server_factory, redis_url):
    """%23 in a /stream URL; since and snapshot on a user stream published
    through the Publisher, as for public streams."""
    server = await server_factory(**AUTH)
    publisher = Publisher(redis_url)
    stream = "account.orders#u-1"
    seqs = [
        publisher.publish(stream, {"e": "order", "i": i}, snapshot={"open": i}) for i in range(3)
    ]
    ws = await connect(
        server,
        "/stream?streams=account.orders%23u-1&since=account.orders%23u-1:" + str(seqs[0]),
        bearer=token("u-1"),
    )
    got = [ujson.loads(await read(ws)) for _ in range(2)]
    assert [(m["stream"], m["seq"], m["data"]["i"]) for m in got] == [
        (stream, seqs[1], 1),
        (stream, seqs[2], 2),
    ]
    await ws.write_message(
        ujson.dumps({"method": "SUBSCRIBE", "params": [stream], "id": 3, "snapshot": True})
    )
    late = await connect(server, bearer=token("u-1"))
    await late.write_message(
        ujson.dumps({"method": "SUBSCRIBE", "params": [stream], "id": 3, "snapshot": True})
    )
    snap = ujson.loads(await read(late))
    if "stream" not in snap:  # the acknowledgement
        snap = ujson.loads(await read(late))
    assert snap == {"stream": stream, "data": {"open": 2}, "seq": seqs[2]}
    publisher.close()


@pytest.mark.gen_test
async def test_protected_streams_and_the_channels_claim(server_factory, redis_client):
    server = await server_factory(auth__protected="depth.full.*", **AUTH)
    anonymous = await connect(server)
    plain = await connect(server, bearer=token("1"))
    granted = await connect(server, bearer=token("2", channels=["raw.*"]))
    names = ["depth.full.BTC_USDT", "raw.BTC_USDT"]
    for ws in (anonymous, plain, granted):
        await send(ws, "SUBSCRIBE", names)
        await send(ws, "LIST_SUBSCRIPTIONS", request_id=2)
    assert (await reply(anonymous, 2))["result"] == []
    assert (await reply(plain, 2))["result"] == ["depth.full.BTC_USDT"]
    assert (await reply(granted, 2))["result"] == names
    counters = server.manager.counters
    assert counters.rejected["protected"] == 1
    assert counters.rejected["unknown_type"] == 2  # raw.* for anonymous and plain
    # The claim never grants another user's stream.
    greedy = await connect(server, bearer=token("3", channels=["*"]))
    await send(greedy, "SUBSCRIBE", ["account.orders#42"], request_id=4)
    assert "another user" in (await reply(greedy, 4))["error"]["msg"]


# --- AUTH, expiry and refresh ------------------------------------------------------


@pytest.mark.gen_test
async def test_auth_message_authenticates_and_a_bad_one_changes_nothing(server_factory):
    server = await server_factory(**AUTH)
    ws = await connect(server)
    failed = server.manager.counters.auth_failed
    await send(ws, "AUTH", [token(exp_in=-60)], request_id=1)
    assert (await reply(ws, 1))["error"]["msg"] == "token expired"
    await send(ws, "SUBSCRIBE", ["account.orders#42"], request_id=2)
    assert "error" in await reply(ws, 2)  # still anonymous
    good = token("42", exp_in=600)
    await send(ws, "AUTH", [good], request_id=3)
    answer = await reply(ws, 3)
    assert answer["result"]["sub"] == "42"
    assert answer["result"]["exp"] == jwt.decode(good, SECRET, ["HS256"])["exp"]
    await send(ws, "SUBSCRIBE", ["account.orders#42"], request_id=4)
    assert await reply(ws, 4) == {"result": None, "id": 4}
    # Another sub on an authenticated connection: refused, nothing changes.
    await send(ws, "AUTH", [token("43")], request_id=5)
    assert (await reply(ws, 5))["error"]["msg"] == "the token is for another sub"
    assert failed["expired"] == 1 and failed["wrong_sub"] == 1
    assert server.manager.counters.auth_refreshed == 1
    # A bad token's reply comes even with acks off, and it is not an invalid frame.
    quiet = await server_factory(auth__jwt_key=SECRET)
    ws2 = await connect(quiet)
    await send(ws2, "AUTH", ["garbage"], request_id=9)
    assert (await reply(ws2, 9))["error"]["msg"] == "malformed token"


async def closed_with(ws, timeout=15):
    """(code, reason) once the server closes ``ws``."""

    async def drain():
        while await ws.read_message() is not None:
            pass

    await asyncio.wait_for(drain(), timeout)
    return ws.close_code, ws.close_reason


@pytest.mark.gen_test(timeout=60)
async def test_expiry_closes_at_exp_and_refresh_moves_it(server_factory):
    server = await server_factory(auth__leeway="0", **AUTH)
    exp = int(time.time()) + 3
    expiring = await connect(server, bearer=jwt.encode({"sub": "a", "exp": exp}, SECRET))
    refreshed = await connect(server, "/ws?token=" + jwt.encode({"sub": "b", "exp": exp}, SECRET))
    later = exp + 3
    await send(refreshed, "AUTH", [jwt.encode({"sub": "b", "exp": later}, SECRET)], request_id=1)
    assert (await reply(refreshed, 1))["result"]["exp"] == later
    assert await closed_with(expiring) == (4001, "token expired")
    closed_at = time.time()
    assert exp <= closed_at < exp + 2  # at the second (the machine may be slow)
    assert refreshed.protocol is not None and refreshed.close_code is None
    assert await closed_with(refreshed) == (4001, "token expired")
    assert later <= time.time() < later + 2
    assert server.manager.counters.closed["token_expired"] == 2
    await async_wait_until(lambda: not sessions(server).grants)


# --- the property: nobody reads another user's stream -------------------------------

USERS = st.sampled_from(["1", "2", "alice", "bob@example.com", "x-y_z"])


@pytest.mark.gen_test(timeout=120)
async def test_a_user_never_receives_another_users_messages(server_factory, redis_client):
    server = await server_factory(**AUTH)

    @hsettings(
        max_examples=15,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    @given(
        st.lists(st.one_of(st.none(), USERS), min_size=1, max_size=5),
        st.lists(st.tuples(st.sampled_from(["orders", "fills"]), USERS), min_size=1, max_size=6),
    )
    def scenario(subs, streams):
        examples.append((subs, streams))

    examples = []
    scenario()
    for number, (subs, streams) in enumerate(examples):
        names = sorted({"account.%s#%s" % pair for pair in streams})
        clients = []
        for sub in subs:
            ws = await connect(server, bearer=None if sub is None else token(sub))
            # Everyone asks for every stream, by AUTH or at connect.
            await send(ws, "SUBSCRIBE", names, request_id=number)
            await reply(ws, number)
            clients.append((sub, ws))
        owned = {name for name in names for sub in subs if sub and name.endswith("#" + sub)}
        for name in owned:
            await subscribed(redis_client, name)
        marker = "trade.END_%d" % number
        for _, ws in clients:
            await send(ws, "SUBSCRIBE", [marker], request_id=1000 + number)
            await reply(ws, 1000 + number)
        await subscribed(redis_client, marker)
        for name in names:
            redis_client.publish(name, '{"stream":"%s","data":{"e":"x"}}' % name)
        redis_client.publish(marker, '{"stream":"%s","data":{"e":"end"}}' % marker)
        for sub, ws in clients:
            received = []
            while True:
                stream = ujson.loads(await read(ws, timeout=10))["stream"]
                if stream == marker:
                    break
                received.append(stream)
            mine = sorted(name for name in names if sub is not None and name.endswith("#" + sub))
            assert sorted(received) == mine, (sub, names)
            ws.close()


# --- configuration ----------------------------------------------------------------


def test_a_key_file_that_cannot_be_read_stops_start_up(tmp_path, redis_url):
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match=r"\[auth\] jwt_key: cannot read the public key file"):
        make_settings(redis_url, auth__jwt_key=missing, auth__jwt_algorithms="RS256")
    with pytest.raises(ConfigError, match="cannot be mixed"):
        make_settings(redis_url, auth__jwt_key=missing, auth__jwt_algorithms="HS256, RS256")
    with pytest.raises(ConfigError, match="none"):
        make_settings(redis_url, auth__jwt_algorithms="none")
    with pytest.raises(ConfigError, match="required = true needs"):
        make_settings(redis_url, auth__required="true")


def test_a_public_key_as_the_hmac_secret_stops_start_up(redis_url):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(ConfigError, match=r"\[auth\] jwt_key: the key is no HMAC secret"):
        make_settings(redis_url, auth__jwt_key=pem, auth__jwt_algorithms="HS256")


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
@pytest.mark.gen_test
async def test_public_key_algorithms(server_factory, tmp_path, algorithm):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    private = {
        "RS256": _rsa_key,
        "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate,
    }[algorithm]()
    pem = tmp_path / "public.pem"
    pem.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    server = await server_factory(auth__jwt_key=str(pem), auth__jwt_algorithms=algorithm)
    ws = await connect(server, bearer=token("k", key=private, algorithm=algorithm))
    await async_wait_until(lambda: sessions(server).grants)
    ws.close()
    # An HS256 token signed with the public key's text: the algorithm confusion attack.
    forged = jwt.encode({"sub": "k"}, "x" * 40, algorithm="HS256")
    assert (await handshake_answer(server, "/ws?token=" + forged))[0] == 401
    assert server.manager.counters.auth_refused["algorithm"] == 1


def test_pyjwt_is_loaded_only_where_auth_is_configured():
    """PyJWT with cryptography costs a process about 10 MB: a server without
    ``[auth] jwt_key`` never imports it, one with it does."""
    import subprocess
    import sys

    program = (
        "import sys\n"
        "from marketstream.server.config import load_settings\n"
        "from marketstream.server.channels import ChannelManager\n"
        "from marketstream.server.context import Context\n"
        "flat = {'redis.url': 'redis://127.0.0.1:1'}\n"
        "if sys.argv[1] == 'auth':\n"
        "    flat['auth.jwt_key'] = 'a-secret-of-at-least-thirty-two-bytes!'\n"
        "settings = load_settings(environ={}, overrides=flat)\n"
        "Context(settings, ChannelManager('redis://127.0.0.1:1'))\n"
        "print(sorted(set(sys.modules) & {'jwt', 'cryptography.hazmat'}))\n"
    )
    # (redis-py imports the top of the cryptography package, a few kB: not
    # its bindings to OpenSSL.)
    for mode, loaded in (("plain", "[]"), ("auth", "['cryptography.hazmat', 'jwt']")):
        out = subprocess.run(
            [sys.executable, "-c", program, mode], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == loaded, (mode, out.stdout, out.stderr)
