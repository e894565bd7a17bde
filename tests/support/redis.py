"""Fleet mode tests: a real ``redis-server`` on a free loopback port.

`RedisServer` starts ``redis-server`` without persistence (``--save ""
--appendonly no``), waits until it answers PING, and stops it by its PID;
`RedisServer.stop` and `RedisServer.start` again bring it back on the same
port, empty (what a restarted cache looks like). `SilentServer` is a real TCP
listener that accepts connections and never answers: a Redis that hangs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.sidecar import free_port
from tests.support.wait import wait_until

INSTALL_HINT = (
    "redis-server is not installed: the fleet tests need a real one. Install it with "
    "`scripts/setup-env --system` (Debian/Ubuntu: `sudo apt-get install redis-server`)."
)


def redis_binary() -> str:
    """The path of ``redis-server``; fails the test (not skips) when missing."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return found


class RedisServer:
    """A ``redis-server`` process of our own on 127.0.0.1."""

    def __init__(self, port: int | None = None) -> None:
        self.binary = redis_binary()
        self.port = port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="sidecar-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start it (again, on the same port) and wait until it answers PING."""
        assert not self.running, "already running"
        log = (self.workdir / f"redis-{self.starts}.log").open("wb")
        self.starts += 1
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with self.client(timeout=0.5) as client:
                    return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(answers, timeout=timeout, interval=0.02, message="redis-server PING")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID, wait; SIGKILL if it lingers."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def client(self, timeout: float = 2.0) -> redis.Redis:
        """A synchronous client for the test's own inspection (close it after use)."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A running `RedisServer`, stopped by PID on exit."""
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte: a hung Redis."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self.accepted:
            conn.close()
        self._sock.close()


def redis_keys(server: RedisServer, pattern: str = "*") -> dict[str, int]:
    """Every key matching ``pattern`` with its TTL in milliseconds (PTTL)."""
    with server.client() as client:
        keys = [k.decode() for k in client.scan_iter(match=pattern, count=1000)]
        return {k: int(client.pttl(k)) for k in keys}
