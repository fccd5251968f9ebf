"""marketstream.server.reads: history reads against a real Redis, one per
stream, at most MAX_READS at a time, retried after a failure."""

import asyncio
import logging

import pytest

from marketstream.fanout.core import Core, Want
from marketstream.fanout.counters import Counters
from marketstream.loglimit import LogLimiter
from marketstream.publisher import Publisher
from marketstream.server.reads import MAX_READS, HistoryReads
from marketstream.testing import async_wait_until, free_port

log = logging.getLogger("marketstream.server.channels")


class Conn:
    def __init__(self):
        self.writes = []

    def write_frames(self, data):
        self.writes.append(data)


def recovering(core, conn, names):
    """``conn`` subscribes ``names`` with a snapshot wanted, confirmed."""
    core.register(conn)
    core.subscribe(conn, names, {name: Want(snapshot=True) for name in names})
    for name in names:
        core.upstream_confirmed(name)


@pytest.mark.gen_test(timeout=30)
async def test_reads_run_at_most_max_reads_at_a_time_and_deliver_every_snapshot(redis_url):
    names = ["ticker.READ%d_USDT" % index for index in range(MAX_READS + 8)]
    publisher = Publisher(redis_url, history=10)
    for name in names:
        publisher.publish(name, {"p": name}, snapshot=True)
    publisher.close()
    core, conn, done = Core(Counters()), Conn(), []
    recovering(core, conn, names)
    reads = HistoryReads(redis_url, core, 100, LogLimiter(log), lambda: done.append(1))
    reads.start()
    await asyncio.sleep(0)  # start() runs once the loop has handled what it read
    assert len(reads._tasks) == MAX_READS  # the rest wait for one to end
    await async_wait_until(lambda: not core.recovering, timeout=20, message="all read")
    frames = core.take_batch()[conn]
    assert all(name.encode() in frames for name in names)
    assert done
    reads.cancel()
    await reads.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_failed_read_is_logged_and_retried(caplog):
    caplog.set_level(logging.WARNING, "marketstream.server.channels")
    core, conn, done = Core(Counters()), Conn(), []
    recovering(core, conn, ["ticker.GONE_USDT"])
    url = "redis://127.0.0.1:%d/0" % free_port()  # nothing listens
    reads = HistoryReads(url, core, 100, LogLimiter(log), lambda: done.append(1))
    reads.start()

    def failures():
        return [r for r in caplog.records if "history of ticker.GONE_USDT" in r.getMessage()]

    # Each try fails (redis-py retries the connection a few times first);
    # a second line means the read was tried again.
    await async_wait_until(lambda: len(failures()) >= 2, timeout=40, message="tried again")
    assert not done and core.recovering
    reads.cancel()
    await reads.close()
    await async_wait_until(lambda: not reads._tasks, message="cancelled")
