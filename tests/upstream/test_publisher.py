"""Recoverable publishing against a real redis-server >= 7 (SPUBLISH), also a
one-node Redis Cluster: positions, history, TTL, snapshots, resets, the raw
EVALSHA call other languages make, concurrency, and AsyncPublisher."""

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import ujson

from marketstream.testing import RedisServer, wait_until
from marketstream.publisher import (
    SCRIPT,
    SCRIPT_SHA,
    AsyncPublisher,
    Publisher,
    check_stream_name,
    stream_keys,
)


def _redis7_binary():
    for candidate in (
        os.environ.get("MARKETSTREAM_REDIS7_SERVER"),
        shutil.which("redis-server"),
        "/usr/bin/redis-server",
    ):
        if candidate and os.access(candidate, os.X_OK):
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True).stdout
            version = out.split("v=", 1)[1].split()[0] if "v=" in out else "0"
            if int(version.split(".")[0]) >= 7:
                return candidate
    return None


@pytest.fixture(scope="session")
def redis7_server():
    """A redis-server >= 7 (the session's default one may be 6.2), with a
    unix socket too."""
    binary = _redis7_binary()
    if binary is None:
        pytest.skip("needs redis-server >= 7")
    directory = tempfile.mkdtemp(prefix="marketstream-test-")
    sock = os.path.join(directory, "redis.sock")
    server = RedisServer(binary=binary, extra_args=["--unixsocket", sock]).start()
    server.unix_socket = sock
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def r7(redis7_server):
    """A client of an empty redis7_server."""
    if not redis7_server.running:
        redis7_server.restart()
    client = redis.Redis(port=redis7_server.port)
    client.flushall()
    client.script_flush()
    yield client
    client.close()


@pytest.fixture(scope="session")
def cluster7():
    """A one-node Redis Cluster (all slots on one primary)."""
    binary = _redis7_binary()
    if binary is None:
        pytest.skip("needs redis-server >= 7")
    server = RedisServer(
        binary=binary,
        extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"],
    ).start()
    client = redis.Redis(port=server.port)
    client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
    wait_until(
        lambda: b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO"),
        timeout=10,
        message="cluster state ok",
    )
    client.close()
    yield server
    server.stop()


def frame(stream, data_json, seq):
    return '{"stream":"%s","data":%s,"seq":%d}' % (stream, data_json, seq)


def drain(pubsub, count, kind="message", timeout=5.0):
    received = []

    def enough():
        message = pubsub.get_message(timeout=0.05)
        while message is not None:
            if message["type"] == kind:
                received.append(message["data"])
            message = pubsub.get_message(timeout=0)
        return len(received) >= count

    wait_until(enough, timeout=timeout, message="%d %s(s)" % (count, kind))
    return received


def subscribed(client, *channels, sharded=False):
    pubsub = client.pubsub()
    (pubsub.ssubscribe if sharded else pubsub.subscribe)(*channels)
    drain(pubsub, len(channels), kind="ssubscribe" if sharded else "subscribe")
    return pubsub


def test_positions_rise_by_one_and_payload_is_prefix_plus_frame(r7):
    pubsub = subscribed(r7, "trade.SOL_USDC")
    with Publisher(r7) as pub:
        data = [{"e": "trade", "t": i, "s": "é/x"} for i in range(50)]
        seqs = [pub.publish("trade.SOL_USDC", d) for d in data]
    assert seqs == list(range(seqs[0], seqs[0] + 50))
    assert all(type(s) is int and 0 < s < 2**53 for s in seqs)
    payloads = drain(pubsub, 50)
    pubsub.close()
    for seq, d, payload in zip(seqs, data, payloads):
        compact = ujson.dumps(d, ensure_ascii=False, escape_forward_slashes=False)
        assert payload == ("@%d %s" % (seq, frame("trade.SOL_USDC", compact, seq))).encode()
    assert int(r7.get("{trade.SOL_USDC}:seq")) == seqs[-1]


