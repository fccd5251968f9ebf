"""scripts/bench_fanout.py keeps working (a tiny run; figures are not judged here)."""

import json
import os
import subprocess
import sys

from tests.helpers import ROOT


def test_bench_small_run_reports_figures():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench_fanout.py"), "--connections", "20",
         "--streams", "4", "--rate", "200", "--duration", "1", "--json",
         "--set", "server.fast_handshake=false"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["expected_deliveries"] == figures["received_deliveries"] > 0
    assert figures["loss_percent"] == 0
    for key in ("latency_ms_p50", "latency_ms_p99", "rss_per_connection_kb",
                "server_cpu_seconds", "handshakes_per_second", "sustained_deliveries_per_second",
                "drain_seconds", "published_per_second"):
        assert figures[key] is not None
