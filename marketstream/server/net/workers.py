"""Several worker processes on one port.

The parent binds one group of listening sockets per worker
(:func:`~marketstream.server.net.listen.bind_listeners`, ``SO_REUSEPORT``: the kernel
spreads connections evenly over the groups), forks ``count`` workers,
restarts a worker that dies, and on SIGTERM or SIGINT asks every worker to
shut down gracefully and waits for them::

    groups = bind_listeners("0.0.0.0", 4000, 2)
    exit_code = supervise(2, lambda index: run_worker(groups[index]), grace=15,
                          listeners=groups)

Worker ``i`` keeps only ``groups[i]`` open (it closes its copies of the other
workers' sockets); the parent keeps them all, so connections that arrive
for a worker while it restarts wait in its socket's backlog.  Each worker
runs its own event loop, Redis subscription and clients.  Workers ask the
kernel to send them SIGTERM if the parent dies, so none outlives it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType


__all__ = ["supervise", "worker_id", "die_with_parent"]

log = logging.getLogger(__name__)

_worker_id: int | None = None


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` (SIGTERM) to this process when its
    parent exits.

    Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere it does nothing.  The
    kernel ties this to the parent *thread*: start the child from a thread
    that lives as long as the child should::

        subprocess.Popen(args, preexec_fn=die_with_parent)
        subprocess.Popen(args, preexec_fn=functools.partial(die_with_parent, signal.SIGKILL))
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_id() -> int | None:
    """The index of this worker (0..count-1), or None in a single process."""
    return _worker_id


def _spawn(
    index: int,
    target: Callable[[int], int | None],
    listeners: Sequence[Sequence[socket.socket]] | None = None,
) -> int:
    pid = os.fork()
    if pid:
        return pid
    # Child.
    global _worker_id
    _worker_id = index
    code = 1
    try:
        for other, group in enumerate(listeners or ()):
            if other != index:
                for sock in group:
                    sock.close()  # the parent's copy stays open
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        die_with_parent()
        code = target(index) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("worker %d crashed", index)
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def supervise(
    count: int,
    target: Callable[[int], int | None],
    grace: float = 10.0,
    restart_delay: float = 1.0,
    on_exit: Callable[[int], None] | None = None,
    listeners: Sequence[Sequence[socket.socket]] | None = None,
    fatal: int | None = None,
) -> int:
    """Run ``target(index)`` in ``count`` forked workers until SIGTERM/SIGINT.

    A worker that exits while the parent is not stopping is logged and
    restarted (no faster than once per ``restart_delay`` per slot);
    ``on_exit(pid)`` is called for every worker that exits.  With
    ``listeners`` (one group of sockets per worker), worker ``i`` closes
    every group but ``listeners[i]``.  A worker that exits with code
    ``fatal`` (it cannot start, and would not in another try) is not
    restarted: the others are stopped.  Returns 0 when every worker stopped
    cleanly on request, 1 otherwise.
    """
    if listeners is not None and len(listeners) != count:
        raise ValueError("listeners: %d groups for %d workers" % (len(listeners), count))
    stopping: list[int] = []

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    workers: dict[int, int] = {}  # pid -> index
    started: dict[int, float] = {}  # index -> time of last start
    try:
        for index in range(count):
            workers[_spawn(index, target, listeners)] = index
            started[index] = time.monotonic()
        log.info("started %d worker processes: %s", count, " ".join(map(str, workers)))
        while workers and not stopping:
            reaped = _wait(timeout=0.5)
            if reaped is None:
                continue
            pid, status = reaped
            index = workers.pop(pid)
            if on_exit:
                on_exit(pid)
            if stopping:
                break
            if fatal is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == fatal:
                log.error("worker %d (pid %d) cannot start; stopping the others", index, pid)
                _stop_all(workers, grace)
                return 1
            log.error("worker %d (pid %d) %s; restarting it", index, pid, _describe(status))
            time.sleep(max(0.0, started[index] + restart_delay - time.monotonic()))
            workers[_spawn(index, target, listeners)] = index
            started[index] = time.monotonic()
        return _stop_all(workers, grace)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(timeout: float) -> tuple[int, int] | None:
    """``(pid, status)`` of a child that exited within ``timeout``, or None."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return None
        if pid:
            return pid, status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return "was killed by signal %d" % os.WTERMSIG(status)
    return "exited with code %d" % os.WEXITSTATUS(status)


def _stop_all(workers: dict[int, int], grace: float) -> int:
    log.info("stopping %d worker(s)", len(workers))
    for pid in workers:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    clean = True
    deadline = time.monotonic() + grace + 5
    while workers and time.monotonic() < deadline:
        reaped = _wait(timeout=0.2)
        if reaped is not None and reaped[0] in workers:
            pid, status = reaped
            index = workers.pop(pid)
            if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                log.warning("worker %d (pid %d) %s", index, pid, _describe(status))
                clean = False
    for pid in workers:  # did not stop within the grace period
        log.error("worker pid %d did not stop in time; killing it", pid)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        clean = False
    return 0 if clean else 1
