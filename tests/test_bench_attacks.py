"""scripts/bench_attacks.py keeps working: each attack, tiny (figures are not
judged here beyond what the limits promise)."""

import json
import os
import subprocess
import sys

from tests.helpers import ROOT, assert_options_documented

BENCH = os.path.join(ROOT, "scripts", "bench_attacks.py")


def bench(*args, timeout=120):
    result = subprocess.run(
        [sys.executable, BENCH, *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_channels_attack_stops_at_the_limits():
    figures = bench(
        "channels",
        "--connections",
        "4",
        "--per-conn",
        "50",
        "--set",
        "server.max_connections_per_ip=3",
        "--set",
        "limits.max_channels=120",
    )
    assert figures["accepted"] == 3 and figures["refused_by_status"] == {"429": 1}
    assert figures["redis_channels"] == 120
    assert figures["server_rss_mb_after"] > 0 and figures["closed_by_server"] == 0


def test_churn_attack_reports_cpu_and_redis_calls():
    figures = bench(
        "churn",
        "--connections",
        "2",
        "--per-conn",
        "20",
        "--rate",
        "5",
        "--duration",
        "1",
        "--held",
        "100",
    )
    assert figures["messages_sent"] >= 10 and figures["closed_by_server"] == 0
    assert figures["held_channels"] == 100
    assert figures["server_cpu_percent"] >= 0
    assert figures["redis_subscribe_calls"] == figures["redis_unsubscribe_calls"] == 0


def test_resume_attack_is_bounded_by_the_buffer():
    figures = bench(
        "resume", "--clients", "2", "--streams", "20", "--history", "100", "--snapshot-every", "10"
    )
    assert figures["client_closed"] == [None, None]
    assert figures["server_slow_consumer_closes"] == 0
    assert all(0 < mb <= 0.6 for mb in figures["client_mb_received"])
    assert figures["client_gap_notices"] == [20, 20]
    assert figures["redis_bytes_sent_mb"] < 2


def test_every_option_has_help_and_shows_its_default():
    assert_options_documented(
        BENCH,
        (
            "--connections",
            "--per-conn",
            "--rate",
            "--duration",
            "--held",
            "--streams",
            "--history",
            "--size",
            "--snapshot-every",
            "--clients",
            "--timeout",
        ),
    )