def test_encoded_json_passes_through_verbatim(r7):
    pubsub = subscribed(r7, "trade.A_B")
    pub = Publisher(r7)
    s1 = pub.publish("trade.A_B", '{"p": "1.50",  "x":[1, 2]}')
    s2 = pub.publish("trade.A_B", b'{"raw":true}')
    s3 = pub.publish("trade.A_B", {"e": "trade"}, snapshot=bytearray(b'{"book":[]}'))
    assert drain(pubsub, 3) == [
        ("@%d " % s1 + frame("trade.A_B", '{"p": "1.50",  "x":[1, 2]}', s1)).encode(),
        ("@%d " % s2 + frame("trade.A_B", '{"raw":true}', s2)).encode(),
        ("@%d " % s3 + frame("trade.A_B", '{"e":"trade"}', s3)).encode(),
    ]
    pubsub.close()
    assert (
        r7.get("{trade.A_B}:snap") == ("@%d " % s3 + frame("trade.A_B", '{"book":[]}', s3)).encode()
    )


@pytest.mark.parametrize(
    "data",
    [
        "",
        "not json",
        "[1, 2]",
        '"text"',
        "1",
        "null",
        '{"p":1',
        '{"p":NaN}',
        '{"p":01}',
        '{"p":1}, "stream": "trade.OTHER_X"',
        '{"p":1} {"q":2}',
        b'{"p":"\xff"}',
        b'{"p":"caf\xe9"}',
        '{"p":"\ud800"}',
        [1, "two"],
        5,
        None,
        True,
        ("a",),
        memoryview(b"[]"),
    ],
)
def test_data_that_is_not_one_json_object_is_refused(data, r7):
    """What a server would drop (not one JSON object, or not UTF-8) never
    reaches Redis: neither as data nor as a snapshot."""
    pub = Publisher(r7)
    with pytest.raises(ValueError, match="must be one JSON object"):
        pub.publish("trade.A_B", data)
    if data not in (None, True, False):  # those choose the snapshot mode
        with pytest.raises(ValueError, match="must be one JSON object"):
            pub.publish("trade.A_B", {"e": "trade"}, snapshot=data)
    with pytest.raises(ValueError, match="must be one JSON object"):
        pub.publish_many([("trade.A_B", {"ok": 1}), ("trade.A_B", data)])
    assert r7.dbsize() == 0


def test_history_is_trimmed_to_exactly_history_messages(r7):
    pub = Publisher(r7, history=5)
    seqs = pub.publish_many([("trade.A_B", {"i": i}) for i in range(20)])
    assert seqs == list(range(seqs[0], seqs[0] + 20))
    entries = r7.xrange("{trade.A_B}:log")
    assert [e[0] for e in entries] == [b"%d-0" % s for s in seqs[-5:]]
    assert [ujson.loads(e[1][b"p"].split(b" ", 1)[1])["data"]["i"] for e in entries] == list(
        range(15, 20)
    )
    assert all(e[1][b"p"].startswith(b"@%d " % s) for e, s in zip(entries, seqs[-5:]))


def test_history_zero_keeps_positions_but_no_history(r7):
    Publisher(r7, history=3).publish("trade.A_B", {"i": 0})
    pub = Publisher(r7, history=0)
    seqs = [pub.publish("trade.A_B", {"i": i}) for i in range(5)]
    assert seqs == list(range(seqs[0], seqs[0] + 5))
    assert not r7.exists("{trade.A_B}:log")


def test_ttl_applies_to_all_keys_and_zero_means_no_expiry(r7):
    keys = stream_keys("depth.A_B")
    Publisher(r7, ttl=60).publish("depth.A_B", {"d": 1}, snapshot={"full": 1})
    assert all(0 < r7.ttl(key) <= 60 for key in keys)
    Publisher(r7, ttl=0).publish("depth.A_B", {"d": 2}, snapshot={"full": 2})
    assert [r7.ttl(key) for key in keys] == [-1, -1, -1]
    Publisher(r7, ttl=1).publish("depth.A_B", {"d": 3}, snapshot=True)
    wait_until(lambda: r7.exists(*keys) == 0, timeout=5, message="keys expired")


