"""scripts/bench_fanout.py keeps working (tiny runs; figures are not judged here)."""

import json
import multiprocessing
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT, ServerProcess, assert_options_documented, load_script

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


def test_book_publisher_publishes_a_book_flow_a_server_book_follows(redis_client, redis_url):
    """--books' order flow: every diff follows the last one (a book kept
    from the first applies each), positions rise by one, and the stored
    snapshot is the book after the last diff, checksum and all."""
    from marketstream.fanout.books import Book
    from marketstream.wire.positions import split_position, stream_keys

    module = load_script(BENCH)
    stream = "depth.BKS_USDT"
    redis_client.delete(*stream_keys(stream))
    pubsub = redis_client.pubsub()
    pubsub.subscribe(stream)
    try:
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        sim = module.seed_book(redis_url, stream, "BKS_USDT")
        out, into = multiprocessing.Pipe(duplex=False)
        module.book_publisher(redis_url, stream, sim, 400, 0.5, into)
        sent, _ = out.recv()
        frames = []
        while len(frames) < 1 + sent:
            message = pubsub.get_message(timeout=10)
            assert message is not None, "%d of %d published" % (len(frames), 1 + sent)
            if message["type"] == "message":
                frames.append(split_position(message["data"]))
    finally:
        pubsub.close()
    assert sent == 200
    assert [seq for seq, _ in frames] == list(range(frames[0][0], frames[0][0] + 1 + sent))
    book = Book("BKS_USDT")
    book.apply({"e": "depthSnapshot", "u": 0, "b": [], "a": []})  # the simulator starts empty
    assert {book.apply_frame(frame) for _, frame in frames} == {"applied"}
    assert len(book) > 20  # levels beyond the top 10 and 20 come and go
    stored = Book("BKS_USDT")
    seq, snapshot = split_position(redis_client.get(stream_keys(stream)[2]))
    assert seq == frames[-1][0] and stored.apply_frame(snapshot) == "snapshot"
    assert (stored.bids(), stored.asks()) == (book.bids(), book.asks())
    assert stored.checksum == book.checksum


def test_books_baseline_counts_every_diff_and_byte_per_client():
    figures = json.loads(
        bench(
            *("--books", "--baseline", "--connections", "30", "--rate", "200"),
            *("--duration", "1", "--receiver-processes", "2", "--json"),
        ).stdout
    )
    assert figures["run"] == "baseline" and figures["published"] == 200
    [group] = figures["groups"]
    assert group["stream"] == "depth.BTC_USDT" and group["clients"] == 30
    # Each client got every diff, nothing else, and was never closed.
    assert group["frames_per_client_min"] == group["frames_per_client_max"] == 200
    assert group["frames"] == figures["deliveries"] == 6000
    assert figures["plain_loss_percent"] == 0
    assert group["bytes_per_frame"] > len('{"stream":"depth.BTC_USDT","data":{}}')
    assert group["bytes_per_client"] == group["bytes"] / 30
    assert group["gap_notices"] == group["closed_by_server"] == 0
    assert figures["server_cpu_seconds_per_million"] > 0


def test_a_refused_book_stream_is_said_at_once_not_waited_for():
    """What the server refuses (here: no depth streams at all; a server
    without its own books refuses the derived streams alike) ends the run
    with the server's reason."""
    result = subprocess.run(
        [sys.executable, BENCH, "--books", "--connections", "6", "--rate", "100"]
        + ["--duration", "1", "--set", "protocol.stream_types=trade"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr
    assert "the server refused depth" in result.stderr
    assert "unknown stream type 'depth'" in result.stderr


def test_book_clients_count_frames_and_gap_notices_cut_anywhere():
    module = load_script(BENCH)
    frames = [
        b'\x81\x3f{"stream":"depth.A_B","data":{"e":"depth","U":%d},"seq":%d}' % (k, k)
        for k in range(5)
    ] + [b'\x81\x30{"stream":"depth.A_B","data":{"e":"gap","reason":"x"}}']
    data = b"".join(frames)
    for cut in range(1, len(data)):
        for pieces in (
            [data[:cut], data[cut:]],
            [data[i : i + cut] for i in range(0, len(data), cut)],
        ):
            client = module.BookCounter()
            for piece in pieces:
                client.data_received(piece)
            assert (client.frames, client.gaps, client.bytes) == (6, 1, len(data)), cut


def test_books_comparison_against_the_baseline():
    module = load_script(BENCH)

    def run(cpu, *frames):
        groups = [{"frames": n} for n in frames]
        return {
            "server_cpu_seconds": cpu,
            "server_cpu_seconds_per_million": cpu / sum(frames) * 1e6,
            "groups": groups,
        }

    # Plain delivery costs 10 s per million; the variants' run spent 1.2 s
    # on 100k plain deliveries (1 s at that cost) and 20k derived ones.
    comparison = module.books_comparison([run(1.2, 100_000, 10_000, 10_000)], [run(3.0, 300_000)])
    assert comparison["baseline_cpu_seconds_per_million"] == 10.0
    assert comparison["variants_cpu_seconds_per_million"] == 10.0
    assert comparison["ratio"] == 1.0
    assert comparison["derived_cpu_seconds_per_million_estimate"] == 10.0
    assert "against today's plain diff delivery 10.000 s" in module.books_comparison_text(
        comparison
    )
