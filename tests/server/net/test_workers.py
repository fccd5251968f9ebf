"""The supervisor of worker processes (marketstream.server.net.workers):
each worker accepts on its own listening sockets only."""

import collections
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from marketstream.testing import process_gone, wait_until
from tests.helpers import ROOT


_WORKERS = textwrap.dedent("""
    import os, select, sys
    from marketstream.server.net.listen import bind_listeners
    from marketstream.server.net.workers import supervise

    groups = bind_listeners("127.0.0.1", 0, 2)
    print(groups[0][0].getsockname()[1], flush=True)

    def worker(index):
        mine = groups[index][0]
        assert all(s.fileno() == -1 for g in groups if g is not groups[index] for s in g)
        mine.setblocking(True)
        while True:
            conn, _ = mine.accept()
            conn.sendall(b"%d" % index)
            conn.close()

    sys.exit(supervise(2, worker, grace=2, listeners=groups))
""")


def test_each_worker_accepts_on_its_own_socket_only():
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKERS],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        port = int(proc.stdout.readline())
        seen = collections.Counter()

        def answered():
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"x")  # TCP_DEFER_ACCEPT: hand over once data came
                seen[sock.recv(8)] += 1
            return sum(seen.values()) >= 400

        wait_until(answered, 20, interval=0, message="400 answers")
        assert set(seen) == {b"0", b"1"}, seen
        assert min(seen.values()) >= 0.4 * 400, seen
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    errors = proc.stderr.read()
    assert "crashed" not in errors and "Traceback" not in errors, errors


def test_supervise_refuses_a_group_count_that_does_not_match():
    from marketstream.server.net.workers import supervise

    with pytest.raises(ValueError):
        supervise(2, lambda index: 0, listeners=[[]])


_ORPHAN = textwrap.dedent("""
    import subprocess, sys, time
    from marketstream.server.net.workers import die_with_parent
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             preexec_fn=die_with_parent)
    print(child.pid, flush=True)
    time.sleep(60)
""")


def test_a_child_that_asked_to_die_with_its_parent_does():
    parent = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN], cwd=ROOT, text=True, stdout=subprocess.PIPE
    )
    try:
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        wait_until(
            lambda: process_gone(child),
            20,
            interval=0.05,
            message="the child to exit with its parent",
        )
    finally:
        parent.kill()
        parent.wait()
