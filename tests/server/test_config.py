"""Configuration: defaults, the sample INI file, precedence and errors."""

import configparser
import os
import subprocess
import sys

import pytest

from marketstream.server.cli import build_parser, settings_from_args
from marketstream.server.config import SCHEMA, ConfigError, load_settings, parse_listen
from tests.helpers import ROOT

SAMPLE = os.path.join(ROOT, "conf", "marketstream.ini")
CONFIG_ENV = ("MARKETSTREAM_CONFIG", "WS_STREAM_URL", "REDIS_URL")


def from_flags(*flags, environ=None):
    return settings_from_args(build_parser().parse_args(list(flags)), environ=environ or {})


@pytest.fixture
def ini(tmp_path):
    """Write an INI file and return its path (as str)."""
    count = [0]

    def write(text, name=None):
        count[0] += 1
        path = tmp_path / (name or "conf%d.ini" % count[0])
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write


# --- defaults ------------------------------------------------------------------------


def test_defaults():
    s = load_settings(environ={})
    assert s.server.listen == ("0.0.0.0", 4000, "")
    assert (s.host, s.port, s.ws_path) == ("0.0.0.0", 4000, "")
    assert s.server.processes == 1
    assert s.server.xheaders is False
    assert s.server.shutdown_timeout == 10
    assert s.server.max_connections == 10000
    assert s.server.max_connections_per_ip == 500
    assert s.server.allowed_origins == ()
    assert (s.server.ping_interval, s.server.ping_timeout) == (20, 20)
    assert s.server.min_flush_interval == 0
    assert s.redis.url == ""
    assert s.redis.format == "envelope"
    assert s.redis.health_interval == 1 and s.redis.reconnect_max_delay == 1
    assert s.protocol.acks is False
    assert s.protocol.stream_types == ("depth", "trade", "ticker", "bookTicker", "kline")
    assert s.protocol.markets == ()
    assert s.protocol.market_pattern.pattern == "^[A-Z0-9]+_[A-Z0-9]+$"
    assert s.limits.max_streams_per_connection == 1024
    assert s.limits.max_frame_bytes == 65536
    assert s.limits.messages_per_second == 10 and s.limits.messages_burst == 50
    assert s.limits.max_buffer_bytes == 1048576
    assert s.limits.max_channels == 100000
    assert s.logging.level == "INFO" and s.logging.config_file == ""
    assert set(s.sources.values()) == {"default"}
    assert set(s.sources) == {"%s.%s" % (sec, key) for sec, keys in SCHEMA.items() for key in keys}


def test_environ_none_reads_the_process_environment(monkeypatch):
    for name in CONFIG_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WS_STREAM_URL", "127.0.0.1:4555")
    assert load_settings().server.listen == ("127.0.0.1", 4555, "")


def test_empty_environment_values_are_ignored():
    s = load_settings(environ={"WS_STREAM_URL": "", "REDIS_URL": "", "MARKETSTREAM_CONFIG": ""})
    assert s == load_settings(environ={})
    assert set(s.sources.values()) == {"default"}


# --- the sample file ----------------------------------------------------------


def sample_keys():
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    with open(SAMPLE, encoding="utf-8") as handle:
        parser.read_file(handle)
    return parser


def test_sample_file_equals_the_defaults():
    from_file = load_settings(SAMPLE, environ={})
    assert from_file == load_settings(environ={})
    assert set(from_file.sources.values()) == {SAMPLE}


def test_sample_file_and_schema_have_the_same_keys():
    parser = sample_keys()
    in_file = {(section, key) for section in parser.sections() for key in parser[section]}
    in_code = {(section, key) for section, keys in SCHEMA.items() for key in keys}
    assert in_file - in_code == set(), "keys in the sample file that the code does not know"
    assert in_code - in_file == set(), "keys missing from the sample file"
    assert parser.sections() == list(SCHEMA)


def test_sample_file_text_equals_schema_defaults():
    parser = sample_keys()
    for section, keys in SCHEMA.items():
        for key, spec in keys.items():
            assert parser[section][key].strip() == spec["default"], (section, key)


# --- precedence: server.listen ------------------------------------------------------


def test_listen_from_file(ini):
    path = ini("[server]\nlisten = 127.0.0.1:5001\n")
    s = load_settings(path, environ={})
    assert s.server.listen == ("127.0.0.1", 5001, "")
    assert s.sources["server.listen"] == path
    assert s.sources["server.processes"] == "default"


