"""Scale-out: two marketstream instances behind a real nginx, one Redis.

The nginx configuration is the shipped ``conf/nginx.conf`` with only the
upstream servers and the listen port changed.
"""

import asyncio
import os
import re
import shutil
import signal
import subprocess
import tempfile

import pytest
import redis
import ujson

from marketstream.embedded import free_port
from tests.helpers import ROOT, RawClient, ServerProcess, wait_until

NGINX = shutil.which("nginx") or next(
    (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(path, os.X_OK)), None)

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")

CLIENT_IP = "127.0.0.2"  # clients connect from here; nginx reaches marketstream from 127.0.0.1
STREAM = "trade.NGX_USDT"


def site_config(upstream_ports, listen_port):
    with open(os.path.join(ROOT, "conf", "nginx.conf")) as handle:
        site = handle.read()
    servers = "".join("    server 127.0.0.1:%d;\n" % port for port in upstream_ports)
    site, count = re.subn(r"(    server 127\.0\.0\.1:\d+;\n)+", servers, site)
    assert count == 1
    site, count = re.subn(r"listen 80;", "listen 127.0.0.1:%d;" % listen_port, site)
    assert count == 1
    return site


@pytest.fixture
def nginx_factory():
    started = []

    def start(upstream_ports):
        prefix = tempfile.mkdtemp(prefix="marketstream-nginx-")
        port = free_port()
        for sub in ("logs", "tmp"):
            os.makedirs(os.path.join(prefix, sub))
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w") as handle:
            handle.write("worker_processes 1;\npid %s/nginx.pid;\nerror_log %s/logs/error.log warn;\n"
                         "events { worker_connections 1024; }\nhttp {\n"
                         "  access_log off;\n  client_body_temp_path %s/tmp;\n  proxy_temp_path %s/tmp;\n"
                         % (prefix, prefix, prefix, prefix))
            handle.write(site_config(upstream_ports, port))
            handle.write("\n}\n")
        if os.geteuid() == 0:  # nginx's workers need a user that can read the prefix
            with open(conf) as handle:
                text = handle.read()
            with open(conf, "w") as handle:
                handle.write("user root;\n" + text)
        proc = subprocess.Popen([NGINX, "-p", prefix, "-c", conf, "-g", "daemon off;"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        started.append((proc, prefix))
        wait_until(lambda: _listening(port) or proc.poll() is not None, 10, message="nginx")
        assert proc.poll() is None, proc.stdout.read().decode()
        return port

    yield start
    for proc, prefix in started:
        proc.terminate()
        proc.wait(10)
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
    instances = [ServerProcess("--redis-url", redis_url, "--acks", "--set", "server.xheaders=true")
                 for _ in range(2)]
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
