"""REDIS_URL forms, bad URLs, redaction (marketstream.upstream.urls)."""

import dataclasses

import pytest
import redis
import redis.asyncio
import redis.cluster

from marketstream.upstream.clients import sync_client
from marketstream.upstream.urls import RedisURL, parse_redis_url


# --- parsing --------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        (
            "redis://127.0.0.1:6379/0",
            dict(mode="single", seeds=(("127.0.0.1", 6379),), db=0, tls=False),
        ),
        ("redis://localhost", dict(mode="single", seeds=(("localhost", 6379),), db=0)),
        (
            "redis://user:p%40ss@h:7000/5",
            dict(mode="single", seeds=(("h", 7000),), db=5, username="user", password="p@ss"),
        ),
        (
            "rediss://:pw@h:6380/1?ssl_cert_reqs=none&socket_timeout=2.5",
            dict(
                mode="single",
                tls=True,
                db=1,
                password="pw",
                options=(("socket_timeout", 2.5), ("ssl_cert_reqs", "none")),
            ),
        ),
        ("redis://[::1]:6379", dict(mode="single", seeds=(("::1", 6379),))),
        (
            "unix:///run/redis/redis.sock?db=3",
            dict(mode="single", seeds=(), path="/run/redis/redis.sock", db=3),
        ),
        ("unix://:pw@/run/redis.sock", dict(path="/run/redis.sock", password="pw")),
        (
            "redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26380,10.0.0.3/prices/2",
            dict(
                mode="sentinel",
                service_name="prices",
                db=2,
                password="pw",
                seeds=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379)),
            ),
        ),
        (
            "rediss+sentinel://s1:26379/mymaster?sentinel_password=spw",
            dict(
                mode="sentinel",
                tls=True,
                service_name="mymaster",
                db=0,
                options=(("sentinel_password", "spw"),),
            ),
        ),
        (
            "redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001",
            dict(
                mode="cluster", seeds=(("10.0.0.1", 7000), ("10.0.0.2", 7001)), password="pw", db=0
            ),
        ),
        ("rediss+cluster://n1:7000/0", dict(mode="cluster", tls=True, seeds=(("n1", 7000),))),
        ("REDIS+CLUSTER://n1:7000", dict(mode="cluster", scheme="redis+cluster")),
    ],
)
def test_url_forms(url, expected):
    desc = parse_redis_url(url)
    for name, value in expected.items():
        assert getattr(desc, name) == value, name


@pytest.mark.parametrize(
    "url, message",
    [
        ("", "empty"),
        ("localhost:6379", "unsupported Redis URL scheme"),
        ("http://h:1", "unsupported Redis URL scheme 'http'"),
        ("redis+sentinl://h:1/s", "unsupported Redis URL scheme 'redis+sentinl'"),
        ("redis://a:1,b:2", "takes one host"),
        ("redis://h:99999", "bad port '99999'"),
        ("redis://h:abc/0", "bad port 'abc'"),
        ("redis://h:", "empty port"),
        ("redis://h/zero", "bad database 'zero'"),
        ("redis://::1", "must be in brackets"),
        ("redis://h?sockettimeout=1", "unknown option 'sockettimeout'"),
        ("redis://h?socket_timeout=soon", "invalid value 'soon' for option 'socket_timeout'"),
        ("redis://h?ssl_ca_certs=/ca.pem", "need a TLS URL (rediss://)"),
        ("redis://h?sentinel_password=x", "apply only to redis+sentinel"),
        ("redis://:pa#ss@h", "no #fragment"),
        ("unix://", "needs a socket path"),
        ("unix://host/x.sock", "names a socket path, not a host"),
        ("redis+sentinel://h:26379", "needs the service name"),
        ("redis+sentinel://h:26379/", "needs the service name"),
        ("redis+sentinel://h:26379/svc/x", "bad database 'x'"),
        ("redis+sentinel://h:26379/svc/1/2", "too many path parts"),
        ("redis+sentinel:///svc", "needs at least one host:port"),
        ("redis+sentinel://h:1,,h:2/svc", "empty host"),
        ("redis+cluster://", "needs at least one host:port"),
        ("redis+cluster://h:7000/3", "cannot select a database"),
        ("redis+cluster://h:7000,h:7000", "listed twice"),
        ("redis+cluster://h:7000?protocol=4", "invalid value '4' for option 'protocol'"),
    ],
)
def test_bad_urls_raise_a_clear_value_error(url, message):
    with pytest.raises(
        ValueError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("?", r"\?")
        .replace("+", r"\+"),
    ):
        parse_redis_url(url)


def test_bad_url_messages_do_not_show_passwords():
    for url in [
        "http://:secret@h:1",
        "redis://:secret@h?sentinel_password=x",
        "redis+sentinel://:secret@h:1/s?sentinel_password=bad&socket_timeout=x",
    ]:
        with pytest.raises(ValueError) as info:
            parse_redis_url(url)
        assert "secret" not in str(info.value)


def test_redact_hides_passwords_and_round_trips():
    for url, shown in [
        ("redis://:pw@h:1/2", "redis://:***@h:1/2"),
        ("redis://u:pw@h:1/0", "redis://u:***@h:1/0"),
        ("redis://h:1", "redis://h:1/0"),
        ("unix://:pw@/tmp/r.sock?db=4", "unix://:***@/tmp/r.sock?db=4"),
        (
            "redis+sentinel://:pw@a:1,b:2/svc/3?sentinel_password=spw",
            "redis+sentinel://:***@a:1,b:2/svc/3?sentinel_password=***",
        ),
        ("rediss+cluster://:pw@[::1]:7000,b:7001", "rediss+cluster://:***@[::1]:7000,b:7001"),
    ]:
        desc = parse_redis_url(url)
        assert desc.redact() == shown == str(desc)
        assert "pw" not in repr(desc)
        reparsed = parse_redis_url(shown)
        assert (reparsed.mode, reparsed.seeds, reparsed.db, reparsed.service_name) == (
            desc.mode,
            desc.seeds,
            desc.db,
            desc.service_name,
        )


def test_description_is_frozen_and_hashable():
    desc = parse_redis_url("redis+cluster://a:1,b:2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        desc.mode = "single"
    assert desc == parse_redis_url("redis+cluster://a:1,b:2")
    assert len({desc, parse_redis_url("redis+cluster://a:1,b:2")}) == 1
    assert isinstance(desc, RedisURL)


def test_connection_kwargs_for_nodes_and_sentinels():
    desc = parse_redis_url(
        "rediss+sentinel://u:pw@s:26379/svc?sentinel_password=spw"
        "&socket_connect_timeout=2&ssl_cert_reqs=none"
    )
    assert desc.connection_kwargs() == {
        "username": "u",
        "password": "pw",
        "ssl": True,
        "socket_connect_timeout": 2.0,
        "ssl_cert_reqs": "none",
    }
    assert desc.sentinel_kwargs() == {
        "password": "spw",
        "ssl": True,
        "socket_connect_timeout": 2.0,
        "ssl_cert_reqs": "none",
    }
    tls = sync_client("rediss://h:6380/0?ssl_cert_reqs=none")
    assert tls.connection_pool.connection_class is redis.SSLConnection
    tls.close()