def test_snapshot_modes(r7):
    pub = Publisher(r7)
    pub.publish("ticker.A_B", {"e": "ticker", "c": "1"})
    assert r7.get("{ticker.A_B}:snap") is None
    seq = pub.publish("ticker.A_B", {"e": "ticker", "c": "2"}, snapshot=True)
    assert (
        r7.get("{ticker.A_B}:snap")
        == ("@%d " % seq + frame("ticker.A_B", '{"e":"ticker","c":"2"}', seq)).encode()
    )
    seq = pub.publish(
        "depth.A_B",
        {"e": "depth", "U": 5, "u": 6},
        snapshot={"e": "depthSnapshot", "u": 6, "b": [["1", "2"]], "a": []},
    )
    assert (
        r7.get("{depth.A_B}:snap")
        == (
            "@%d " % seq
            + frame("depth.A_B", '{"e":"depthSnapshot","u":6,"b":[["1","2"]],"a":[]}', seq)
        ).encode()
    )
    seq = pub.publish("depth.A_B", {"e": "depth"}, snapshot='{"already": "json"}')
    assert r7.get("{depth.A_B}:snap").endswith(b',"data":{"already": "json"},"seq":%d}' % seq)
    # A message without a snapshot leaves the stored one alone.
    pub.publish("depth.A_B", {"e": "depth"})
    assert r7.get("{depth.A_B}:snap").startswith(b"@%d " % seq)


def test_lost_history_restarts_positions_above_every_earlier_one(r7, redis7_server):
    pub = Publisher(redis7_server.url)
    before = [pub.publish("trade.A_B", {"i": i}) for i in range(3)]
    r7.flushall()
    after_flush = pub.publish("trade.A_B", {"i": 3})
    assert after_flush > before[-1]

    redis7_server.restart()  # no persistence: data and script cache are gone
    wait_until(lambda: _pings(redis7_server.url), message="redis back")
    after_restart = pub.publish("trade.A_B", {"i": 4})
    assert after_restart > after_flush
    r7b = redis.Redis(port=redis7_server.port)
    r7b.script_flush()
    assert pub.publish_many([("trade.A_B", {"i": 5}), ("trade.A_B", {"i": 6})]) == [
        after_restart + 1,
        after_restart + 2,
    ]
    r7b.close()
    pub.close()
    assert after_restart < 2**53
    # Positions start near Redis TIME in microseconds.
    assert abs(after_restart / 1e6 - time.time()) < 60


def _pings(url):
    client = redis.Redis.from_url(url)
    try:
        return client.ping()
    except redis.ConnectionError:
        return False
    finally:
        client.close()


def resp(*args):
    out = b"*%d\r\n" % len(args)
    for arg in args:
        arg = arg if isinstance(arg, bytes) else str(arg).encode()
        out += b"$%d\r\n%s\r\n" % (len(arg), arg)
    return out


def read_reply(reader):
    line = reader.readline()
    kind, rest = line[:1], line[1:-2]
    if kind == b":":
        return int(rest)
    if kind == b"$":
        return None if rest == b"-1" else reader.read(int(rest) + 2)[:-2]
    if kind in (b"+", b"-"):
        return (kind + rest).decode()
    raise AssertionError("unexpected reply %r" % line)


def test_raw_evalsha_call_as_documented_for_other_languages(r7, redis7_server):
    """The call in the script's header, spoken in RESP over a plain socket."""
    pubsub = subscribed(r7, "trade.X_Y")
    with socket.create_connection(("127.0.0.1", redis7_server.port)) as sock:
        reader = sock.makefile("rb")
        sock.sendall(resp("SCRIPT", "LOAD", SCRIPT))
        assert read_reply(reader) == SCRIPT_SHA.encode()
        call = (
            "EVALSHA",
            SCRIPT_SHA,
            3,
            "{trade.X_Y}:seq",
            "{trade.X_Y}:log",
            "{trade.X_Y}:snap",
            "trade.X_Y",
            '{"e":"trade","p":"1.5"}',
            1000,
            3600,
            "",
            "",
            "publish",
        )
        sock.sendall(resp(*call) + resp(*call))
        first, second = read_reply(reader), read_reply(reader)
        sock.sendall(
            resp(
                "EVALSHA",
                SCRIPT_SHA,
                3,
                "{trade.X_Y}:seq",
                "{trade.X_Y}:log",
                "{trade.X_Y}:snap",
                "trade.X_Y",
                "{}",
                1000,
                3600,
                "",
                "",
                "shout",
            )
        )
        assert read_reply(reader).startswith("-ERR marketstream: pubcmd")
        sock.sendall(resp("SCRIPT", "FLUSH") + resp(*call))
        assert read_reply(reader) == "+OK"
        assert read_reply(reader).startswith("-NOSCRIPT")
    assert second == first + 1
    assert drain(pubsub, 2) == [
        ("@%d " % s + frame("trade.X_Y", '{"e":"trade","p":"1.5"}', s)).encode()
        for s in (first, second)
    ]
    pubsub.close()
    # Nothing of the failed calls was done.
    assert int(r7.get("{trade.X_Y}:seq")) == second


