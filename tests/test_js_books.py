"""The browser client's book checksums (server/static/marketstream.js), run
with Node.js: its CRC-32 and book checksum against zlib.crc32 computed here
(never with the server's book code), a corrupted frame that resyncs that
stream only on the same connection, and the frames of top-N streams and
update speeds, whose positions skip.

Node has no WebSocket: a stand-in records what the client sends and hands
it the frames built here (and Node 18, Debian bookworm's, no CustomEvent:
a stand-in too); everything else is the shipped module.
"""

import json
import os
import random
import shutil
import subprocess
import zlib

import pytest

from tests.helpers import ROOT
from tests.checksums import crc_of

MODULE = os.path.join(ROOT, "marketstream", "server", "static", "marketstream.js")
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(
    NODE is None,
    reason="Node.js is not installed (no `node` on PATH): these tests run the browser "
    "client's checksums in it; .ci/run installs Debian's nodejs",
)

HARNESS = r"""
import {readFileSync} from "node:fs";
const {MarketStream, OrderBook, crc32, bookChecksum} = await import(process.argv[2]);
const input = JSON.parse(readFileSync(0, "utf8"));
const sockets = [];
class FakeWebSocket {
  static CONNECTING = 0; static OPEN = 1; static CLOSING = 2; static CLOSED = 3;
  constructor(url) {
    this.url = url; this.readyState = 0; this.sent = []; sockets.push(this);
    setTimeout(() => { this.readyState = 1; this.onopen && this.onopen(); }, 0);
  }
  send(text) { this.sent.push(JSON.parse(text)); }
  close() { this.readyState = 3; }
}
globalThis.WebSocket = FakeWebSocket;
// A browser's CustomEvent, which Node has as a global from 19 on only.
globalThis.CustomEvent ??= class CustomEvent extends Event {
  constructor(type, init) { super(type, init); this.detail = init?.detail ?? null; }
};
const tick = () => new Promise((resolve) => setTimeout(resolve, 5));
const out = {};
if (input.texts) out.crc = input.texts.map((text) => crc32(text));
if (input.books) {
  out.checksums = input.books.map(([b, a]) => {
    const book = new OrderBook();
    book.applySnapshot({u: 1, b, a});
    return bookChecksum(book);
  });
}
if (input.streams) {
  const client = new MarketStream({snapshotWait: 60000});
  const events = [];
  client.addEventListener("gap", (e) => events.push(e.detail));
  const refused = [];
  client.addEventListener("refused", (e) => refused.push(e.detail));
  client.connect("ws://127.0.0.1:1/ws");
  client.subscribe(input.streams);
  await tick();
  for (const frame of input.frames) {
    sockets[0].onmessage({data: frame});
    await tick();
  }
  out.sockets = sockets.length;
  out.sent = sockets.flatMap((s) => s.sent);
  out.gaps = events;
  out.refused = refused;
  out.books = client.books;
  out.streams = client.streams;
  client.close();
}
console.log(JSON.stringify(out));
process.exit(0);
"""


