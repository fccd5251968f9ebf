"""The shipped deployment files are valid for the tools that read them."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path):
    with open(os.path.join(ROOT, "conf", "marketstream.service")) as handle:
        unit = handle.read()
    executable = shutil.which("marketstream") or os.path.join(os.path.dirname(sys.executable), "marketstream")
    assert os.access(executable, os.X_OK), "install the package first (pip install -e .)"
    unit = unit.replace("/opt/marketstream/bin/marketstream", executable)
    path = tmp_path / "marketstream.service"
    path.write_text(unit)
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(path)], capture_output=True, text=True)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "marketstream.service" in line]
    assert result.returncode == 0 and not problems, problems


def test_env_file_sets_what_the_unit_documents():
    with open(os.path.join(ROOT, "conf", "marketstream.env")) as handle:
        keys = {line.split("=", 1)[0] for line in handle
                if "=" in line and not line.startswith("#")}
    assert keys == {"REDIS_URL", "WS_STREAM_URL"}