@pytest.mark.parametrize(
    "value, listen",
    [
        ("0.0.0.0:4100", ("0.0.0.0", 4100, "")),
        ("127.0.0.1:4101", ("127.0.0.1", 4101, "")),
        ("ws://10.1.2.3:4102/stream-ws", ("10.1.2.3", 4102, "/stream-ws")),
        ("ws://0.0.0.0:4103/ws", ("0.0.0.0", 4103, "/ws")),
        ("ws://0.0.0.0:4104/ws/", ("0.0.0.0", 4104, "/ws")),
        ("ws://0.0.0.0:4105/", ("0.0.0.0", 4105, "")),
        ("[::1]:4106", ("::1", 4106, "")),
    ],
)
def test_ws_stream_url_forms(value, listen):
    s = load_settings(environ={"WS_STREAM_URL": value})
    assert s.server.listen == listen
    assert (s.host, s.port, s.ws_path) == listen
    assert s.sources["server.listen"] == "environment WS_STREAM_URL"


def test_environment_beats_file_for_listen(ini):
    path = ini("[server]\nlisten = 127.0.0.1:5001\nprocesses = 3\n")
    s = load_settings(path, environ={"WS_STREAM_URL": "ws://127.0.0.2:5002/feed"})
    assert s.server.listen == ("127.0.0.2", 5002, "/feed") and s.ws_path == "/feed"
    assert s.sources["server.listen"] == "environment WS_STREAM_URL"
    assert s.server.processes == 3 and s.sources["server.processes"] == path


def test_flag_beats_environment_and_file_for_listen(ini):
    path = ini("[server]\nlisten = 127.0.0.1:5001\n")
    env = {"WS_STREAM_URL": "127.0.0.2:5002"}
    s = from_flags("--config", path, "--listen", "ws://127.0.0.3:5003/x", environ=env)
    assert s.server.listen == ("127.0.0.3", 5003, "/x")
    assert "command line" in s.sources["server.listen"]
    s = from_flags("--config", path, "--set", "server.listen=127.0.0.4:5004", environ=env)
    assert s.server.listen == ("127.0.0.4", 5004, "")
    assert "command line" in s.sources["server.listen"]
    s = from_flags("--config", path, environ=env)
    assert s.server.listen == ("127.0.0.2", 5002, "")
    s = from_flags("--config", path)
    assert s.server.listen == ("127.0.0.1", 5001, "")


def test_listen_flag_beats_set(ini):
    s = from_flags("--set", "server.listen=127.0.0.4:5004", "--listen", "127.0.0.5:5005")
    assert s.server.listen == ("127.0.0.5", 5005, "")


# --- precedence: redis.url ---------------------------------------------------------


def test_redis_url_precedence(ini):
    path = ini("[redis]\nurl = redis://file-host:6379/0\n")
    assert load_settings(path, environ={}).redis.url == "redis://file-host:6379/0"
    env = {"REDIS_URL": "redis://env-host:6379/1"}
    s = load_settings(path, environ=env)
    assert s.redis.url == "redis://env-host:6379/1"
    assert s.sources["redis.url"] == "environment REDIS_URL"
    s = from_flags("--config", path, "--redis-url", "rediss://flag-host:6380/2", environ=env)
    assert s.redis.url == "rediss://flag-host:6380/2"
    assert "command line" in s.sources["redis.url"]
    s = from_flags("--config", path, "--set", "redis.url=unix:///run/redis.sock", environ=env)
    assert s.redis.url == "unix:///run/redis.sock"


def test_empty_redis_url_flag_overrides_the_environment():
    s = from_flags("--redis-url", "", environ={"REDIS_URL": "redis://env-host:6379/1"})
    assert s.redis.url == ""
    assert "command line" in s.sources["redis.url"]


def test_demo_ignores_redis_url():
    s = from_flags("--demo", environ={"REDIS_URL": "redis://env-host:6379/1"})
    assert s.redis.url == ""


# --- MARKETSTREAM_CONFIG ---------------------------------------------------------------


def test_marketstream_config_is_used_without_a_config_argument(ini):
    path = ini("[server]\nprocesses = 4\n")
    s = load_settings(environ={"MARKETSTREAM_CONFIG": path})
    assert s.server.processes == 4 and s.sources["server.processes"] == path
    assert from_flags(environ={"MARKETSTREAM_CONFIG": path}).server.processes == 4


