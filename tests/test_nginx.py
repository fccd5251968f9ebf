"""Scale-out: two marketstream instances behind a real nginx, one Redis.

The nginx configuration is the shipped ``conf/nginx.conf`` with only the
upstream servers and the listen port changed (and, for wss://, its TLS
example uncommented with a test certificate).
"""

import asyncio
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import pytest
import redis
import tornado.httpclient
import tornado.websocket
import ujson

from marketstream.testing import RawClient, free_port, handshake_request, wait_until
from tests.helpers import ROOT, ServerProcess

NGINX = shutil.which("nginx") or next(
    (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(path, os.X_OK)),
    None,
)

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (apt-get install nginx-light)"
)

CLIENT_IP = "127.0.0.2"  # clients connect from here; nginx reaches marketstream from 127.0.0.1
STREAM = "trade.NGX_USDT"


def site_config(upstream_ports, listen_port, tls=None):
    """The shipped site with the test's upstream ports and listen port.
    ``tls``: (port, certificate, key) to uncomment the wss:// example too."""
    with open(os.path.join(ROOT, "conf", "nginx.conf")) as handle:
        site = handle.read()
    servers = "".join("    server 127.0.0.1:%d;\n" % port for port in upstream_ports)
    site, count = re.subn(r"(    server 127\.0\.0\.1:\d+;\n)+", servers, site)
    assert count == 1
    site, count = re.subn(
        r"^    listen 80 default_server( backlog=\d+)?;$",
        r"    listen 127.0.0.1:%d default_server\1;" % listen_port,
        site,
        flags=re.M,
    )
    assert count == 1
    if tls:
        tls_port, certificate, key = tls
        block = re.search(r"^#server \{\n.*?^#\}\n", site, re.S | re.M)
        assert block, "no commented TLS server block"
        server = re.sub(r"^#", "", block.group(0), flags=re.M)
        replacements = [
            (r"listen 443 ssl( backlog=\d+)?;", r"listen 127.0.0.1:%d ssl\1;" % tls_port),
            (r"ssl_certificate +\S+;", "ssl_certificate %s;" % certificate),
            (r"ssl_certificate_key +\S+;", "ssl_certificate_key %s;" % key),
        ]
        for pattern, replacement in replacements:
            server, count = re.subn(pattern, replacement, server)
            assert count == 1, pattern
        site += server
    return site


