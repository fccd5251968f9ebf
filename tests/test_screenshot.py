"""``python scripts/screenshot.py`` says what to install when it cannot run."""

import os
import subprocess
import sys

from tests.helpers import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "screenshot.py")


def run(*args, hide_selenium=False):
    """The script as a user runs it; ``hide_selenium``: as if selenium were
    not installed (its import fails)."""
    code = "import runpy, sys\n"
    if hide_selenium:
        code += "sys.modules['selenium'] = None\n"
    code += "sys.argv = %r\nrunpy.run_path(%r, run_name='__main__')\n" % ([SCRIPT, *args], SCRIPT)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_without_selenium_the_error_names_the_extra():
    done = run(hide_selenium=True)
    assert done.returncode == 2, done.stderr
    assert "selenium is not installed: pip install -e '.[test]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""  # no demo server was started first


def test_without_the_browser_the_error_names_the_package(tmp_path):
    missing = str(tmp_path / "chromium")
    done = run("--chromium", missing)
    assert done.returncode == 2, done.stderr
    assert "chromium not found at %s: apt-get install chromium" % missing in done.stderr
    done = run("--chromium", sys.executable, "--chromedriver", missing)  # any executable
    assert done.returncode == 2, done.stderr
    assert "apt-get install chromium-driver" in done.stderr
