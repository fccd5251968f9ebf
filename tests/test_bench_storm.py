"""scripts/bench_storm.py keeps working: tiny storms straight to the server,
through nginx and against the reference server (figures are not judged
here, only that every client is counted)."""

import json
import os
import shutil
import subprocess
import sys

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
