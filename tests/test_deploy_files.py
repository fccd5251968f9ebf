"""The shipped deployment files are valid for the tools that read them, and
agree with each other: the templated systemd unit, one environment file per
instance, and nginx's upstream list."""

import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

from marketstream.server.config import load_settings
from marketstream.server.cli import build_parser, settings_from_args
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


def command_line(env):
    """The arguments systemd passes to marketstream with ``env`` (ExecStart:
    ``$NAME`` as a word of its own is the variable's value split at
    whitespace, nothing when unset), and the shipped INI file in place of
    the installed one."""
    words = unit_option("ExecStart").split()
    assert words[0] == "/opt/marketstream/bin/marketstream"
    args = []
    for word in words[1:]:
        if word.startswith("$"):
            args += env.get(word[1:], "").split()
        else:
            args.append(
                word.replace(
                    "/etc/marketstream/marketstream.ini", os.path.join(CONF, "marketstream.ini")
                )
            )
    return args


def instance_settings(env):
    """The settings an instance runs with: its command line and environment."""
    return settings_from_args(build_parser().parse_args(command_line(env)), environ=env)


def test_two_instances_with_their_own_port():
    files = env_files()
    assert sorted(files) == ["1", "2"]
    listens = {}
    for instance, path in files.items():
        env = parse_env(path)
        assert set(env) == {"REDIS_URL", "WS_STREAM_URL", "MARKETSTREAM_ARGS"}, path
        # The server accepts it, with the shipped INI file underneath.
        settings = instance_settings(env)
        listens[instance] = (settings.host, settings.port)
        assert settings.redis.url == env["REDIS_URL"]
    # Every instance on its own port, all on one Redis.
    assert len({port for _, port in listens.values()}) == len(listens), listens
    assert len({parse_env(path)["REDIS_URL"] for path in files.values()}) == 1


def test_instances_behind_nginx_take_the_client_address_from_its_headers():
    # conf/nginx.conf passes X-Real-IP and X-Forwarded-For; the instances it
    # proxies to must read them, or every identity and log line says 127.0.0.1.
    for path in env_files().values():
        env = parse_env(path)
        settings = instance_settings(env)
        assert settings.server.xheaders, path
        assert settings.sources["server.xheaders"].startswith("command line"), path
    # Without the variable (an instance not behind nginx) the default holds.
    env = parse_env(env_files()["1"])
    del env["MARKETSTREAM_ARGS"]
    assert command_line(env) == ["--config", os.path.join(CONF, "marketstream.ini")]
    assert not instance_settings(env).server.xheaders


def test_the_unit_says_how_to_build_the_package_it_installs(tmp_path):
    unit = read(UNIT)
    assert "python3 -m build --sdist" in unit
    installed = re.search(r"/opt/marketstream/bin/pip install (dist/\S+\.tar\.gz)", unit).group(1)
    # The build as the unit says, offline (the build backend is installed).
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist), ROOT],
        check=True,
        capture_output=True,
        timeout=300,
    )
    built = glob.glob(os.path.join(str(tmp_path), installed))
    assert len(built) == 1, os.listdir(dist)
    # It holds the whole package: the Lua script and the static files too.
    with tarfile.open(built[0]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for name in (
        "server/app.py",
        "wire/recovery.lua",
        "server/static/marketstream.js",
        "server/static/index.html",
    ):
        assert "marketstream/" + name in names, name


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
    assert {
        "conf/marketstream@.service",
        "conf/marketstream.ini",
        "conf/marketstream-1.env",
        "conf/marketstream-2.env",
    } <= named
    for name in named:
        assert os.path.exists(os.path.join(ROOT, name)), name
    assert "enable --now marketstream@1 marketstream@2" in unit


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("instance", ["1", "2"])
def test_systemd_unit_verifies(tmp_path, instance):
    unit = read(UNIT)
    executable = shutil.which("marketstream") or os.path.join(
        os.path.dirname(sys.executable), "marketstream"
    )
    assert os.access(executable, os.X_OK), "install the package first (pip install -e .)"
    assert unit.count("/opt/marketstream/bin/marketstream ") == 1
    unit = unit.replace("/opt/marketstream/bin/marketstream ", executable + " ")
    (tmp_path / "marketstream@.service").write_text(unit)
    # Verifying an instance loads the template with %i filled in.
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(tmp_path / ("marketstream@%s.service" % instance))],
        capture_output=True,
        text=True,
    )
    problems = [
        line for line in (result.stdout + result.stderr).splitlines() if "marketstream@" in line
    ]
    assert result.returncode == 0 and not problems, problems


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_verify_catches_a_broken_unit(tmp_path):
    # The check above is not vacuous: a mistyped value is reported.
    unit = read(UNIT).replace("Type=simple", "Type=simpel")
    (tmp_path / "marketstream@.service").write_text(unit)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(tmp_path / "marketstream@1.service")],
        capture_output=True,
        text=True,
    )
    assert "simpel" in result.stdout + result.stderr


def test_ci_runs_the_readmes_test_command():
    """.ci/run ends with the README's test command, verbatim: the linter,
    the formatter check, the type checker, the tests."""
    readme = read(os.path.join(ROOT, "README.md"))
    command = next(
        line
        for line in readme.splitlines()
        if line.startswith("python3 -m venv") and "pytest" in line
    )
    assert "ruff check . && ruff format --check . && mypy && python -m pytest -q" in command
    ci = [line for line in read(os.path.join(ROOT, ".ci", "run")).splitlines() if line.strip()]
    assert ci[-1] == command
