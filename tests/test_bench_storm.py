"""scripts/bench_storm.py keeps working: tiny storms straight to the server,
through nginx and against the reference server (figures are not judged
here, only that every client is counted)."""

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.helpers import ROOT, assert_options_documented, load_script

BENCH = os.path.join(ROOT, "scripts", "bench_storm.py")
TINY = (
    "--connections",
    "60",
    "--client-processes",
    "2",
    "--streams",
    "5",
    "--tick",
    "0.02",
    "--settle",
    "0.2",
    "--idle-wait",
    "0.2",
    "--timeout",
    "20",
    "--time-wait-limit",
    "1000000",
    "--json",
)
HAS_NGINX = shutil.which("nginx") or os.access("/usr/sbin/nginx", os.X_OK)


def bench(*args, timeout=120):
    result = subprocess.run(
        [sys.executable, BENCH, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return result


def assert_all_served(figures):
    assert figures["served"] == 60, figures["failures"]
    assert figures["refused"] == figures["failed"] == 0
    assert 0 < figures["upgraded_seconds_max"] <= figures["served_seconds_max"]
    assert figures["served_within_target"] == 60
    assert set(figures["netstat"]) >= {"ListenOverflows", "ListenDrops"}
    assert figures["rss_per_connection_kb"] is not None


def test_tiny_storm_serves_every_client_and_reports_memory_and_logs():
    figures = json.loads(bench(*TINY).stdout)
    assert_all_served(figures)
    assert figures["server"] == "marketstream"
    assert figures["open_connections_after"] == 60
    assert figures["server_error_lines"] == 0
    live = [figures[k] for k in ("live_delay_ms_p50", "live_delay_ms_p99", "live_delay_ms_max")]
    if figures["live_reads_during_storm"]:  # clients served before the last one
        assert 0 <= live[0] <= live[1] <= live[2], live


def test_a_refusal_is_counted_not_served():
    # A server that takes 40 connections refuses the other 20 with 503.
    figures = json.loads(bench(*TINY, "--set", "server.max_connections=40").stdout)
    assert figures["served"] == 40
    assert figures["refused"] == 20 and figures["refused_by_status"] == {"503": 20}


@pytest.mark.skipif(not HAS_NGINX, reason="nginx is not installed")
def test_tiny_storm_through_nginx():
    figures = json.loads(bench(*TINY, "--nginx", "--nginx-backlog", "1024").stdout)
    assert_all_served(figures)
    assert figures["nginx"] is True and figures["nginx_error_log"] == {}
    assert figures["nginx_rss_per_connection_kb"] is not None


def test_the_nginx_run_keeps_the_shipped_backlog_unless_told():
    storm = load_script(BENCH)
    shipped = storm.shipped_nginx_backlog()
    assert shipped and shipped >= 4096
    assert "listen 127.0.0.1:9 default_server backlog=%d;" % shipped in storm.nginx_site(8, 9, None)
    assert "listen 127.0.0.1:9 default_server backlog=1024;" in storm.nginx_site(8, 9, 1024)
    assert "listen 127.0.0.1:9 default_server;" in storm.nginx_site(8, 9, 0)
    assert "server 127.0.0.1:8;" in storm.nginx_site(8, 9, None)


def test_tiny_token_compare_runs_both_and_divides():
    output = json.loads(bench(*TINY, "--token-compare").stdout)
    for label in ("anonymous", "token"):
        (figures,) = output[label]["runs"]
        assert_all_served(figures)
        assert figures["server_error_lines"] == 0
        assert figures["token"] is (label == "token")
    ratios = output["token_over_anonymous"]
    anonymous, token = output["anonymous"]["medians"], output["token"]["medians"]
    assert ratios["served_seconds_max"] == round(
        token["served_seconds_max"] / anonymous["served_seconds_max"], 2
    )
    storm = load_script(BENCH)
    assert storm.token_ratios({"served_seconds_max": 0}, {"served_seconds_max": 1.0}) == {
        key: None for key in storm.RATIO_KEYS
    }


def test_tiny_storm_against_the_reference_server():
    assert_all_served(json.loads(bench(*TINY, "--reference").stdout))


def test_every_option_has_help_and_shows_its_default():
    assert_options_documented(
        BENCH,
        (
            "--connections",
            "--streams",
            "--per-conn",
            "--tick",
            "--client-processes",
            "--processes",
            "--nginx",
            "--nginx-backlog",
            "--server-cpu",
            "--load-cpu",
            "--no-pin",
            "--json",
            "--py-spy",
            "--repeat",
        ),
    )


def test_live_delay_and_phases_are_summed_as_documented():
    storm = load_script(BENCH)
    assert storm.histogram_quantile(collections.Counter(), 0.5) is None
    delays = collections.Counter({3: 98, 40: 1, 700: 1})
    assert storm.histogram_quantile(delays, 0.5) == 3
    assert storm.histogram_quantile(delays, 0.99) == 700

    # A py-spy chrometrace: a handshake with a token check, then delivery,
    # then a handshake alone; the storm starts 1 s into the recording.
    def frames(ts, phase, names):
        return [{"ph": phase, "ts": ts, "name": n, "args": {"filename": f}} for f, n in names]

    handshake = [("/x/upgrade.py", "StreamServer._switch")]
    token = [("/x/auth.py", "Sessions.switching"), ("/y/api_jws.py", "PyJWS._load")]
    delivery = [("/x/channels.py", "ChannelManager._flush"), ("/x/delivery.py", "_send")]
    events = (
        frames(1_000_000, "B", handshake + token)
        + frames(1_040_000, "E", (handshake + token)[::-1])
        + frames(1_040_000, "B", delivery)
        + frames(1_100_000, "E", delivery[::-1])
        + frames(2_500_000, "B", handshake)
        + frames(2_520_000, "E", handshake)
    )
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(events, f)
    try:
        phases = storm.phases_per_second(f.name, 1.0)
    finally:
        os.unlink(f.name)
    first, second = phases["per_second_percent"]
    assert first == {
        "second": 0,
        "busy": 10,
        "auth": 4,
        "handshake": 0,
        "client_frames": 0,
        "delivery": 6,
        "other": 0,
    }
    assert second["second"] == 1 and second["handshake"] == 2 and second["busy"] == 2
    assert phases["seconds"]["auth"] == 0.04 and phases["seconds"]["delivery"] == 0.06
