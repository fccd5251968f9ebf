"""The test and benchmark toolkit (marketstream.testing) itself: frames
both ways, waiting, handshakes and /health against a real server, and
process checks."""

import asyncio
import struct
import subprocess
import sys

import pytest

from marketstream.testing import (
    RawClient,
    async_wait_until,
    close_frame,
    close_reason,
    die_with_parent,
    free_port,
    handshake,
    handshake_request,
    health,
    health_status,
    masked_frame,
    percentile,
    process_gone,
    raw_socket,
    read_frames,
    server_command,
    server_frames,
    stop_process,
    wait_until,
)
from marketstream.wire.frames import OP_CLOSE, OP_PING, OP_TEXT, text_frame


def unmask(frame):
    """(first byte, payload) of a masked client frame."""
    length, at = frame[1] & 0x7F, 2
    assert frame[1] & 0x80, "a client frame is masked"
    if length == 126:
        length, at = struct.unpack("!H", frame[2:4])[0], 4
    elif length == 127:
        length, at = struct.unpack("!Q", frame[2:10])[0], 10
    mask, body = frame[at : at + 4], frame[at + 4 :]
    assert len(body) == length
    return frame[0], bytes(b ^ mask[i % 4] for i, b in enumerate(body))


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 70000])
def test_masked_frames_of_every_length_class(length):
    payload = bytes(range(256)) * (length // 256) + b"x" * (length % 256)
    assert unmask(masked_frame(payload)) == (0x81, payload)
    assert unmask(masked_frame(payload, OP_PING, fin=False)) == (OP_PING, payload)


@pytest.mark.parametrize("cut", range(0, 12))
def test_read_frames_keeps_a_partial_frame_for_later(cut):
    big, small = text_frame(b"y" * 300), text_frame(b"hi")
    data = small + big
    frames, rest = read_frames(data[: len(small) + cut])
    assert frames == [(OP_TEXT, b"hi")] and rest == big[:cut]
    assert server_frames(rest + big[cut:]) == ([b"y" * 300], b"")
    assert close_reason(b"\x03\xe8") == (1000, "") and close_reason(b"") == (None, "")


def test_waiting_returns_the_value_or_says_what_it_waited_for():
    assert wait_until(lambda: [1]) == [1]
    with pytest.raises(AssertionError, match="waiting for the moon"):
        wait_until(lambda: 0, timeout=0.05, message="the moon")
    calls = iter([OSError("not yet"), OSError("not yet"), "up"])

    def flaky():
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    assert wait_until(flaky, ignore=(OSError,)) == "up"
    with pytest.raises(ValueError):
        wait_until(lambda: int("x"), ignore=(OSError,))
    assert asyncio.run(async_wait_until(lambda: "now")) == "now"


def test_percentile_by_rank():
    assert percentile([], 0.5) is None
    assert percentile(range(100), 0.99) == 99 and percentile([5.0], 0.0) == 5.0


@pytest.mark.gen_test(timeout=30)
async def test_raw_clients_and_health_against_a_real_server(server):
    port = server.settings.port
    client = await RawClient.connect(port)
    client.send('{"method":"LIST_SUBSCRIPTIONS","id":1}')
    assert await client.recv() == (OP_TEXT, b'{"result":[],"id":1}')
    loop = asyncio.get_running_loop()
    sock, rest = await raw_socket(port)
    await loop.sock_sendall(sock, masked_frame(struct.pack("!H", 1000), OP_CLOSE))
    assert await close_frame(sock, rest) == (1000, "")
    sock.close()
    client.close()
    # /health, blocking: off the loop the server runs on.
    body = await loop.run_in_executor(None, health, port)
    assert body["status"] == "ok" and "stats" in body  # a direct request gets the details
    assert await loop.run_in_executor(None, health_status, port) == 200
    assert await loop.run_in_executor(None, health_status, free_port()) is None


def test_process_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_gone(child.pid)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not process_gone(running.pid)
    finally:
        running.kill()
        running.wait()


def test_server_command_starts_a_server_with_the_settings_given(redis_url):
    """The benchmarks' server: listening where asked, on the Redis given,
    each setting passed (acks on), the settings winning over the room made
    for ``clients`` (two connections, not 1100)."""
    port = free_port()
    command = server_command(
        port, redis_url, ["protocol.acks=true", "server.max_connections=2"], clients=1000
    )
    proc = subprocess.Popen(command, preexec_fn=die_with_parent)
    sockets = []
    try:
        wait_until(lambda: health_status(port) == 200, 30, message="GET /health -> 200")
        assert health(port)["pid"] == proc.pid
        for _ in range(2):
            sockets.append(handshake(("127.0.0.1", port), handshake_request(port)))
        sockets[0].sendall(masked_frame('{"method":"SUBSCRIBE","params":["trade.A_B"],"id":7}'))
        sockets[0].settimeout(10)
        data = b""
        while not read_frames(data)[0]:
            chunk = sockets[0].recv(4096)
            assert chunk, "closed before the reply"
            data += chunk
        assert read_frames(data)[0] == [(OP_TEXT, b'{"result":null,"id":7}')]
        with pytest.raises(RuntimeError, match="refused"):
            sockets.append(handshake(("127.0.0.1", port), handshake_request(port)))
    finally:
        for sock in sockets:
            sock.close()
        stop_process(proc)
