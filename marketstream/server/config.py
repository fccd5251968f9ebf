"""Configuration: INI files, environment and flags into one typed object.

Precedence, highest first: command-line flags, the environment
(``WS_STREAM_URL``, ``REDIS_URL``), the INI file given by ``--config`` or
``MARKETSTREAM_CONFIG``, and the built-in defaults (which equal
``conf/marketstream.ini``).  The server calls
``load_settings(config_file, os.environ, overrides)``; without a file or
environment:

>>> settings = load_settings(environ={}, overrides={"server.processes": "2"})
>>> settings.port, settings.server.processes, settings.protocol.acks
(4000, 2, False)
>>> settings.sources["server.processes"], settings.sources["server.listen"]
('command line (server.processes)', 'default')

Any unknown section or key, or a value of the wrong type, raises
:class:`ConfigError` naming where it came from (file, section and key).
"""

import ast
import configparser
import dataclasses
import ipaddress
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    from marketstream.wire.books import BookFields
    from marketstream.wire.derived import DerivedRules

__all__ = ["ConfigError", "Settings", "load_settings", "parse_listen", "SCHEMA"]


class ConfigError(Exception):
    """A configuration value that cannot be used; the message says where."""


T = TypeVar("T")
#: A value parser: the text of an INI value to its typed value, or ValueError.
Parser = Callable[[str], T]


# --- value parsers -----------------------------------------------------------

_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected true or false, got %r" % text)


