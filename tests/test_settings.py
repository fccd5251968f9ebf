"""Configuration: defaults, the sample file, precedence, errors."""

import configparser
import os
import subprocess
import sys

import pytest

from marketstream.config import SCHEMA, ConfigError, load_settings
from marketstream.server import build_parser, settings_from_args
from tests.test_process import ROOT

SAMPLE = os.path.join(ROOT, "conf", "marketstream.ini")


def from_flags(*flags, environ=None):
    return settings_from_args(build_parser().parse_args(list(flags)), environ=environ or {})


def test_defaults():
    s = load_settings(environ={})
    assert s.server.listen == ("0.0.0.0", 4000, "") and s.server.processes == 1
    assert s.redis.url == "" and s.redis.format == "envelope"
    assert s.protocol.acks is False and "kline" in s.protocol.stream_types
    assert s.limits.max_streams_per_connection == 1024 and s.limits.max_frame_bytes == 65536
    assert s.limits.max_buffer_bytes == 1048576
    assert (s.server.ping_interval, s.server.ping_timeout) == (20, 20)


def test_sample_file_documents_every_key_and_equals_the_defaults():
    assert load_settings(SAMPLE, environ={}) == load_settings(environ={})
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read(SAMPLE)
    in_file = {(section, key) for section in parser.sections() for key in parser[section]}
    in_code = {(section, key) for section, keys in SCHEMA.items() for key in keys}
    assert in_file == in_code
    text = open(SAMPLE).read()
    for section, key in in_code:  # each key has a comment right above it or its group
        assert "\n%s =" % key in text


def test_precedence(tmp_path):
    ini = tmp_path / "a.ini"
    ini.write_text("[server]\nlisten = 127.0.0.1:5000\n[redis]\nurl = redis://file:1/0\n")
    assert load_settings(str(ini), environ={}).port == 5000
    s = load_settings(str(ini), environ={"WS_STREAM_URL": "ws://0.0.0.0:6000/feed",
                                         "REDIS_URL": "redis://env:2/0"})
    assert (s.port, s.ws_path, s.redis.url) == (6000, "/feed", "redis://env:2/0")
    assert s.sources["server.listen"] == "environment WS_STREAM_URL"
    s = from_flags("--config", str(ini), "--listen", "127.0.0.1:7000", "--redis-url", "unix:///r.sock",
                   environ={"WS_STREAM_URL": "0.0.0.0:6000", "REDIS_URL": "redis://env:2/0"})
    assert (s.port, s.redis.url) == (7000, "unix:///r.sock")
    assert load_settings(environ={"MARKETSTREAM_CONFIG": str(ini)}).port == 5000
    s = from_flags("--acks", "--processes", "0", "--set", "limits.max_frame_bytes=2048")
    assert s.protocol.acks and s.server.processes == 0 and s.limits.max_frame_bytes == 2048
    assert s.sources["limits.max_frame_bytes"] == "command line (limits.max_frame_bytes)"


@pytest.mark.parametrize("text, expected", [
    ("[nope]\nx = 1\n", "unknown section [nope]"),
    ("[server]\nlisen = 1\n", "unknown key 'lisen' in section [server]"),
    ("[server]\nprocesses = many\n", "[server] processes: expected an integer"),
    ("[server]\nxheaders = perhaps\n", "[server] xheaders: expected true or false"),
    ("[redis]\nformat = xml\n", "[redis] format: expected one of envelope, data"),
    ("[redis]\nurl = http://x\n", "[redis] url: expected a redis://"),
    ("[server]\nlisten = nowhere\n", "[server] listen: no port"),
    ("[protocol]\nmarket_pattern = ([\n", "[protocol] market_pattern: not a regular expression"),
    ("[server]\nping_interval = 5\nping_timeout = 10\n", "[server] ping_timeout: must not exceed"),
    ("no section header\n", "File contains no section headers"),
])
def test_errors_name_file_section_and_key(tmp_path, text, expected):
    ini = tmp_path / "bad.ini"
    ini.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_settings(str(ini), environ={})
    assert str(error.value).startswith(str(ini))
    assert expected in str(error.value)


def test_environment_errors_name_the_variable():
    with pytest.raises(ConfigError, match="environment REDIS_URL: \\[redis\\] url"):
        load_settings(environ={"REDIS_URL": "mysql://x"})


def test_command_exits_2_on_configuration_errors(tmp_path):
    ini = tmp_path / "bad.ini"
    ini.write_text("[limits]\nmax_frame_bytes = huge\n")
    cases = [(["--config", str(ini)], "%s: [limits] max_frame_bytes" % ini),
             (["--set", "server.processes=many"], "command line (server.processes): [server] processes"),
             (["--config", str(tmp_path / "missing.ini")], "missing.ini: cannot read config file")]
    for args, expected in cases:
        result = subprocess.run([sys.executable, "-m", "marketstream", *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, result.stderr
        assert "configuration error" in result.stderr and expected in result.stderr
