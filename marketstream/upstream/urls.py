"""``REDIS_URL`` in its three modes: one server, Sentinel, Redis Cluster.

The forms::

    redis://[[user]:password@]host[:port][/db]          one server (rediss:// for TLS)
    unix://[[user]:password@]/path/to/redis.sock[?db=N]  one server on a Unix socket
    redis+sentinel://[[user]:password@]host:port[,host:port...]/<service_name>[/db]
    redis+cluster://[[user]:password@]host:port[,host:port...]

``rediss+sentinel://`` and ``rediss+cluster://`` are the TLS variants.  The
password belongs to the data nodes (the Sentinel's primary and replicas, or
the cluster's nodes); sentinels that need their own credentials take them
from the ``sentinel_username`` / ``sentinel_password`` query options.  A port
left out is 6379 (26379 for a sentinel).

Parsing checks everything up front and raises :class:`ValueError` with a
message that says what is wrong::

    >>> url = parse_redis_url("redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26379/prices/2")
    >>> url.mode, url.seeds, url.service_name, url.db
    ('sentinel', (('10.0.0.1', 26379), ('10.0.0.2', 26379)), 'prices', 2)
    >>> url.redact()
    'redis+sentinel://:***@10.0.0.1:26379,10.0.0.2:26379/prices/2'
    >>> parse_redis_url("redis+cluster://10.0.0.1:7000/3")
    Traceback (most recent call last):
        ...
    ValueError: a cluster URL cannot select a database (got /3): Redis Cluster has only db 0

:func:`redact_url` hides the password of any URL, even one that does not
parse, for logs; :func:`node_label` names a node as health and metrics do.
The redis-py clients for a URL are :mod:`marketstream.upstream.clients`'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeAlias
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

__all__ = [
    "MODES",
    "ConnectionOptions",
    "OptionValue",
    "RedisURL",
    "parse_redis_url",
    "redact_url",
    "node_label",
]

MODES = ("single", "sentinel", "cluster")

#: A query option's value, as its parser in ``_OPTIONS`` returns it.
OptionValue = str | int | float | bool

#: Keyword arguments for a redis-py client or connection (credentials, TLS,
#: socket options, host and port...).  Any: redis-py's constructors take each
#: option as a keyword of its own type (``port: int``, ``retry: Retry``,
#: ``ssl_cert_reqs: str``...), and a dict spread into them as ``**kwargs``
#: type-checks only with Any values.
ConnectionOptions: TypeAlias = dict[str, Any]

_SCHEMES = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "unix": ("single", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}

_FORMS = (
    "redis://host:port/db, rediss://..., unix:///path/to/socket, "
    "redis+sentinel://host:port[,host:port...]/<service_name>[/db], "
    "redis+cluster://host:port[,host:port...] (rediss+... for TLS)"
)


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _protocol(value: str) -> int:
    if value not in ("2", "3"):
        raise ValueError(value)
    return int(value)


def _cert_reqs(value: str) -> str:
    if value not in ("none", "optional", "required"):
        raise ValueError(value)
    return value


# Query options: name -> parser.  Every one of them is understood by the
# redis-py clients of all three modes (sync and asyncio).
_OPTIONS: dict[str, Callable[[str], OptionValue]] = {
    "db": int,
    "client_name": str,
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "socket_keepalive": _bool,
    "health_check_interval": int,
    "max_connections": int,
    "protocol": _protocol,
    "ssl_cert_reqs": _cert_reqs,
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_check_hostname": _bool,
    "sentinel_username": str,
    "sentinel_password": str,
}
_SECRET_OPTIONS = ("sentinel_password",)


@dataclasses.dataclass(frozen=True)
class RedisURL:
    """What a ``REDIS_URL`` names (see :func:`parse_redis_url`).

    ``seeds`` is ``((host, port),)`` for one server over TCP, ``()`` for a
    Unix socket (``path``), the sentinels for ``sentinel`` and the seed
    nodes for ``cluster``.  ``options`` are the query options, checked and
    converted, as sorted ``(name, value)`` pairs.
    """

    mode: str
    scheme: str
    seeds: tuple[tuple[str, int], ...] = ()
    path: str | None = None
    service_name: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    tls: bool = False
    options: tuple[tuple[str, OptionValue], ...] = dataclasses.field(default=(), repr=False)
    url: str = dataclasses.field(default="", repr=False, compare=False)

    @property
    def host(self) -> str | None:
        """The (first) host; None for a Unix socket."""
        return self.seeds[0][0] if self.seeds else None

    @property
    def port(self) -> int | None:
        return self.seeds[0][1] if self.seeds else None

    def option(self, name: str, default: OptionValue | None = None) -> OptionValue | None:
        """One query option's converted value."""
        return dict(self.options).get(name, default)

    def redact(self) -> str:
        """The URL with its passwords replaced by ``***`` (for logs)::

        >>> parse_redis_url("redis://:pw@h:1/0").redact()
        'redis://:***@h:1/0'
        """
        userinfo = ""
        if self.username is not None or self.password is not None:
            userinfo = quote(self.username or "", safe="")
            if self.password is not None:
                userinfo += ":***"
            userinfo += "@"
        if self.path is not None:
            location = "/" + self.path.lstrip("/")
        else:
            location = ",".join(map(node_label, self.seeds))
        if self.mode == "sentinel":
            location += "/%s" % quote(self.service_name or "", safe="")
            if self.db:
                location += "/%d" % self.db
        elif self.mode == "single" and self.path is None:
            location += "/%d" % self.db
        query = [
            (name, "***" if name in _SECRET_OPTIONS else _format_option(value))
            for name, value in self.options
        ]
        if self.path is not None and self.db:
            query.append(("db", str(self.db)))
        text = "%s://%s%s" % (self.scheme, userinfo, location)
        if query:
            text += "?" + "&".join("%s=%s" % (n, quote(v, safe="*")) for n, v in sorted(query))
        return text

    def __str__(self) -> str:
        return self.redact()

    # --- what redis-py needs ---------------------------------------------

    def connection_kwargs(self) -> ConnectionOptions:
        """Keyword arguments of a connection to a data node (credentials,
        TLS, socket options), for redis-py clients and connections."""
        kwargs: ConnectionOptions = {}
        if self.username is not None:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password
        if self.tls:
            kwargs["ssl"] = True
        for name, value in self.options:
            if name not in ("db", "sentinel_username", "sentinel_password"):
                kwargs[name] = value
        return kwargs

    def sentinel_kwargs(self) -> ConnectionOptions:
        """Keyword arguments of a connection to a sentinel."""
        kwargs: ConnectionOptions = {}
        options = dict(self.options)
        if "sentinel_username" in options:
            kwargs["username"] = options["sentinel_username"]
        if "sentinel_password" in options:
            kwargs["password"] = options["sentinel_password"]
        if self.tls:
            kwargs["ssl"] = True
        for name, value in self.options:
            if name.startswith(("socket_", "ssl_")) or name in ("client_name", "protocol"):
                kwargs[name] = value
        return kwargs