def test_config_argument_beats_marketstream_config(ini):
    env_file = ini("[server]\nprocesses = 4\n")
    arg_file = ini("[server]\nmax_connections = 77\n")
    s = load_settings(arg_file, environ={"MARKETSTREAM_CONFIG": env_file})
    assert s.server.processes == 1 and s.server.max_connections == 77
    s = from_flags("--config", arg_file, environ={"MARKETSTREAM_CONFIG": env_file})
    assert s.server.processes == 1 and s.server.max_connections == 77


def test_marketstream_config_still_below_environment_and_flags(ini):
    path = ini("[server]\nlisten = 127.0.0.1:5001\n[redis]\nurl = redis://file-host/0\n")
    env = {"MARKETSTREAM_CONFIG": path, "REDIS_URL": "redis://env-host/1"}
    s = from_flags("--listen", "127.0.0.9:5009", environ=env)
    assert s.server.listen == ("127.0.0.9", 5009, "")
    assert s.redis.url == "redis://env-host/1"
    assert s.sources["redis.url"] == "environment REDIS_URL"


# --- other flags -----------------------------------------------------------------------------


def test_acks_flag(ini):
    assert from_flags().protocol.acks is False
    assert from_flags("--acks").protocol.acks is True
    path = ini("[protocol]\nacks = false\n")
    assert from_flags("--config", path, "--acks").protocol.acks is True
    path = ini("[protocol]\nacks = yes\n")
    assert from_flags("--config", path).protocol.acks is True


def test_processes_flag(ini):
    path = ini("[server]\nprocesses = 2\n")
    assert from_flags("--config", path).server.processes == 2
    s = from_flags("--config", path, "--processes", "6")
    assert s.server.processes == 6 and "command line" in s.sources["server.processes"]
    assert from_flags("--processes", "0").server.processes == 0
    s = from_flags("--set", "server.processes=3", "--processes", "5")
    assert s.server.processes == 5


def test_set_any_key():
    s = from_flags(
        "--set",
        "protocol.markets=SOL_USDC, BTC_USDT",
        "--set",
        "limits.max_frame_bytes=1024",
        "--set",
        "logging.format=%(message)s a=b",
        "--set",
        "redis.format=data",
        "--set",
        "server.allowed_origins=https://a.example,https://b.example",
    )
    assert s.protocol.markets == ("SOL_USDC", "BTC_USDT")
    assert s.limits.max_frame_bytes == 1024
    assert s.logging.format == "%(message)s a=b"
    assert s.redis.format == "data"
    assert s.server.allowed_origins == ("https://a.example", "https://b.example")
    assert s.sources["limits.max_frame_bytes"] == "command line (limits.max_frame_bytes)"
    assert s.sources["server.processes"] == "default"


def test_log_level_flag():
    assert from_flags("--log-level", "debug").logging.level == "DEBUG"


def test_overrides_beat_file_and_environment(ini):
    path = ini("[server]\nlisten = 127.0.0.1:5001\n")
    s = load_settings(
        path,
        environ={"WS_STREAM_URL": "127.0.0.2:5002"},
        overrides={"server.listen": "127.0.0.3:5003"},
    )
    assert s.server.listen == ("127.0.0.3", 5003, "")


