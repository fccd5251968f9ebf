"""marketstream.server.wsprotocol: the frame loop in a task of its own, the
frame budget, and close frames checked before Tornado reads them."""

import logging
import struct

import pytest

from marketstream.server.wsprotocol import StreamProtocol
from marketstream.testing import RawClient, async_wait_until
from marketstream.wire.frames import OP_CLOSE, OP_PING

LIST = '{"method":"LIST_SUBSCRIPTIONS","id":1}'


@pytest.mark.gen_test
async def test_the_frame_loop_runs_in_a_task_the_handler_holds(server):
    client = await RawClient.connect(server.settings.port)
    client.send(LIST)
    assert (await client.recv())[1]
    handler = next(iter(server.manager.connections))
    assert isinstance(handler.ws_connection, StreamProtocol)
    loop_task = handler.frame_loop
    assert loop_task is not None and not loop_task.done()
    client.close()
    await async_wait_until(lambda: handler.frame_loop is None, message="loop over")
    assert loop_task.done() and not loop_task.cancelled() and loop_task.exception() is None


@pytest.mark.gen_test
async def test_pings_past_the_frame_budget_close_with_1008(server_factory):
    """Control frames count: a ping flood never reaches the message limit,
    but it spends the frame budget."""
    server = await server_factory(limits__frames_per_second="1", limits__frames_burst="20")
    client = await RawClient.connect(server.settings.port)
    for _ in range(60):
        client.send(b"", opcode=OP_PING)
    assert await client.recv_close() == (1008, "frame rate exceeded")
    client.close()
    assert server.counters.closed["frame_rate_limit"] == 1
    await async_wait_until(lambda: not server.manager.connections, message="closed")


@pytest.mark.gen_test
async def test_a_close_frame_with_a_broken_reason_drops_only_that_client(server, caplog):
    caplog.set_level(logging.INFO, "marketstream.server.handlers")
    bad = await RawClient.connect(server.settings.port)
    good = await RawClient.connect(server.settings.port)
    bad.send(struct.pack("!H", 1000) + b"\xff\xfe", opcode=OP_CLOSE)
    while (await bad.recv())[0] is not None:
        pass  # dropped without a close frame of ours
    bad.close()
    good.send(LIST)
    assert (await good.recv())[1]
    good.close()
    ours = [r for r in caplog.records if r.name.startswith("marketstream")]
    assert not [r for r in ours if r.levelno >= logging.ERROR or r.exc_info]
    assert any("invalid UTF-8 reason" in r.getMessage() for r in ours)
