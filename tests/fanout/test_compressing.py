"""Compressing listeners in the fan-out core (marketstream.fanout.compressing):
each message deflated once, the frame shared by every compressing
connection, plain connections unchanged; catch-ups and gap notices follow
the same rule."""

from __future__ import annotations

import json

from marketstream.fanout.core import Core, Want
from marketstream.fanout.counters import Counters
from marketstream.wire.deflate import Deflater, inflate_frame
from marketstream.wire.frames import text_frame
from tests.fanout.doubles import Feed, finish, one_read

S = "depth.BTC_USDT"
DEPTH = json.dumps(
    {"e": "depth", "bids": [["%d.5" % (60000 - i), "0.25"] for i in range(60)]},
    separators=(",", ":"),
).encode()
BIG = b'{"stream":"%s","data":%s}' % (S.encode(), DEPTH)
SMALL = b'{"stream":"%s","data":{"e":"depth","b":[["1.0","2"]]}}' % S.encode()


class Conn:
    """A connection that keeps its raw writes and decodes them as a
    permessage-deflate client would (frames with RSV1 inflated)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.writes: list[bytes] = []

    def __repr__(self) -> str:
        return "Conn(%s)" % self.name

    def frames(self) -> list[bytes]:
        """Every frame received, whole (header included)."""
        out = []
        for data in self.writes:
            at = 0
            while at < len(data):
                length, start = data[at + 1] & 0x7F, at + 2
                if length == 126:
                    length, start = int.from_bytes(data[at + 2 : at + 4], "big"), at + 4
                elif length == 127:
                    length, start = int.from_bytes(data[at + 2 : at + 10], "big"), at + 10
                out.append(data[at : start + length])
                at = start + length
        return out

    def messages(self) -> list[bytes]:
        return [inflate_frame(frame) for frame in self.frames()]

    def compressed(self) -> list[bool]:
        return [bool(frame[0] & 0x40) for frame in self.frames()]


def make_core(min_bytes: int = 256) -> Core:
    return Core(Counters(), deflater=Deflater(min_bytes))


def flush(core: Core) -> dict:
    batch = core.take_batch()
    for conn, data in batch.items():
        conn.writes.append(data)
    return batch


def join(core: Core, conn: Conn, compressing: bool, name: str = S, want: Want | None = None):
    core.register(conn, compressing)
    core.subscribe(conn, [name], {name: want} if want else None)
    core.upstream_confirmed(name)


def test_a_compressing_and_a_plain_client_receive_the_same_messages():
    core = make_core()
    z, p = Conn("z"), Conn("p")
    join(core, z, True)
    join(core, p, False)
    core.on_message(S.encode(), BIG)
    core.on_message(S.encode(), SMALL)
    flush(core)
    assert z.messages() == p.messages() == [BIG, SMALL]
    assert z.compressed() == [True, False]  # the small one goes plain (RSV1 clear)
    assert p.compressed() == [False, False]
    assert p.writes == [text_frame(BIG) + text_frame(SMALL)]
    assert sum(map(len, z.writes)) < len(BIG) // 3


def test_each_message_is_compressed_once_and_its_frame_shared():
    core = make_core()
    zs = [Conn("z%d" % i) for i in range(5)]
    plain = [Conn("p%d" % i) for i in range(3)]
    for conn in zs:
        join(core, conn, True)
    for conn in plain:
        join(core, conn, False)
    core.on_message(S.encode(), BIG)
    batch = core.take_batch()
    frames = [batch[conn] for conn in zs]
    assert all(frame is frames[0] for frame in frames)  # one object, five clients
    assert all(batch[conn] is batch[plain[0]] for conn in plain)
    assert frames[0] is not batch[plain[0]] and frames[0][0] == 0xC1
    counters = core.counters
    assert counters.deflated_messages == 1
    assert counters.deflate_bytes_in == len(text_frame(BIG))
    assert counters.deflate_bytes_out == len(frames[0])
    assert counters.deliveries == 8 and core.batch.messages == 0


def test_only_streams_with_compressing_listeners_compress():
    core = make_core()
    p = Conn("p")
    join(core, p, False)
    core.on_message(S.encode(), BIG)
    flush(core)
    assert core.counters.deflated_messages == 0
    z = Conn("z")
    join(core, z, True)  # the split by kind follows the listeners
    core.on_message(S.encode(), BIG)
    flush(core)
    assert z.compressed() == [True] and core.counters.deflated_messages == 1
    core.remove(z)
    core.on_message(S.encode(), BIG)
    flush(core)
    assert core.counters.deflated_messages == 1
    assert p.messages() == [BIG] * 3


def test_compression_off_sends_plain_frames_to_everyone():
    core = Core(Counters())  # no Deflater
    z = Conn("z")
    join(core, z, True)
    core.on_message(S.encode(), BIG)
    flush(core)
    assert z.writes == [text_frame(BIG)]


def test_a_snapshot_catch_up_is_compressed_once_for_all_compressing_clients():
    core = make_core(min_bytes=40)
    feed = Feed(name=S, snapshot_every=5)
    feed.snapshot = None
    for _ in range(6):
        feed.publish()
    feed.snapshot = (5, b'{"stream":"%s","data":%s,"seq":5}' % (S.encode(), DEPTH))
    z1, z2, p = Conn("z1"), Conn("z2"), Conn("p")
    for conn, compressing in ((z1, True), (z2, True), (p, False)):
        join(core, conn, compressing, want=Want(snapshot=True))
    read = one_read(core)
    finish(core, read, feed.read(read, core.max_replay))
    batch = flush(core)
    assert batch[z1] is batch[z2]  # the joined catch-up, built once
    assert z1.messages() == p.messages()
    assert z1.messages()[0] == feed.snapshot[1]
    assert z1.compressed()[0] is True and p.compressed() == [False, False]
    assert core.counters.snapshots_sent == 3
    assert core.counters.deflated_messages == 1  # the snapshot; the small entry stays plain


def test_gap_notices_follow_the_same_rule():
    core = make_core(min_bytes=0)
    z, p = Conn("z"), Conn("p")
    join(core, z, True, "trade.X")
    join(core, p, False, "trade.X")
    core.link_lost()
    core.link_restored({"trade.X"})
    core.upstream_confirmed("trade.X")
    flush(core)
    assert z.messages() == p.messages()
    assert json.loads(z.messages()[0])["data"]["e"] == "gap"
