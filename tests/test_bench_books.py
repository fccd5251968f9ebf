"""scripts/bench_books.py keeps working (a tiny run; figures are not judged here)."""

import json
import os
import subprocess
import sys

from tests.helpers import ROOT

BENCH = os.path.join(ROOT, "scripts", "bench_books.py")


def test_bench_books_reports_per_diff_figures():
    result = subprocess.run(
        [sys.executable, BENCH, "--levels", "100", "--diffs", "200", "--repeat", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    for name in ("apply_us", "apply_frame_us", "checksum_us", "apply_and_merge_us"):
        assert figures[name] > 0
    assert 0 < figures["book_levels_after"] <= 200