def run_node(tmp_path, payload):
    script = tmp_path / "harness.mjs"
    script.write_text(HARNESS)
    # The shipped file under an .mjs name: before 20.19 and 22.7, Node reads a
    # .js file outside a "type": "module" package as CommonJS, and the
    # module's export statements are a SyntaxError there (Debian's Node is 18).
    module = tmp_path / "marketstream.mjs"
    shutil.copyfile(MODULE, module)
    result = subprocess.run(
        [NODE, str(script), module.as_uri()],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def frame(stream, e, seq, u, bids, asks, book=None, first=None, checksum=True):
    """A frame; its checksum is that of ``book`` (the server's book after
    it), or of ``bids``/``asks`` for a snapshot or a top-N frame."""
    data = {"e": e, "s": "X_Y", "u": u, "b": bids, "a": asks}
    if first is not None:
        data["U"] = first
    obj = {"stream": stream, "data": data, "seq": seq}
    if checksum is not None:
        obj["checksum"] = crc_of(*(book or (bids, asks))) if checksum is True else checksum
    return json.dumps(obj, separators=(",", ":"))


def test_crc32_and_the_book_checksum_equal_zlibs(tmp_path):
    rng = random.Random(7)
    texts = ["", "a", "100.5:2:101:3", "prix:1,5€:数量", "x" * 1000]
    books = []
    for _ in range(40):
        bids = {
            "%d.%d" % (rng.randint(1, 200), rng.randint(0, 9)): str(rng.randint(1, 9))
            for _ in range(rng.randint(0, 30))
        }
        asks = {
            "%d.%02d" % (rng.randint(201, 400), rng.randint(0, 99)): "0.%d" % rng.randint(1, 9)
            for _ in range(rng.randint(0, 30))
        }
        books.append(([list(kv) for kv in bids.items()], [list(kv) for kv in asks.items()]))
    out = run_node(tmp_path, {"texts": texts, "books": books})
    assert out["crc"] == [zlib.crc32(t.encode()) for t in texts]
    for (bids, asks), checksum in zip(books, out["checksums"]):
        best_bids = sorted(bids, key=lambda kv: -float(kv[0]))
        best_asks = sorted(asks, key=lambda kv: float(kv[0]))
        assert checksum == crc_of(best_bids, best_asks)


A, B = "depth.A_B", "depth.C_D"


def test_a_checksum_mismatch_resyncs_that_stream_only_on_the_same_connection(tmp_path):
    a1 = ([["5", "2"]], [["6", "1"]])
    frames = [
        frame(A, "depthSnapshot", 10, 100, [["5", "1"]], [["6", "1"]]),
        frame(B, "depthSnapshot", 20, 200, [["50", "1"]], [["60", "1"]]),
        frame(A, "depth", 11, 101, [["5", "2"]], [], a1, 101),
        frame(B, "depth", 21, 201, [["50", "2"]], [], ([["50", "2"]], [["60", "1"]]), 201),
        # A's book after 102 is 5:3 / 6:1; the checksum says 5:9.
        frame(A, "depth", 12, 102, [["5", "3"]], [], ([["5", "9"]], [["6", "1"]]), 102),
        # In flight before the resync's snapshot: skipped.
        frame(A, "depth", 13, 103, [["4", "1"]], [], ([["5", "3"], ["4", "1"]], [["6", "1"]]), 103),
        # No checksum: not checked.
        frame(B, "depth", 22, 202, [["50", "3"]], [], first=202, checksum=None),
        frame(A, "depthSnapshot", 13, 103, [["5", "3"], ["4", "1"]], [["6", "1"]]),
        frame(A, "depth", 14, 104, [], [["6", "0"]], ([["5", "3"], ["4", "1"]], []), 104),
        frame(B, "depth", 23, 203, [], [["60", "0"]], ([["50", "3"]], []), 203),
    ]
    out = run_node(tmp_path, {"streams": [A, B], "frames": frames})
    assert out["sockets"] == 1  # never reconnected
    assert [(m["method"], m["params"], m.get("snapshot")) for m in out["sent"]] == [
        ("SUBSCRIBE", [A, B], [A, B]),
        ("UNSUBSCRIBE", [A], None),
        ("SUBSCRIBE", [A], [A]),
    ]
    assert [(g["stream"], g["reason"]) for g in out["gaps"]] == [(A, "checksum mismatch")]
    assert out["gaps"][0]["expected"] == crc_of([["5", "9"]], [["6", "1"]])
    assert out["gaps"][0]["got"] == crc_of([["5", "3"]], [["6", "1"]])
    book_a, book_b = out["books"][A], out["books"][B]
    assert (book_a["status"], book_a["seq"], book_a["bids"], book_a["asks"]) == (
        "synced",
        14,
        [["5", "3"], ["4", "1"]],
        [],
    )
    assert (book_b["status"], book_b["seq"], book_b["bids"], book_b["asks"]) == (
        "synced",
        23,
        [["50", "3"]],
        [],
    )
    assert out["streams"][A]["checksums"] == {"checked": 5, "mismatches": 1}
    assert out["streams"][B]["checksums"] == {"checked": 3, "mismatches": 0}


def test_top_n_frames_and_merged_diffs_skip_positions_without_a_gap(tmp_path):
    top, speed = "depth5.X_Y", "depth.X_Y@100ms"
    frames = [
        frame(top, "depthTop", 10, 100, [["5", "1"]], []),
        frame(top, "depthTop", 15, 150, [["5", "2"], ["4", "1"]], []),
        frame(top, "depthTop", 31, 310, [["4", "1"]], []),
        frame(speed, "depthSnapshot", 10, 100, [["5", "1"]], []),
        frame(
            speed,
            "depth",
            14,
            104,
            [["5", "2"], ["4", "1"]],
            [],
            ([["5", "2"], ["4", "1"]], []),
            101,
        ),
        frame(speed, "depth", 31, 131, [["5", "0"]], [], ([["4", "1"]], []), 105),
    ]
    out = run_node(tmp_path, {"streams": [top, speed], "frames": frames})
    assert out["gaps"] == []
    assert out["books"][top]["bids"] == [["4", "1"]] and out["books"][top]["seq"] == 31
    assert out["books"][speed]["bids"] == [["4", "1"]] and out["books"][speed]["u"] == 131
    assert out["streams"][top]["checksums"] == {"checked": 3, "mismatches": 0}
    assert out["streams"][speed]["checksums"] == {"checked": 3, "mismatches": 0}
    # A top-N stream asks for no snapshot: every frame is one.
    assert out["sent"][0]["snapshot"] == [speed]


def test_a_stream_the_server_ends_is_refused_and_forgotten(tmp_path):
    """A derived stream of a book stream without snapshots: the server's
    ``unsubscribed`` notice is a refusal, not a book frame."""
    top, plain = "depth10.X_Y", "depth.X_Y"
    notice = {"e": "unsubscribed", "reason": "no_book", "msg": "depth.X_Y has no snapshots"}
    frames = [json.dumps({"stream": top, "data": notice})]
    out = run_node(tmp_path, {"streams": [top, plain], "frames": frames})
    assert out["refused"] == [{"stream": top, "reason": "depth.X_Y has no snapshots"}]
    assert top not in out["streams"] and top not in out["books"]
    assert plain in out["streams"] and out["gaps"] == []