def node_label(addr: tuple[str, int]) -> str:
    """``"host:port"`` (``"[v6]:port"``), the node label of health and metrics::

    >>> node_label(("10.0.0.1", 7000)), node_label(("::1", 6379))
    ('10.0.0.1:7000', '[::1]:6379')
    """
    host, port = addr
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def _format_option(value: OptionValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_addr(text: str, default_port: int, mode: str) -> tuple[str, int]:
    if not text:
        raise ValueError("empty host in the host list" if mode != "single" else "no host given")
    if text.startswith("["):  # [ipv6]:port
        close = text.find("]")
        if close < 0:
            raise ValueError("unclosed '[' in host %r" % text)
        host, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError("bad host %r" % text)
        port_text = rest[1:] if rest else ""
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
        elif ":" in host:
            raise ValueError("IPv6 address %r must be in brackets: [addr]:port" % text)
    if not host:
        raise ValueError("no host in %r" % text)
    if port_text == "":
        if ":" in text.rsplit("]", 1)[-1]:
            raise ValueError("empty port in %r" % text)
        return unquote(host), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("bad port %r in %r (expected 1-65535)" % (port_text, text))
    return unquote(host), int(port_text)


def _parse_db(text: str, what: str) -> int:
    if not text.isdigit():
        raise ValueError("bad database %r in %s (expected a number)" % (text, what))
    return int(text)


def parse_redis_url(url: str) -> RedisURL:
    """Parse a ``REDIS_URL`` (see the module docstring for the forms).

    Raises ValueError naming the problem: unknown scheme, missing host or
    service name, bad port or database, unknown or invalid query option.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("the Redis URL is empty (expected %s)" % _FORMS)
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        raise ValueError(
            "unsupported Redis URL scheme %r in %r (expected %s)"
            % (scheme if sep else url, redact_url(url), _FORMS)
        )
    mode, tls = _SCHEMES[scheme]
    if "#" in rest:
        raise ValueError("a Redis URL has no #fragment (a '#' in a password must be written %23)")
    rest, _, query = rest.partition("?")
    if scheme == "unix":
        netloc, path = ("", rest) if rest.startswith("/") else rest.partition("/")[::2]
        if rest and not rest.startswith("/"):
            path = "/" + path
    else:
        netloc, slash, path = rest.partition("/")
        path = slash + path

    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user_text, colon, pass_text = userinfo.partition(":")
        username = unquote(user_text) if user_text else None
        password = unquote(pass_text) if colon else None
    options = _parse_options(query, scheme, mode, tls)
    if scheme == "unix":
        seeds, socket_path, service, db = _unix_location(hosts, path, options)
    elif mode == "single":
        seeds, socket_path, service, db = _single_location(scheme, hosts, path, options)
    else:
        seeds, socket_path, service, db = _nodes_location(scheme, mode, hosts, path, options)
    options.pop("db", None)
    return RedisURL(
        mode=mode,
        scheme=scheme,
        seeds=seeds,
        path=socket_path,
        service_name=service,
        db=db,
        username=username,
        password=password,
        tls=tls,
        options=tuple(sorted(options.items())),
        url=url,
    )


#: Where a URL points: (seeds, socket path, service name, db).
_Location = tuple[tuple[tuple[str, int], ...], "str | None", "str | None", int]


def _parse_options(query: str, scheme: str, mode: str, tls: bool) -> dict[str, OptionValue]:
    """The query's options, each parsed."""
    options: dict[str, OptionValue] = {}
    for name, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        parser = _OPTIONS.get(name)
        if parser is None:
            raise ValueError(
                "unknown option %r in the Redis URL query (known: %s)"
                % (name, ", ".join(sorted(_OPTIONS)))
            )
        try:
            options[name] = parser(value)
        except ValueError:
            raise ValueError(
                "invalid value %r for option %r in the Redis URL"
                % ("***" if name in _SECRET_OPTIONS else value, name)
            ) from None
    if not tls and any(name.startswith("ssl_") for name in options):
        raise ValueError(
            "ssl_* options need a TLS URL (%s://)" % scheme.replace("redis", "rediss", 1)
            if scheme != "unix"
            else "ssl_* options do not apply to unix://"
        )
    if mode != "sentinel" and any(name.startswith("sentinel_") for name in options):
        raise ValueError("sentinel_* options apply only to redis+sentinel:// URLs")
    return options


def _unix_location(hosts: str, path: str, options: dict[str, OptionValue]) -> _Location:
    if hosts:
        raise ValueError(
            "a unix:// URL names a socket path, not a host (unix:///path/to/redis.sock)"
        )
    if path in ("", "/"):
        raise ValueError("a unix:// URL needs a socket path (unix:///path/to/redis.sock)")
    return (), unquote(path), None, int(options.get("db", 0))


def _single_location(
    scheme: str, hosts: str, path: str, options: dict[str, OptionValue]
) -> _Location:
    if "," in hosts:
        raise ValueError(
            "%s:// takes one host; several hosts need redis+sentinel:// or "
            "redis+cluster://" % scheme
        )
    seeds = (_parse_addr(hosts, 6379, "single"),)
    db_text = path.strip("/")
    db = 0
    if "db" in options:
        db = int(options["db"])
    elif db_text:
        db = _parse_db(db_text, "the path %r" % path)
    return seeds, None, None, db


def _nodes_location(
    scheme: str, mode: str, hosts: str, path: str, options: dict[str, OptionValue]
) -> _Location:
    """Sentinel's or Cluster's nodes (and Sentinel's service and db)."""
    default_port = 26379 if mode == "sentinel" else 6379
    if not hosts:
        raise ValueError(
            "a %s URL needs at least one host:port (%s://host:port[,host:port...])" % (mode, scheme)
        )
    seeds = tuple(_parse_addr(part.strip(), default_port, mode) for part in hosts.split(","))
    if len(set(seeds)) != len(seeds):
        raise ValueError("a host is listed twice in the %s URL" % mode)
    parts = path.split("/")[1:] if path else []
    if mode != "sentinel":
        tail = "/".join(parts)
        if tail not in ("", "0") or options.get("db", 0):
            raise ValueError(
                "a cluster URL cannot select a database (got /%s): Redis Cluster "
                "has only db 0" % (tail or options.get("db"))
            )
        return seeds, None, None, 0
    if not parts or not parts[0]:
        raise ValueError(
            "a sentinel URL needs the service name: "
            "%s://host:port[,host:port...]/<service_name>[/db]" % scheme
        )
    if len(parts) > 2:
        raise ValueError(
            "too many path parts in the sentinel URL %r (expected /<service_name>[/db])" % path
        )
    db = 0
    if len(parts) == 2 and parts[1]:
        db = _parse_db(parts[1], "the sentinel URL")
    if "db" in options:
        db = int(options["db"])
    return seeds, None, unquote(parts[0]), db


_MASK = "***"


def redact_url(url: str) -> str:
    """``url`` with its password hidden and everything else kept.

    The user name stays (it tells which ACL user connects); the password,
    in the authority or in a ``password=`` query parameter (which redis-py
    accepts too), becomes ``***``.  A URL without a password is returned
    unchanged::

        >>> redact_url("redis://user:pw@host:6379/0")
        'redis://user:***@host:6379/0'
        >>> redact_url("rediss://:pw@host:6380")
        'rediss://:***@host:6380'
        >>> redact_url("redis://user:p@ss@host/0")
        'redis://user:***@host/0'
        >>> redact_url("redis://host:6379/0?password=pw&db=1")
        'redis://host:6379/0?password=***&db=1'
        >>> redact_url("redis+sentinel://:pw@s1:26379,s2:26379/mymaster")
        'redis+sentinel://:***@s1:26379,s2:26379/mymaster'
        >>> redact_url("unix:///run/redis.sock?db=0")
        'unix:///run/redis.sock?db=0'
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced "[" in the host
        head, sep, _ = url.rpartition("@")
        if not sep:
            return url
        scheme, slashes, userinfo = head.partition("//")
        return "%s%s%s@%s" % (
            scheme,
            slashes,
            userinfo.partition(":")[0] + ":" + _MASK,
            url.rpartition("@")[2],
        )
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = "%s:%s@%s" % (userinfo.partition(":")[0], _MASK, hostport)
    query = parts.query
    if "password" in query.lower():
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(key, _MASK if "password" in key.lower() else value) for key, value in pairs], safe="*"
        )
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))
