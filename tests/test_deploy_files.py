"""The shipped deployment files are valid for the tools that read them, and
agree with each other: the templated systemd unit, one environment file per
instance, and nginx's upstream list."""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from marketstream.config import load_settings
from tests.helpers import ROOT

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
CONF = os.path.join(ROOT, "conf")
UNIT = os.path.join(CONF, "marketstream@.service")


def read(path):
    with open(path) as handle:
        return handle.read()


def env_files():
    """{instance: path} of conf/marketstream-<instance>.env."""
    found = {}
    for path in glob.glob(os.path.join(CONF, "marketstream-*.env")):
        instance = re.fullmatch(r"marketstream-(.+)\.env", os.path.basename(path)).group(1)
        found[instance] = path
    return found


def parse_env(path):
    """KEY=value lines as systemd's EnvironmentFile= reads these simple ones."""
    values = {}
    for line in read(path).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, "%s: not KEY=value: %r" % (path, line)
        assert key not in values, "%s sets %s twice" % (path, key)
        values[key] = value
    return values


def upstream_servers():
    """host:port of the active server lines in nginx.conf's upstream block."""
    site = read(os.path.join(CONF, "nginx.conf"))
    block = re.search(r"^upstream marketstream \{(.*?)^\}", site, re.S | re.M)
    assert block, "no upstream marketstream block"
    return re.findall(r"^\s*server\s+(\S+?)\s*;", block.group(1), re.M)


def unit_option(name):
    values = re.findall(r"^%s=(.*)$" % name, read(UNIT), re.M)
    assert len(values) == 1, (name, values)
    return values[0]


def test_the_unit_is_a_template_reading_one_env_file_per_instance():
    path = unit_option("EnvironmentFile")
    assert "%i" in path
    directory, pattern = os.path.split(path)
    # The installed name is the shipped file's name: install copies it as is.
    for instance, shipped in env_files().items():
        assert pattern.replace("%i", instance) == os.path.basename(shipped)
    assert "%i" in unit_option("Description")
    assert not os.path.exists(os.path.join(CONF, "marketstream.service"))
    assert not os.path.exists(os.path.join(CONF, "marketstream.env"))


def test_two_instances_with_their_own_port():
    files = env_files()
    assert sorted(files) == ["1", "2"]
    listens = {}
    for instance, path in files.items():
        env = parse_env(path)
        assert set(env) == {"REDIS_URL", "WS_STREAM_URL"}, path
        # The server accepts it, with the shipped INI file underneath.
        settings = load_settings(config_file=os.path.join(CONF, "marketstream.ini"), environ=env)
        listens[instance] = (settings.host, settings.port)
        assert settings.redis.url == env["REDIS_URL"]
    # Every instance on its own port, all on one Redis.
    assert len({port for _, port in listens.values()}) == len(listens), listens
    assert len({parse_env(path)["REDIS_URL"] for path in files.values()}) == 1


def test_nginx_upstream_lists_exactly_the_instances():
    files = env_files()
    ports = set()
    for path in files.values():
        settings = load_settings(environ=parse_env(path))
        # nginx connects to 127.0.0.1: an instance must listen there.
        assert settings.host in ("127.0.0.1", "0.0.0.0", ""), (path, settings.host)
        ports.add(settings.port)
    servers = upstream_servers()
    assert len(servers) == len(set(servers))
    assert sorted(servers) == sorted("127.0.0.1:%d" % port for port in ports)
    assert "127.0.0.1:4001" in servers and "127.0.0.1:4002" in servers


def test_install_lines_name_files_that_exist():
    unit = read(UNIT)
    named = set(re.findall(r"\bconf/[\w.@-]+", unit))
    assert {"conf/marketstream@.service", "conf/marketstream.ini", "conf/marketstream-1.env",
            "conf/marketstream-2.env"} <= named
    for name in named:
        assert os.path.exists(os.path.join(ROOT, name)), name
    assert "enable --now marketstream@1 marketstream@2" in unit


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("instance", ["1", "2"])
def test_systemd_unit_verifies(tmp_path, instance):
    unit = read(UNIT)
    executable = shutil.which("marketstream") or os.path.join(os.path.dirname(sys.executable),
                                                              "marketstream")
    assert os.access(executable, os.X_OK), "install the package first (pip install -e .)"
    assert unit.count("/opt/marketstream/bin/marketstream ") == 1
    unit = unit.replace("/opt/marketstream/bin/marketstream ", executable + " ")
    (tmp_path / "marketstream@.service").write_text(unit)
    # Verifying an instance loads the template with %i filled in.
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(tmp_path / ("marketstream@%s.service"
                                                                          % instance))],
                            capture_output=True, text=True)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "marketstream@" in line]
    assert result.returncode == 0 and not problems, problems


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_verify_catches_a_broken_unit(tmp_path):
    # The check above is not vacuous: a mistyped value is reported.
    unit = read(UNIT).replace("Type=simple", "Type=simpel")
    (tmp_path / "marketstream@.service").write_text(unit)
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(tmp_path / "marketstream@1.service")],
                            capture_output=True, text=True)
    assert "simpel" in result.stdout + result.stderr