def _int(minimum: int | None = None, maximum: int | None = None) -> Parser[int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError("expected an integer, got %r" % text) from None
        if minimum is not None and value < minimum:
            raise ValueError("must be >= %d, got %d" % (minimum, value))
        if maximum is not None and value > maximum:
            raise ValueError("must be <= %d, got %d" % (maximum, value))
        return value

    return parse


def _float(minimum: float | None = None) -> Parser[float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError("expected a number, got %r" % text) from None
        if not math.isfinite(value):
            raise ValueError("expected a finite number, got %r" % text)
        if minimum is not None and value < minimum:
            raise ValueError("must be >= %s, got %s" % (minimum, value))
        return value

    return parse


def _list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.replace("\n", ",").split(",") if item.strip())


#: An address or network from ``[server] trusted_proxies``.
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(text: str) -> tuple[Network, ...]:
    """Comma-separated addresses and CIDR networks (``10.0.0.0/8``, ``::1``)."""
    networks = []
    for item in _list(text):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError("expected IP addresses or networks (CIDR), got %r" % item) from None
    return tuple(networks)


def _choice(*choices: str) -> Parser[str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value not in choices:
            raise ValueError("expected one of %s, got %r" % (", ".join(choices), text))
        return value

    return parse


def _str(text: str) -> str:
    return text.strip()


def _regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text.strip())
    except re.error as exc:
        raise ValueError("not a regular expression: %s" % exc) from None


def _redis_url(text: str) -> str:
    """One server, Sentinel or Cluster (see :mod:`marketstream.upstream.urls`);
    empty: an embedded redis-server."""
    value = text.strip()
    if value:
        from marketstream.upstream.urls import parse_redis_url

        parse_redis_url(value)  # raises ValueError saying what is wrong
    return value


def _log_level(text: str) -> str:
    value = text.strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got %r" % text)
    return value


def parse_listen(text: str) -> tuple[str, int, str]:
    """Parse ``host:port`` or ``ws://host:port/path`` into (host, port, path).

    >>> parse_listen("0.0.0.0:4000")
    ('0.0.0.0', 4000, '')
    >>> parse_listen("ws://127.0.0.1:8080/stream-ws")
    ('127.0.0.1', 8080, '/stream-ws')
    """
    value = text.strip()
    if "://" not in value:
        value = "ws://" + value
    parts = urllib.parse.urlsplit(value)
    if parts.scheme != "ws":
        raise ValueError(
            "expected host:port or ws://host:port/path, got %r "
            "(the server speaks plain ws://; terminate TLS in a proxy)" % text
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError("bad port in %r" % text) from None
    if port is None:
        raise ValueError("no port in %r" % text)
    host = parts.hostname or "0.0.0.0"
    path = parts.path.rstrip("/")
    return host, port, path


# --- schema ------------------------------------------------------------------


def setting(default: str, parse: Parser[T]) -> T:
    """A settings field: its default as written in the INI, and its parser.

    The field is typed as what ``parse`` returns::

        processes: int = setting("1", _int(0, 256))
    """
    return cast(T, dataclasses.field(metadata={"default": default, "parse": parse}))


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    listen: tuple[str, int, str] = setting("0.0.0.0:4000", parse_listen)  # (host, port, path)
    processes: int = setting("1", _int(0, 256))
    xheaders: bool = setting("false", _bool)
    trusted_proxies: tuple[Network, ...] = setting("127.0.0.1, ::1", _networks)
    shutdown_timeout: float = setting("10", _float(0))
    handshake_timeout: float = setting("10", _float(0.1))
    max_connections: int = setting("10000", _int(1))
    max_connections_per_ip: int = setting("500", _int(0))
    allowed_origins: tuple[str, ...] = setting("", _list)
    ping_interval: float = setting("20", _float(0))
    ping_timeout: float = setting("20", _float(0.1))
    min_flush_interval: float = setting("0", _float(0))
    fast_handshake: bool = setting("true", _bool)
    demo_page: bool = setting("false", _bool)
    event_loop: str = setting("asyncio", _choice("asyncio", "uvloop"))
    compression: bool = setting("true", _bool)
    compression_min_bytes: int = setting("512", _int(0))


@dataclasses.dataclass(frozen=True)
class RedisSettings:
    url: str = setting("", _redis_url)
    format: str = setting("envelope", _choice("envelope", "data"))
    health_interval: float = setting("1", _float(0.05))
    health_timeout: float = setting("2", _float(0.05))
    reconnect_max_delay: float = setting("1", _float(0.01))
    startup_timeout: float = setting("0", _float(0))


@dataclasses.dataclass(frozen=True)
class ProtocolSettings:
    acks: bool = setting("false", _bool)
    stream_types: tuple[str, ...] = setting("depth, trade, ticker, bookTicker, kline", _list)
    markets: tuple[str, ...] = setting("", _list)
    market_pattern: re.Pattern[str] = setting("^[A-Z0-9]+_[A-Z0-9]+$", _regex)


@dataclasses.dataclass(frozen=True)
class LimitsSettings:
    max_streams_per_connection: int = setting("1024", _int(1))
    max_frame_bytes: int = setting("65536", _int(16))
    messages_per_second: float = setting("10", _float(0.01))
    messages_burst: int = setting("50", _int(1))
    frames_per_second: float = setting("100", _float(0.01))
    frames_burst: int = setting("200", _int(1))
    max_buffer_bytes: int = setting("1048576", _int(1024))
    max_channels: int = setting("100000", _int(0))


@dataclasses.dataclass(frozen=True)
class RecoverySettings:
    snapshot_types: tuple[str, ...] = setting("", _list)
    max_replay: int = setting("1000", _int(0, 1_000_000))


@dataclasses.dataclass(frozen=True)
class LoggingSettings:
    level: str = setting("INFO", _log_level)
    format: str = setting("%(asctime)s %(levelname)s %(name)s: %(message)s", _str)
    config_file: str = setting("", _str)


def _algorithms(text: str) -> tuple[str, ...]:
    from marketstream.wire.access import check_algorithms

    return check_algorithms(_list(text))


def _patterns(text: str) -> tuple[str, ...]:
    from marketstream.wire.access import compile_patterns

    patterns = _list(text)
    compile_patterns(patterns)  # raises ValueError saying what is wrong
    return patterns


@dataclasses.dataclass(frozen=True)
class AuthSettings:
    """``[auth]``: JWT authentication (off while ``jwt_key`` is empty)."""

    jwt_key: str = setting("", _str)
    jwt_algorithms: tuple[str, ...] = setting("HS256", _algorithms)
    jwt_audience: str = setting("", _str)
    jwt_issuer: str = setting("", _str)
    leeway: float = setting("5", _float(0))
    required: bool = setting("false", _bool)
    protected: tuple[str, ...] = setting("", _patterns)
    max_connections_per_user: int = setting("0", _int(0))

    def __post_init__(self) -> None:
        if self.required and not self.jwt_key:
            raise ConfigError("[auth] required = true needs [auth] jwt_key")
        if self.jwt_key:
            from marketstream.wire.tokens import load_key

            try:
                load_key(self.jwt_key, self.jwt_algorithms)
            except ValueError as exc:
                raise ConfigError("[auth] jwt_key: %s" % exc) from None


def _field_name(text: str) -> str:
    value = text.strip()
    if not value or '"' in value or "\\" in value:
        raise ValueError("a JSON field name, not empty, without '\"' or '\\\\'")
    return value


@dataclasses.dataclass(frozen=True)
class BooksSettings:
    """``[books]``: the book streams the server keeps books of (checksums,
    top-N streams, update speeds), and their data's field names."""

    streams: tuple[str, ...] = setting("depth.*", _patterns)
    speed_types: tuple[str, ...] = setting("ticker, bookTicker, kline", _list)
    bids: str = setting("b", _field_name)
    asks: str = setting("a", _field_name)
    first_update_id: str = setting("U", _field_name)
    last_update_id: str = setting("u", _field_name)
    event: str = setting("e", _field_name)
    snapshot_event: str = setting("depthSnapshot", _field_name)

    def rules(self) -> "DerivedRules":
        """Which derived stream names exist (see marketstream.wire.derived)."""
        from marketstream.wire.derived import DerivedRules

        return DerivedRules(self.streams, self.speed_types)

    def fields(self) -> "BookFields":
        """The book streams' field names."""
        from marketstream.wire.books import BookFields

        return BookFields(
            self.bids,
            self.asks,
            self.first_update_id,
            self.last_update_id,
            self.event,
            self.snapshot_event,
        )


@dataclasses.dataclass(frozen=True)
class Settings:
    """Typed settings: ``settings.<section>.<key>``.

    ``sources`` maps ``"section.key"`` to where the value came from
    (``default``, a file name, an environment variable or a flag).
    """

    server: ServerSettings
    redis: RedisSettings
    protocol: ProtocolSettings
    limits: LimitsSettings
    recovery: RecoverySettings
    logging: LoggingSettings
    auth: AuthSettings
    books: BooksSettings
    sources: dict[str, str] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def host(self) -> str:
        return self.server.listen[0]

    @property
    def port(self) -> int:
        return self.server.listen[1]

    @property
    def ws_path(self) -> str:
        """Extra WebSocket path from a ``ws://host:port/path`` listen URL, or ''."""
        return self.server.listen[2]

    def replace(self, section: str, **changes: Any) -> "Settings":  # Any: each field's own type
        """A copy with some already-typed values of one section changed."""
        changed = dataclasses.replace(getattr(self, section), **changes)
        return dataclasses.replace(self, **{section: changed})


# Any: each section is a dataclass of its own (dataclasses types a field's type as Any).
_SECTIONS: dict[str, type[Any]] = {
    f.name: cast("type[Any]", f.type) for f in dataclasses.fields(Settings) if f.name != "sources"
}

#: section -> key -> field metadata (``default`` text and ``parse``).  The
#: defaults are the text of ``conf/marketstream.ini``; a test keeps them equal.
#: Any: dataclasses types a field's metadata so (``Field.metadata``).
SCHEMA: dict[str, dict[str, Mapping[str, Any]]] = {
    name: {f.name: f.metadata for f in dataclasses.fields(cls)} for name, cls in _SECTIONS.items()
}


def _apply(
    raw: dict[str, dict[str, str]],
    sources: dict[str, str],
    section: str,
    key: str,
    text: str,
    origin: str,
) -> None:
    if section not in SCHEMA:
        raise ConfigError("%s: unknown section [%s]" % (origin, section))
    if key not in SCHEMA[section]:
        raise ConfigError("%s: unknown key %r in section [%s]" % (origin, key, section))
    raw[section][key] = text
    sources["%s.%s" % (section, key)] = origin


def _describe_ini_error(path: str, exc: configparser.Error) -> str:
    """configparser's exception as "file, line N, [section] key: problem"."""
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return "%s, line %d: %r comes before any [section] header" % (
            path,
            exc.lineno,
            exc.line.strip(),
        )
    if isinstance(exc, configparser.DuplicateOptionError):
        # lineno is Optional in the stubs; it is always set for a file read
        return "%s, line %s: [%s] %s: duplicate key (set it once)" % (
            path,
            exc.lineno,
            exc.section,
            exc.option,
        )
    if isinstance(exc, configparser.DuplicateSectionError):
        return "%s, line %s: [%s]: duplicate section" % (path, exc.lineno, exc.section)
    if isinstance(exc, configparser.ParsingError):
        lineno, line = exc.errors[0]
        try:  # configparser keeps the repr() of the line
            line = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            pass
        return '%s, line %d: %s is not "key = value" (only "=" separates a key from its value)' % (
            path,
            lineno,
            line.strip(),
        )
    detail = " ".join(line.strip() for line in str(exc).splitlines())
    return "%s: %s" % (path, detail)


class _CaseSensitiveParser(configparser.ConfigParser):
    """Keys are case-sensitive, like the schema."""

    def optionxform(self, optionstr: str) -> str:
        return optionstr


def read_ini(path: str) -> dict[str, dict[str, str]]:
    """Parse an INI file into {section: {key: text}}, or raise ConfigError."""
    # Only "=" separates a key from its value: with ":" as well, a line like
    # "listen 0.0.0.0:4000" (its "=" forgotten) would read as key "listen 0.0.0.0".
    parser = _CaseSensitiveParser(
        interpolation=None, inline_comment_prefixes=(";",), delimiters=("=",)
    )
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise ConfigError("%s: cannot read config file: %s" % (path, exc.strerror)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError("%s: not UTF-8 text (byte %d)" % (path, exc.start)) from None
    except configparser.Error as exc:
        raise ConfigError(_describe_ini_error(path, exc)) from None
    if parser.defaults():
        raise ConfigError("%s: unknown section [%s]" % (path, parser.default_section))
    sections: dict[str, dict[str, str]] = {}
    for section in parser.sections():
        if section not in SCHEMA:
            keys = ", ".join(parser.options(section)) or "no keys"
            raise ConfigError("%s: unknown section [%s] (%s)" % (path, section, keys))
        sections[section] = dict(parser.items(section))
    return sections


def load_settings(
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Settings:
    """Build :class:`Settings` from all sources.

    ``config_file``: path of an INI file, or None to use
    ``MARKETSTREAM_CONFIG`` from ``environ`` if set.  ``overrides`` maps
    ``"section.key"`` to text, from command-line flags.
    """
    environ = os.environ if environ is None else environ
    raw = {
        section: {key: spec["default"] for key, spec in keys.items()}
        for section, keys in SCHEMA.items()
    }
    sources = {"%s.%s" % (s, k): "default" for s, keys in SCHEMA.items() for k in keys}

    config_file = config_file or environ.get("MARKETSTREAM_CONFIG") or None
    if config_file:
        for section, ini_values in read_ini(config_file).items():
            for key, text in ini_values.items():
                _apply(raw, sources, section, key, text, config_file)

    if environ.get("WS_STREAM_URL"):
        _apply(
            raw, sources, "server", "listen", environ["WS_STREAM_URL"], "environment WS_STREAM_URL"
        )
    if environ.get("REDIS_URL"):
        _apply(raw, sources, "redis", "url", environ["REDIS_URL"], "environment REDIS_URL")

    for dotted, text in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        _apply(raw, sources, section, key, text, "command line (%s)" % dotted)

    sections = {}
    for section, keys in SCHEMA.items():
        values: dict[str, Any] = {}  # Any: each key's own type, for the section's dataclass
        for key, spec in keys.items():
            try:
                values[key] = spec["parse"](raw[section][key])
            except ValueError as exc:
                raise ConfigError(
                    "%s: [%s] %s: %s" % (sources["%s.%s" % (section, key)], section, key, exc)
                ) from None
        sections[section] = _SECTIONS[section](**values)
    return Settings(sources=sources, **sections)