def _write_conf(prefix, site):
    for sub in ("logs", "tmp"):
        os.makedirs(os.path.join(prefix, sub), exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as handle:
        if os.geteuid() == 0:  # nginx's workers need a user that can read the prefix
            handle.write("user root;\n")
        handle.write(
            "worker_processes 1;\npid %s/nginx.pid;\nerror_log %s/logs/error.log warn;\n"
            "events { worker_connections 1024; }\nhttp {\n"
            "  access_log off;\n  client_body_temp_path %s/tmp;\n  proxy_temp_path %s/tmp;\n"
            % (prefix, prefix, prefix, prefix)
        )
        handle.write(site)
        handle.write("\n}\n")
    return conf


@pytest.fixture
def nginx_factory():
    """start(upstream_ports) runs nginx with the shipped site and returns
    its port; start(upstream_ports, site=text) runs nginx on a site of the
    test's own (then the caller picks the ports); check(site) is ``nginx -t``
    on a site: (exit code, output)."""
    started = []
    prefixes = []

    def new_prefix():
        prefix = tempfile.mkdtemp(prefix="marketstream-nginx-")
        prefixes.append(prefix)
        return prefix

    def start(upstream_ports, site=None, wait_port=None):
        prefix = new_prefix()
        port = free_port()
        if site is None:
            site = site_config(upstream_ports, port)
        else:
            port = wait_port
        conf = _write_conf(prefix, site)
        proc = subprocess.Popen(
            [NGINX, "-p", prefix, "-c", conf, "-g", "daemon off;"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        started.append(proc)
        wait_until(lambda: _listening(port) or proc.poll() is not None, 10, message="nginx")
        assert proc.poll() is None, proc.stdout.read().decode()
        return port

    def check(site):
        prefix = new_prefix()
        conf = _write_conf(prefix, site)
        result = subprocess.run(
            [NGINX, "-t", "-p", prefix, "-c", conf], capture_output=True, text=True, timeout=30
        )
        return result.returncode, result.stdout + result.stderr

    start.check = check
    yield start
    for proc in started:
        proc.terminate()
        proc.wait(10)
    for prefix in prefixes:
        shutil.rmtree(prefix, ignore_errors=True)


def _listening(port):
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def connect_client(nginx_port):
    client = await RawClient.connect(nginx_port, source=CLIENT_IP)
    client.port = client.writer.get_extra_info("sockname")[1]
    client.send('{"method":"SUBSCRIBE","params":["%s"],"id":1}' % STREAM)
    opcode, payload = await client.recv()
    assert ujson.loads(payload) == {"result": None, "id": 1}  # acks on: subscribed upstream
    return client


async def expect_messages(client, ts):
    for t in ts:
        opcode, payload = await client.recv()
        assert opcode == 0x1
        assert ujson.loads(payload)["data"]["t"] == t
    # Nothing more in between: the next frame is the answer to this request.
    client.send('{"method":"LIST_SUBSCRIPTIONS","id":2}')
    opcode, payload = await client.recv()
    assert ujson.loads(payload) == {"result": [STREAM], "id": 2}


def test_two_instances_behind_nginx(redis_url, nginx_factory):
    instances = [
        ServerProcess("--redis-url", redis_url, "--acks", "--set", "server.xheaders=true")
        for _ in range(2)
    ]
    publisher = redis.Redis.from_url(redis_url)
    try:
        for instance in instances:
            instance.wait_listening()
        nginx_port = nginx_factory([instance.port for instance in instances])

        def publish(t):
            publisher.publish(STREAM, '{"stream":"%s","data":{"e":"trade","t":%d}}' % (STREAM, t))

        async def scenario():
            clients = [await connect_client(nginx_port) for _ in range(100)]
            # Both instances hold clients, and subscribed upstream once each.
            assert publisher.pubsub_numsub(STREAM)[0][1] == 2
            for t in (1, 2, 3):
                publish(t)
            for client in clients:
                await expect_messages(client, (1, 2, 3))

            # Identities: the client's address from X-Real-IP, unique per connection.
            identities = []
            for instance in instances:
                mine = re.findall(r"connect (\S+)\n", instance.output)
                assert mine, "an instance got no clients"
                identities.append(mine)
            everyone = identities[0] + identities[1]
            assert len(everyone) == 100 and len(set(everyone)) == 100
            # ... and it is the client's own address as nginx saw it.
            assert set(everyone) == {"%s:%d" % (CLIENT_IP, client.port) for client in clients}

            # Stop one instance: only its clients are disconnected (1001).
            instances[0].proc.send_signal(signal.SIGTERM)
            assert instances[0].proc.wait(15) == 0
            # Ask everyone: survivors answer, the others see the close.
            dropped = []
            for index, client in enumerate(clients):
                client.send('{"method":"LIST_SUBSCRIPTIONS","id":3}')
                opcode, payload = await client.recv()
                if opcode == 0x1:
                    assert ujson.loads(payload) == {"result": [STREAM], "id": 3}
                else:
                    assert opcode in (0x8, None)
                    if opcode == 0x8:
                        assert payload[:2] == b"\x03\xe9"  # 1001
                    dropped.append(index)
            assert len(dropped) == len(identities[0])
            # They reconnect through nginx, land on the survivor, get data again.
            for index in dropped:
                clients[index].close()
                clients[index] = await connect_client(nginx_port)
            publish(4)
            for client in clients:
                await expect_messages(client, (4,))
            for client in clients:
                client.close()

        asyncio.run(scenario())
    finally:
        for instance in instances:
            instance.stop()
        publisher.close()


# --- origins and /health through the shipped site ----------------------------


def _upgrade_status(port, origin):
    """The status line nginx on ``port`` answers a browser's upgrade from ``origin`` with."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(handshake_request(port, headers={"Origin": origin}))
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, "closed without an answer"
            data += chunk
    return data.split(b"\r\n")[0].decode()


def test_the_servers_own_page_is_same_origin_behind_nginx(redis_url, nginx_factory):
    """With allowed_origins set, a page served from the address clients use
    (nginx's, with its port) is same-origin: nginx must pass the Host header
    with its port ($http_host; $host drops it, and the page got 403)."""
    instance = ServerProcess(
        "--redis-url",
        redis_url,
        "--set",
        "server.xheaders=true",
        "--set",
        "server.allowed_origins=https://exchange.example",
    )
    try:
        instance.wait_healthy()
        port = nginx_factory([instance.port])
        own = "http://127.0.0.1:%d" % port
        assert _upgrade_status(port, own).startswith("HTTP/1.1 101")
        assert _upgrade_status(port, "https://exchange.example").startswith("HTTP/1.1 101")
        for other in (
            "http://127.0.0.1:%d" % (port + 1),
            "https://evil.example",
            "http://127.0.0.1",
        ):
            assert _upgrade_status(port, other).startswith("HTTP/1.1 403"), other
    finally:
        instance.stop()


def test_health_through_nginx_tells_no_details(instance, nginx_factory):
    """Public /health (nginx proxies it to anyone): status and counts; the
    Redis node, the pid and the counters only to a tool on the host that
    asks the instance directly."""
    port = nginx_factory([instance.port])
    status, body = _get("http://127.0.0.1:%d/health" % port)
    assert status == 200
    assert set(ujson.loads(body)) == {"status", "connections", "streams", "upstream_channels"}
    status, body = _get("http://127.0.0.1:%d/health" % instance.port)
    details = ujson.loads(body)
    assert details["pid"] == instance.proc.pid and details["redis"]["node"]


# --- the shipped file next to Debian's default site, TLS, the smoke test ----

DEBIAN_DEFAULT = """
server {
    listen 127.0.0.1:%d default_server;
    server_name _;
    location / { return 404 "the default site\\n"; }
}
"""


def _get(url, host=None, context=None):
    """(status, body) of a GET, with an optional Host header."""
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def instance(redis_url):
    server = ServerProcess("--redis-url", redis_url)
    server.wait_healthy()
    yield server
    server.stop()


def test_next_to_debians_default_site(instance, nginx_factory):
    port = free_port()
    shipped = site_config([instance.port], port)
    # As shipped (default_server) next to the stock default site, nginx
    # refuses to start and names the clash: nothing is silently shadowed.
    code, output = nginx_factory.check(DEBIAN_DEFAULT % port + shipped)
    assert code != 0 and "duplicate default server" in output, output
    # With the default site disabled, it is the server for any Host.
    nginx_factory([instance.port], site=shipped, wait_port=port)
    status, body = _get("http://127.0.0.1:%d/health" % port, host="anything.example")
    assert status == 200 and ujson.loads(body)["status"] == "ok"


def test_keeping_the_default_site_with_a_real_server_name(instance, nginx_factory):
    # The file's other way out: no default_server, a real server_name.
    port = free_port()
    named = site_config([instance.port], port).replace(
        "default_server backlog=4096;\n    server_name _;",
        "backlog=4096;\n    server_name stream.example.test;",
    )
    assert "server_name stream.example.test;" in named
    code, output = nginx_factory.check(DEBIAN_DEFAULT % port + named)
    assert code == 0, output
    assert "conflicting server name" not in output
    nginx_factory([instance.port], site=DEBIAN_DEFAULT % port + named, wait_port=port)
    status, body = _get("http://127.0.0.1:%d/health" % port, host="stream.example.test")
    assert status == 200 and ujson.loads(body)["status"] == "ok"
    status, body = _get("http://127.0.0.1:%d/health" % port, host="other.example")
    assert status == 404 and body == b"the default site\n"


OPENSSL = shutil.which("openssl")


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
def test_wss_through_the_tls_example(instance, redis_url, nginx_factory, tmp_path):
    certificate, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(
        [
            OPENSSL,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            key,
            "-out",
            certificate,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    port, tls_port = free_port(), free_port()
    site = site_config([instance.port], port, tls=(tls_port, certificate, key))
    nginx_factory([instance.port], site=site, wait_port=tls_port)
    context = ssl.create_default_context(cafile=certificate)
    status, body = _get("https://127.0.0.1:%d/health" % tls_port, context=context)
    assert status == 200 and ujson.loads(body)["status"] == "ok"
    # /metrics stays closed to others there too (nginx sees 127.0.0.1 here,
    # which is allowed, so only check that it is proxied, not the default page).
    status, body = _get("https://127.0.0.1:%d/metrics" % tls_port, context=context)
    assert status == 200 and b"marketstream" in body

    publisher = redis.Redis.from_url(redis_url)

    async def scenario():
        request = tornado.httpclient.HTTPRequest(
            "wss://127.0.0.1:%d/stream?streams=%s" % (tls_port, STREAM), ca_certs=certificate
        )
        ws = await tornado.websocket.websocket_connect(request)
        try:
            await asyncio.to_thread(
                wait_until,
                lambda: publisher.pubsub_numsub(STREAM)[0][1] == 1,
                message="subscribed through wss://",
            )
            frame = '{"stream":"%s","data":{"e":"trade","t":7}}' % STREAM
            publisher.publish(STREAM, frame)
            assert await asyncio.wait_for(ws.read_message(), 5) == frame
        finally:
            ws.close()

    try:
        asyncio.run(scenario())
    finally:
        publisher.close()


def test_smoke_script_through_nginx(redis_url, nginx_factory):
    # A deployment's check: the smoke test against nginx with both instances
    # of the upstream; its resume step may land on the other instance.
    instances = [
        ServerProcess("--redis-url", redis_url, "--set", "server.xheaders=true") for _ in range(2)
    ]
    try:
        for server in instances:
            server.wait_healthy()
        port = nginx_factory([server.port for server in instances])
        environ = {
            key: value
            for key, value in os.environ.items()
            if key not in ("REDIS_URL", "WS_STREAM_URL", "MARKETSTREAM_CONFIG")
        }
        environ.update(REDIS_URL=redis_url, WS_STREAM_URL="ws://127.0.0.1:%d/ws" % port)
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "scripts", "smoke_test.py")],
            cwd=ROOT,
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        lines = result.stdout.splitlines()
        assert [line.split(":", 1)[0] for line in lines[:6]] == [
            "PASS health",
            "PASS connect",
            "PASS subscribe",
            "PASS deliver",
            "PASS unsubscribe",
            "PASS close",
        ], output
        # Positions rose by 1, and the reconnect with "since" got exactly the
        # missed messages, whichever instance nginx sent it to.
        assert lines[6].startswith("PASS positions: 5 messages with positions"), output
        assert "arrived exactly once on resume" in lines[6]
    finally:
        for server in instances:
            server.stop()


def test_the_page_and_the_javascript_client_through_nginx(redis_url, nginx_factory):
    # What the README tells users to import, and the page with its files,
    # through the shipped site as they are directly.
    server = ServerProcess("--redis-url", redis_url, "--set", "server.demo_page=true")
    try:
        server.wait_healthy()
        base = "http://127.0.0.1:%d" % nginx_factory([server.port])
        status, body = _get(base + "/static/marketstream.js")
        assert status == 200 and b"export class MarketStream" in body
        status, page = _get(base + "/")
        assert status == 200 and b"window.marketstream" in _get(base + "/static/app.js")[1]
        files = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.decode())
        assert "/static/app.js" in files and "/static/style.css" in files
        for path in files:
            direct = _get("http://127.0.0.1:%d%s" % (server.port, path))
            assert _get(base + path) == direct, path
    finally:
        server.stop()


def test_compression_passes_through_nginx(instance, redis_url, nginx_factory):
    """nginx passes the permessage-deflate offer and answer through (it
    does not take part in the extension): a compressing client behind it
    gets RSV1 frames that python-websockets inflates."""
    import websockets

    from marketstream.wire.deflate import inflate_frame

    port = nginx_factory([instance.port])
    stream = "depth.NGX_USDT"
    book = ujson.dumps(
        {"stream": stream, "data": {"e": "depth", "b": [["%d.5" % i, "1.25"] for i in range(80)]}}
    )
    client = redis.Redis.from_url(redis_url)

    async def main():
        url = "ws://127.0.0.1:%d/stream?streams=%s" % (port, stream)
        ws = await websockets.connect(url)
        assert ws.response.headers["Sec-WebSocket-Extensions"].startswith(
            "permessage-deflate; server_no_context_takeover"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            handshake_request(
                port,
                "/stream?streams=%s" % stream,
                {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"},
            )
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b"server_no_context_takeover" in head
        await asyncio.to_thread(
            wait_until,
            lambda: client.pubsub_numsub(stream)[0][1] == 1,
            15,
            message="subscribed upstream",
        )
        # Both subscribed in their handshake: the 101 is written, then the
        # stream subscribed, in one step of the server's event loop.
        client.publish(stream, book)
        assert await asyncio.wait_for(ws.recv(), 10) == book
        first = await asyncio.wait_for(reader.readexactly(4), 10)
        assert first[0] == 0xC1 and first[1] & 0x7F == 126, first  # FIN, RSV1, text
        body = await asyncio.wait_for(reader.readexactly(int.from_bytes(first[2:4], "big")), 10)
        assert inflate_frame(first + body).decode() == book
        writer.close()
        await ws.close()

    try:
        asyncio.run(main())
    finally:
        client.close()
