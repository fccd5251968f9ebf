#!/usr/bin/env python3
"""Per-diff cost of a server book (marketstream.fanout.books), with timeit.

A book of ``--levels`` levels (half bids, half asks, on a grid of ticks)
takes diffs of ``--changes`` level changes each, drawn like a real feed:
most near the top, some deep, a quarter removals that are added back
later.  It reports microseconds per diff for:

- ``apply``: :meth:`Book.apply` on the parsed data (book upkeep and the
  checksum when the top 10 changed);
- ``apply_frame``: the same from the frame's bytes (the JSON parse the
  server adds per message of a book stream);
- ``checksum``: the top-10 checksum alone, computed every time;
- ``merge``: one :class:`DiffMerger` fed every diff (an update speed's
  cost per message);
- ``take_top``: one top-20 snapshot taken (per interval, not per message).

::

    python scripts/bench_books.py                      # 1000 levels, 5 changes per diff
    python scripts/bench_books.py --levels 10000 --json
"""

import argparse
import json
import os
import random
import sys
import timeit

import orjson

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from marketstream.fanout.books import Book, DiffMerger  # noqa: E402
from marketstream.wire.books import book_checksum  # noqa: E402


def price(tick: int) -> str:
    return "%d.%02d" % (tick // 100, tick % 100)


def make_diffs(levels: int, changes: int, count: int, seed: int) -> tuple[dict, list[dict]]:
    """A snapshot of ``levels`` levels and ``count`` contiguous diffs."""
    rng = random.Random(seed)
    center = 50_000
    half = levels // 2
    bids = {
        price(center - 1 - i): "%d.%03d" % (rng.randint(0, 9), rng.randint(1, 999))
        for i in range(half)
    }
    asks = {
        price(center + i): "%d.%03d" % (rng.randint(0, 9), rng.randint(1, 999)) for i in range(half)
    }
    snapshot = {
        "e": "depthSnapshot",
        "s": "X_Y",
        "u": 1000,
        "b": [[p, q] for p, q in bids.items()],
        "a": [[p, q] for p, q in asks.items()],
    }
    diffs = []
    u = 1000
    for _ in range(count):
        b, a = [], []
        for _ in range(changes):
            depth = int(rng.expovariate(1 / 8)) % half
            qty = (
                "0" if rng.random() < 0.25 else "%d.%03d" % (rng.randint(0, 9), rng.randint(1, 999))
            )
            if rng.random() < 0.5:
                b.append([price(center - 1 - depth), qty])
            else:
                a.append([price(center + depth), qty])
        diffs.append(
            {"e": "depth", "s": "X_Y", "E": 1, "U": u + 1, "u": u + changes, "b": b, "a": a}
        )
        u += changes
    return snapshot, diffs


def run(levels: int, changes: int, count: int, repeat: int) -> dict[str, float]:
    snapshot, diffs = make_diffs(levels, changes, count, seed=1)
    frames = [
        b'{"stream":"depth.X_Y","data":%s,"seq":%d}' % (orjson.dumps(d), i + 1)
        for i, d in enumerate(diffs)
    ]
    figures: dict[str, float] = {}

    def per_diff(name: str, setup, body) -> None:
        best = float("inf")
        for _ in range(repeat):
            state = setup()
            best = min(best, timeit.timeit(lambda s=state: body(s), number=1))
        figures[name] = round(best / count * 1e6, 3)

    def fresh() -> Book:
        book = Book("X_Y")
        book.apply(snapshot, seq=0)
        return book

    def apply_all(book: Book) -> None:
        apply = book.apply
        for seq, data in enumerate(diffs, 1):
            apply(data, seq)

    def apply_frames(book: Book) -> None:
        apply_frame = book.apply_frame
        for frame in frames:
            apply_frame(frame)

    def checksums(book: Book) -> None:
        bids, asks = book.top(10)
        for _ in diffs:
            book_checksum(bids, asks)

    def merge_all(state: tuple[Book, DiffMerger]) -> None:
        book, merger = state
        for seq, data in enumerate(diffs, 1):
            book.apply(data, seq)
            merger.add(book.last_diff, book.seq, book.checksum)

    per_diff("apply_us", fresh, apply_all)
    per_diff("apply_frame_us", fresh, apply_frames)
    per_diff("checksum_us", fresh, checksums)
    per_diff("apply_and_merge_us", lambda: (fresh(), DiffMerger()), merge_all)
    book = fresh()
    apply_all(book)
    figures["book_levels_after"] = len(book)
    figures["take_top20_us"] = round(
        min(timeit.repeat(lambda: book.depth_top(20), number=1000, repeat=repeat)) / 1000 * 1e6, 3
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, default=1000, help="levels in the book (1000)")
    parser.add_argument("--changes", type=int, default=5, help="level changes per diff (5)")
    parser.add_argument("--diffs", type=int, default=20000, help="diffs per run (20000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best counts (5)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    figures = run(args.levels, args.changes, args.diffs, args.repeat)
    if args.json:
        print(json.dumps(figures))
    else:
        for name, value in figures.items():
            print("%-22s %s" % (name, value))
    return 0


if __name__ == "__main__":
    sys.exit(main())
