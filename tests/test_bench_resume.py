"""scripts/bench_resume.py keeps working: a tiny reconnect storm (figures are
not judged here, only that every resuming client catches up exactly)."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, assert_options_documented, load_script

BENCH = os.path.join(ROOT, "scripts", "bench_resume.py")
TINY = (
    "--resuming",
    "30",
    "--live",
    "20",
    "--streams",
    "4",
    "--rate",
    "200",
    "--warmup",
    "0.3",
    "--baseline",
    "0.6",
    "--outage",
    "0.3",
    "--storm-window",
    "0.3",
    "--verify",
    "0.2",
    "--timeout",
    "20",
    "--json",
)


def bench(*args, timeout=120):
    result = subprocess.run(
        [sys.executable, BENCH, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("form", ["json", "url"])
def test_tiny_storm_every_client_catches_up_exactly(form):
    figures = json.loads(bench(*TINY, "--form", form).stdout)
    assert figures["reconnect_failures"] == 0
    assert figures["caught_up"] == 30
    assert figures["all_caught_up_ms"] is not None
    assert 0 < figures["catch_up_ms_p50"] <= figures["catch_up_ms_max"]
    assert figures["missed_per_client"] > 0  # the outage made them miss something
    # Every missed position arrived, in order, each once; no gap notice.
    assert figures["gap_notices"] == figures["duplicates"] == figures["missing_positions"] == 0
    assert figures["tracking_anomalies"] == 0
    # The history is read per stream and round, shared by the clients waiting.
    assert 4 <= figures["history_reads"] < figures["history_reads_if_per_client"] // 2
    # The live clients got everything published while they listened.
    assert figures["live_received"] == figures["live_expected"] > 0
    assert figures["live_closed_by_server"] == 0
    for window in ("live_latency_before", "live_latency_storm"):
        assert figures[window]["frames"] > 0 and figures[window]["latency_ms_p99"] is not None
    assert figures["server_cpu_seconds_storm"] >= 0


def test_every_option_has_help_and_shows_its_default():
    assert_options_documented(
        BENCH,
        (
            "--resuming",
            "--live",
            "--streams",
            "--rate",
            "--outage",
            "--form",
            "--server-cpu",
            "--load-cpu",
            "--no-pin",
            "--json",
            "--py-spy",
        ),
    )


def test_weighted_percentile_counts_every_frame_of_a_read():
    module = load_script(BENCH)
    # One read of 99 frames at 1 ms and one read of 1 frame at 100 ms.
    assert module.weighted_percentile([(1.0, 99), (100.0, 1)], 0.50) == 1.0
    assert module.weighted_percentile([(1.0, 99), (100.0, 1)], 0.995) == 100.0
    assert module.weighted_percentile([], 0.5) is None