def test_the_script_refuses_keys_that_are_not_its_streams(r7):
    """The attack: EVALSHA with a stream's keys and ARGV[1] naming another
    stream (trade.ATTACK_X) overwrote that stream's snapshot.  The script
    refuses any key that is not exactly ``{S}:seq {S}:log {S}:snap`` for
    its stream ``S``, a stream name that would break the frame or the hash
    tag, and limits out of range, and then writes and publishes nothing."""
    victim = "depth.VICTIM_X"
    keys = stream_keys(victim)
    pubsub = subscribed(r7, victim, "trade.ATTACK_X")
    with Publisher(r7) as pub:
        first = pub.publish(victim, {"e": "depthSnapshot", "b": [["1", "2"]]}, snapshot=True)
    drain(pubsub, 1)
    stored = {key: r7.dump(key) for key in keys}
    r7.script_load(SCRIPT)

    def call(stream, data='{"e":"x"}', history=1000, ttl=3600, keys=keys):
        return r7.evalsha(
            SCRIPT_SHA, len(keys), *keys, stream, data, history, ttl, "self", "", "publish"
        )

    attacks = [
        lambda: call("trade.ATTACK_X"),  # the measured attack
        lambda: call(victim, keys=stream_keys("trade.ATTACK_X")[:2] + keys[2:]),
        lambda: call(victim, keys=keys[:2] + ("{depth.VICTIM_X}:snap2",)),
        lambda: call(victim, keys=keys[:2]),  # a key short
        lambda: call(victim, keys=keys + ("{depth.VICTIM_X}:x",)),
        lambda: call(""),
        lambda: call(
            'depth.VICTIM_X","data":{},"x', keys=stream_keys('depth.VICTIM_X","data":{},"x')
        ),  # JSON injection by the name
        lambda: call("depth.VICTIM}X", keys=stream_keys("depth.VICTIM}X")),
        lambda: call("depth.VICTIM\nX", keys=stream_keys("depth.VICTIM\nX")),
        lambda: call(victim, history=1_000_001),
        lambda: call(victim, ttl=31_536_001),
    ]
    for attack in attacks:
        with pytest.raises(redis.ResponseError, match="marketstream"):
            attack()
    assert {key: r7.dump(key) for key in keys} == stored
    assert r7.keys("*ATTACK*") == [] and r7.dbsize() == 3
    # Nothing was published either: the next message is a valid one.
    with Publisher(r7) as pub:
        second = pub.publish(victim, {"e": "depth"})
    assert second == first + 1
    assert drain(pubsub, 1) == [("@%d " % second + frame(victim, '{"e":"depth"}', second)).encode()]
    pubsub.close()


def test_two_publishers_get_unique_consecutive_positions(redis7_server, r7):
    results = {}

    def run(name):
        with Publisher(redis7_server.url, history=10000) as pub:
            results[name] = [pub.publish("trade.A_B", {"w": name, "i": i}) for i in range(300)]

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    every = sorted(results["a"] + results["b"])
    assert every == list(range(every[0], every[0] + 600))
    for name in ("a", "b"):
        assert results[name] == sorted(results[name])
    # The history holds each publisher's messages at the positions it got back.
    log = {
        int(e[0].split(b"-")[0]): ujson.loads(e[1][b"p"].split(b" ", 1)[1])["data"]
        for e in r7.xrange("{trade.A_B}:log")
    }
    for name in ("a", "b"):
        assert [log[s] for s in results[name]] == [{"w": name, "i": i} for i in range(300)]


def test_sharded_publish_uses_spublish(r7):
    plain = subscribed(r7, "trade.A_B")
    sharded = subscribed(r7, "trade.A_B", sharded=True)
    seq = Publisher(r7, sharded=True).publish("trade.A_B", {"x": 1})
    assert drain(sharded, 1, kind="smessage") == [
        ("@%d " % seq + frame("trade.A_B", '{"x":1}', seq)).encode()
    ]
    assert plain.get_message(timeout=0.2) is None
    plain.close()
    sharded.close()


