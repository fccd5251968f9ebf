#!/usr/bin/env python3
"""The demo market's messages on the wire, compressed against plain.

Runs the demo simulator (``marketstream.demo.simulator``) for a market,
frames each message as the server does, and deflates it as the server does
for compressing clients (``marketstream.wire.deflate``: on its own, without
history, once for all of them).  Prints, per kind of message (trades, depth
diffs, tickers, depth snapshots), the median frame size plain and
compressed, the ratio of all bytes, and the time to compress one message
(paid once per message, whatever the number of clients); then the ratio by
message size, which is what ``[server] compression_min_bytes`` chooses
from::

    python scripts/bench_compression.py
    python scripts/bench_compression.py --market BTC_USDT --messages 2000 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from marketstream.demo.simulator import MarketSimulator, encode, envelope
from marketstream.wire.deflate import Deflater
from marketstream.wire.frames import text_frame

#: Size classes (bytes of payload) for the ratio by size.
SIZES = ((0, 256), (256, 512), (512, 1024), (1024, 4096), (4096, 1 << 30))


def messages(market: str, count: int, snapshot_every: int) -> dict[str, list[bytes]]:
    """``count`` messages of each live kind, and a depth snapshot every
    ``snapshot_every`` of them, as the demo feed encodes them."""
    sim = MarketSimulator(market, seed=1)
    now = 1_700_000_000_000_000
    kinds: dict[str, list[bytes]] = {"trade": [], "depth": [], "ticker": [], "snapshot": []}
    for i in range(count):
        now += 100_000
        kinds["trade"].append(encode(envelope("trade." + market, sim.trade(now))).encode())
        kinds["depth"].append(encode(envelope("depth." + market, sim.depth(now))).encode())
        kinds["ticker"].append(encode(envelope("ticker." + market, sim.ticker(now))).encode())
        if i % snapshot_every == 0:
            kinds["snapshot"].append(encode(envelope("depth." + market, sim.snapshot())).encode())
    return kinds


def measure(kinds: dict[str, list[bytes]]) -> dict[str, Any]:
    deflater = Deflater(min_bytes=0)
    out: dict[str, Any] = {"kinds": {}, "by_size": []}
    for kind, payloads in kinds.items():
        plain = [text_frame(p) for p in payloads]
        start = time.perf_counter()
        compressed = [deflater.frame(p, f) for p, f in zip(payloads, plain)]
        seconds = time.perf_counter() - start
        out["kinds"][kind] = {
            "messages": len(payloads),
            "plain_median_bytes": statistics.median(map(len, plain)),
            "compressed_median_bytes": statistics.median(map(len, compressed)),
            "ratio": round(sum(map(len, compressed)) / sum(map(len, plain)), 3),
            "us_per_message": round(seconds / len(payloads) * 1e6, 1),
        }
    every = [p for payloads in kinds.values() for p in payloads]
    for low, high in SIZES:
        chosen = [p for p in every if low <= len(p) < high]
        if chosen:
            plain_bytes = sum(len(text_frame(p)) for p in chosen)
            compressed_bytes = sum(len(deflater.frame(p)) for p in chosen)
            out["by_size"].append(
                {
                    "bytes": "%d-%d" % (low, high) if high < 1 << 30 else ">=%d" % low,
                    "messages": len(chosen),
                    "ratio": round(compressed_bytes / plain_bytes, 3),
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--market", default="BTC_USDT", help="the demo market")
    parser.add_argument("--messages", type=int, default=1000, help="messages of each kind")
    parser.add_argument(
        "--snapshot-every", type=int, default=10, help="a depth snapshot every N depth diffs"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    result = measure(messages(args.market, args.messages, args.snapshot_every))
    if args.json:
        print(json.dumps(result))
        return
    print("kind      messages  plain (median B)  compressed (median B)  ratio  us/message")
    for kind, row in result["kinds"].items():
        print(
            "%-9s %8d  %16d  %21d  %5.2f  %10.1f"
            % (
                kind,
                row["messages"],
                row["plain_median_bytes"],
                row["compressed_median_bytes"],
                row["ratio"],
                row["us_per_message"],
            )
        )
    print("\nbytes          messages  ratio")
    for row in result["by_size"]:
        print("%-14s %8d  %5.2f" % (row["bytes"], row["messages"], row["ratio"]))


if __name__ == "__main__":
    main()