def test_parse_listen():
    assert parse_listen("0.0.0.0:4000") == ("0.0.0.0", 4000, "")
    assert parse_listen(" ws://127.0.0.1:8080/stream-ws ") == ("127.0.0.1", 8080, "/stream-ws")
    assert parse_listen(":4000") == ("0.0.0.0", 4000, "")


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, section, key",
    [
        ("[server]\nlistn = 0.0.0.0:4000\n", "server", "listn"),
        ("[server]\nListen = 0.0.0.0:4000\n", "server", "Listen"),
        ("[redis]\nlisten = 0.0.0.0:4000\n", "redis", "listen"),
        ("[server]\nprocesses = many\n", "server", "processes"),
        ("[server]\nprocesses = 1.5\n", "server", "processes"),
        ("[server]\nprocesses = -1\n", "server", "processes"),
        ("[server]\nprocesses = 257\n", "server", "processes"),
        ("[limits]\nmax_frame_bytes = 8\n", "limits", "max_frame_bytes"),
        ("[server]\nshutdown_timeout = soon\n", "server", "shutdown_timeout"),
        ("[server]\nxheaders = maybe\n", "server", "xheaders"),
        ("[protocol]\nacks = 2\n", "protocol", "acks"),
        ("[redis]\nformat = xml\n", "redis", "format"),
        ("[logging]\nlevel = LOUD\n", "logging", "level"),
        ("[redis]\nurl = http://localhost:6379\n", "redis", "url"),
        ("[redis]\nurl = localhost:6379\n", "redis", "url"),
        ("[server]\nlisten = 0.0.0.0\n", "server", "listen"),
        ("[server]\nlisten = 0.0.0.0:notaport\n", "server", "listen"),
        ("[server]\nlisten = 0.0.0.0:99999\n", "server", "listen"),
        ("[server]\nlisten = wss://0.0.0.0:4000/ws\n", "server", "listen"),
        ("[protocol]\nmarket_pattern = [A-Z\n", "protocol", "market_pattern"),
        ("[protocol]\nmarket_pattern = (?P<x\n", "protocol", "market_pattern"),
        (
            "[server]\nlisten = 1.2.3.4:1\nlisten = 1.2.3.4:2\n",
            "server",
            "listen",
        ),  # malformed: duplicate
        ("[sever]\nlisten = 0.0.0.0:4000\n", "sever", "listen"),  # unknown section
    ],
)
def test_bad_file_names_file_section_and_key(ini, text, section, key):
    path = ini(text)
    with pytest.raises(ConfigError) as error:
        load_settings(path, environ={})
    message = str(error.value)
    assert path in message
    assert section in message
    assert key in message


@pytest.mark.parametrize(
    "text",
    [
        "[bogus]\n",  # an empty unknown section is still a mistake
        "[DEFAULT]\nprocesses = 2\n",  # configparser's DEFAULT section is not in the schema
    ],
)
def test_unknown_sections_without_a_known_key_are_errors(ini, text):
    path = ini(text)
    with pytest.raises(ConfigError) as error:
        load_settings(path, environ={})
    assert path in str(error.value)


@pytest.mark.parametrize("value", ["nan", "NaN", "-nan"])
def test_nan_is_not_a_number_of_seconds(value):
    with pytest.raises(ConfigError) as error:
        load_settings(environ={}, overrides={"server.shutdown_timeout": value})
    assert "shutdown_timeout" in str(error.value)


def test_environment_errors_name_the_variable():
    with pytest.raises(ConfigError) as error:
        load_settings(environ={"REDIS_URL": "http://localhost:6379"})
    assert all(part in str(error.value) for part in ("REDIS_URL", "redis", "url"))
    with pytest.raises(ConfigError) as error:
        load_settings(environ={"WS_STREAM_URL": "nowhere"})
    assert all(part in str(error.value) for part in ("WS_STREAM_URL", "server", "listen"))


def test_bad_marketstream_config_names_the_file(tmp_path):
    path = tmp_path / "env.ini"
    path.write_text("[limits]\nmessages_burst = lots\n")
    with pytest.raises(ConfigError) as error:
        load_settings(environ={"MARKETSTREAM_CONFIG": str(path)})
    assert all(part in str(error.value) for part in (str(path), "limits", "messages_burst"))


@pytest.mark.parametrize(
    "flags, parts",
    [
        (["--processes", "many"], ["command line", "server", "processes"]),
        (["--listen", "0.0.0.0"], ["command line", "server", "listen"]),
        (["--redis-url", "http://x:1"], ["command line", "redis", "url"]),
        (["--log-level", "LOUD"], ["command line", "logging", "level"]),
        (["--set", "server.processes=many"], ["command line", "server", "processes"]),
        (["--set", "server.nokey=1"], ["command line", "server", "nokey"]),
        (["--set", "nosection.key=1"], ["command line", "nosection"]),
        (["--set", "server.processes"], ["command line", "server.processes"]),
        (["--set", "processes=2"], ["command line", "processes=2"]),
    ],
)
def test_flag_errors_name_the_flag_section_and_key(flags, parts):
    with pytest.raises(ConfigError) as error:
        from_flags(*flags)
    message = str(error.value)
    for part in parts:
        assert part in message


def test_unreadable_files(tmp_path):
    missing = str(tmp_path / "missing.ini")
    with pytest.raises(ConfigError) as error:
        load_settings(missing, environ={})
    assert missing in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_settings(str(tmp_path), environ={})  # a directory
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize(
    "text",
    [
        "listen = 0.0.0.0:4000\n",  # no section header
        "[server\nlisten = 0.0.0.0:4000\n",  # broken section header
        "[server]\n[server]\n",  # duplicate section
    ],
)
def test_malformed_ini_names_the_file(ini, text):
    path = ini(text)
    with pytest.raises(ConfigError) as error:
        load_settings(path, environ={})
    assert path in str(error.value)


