"""The ``marketstream`` command line as a new user meets it: ``--help`` and
where ``--demo`` listens."""

import os
import re
import socket
import subprocess
import sys
import threading

import pytest

from marketstream.upstream import urls
from marketstream.server.cli import build_parser, settings_from_args
from marketstream.testing import wait_until
from tests.helpers import ROOT


def settings(*flags, environ=None):
    return settings_from_args(build_parser().parse_args(list(flags)), environ=environ or {})


def test_help_lists_every_redis_url_form():
    text = subprocess.run(
        [sys.executable, "-m", "marketstream", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    text = " ".join(text.split())  # argparse wraps the help text
    for scheme in urls._SCHEMES:
        assert "%s://" % scheme in text, scheme
    # What a sentinel URL needs, spelled out.
    assert "/<service_name>" in text


def test_the_demo_listens_on_localhost_unless_told_otherwise(tmp_path):
    assert settings("--demo").server.listen == ("127.0.0.1", 4000, "")
    # Not a demo: the server default stays (instances behind nginx, containers).
    assert settings().host == "0.0.0.0"
    # A demo goes wherever it is told, by flag, environment or file.
    assert settings("--demo", "--listen", "0.0.0.0:4100").host == "0.0.0.0"
    assert settings("--demo", "--listen", "ws://0.0.0.0:4100/feed").server.listen == (
        "0.0.0.0",
        4100,
        "/feed",
    )
    assert settings("--demo", environ={"WS_STREAM_URL": "0.0.0.0:4200"}).host == "0.0.0.0"
    config = tmp_path / "demo.ini"
    config.write_text("[server]\nlisten = 0.0.0.0:4300\n")
    assert settings("--demo", "--config", str(config)).server.listen == ("0.0.0.0", 4300, "")
    assert settings("--demo", "--set", "server.listen=0.0.0.0:4400").host == "0.0.0.0"


def _free_on_any_address(port):
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def test_the_demo_process_accepts_no_connection_from_elsewhere():
    # The default port, for real: skipped when something else holds it.
    if not _free_on_any_address(4000):
        pytest.skip("port 4000 is in use")
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "WS_STREAM_URL", "MARKETSTREAM_CONFIG")
    }
    demo = subprocess.Popen(
        [sys.executable, "-m", "marketstream", "--demo"],
        cwd=ROOT,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    threading.Thread(target=lambda: lines.extend(demo.stdout), daemon=True).start()
    try:
        wait_until(
            lambda: "Press Ctrl-C" in "".join(lines) or demo.poll() is not None,
            60,
            message="the demo banner",
        )
        output = "".join(lines)
        if demo.poll() is not None and "address already in use" in output:
            pytest.skip("port 4000 was taken meanwhile")
        assert demo.poll() is None, output
        assert re.search(r"listening on ws://127\.0\.0\.1:4000/ ", output), output
        assert "WebSocket: ws://127.0.0.1:4000/ws" in output
        with socket.create_connection(("127.0.0.1", 4000), timeout=5):
            pass
        # Another address of this host (127.0.0.2 is loopback too) finds no
        # listener: the demo is not reachable from the network.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", 4000), timeout=5).close()
    finally:
        demo.terminate()
        demo.wait(20)
