"""scripts/bench_fanout.py keeps working (tiny runs; figures are not judged here)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT, ServerProcess, assert_options_documented

BENCH = os.path.join(ROOT, "scripts", "bench_fanout.py")


def bench(*args, timeout=120):
    result = subprocess.run(
        [sys.executable, BENCH, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return result


def test_bench_small_run_reports_figures():
    figures = json.loads(
        bench(
            "--connections",
            "20",
            "--streams",
            "4",
            "--per-conn",
            "2",
            "--rate",
            "200",
            "--duration",
            "1",
            "--warmup",
            "0.5",
            "--json",
            "--receiver",
            "python",
            "--set",
            "server.fast_handshake=false",
        ).stdout
    )
    assert figures["expected_deliveries"] == figures["received_deliveries"] > 0
    assert figures["loss_percent"] == 0
    for key in (
        "latency_ms_p50",
        "latency_ms_p99",
        "latency_ms_p99_steady",
        "rss_per_connection_kb",
        "server_cpu_seconds",
        "server_cpu_seconds_per_million",
        "handshakes_per_second",
        "sustained_deliveries_per_second",
        "drain_seconds",
        "published_per_second",
    ):
        assert figures[key] is not None, key


@pytest.mark.skipif(
    not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")),
    reason="wsblast needs a C compiler",
)
def test_compressing_clients_count_every_delivery_compressed():
    """--compressing: wsblast offers permessage-deflate and counts frames by
    their headers; with compression_min_bytes 0 every delivery comes
    compressed, and none is lost."""
    figures = json.loads(
        bench(
            "--connections",
            "20",
            "--streams",
            "4",
            "--rate",
            "200",
            "--duration",
            "1",
            "--warmup",
            "0.5",
            "--json",
            "--receiver",
            "wsblast",
            "--compressing",
            "--set",
            "server.compression_min_bytes=0",
        ).stdout
    )
    assert figures["compressing"] is True
    assert figures["expected_deliveries"] == figures["received_deliveries"] > 0
    assert figures["compressed_deliveries"] == figures["received_deliveries"]


def test_side_by_side_with_the_reference_server_and_recoverable_publishing():
    output = json.loads(
        bench(
            "--connections",
            "30",
            "--streams",
            "10",
            "--per-conn",
            "3",
            "--rate",
            "300",
            # The warm-up ends with the first progress report: both commands
            # reach the receiver at once.
            "--duration",
            "2",
            "--warmup",
            "1",
            "--compare",
            "--recoverable",
            "--json",
        ).stdout
    )
    runs = output["runs"]
    assert set(runs) == {"marketstream", "reference", "marketstream (recoverable)"}
    for label, [figures] in runs.items():
        assert figures["expected_deliveries"] == figures["received_deliveries"] > 0, label
        assert figures["latency_ms_p99"] is not None, label
        assert figures["latency_ms_p99_steady"] is not None, label
    assert output["medians"]["reference"]["server_cpu_seconds_per_million"] > 0


def test_every_option_has_help_and_shows_its_default():
    assert_options_documented(
        BENCH,
        (
            "--connections",
            "--duration",
            "--server-cpu",
            "--load-cpu",
            "--no-pin",
            "--json",
            "--redis-url",
            "--streams",
            "--per-conn",
            "--rate",
        ),
    )


def test_a_target_run_does_not_claim_to_pin_the_server(redis_url):
    server = ServerProcess("--redis-url", redis_url)
    try:
        server.wait_healthy()
        figures = json.loads(
            bench(
                "--target",
                "ws://127.0.0.1:%d/ws" % server.port,
                "--redis-url",
                redis_url,
                "--connections",
                "10",
                "--streams",
                "2",
                "--rate",
                "100",
                "--duration",
                "1",
                "--receiver",
                "python",
                "--json",
            ).stdout
        )
    finally:
        server.stop()
    assert figures["server_cpus"] is None and "pinned" not in figures
    assert figures["received_deliveries"] == figures["expected_deliveries"] > 0


@pytest.mark.skipif(
    not any(
        os.path.exists(os.path.join(d, "cc")) for d in os.environ.get("PATH", "").split(os.pathsep)
    ),
    reason="no C compiler for wsblast",
)
def test_wsblast_receiver_is_built_and_counts_every_frame():
    figures = json.loads(
        bench(
            "--connections",
            "40",
            "--streams",
            "20",
            "--per-conn",
            "5",
            "--rate",
            "400",
            "--duration",
            "1",
            "--receiver",
            "wsblast",
            "--json",
        ).stdout
    )
    assert figures["receiver"] == "wsblast"
    assert figures["received_deliveries"] == figures["expected_deliveries"] > 0
    assert figures["latency_samples"] > 0


def test_bench_compression_reports_each_kind_of_demo_message():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench_compression.py"), "--json"]
        + ["--messages", "50"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert set(figures["kinds"]) == {"trade", "depth", "ticker", "snapshot"}
    snapshot = figures["kinds"]["snapshot"]
    assert snapshot["compressed_median_bytes"] < snapshot["plain_median_bytes"]
    assert all(0 < row["ratio"] < 1 for row in figures["by_size"])