def test_malformed_line_is_located(ini):
    """A line that is neither a section, a key nor a comment: the message
    must say which one, not only that the file has errors."""
    path = ini("[server]\nlisten = 0.0.0.0:4000\nthis line is garbage\n")
    with pytest.raises(ConfigError) as error:
        load_settings(path, environ={})
    message = str(error.value)
    assert path in message
    assert "this line is garbage" in message or "line 3" in message.replace("line  3", "line 3")


def test_invalid_utf8_file_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.ini"
    path.write_bytes(b"[logging]\nformat = caf\xe9 %(message)s\n")
    with pytest.raises(ConfigError) as error:
        load_settings(str(path), environ={})
    assert str(path) in str(error.value)


# --- the real command ---------------------------------------------------------------------------


def run_marketstream(*args):
    environ = {k: v for k, v in os.environ.items() if k not in CONFIG_ENV}
    return subprocess.run(
        [sys.executable, "-m", "marketstream", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_command_exits_2_for_a_bad_file(tmp_path):
    path = tmp_path / "bad.ini"
    path.write_text("[server]\nlisten = 127.0.0.1:0\n[limits]\nmessages_burst = lots\n")
    done = run_marketstream("--config", str(path))
    assert done.returncode == 2, done.stderr
    assert str(path) in done.stderr
    assert "[limits]" in done.stderr and "messages_burst" in done.stderr
    assert "Traceback" not in done.stderr


def test_command_exits_2_for_a_bad_set_flag():
    done = run_marketstream("--set", "server.processes=many")
    assert done.returncode == 2, done.stderr
    assert "command line" in done.stderr
    assert "[server]" in done.stderr and "processes" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_ping_timeout_longer_than_the_interval_is_accepted(tmp_path):
    ini = tmp_path / "ping.ini"
    ini.write_text("[server]\nping_interval = 5\nping_timeout = 10\n")
    settings = load_settings(str(ini), environ={})
    assert (settings.server.ping_interval, settings.server.ping_timeout) == (5, 10)


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("listen = 0.0.0.0:4000\n", 1, ["before any [section] header", "listen"]),
        ("[server]\nlisten 0.0.0.0:4000\n", 2, ["listen 0.0.0.0:4000", 'only "="']),
        (
            "[server]\nlisten = 1.2.3.4:1\n\nlisten = 1.2.3.4:2\n",
            4,
            ["[server] listen", "duplicate key"],
        ),
        ("[server]\nprocesses = 1\n[server]\n", 3, ["[server]", "duplicate section"]),
    ],
)
def test_malformed_files_name_file_line_section_and_key(tmp_path, text, line, words):
    path = tmp_path / "bad.ini"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_settings(str(path), environ={})
    message = str(error.value)
    assert message.startswith("%s, line %d: " % (path, line)), message
    for word in words:
        assert word in message, message
    assert "\\n" not in message and "Error" not in message


@pytest.mark.parametrize(
    "url", ["http://0.0.0.0:4000", "https://0.0.0.0:4000/ws", "wss://0.0.0.0:4000/ws"]
)
def test_ws_stream_url_must_be_ws_or_host_port(url):
    with pytest.raises(ConfigError, match="environment WS_STREAM_URL.*listen.*ws://"):
        load_settings(None, environ={"WS_STREAM_URL": url})


def test_books_section():
    settings = load_settings(environ={})
    rules, fields = settings.books.rules(), settings.books.fields()
    assert rules.is_book_stream("depth.BTC_USDT") and not rules.is_book_stream("trade.BTC_USDT")
    assert (fields.bids, fields.asks, fields.first_id, fields.last_id) == ("b", "a", "U", "u")
    assert (fields.event, fields.snapshot) == ("e", "depthSnapshot")
    custom = load_settings(
        environ={},
        overrides={
            "books.streams": "book.*, l2.*",
            "books.bids": "bids",
            "books.snapshot_event": "snapshot",
        },
    )
    assert custom.books.rules().is_book_stream("l2.BTC_USDT")
    assert not custom.books.rules().is_book_stream("depth.BTC_USDT")
    assert custom.books.fields().bids == "bids" and custom.books.fields().snapshot == "snapshot"
    with pytest.raises(ConfigError, match="books"):
        load_settings(environ={}, overrides={"books.bids": 'b"'})
