"""scripts/bench_cluster.py keeps working: a tiny run on a real Redis Cluster
(figures are not judged here, only that the per-shard counts add up)."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, assert_options_documented, load_script
from tests.redis_topology import find_redis7

BENCH = os.path.join(ROOT, "scripts", "bench_cluster.py")
REDIS7, WHY = find_redis7()


def bench(*args, timeout=120):
    result = subprocess.run(
        [sys.executable, BENCH, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.skipif(REDIS7 is None, reason=str(WHY))
def test_tiny_run_counts_every_delivery_per_shard():
    figures = json.loads(
        bench(
            "--connections",
            "20",
            "--streams",
            "30",
            "--per-conn",
            "3",
            "--rate",
            "300",
            "--duration",
            "1",
            "--replicas",
            "0",
            "--receiver-processes",
            "2",
            "--json",
        ).stdout
    )
    shards = figures["shards"]
    assert len(shards) == figures["primaries"] == 3
    assert sum(s["slots"] for s in shards) == 16384
    assert sum(s["streams_owned"] for s in shards) == 30
    assert figures["published"] == sum(s["published"] for s in shards) == 300
    for shard in shards:
        assert shard["streams_owned"] > 0, shard  # the streams fall on every shard
        # One server link per primary, subscribed to the streams it owns.
        assert shard["shardnumsub_min"] == 1
        assert shard["shard_channels"] == shard["server_channels"] == shard["streams_owned"]
        # What was published there reached the server from there, and the clients.
        assert shard["published"] == shard["spublish_calls"] == shard["server_received"] > 0
        assert shard["deliveries_measured"]
        assert shard["received_deliveries"] == shard["expected_deliveries"] > 0
        assert shard["loss_percent"] == 0
    # 20 clients x 3 streams = 2 subscribers on each of the 30 streams: 300 messages, 600 deliveries.
    assert figures["received_deliveries"] == figures["expected_deliveries"] == 600
    assert figures["latency_ms_p99"] is not None


def test_frames_cut_anywhere_are_counted_once_per_stream():
    module = load_script(BENCH)
    frames = b"".join(
        b'\x81\x40{"stream":"trade.SYM%d_USDC","data":{"E":%d}}' % (k, 1727866324088000000 + k)
        for k in (7, 12345, 7, 0)
    )
    for cut in range(1, len(frames)):
        module.StreamCounter.counts.clear()
        module.StreamCounter.sampling = True
        counter = module.StreamCounter()
        counter.data_received(frames[:cut])
        counter.data_received(frames[cut:])
        assert module.StreamCounter.counts == {b"7": 2, b"12345": 1, b"0": 1}, cut
    module.StreamCounter.sampling = False


def test_every_option_has_help_and_shows_its_default():
    assert_options_documented(
        BENCH,
        (
            "--connections",
            "--streams",
            "--per-conn",
            "--rate",
            "--duration",
            "--recoverable",
            "--primaries",
            "--replicas",
            "--server-cpu",
            "--load-cpu",
            "--no-pin",
            "--json",
        ),
    )