def test_cluster_client_publishes_sharded(cluster7):
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster7.port)
    pub = Publisher(client, history=10)
    assert pub.sharded
    node = redis.Redis(port=cluster7.port)
    sharded = subscribed(node, "depth.A_B", sharded=True)
    seqs = [pub.publish("depth.A_B", {"i": 0}, snapshot=True)]
    seqs += pub.publish_many([("depth.A_B", {"i": 1}), ("depth.A_B", {"i": 2}, {"s": 2})])
    assert seqs == list(range(seqs[0], seqs[0] + 3))
    assert [m.split(b" ", 1)[0] for m in drain(sharded, 3, kind="smessage")] == [
        b"@%d" % s for s in seqs
    ]
    assert client.get("{depth.A_B}:snap").startswith(b"@%d " % seqs[2])
    sharded.close()
    node.close()
    client.close()


def test_url_forms(redis7_server, r7):
    for url in (redis7_server.url, "unix://%s?db=0" % redis7_server.unix_socket):
        with Publisher(url) as pub:
            assert pub.publish("trade.U_RL", {"via": url}) > 0
    assert r7.xlen("{trade.U_RL}:log") == 2


@pytest.mark.parametrize(
    "name", ["", "trade SOL", "a\tb", 'a"b', "a\\b", "{a}", "a}b", "a/b", None, 5, b"trade.A_B"]
)
def test_bad_stream_names_are_refused(name, r7):
    with pytest.raises(ValueError):
        check_stream_name(name)
    with pytest.raises(ValueError):
        Publisher(r7).publish(name, {})
    assert r7.dbsize() == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"history": -1},
        {"ttl": -5},
        {"history": 1.5},
        {"ttl": "60"},
        {"history": 1_000_001},
        {"ttl": 31_536_001},
    ],
)
def test_bad_limits_are_refused(kwargs, r7):
    with pytest.raises(ValueError):
        Publisher(r7, **kwargs)


def test_async_publisher(redis7_server, r7):
    async def scenario():
        async with AsyncPublisher(redis7_server.url, history=3, ttl=30) as pub:
            first = await pub.publish("ticker.A_B", {"e": "ticker"}, snapshot=True)
            rest = await pub.publish_many(
                [("ticker.A_B", '{"e":"ticker","n":%d}' % i) for i in range(4)]
            )
        return [first] + rest

    seqs = asyncio.run(scenario())
    assert seqs == list(range(seqs[0], seqs[0] + 5))
    assert r7.xlen("{ticker.A_B}:log") == 3
    assert 0 < r7.ttl("{ticker.A_B}:seq") <= 30
    assert r7.get("{ticker.A_B}:snap").startswith(b"@%d " % seqs[0])


def test_async_publisher_on_a_cluster_client(cluster7):
    async def scenario():
        client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=cluster7.port)
        pub = AsyncPublisher(client)
        assert pub.sharded
        seqs = [await pub.publish("trade.C_D", {"i": 0})]
        seqs += await pub.publish_many([("trade.C_D", {"i": 1})])
        await pub.aclose()  # not its client: still open
        assert await client.get("{trade.C_D}:seq") == b"%d" % seqs[-1]
        await client.aclose()
        return seqs

    seqs = asyncio.run(scenario())
    assert seqs[1] == seqs[0] + 1


def test_throughput_against_plain_publish(r7):
    """Publisher (EVALSHA per message) vs plain PUBLISH, one client, not
    pipelined; the figure is printed (-s), the assert only guards a gross
    regression."""
    pub = Publisher(r7, history=1000, ttl=3600)
    payload = {
        "e": "trade",
        "E": 1718000000123456,
        "s": "SOL_USDC",
        "t": 17,
        "p": "150.012",
        "q": "2.310",
        "b": 1000042,
        "a": 1000039,
        "m": False,
        "T": 1718000000123,
    }
    text = ujson.dumps({"stream": "trade.SOL_USDC", "data": payload})
    count = 2000
    started = time.perf_counter()
    for _ in range(count):
        r7.publish("trade.SOL_USDC", text)
    plain = count / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(count):
        pub.publish("trade.SOL_USDC", payload)
    recoverable = count / (time.perf_counter() - started)
    print(
        "\nplain PUBLISH %.0f/s, Publisher.publish %.0f/s (%.0f%%)"
        % (plain, recoverable, 100 * recoverable / plain)
    )
    assert recoverable > plain / 5
