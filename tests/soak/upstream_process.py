"""The soak run's upstream: a thriftpy2 Interop server that writes down every order it executes.

Run as ``python -m tests.soak.upstream_process PORT ORDERS_FILE``: it listens
on PORT (0 for any; it prints the port on one line), and appends the
``customer`` of every ``placeOrder`` it executes to ORDERS_FILE, one line
each, before it replies. The file outlives the process, so executions are
counted across restarts; a customer written twice is a write executed twice.
It serves until SIGTERM, or until its standard input closes (its parent gone).

`UpstreamProcess` starts it, stops it by its PID (SIGTERM, or SIGKILL for a
crash) and starts it again on the same port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def main(port: int, orders_path: str) -> None:
    import logging

    from tests.support.handler import InteropHandler
    from tests.support.servers import Thriftpy2Server

    logging.basicConfig(level=logging.CRITICAL)
    fd = os.open(orders_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    class RecordingHandler(InteropHandler):
        def placeOrder(self, order: Any) -> Any:
            receipt = super().placeOrder(order)
            os.write(fd, f"{order.customer}\n".encode())  # one write: whole lines, even on kill
            return receipt

    class RecordingServer(Thriftpy2Server):
        def _make_processor(self) -> Any:
            from tests.support.idl import load_thriftpy2_interop
            from tests.support.servers import _Thriftpy2Processor

            idl = load_thriftpy2_interop()
            return _Thriftpy2Processor(idl.Interop, RecordingHandler(self.state, idl))

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())

    def wait_stdin_closed() -> None:  # the parent is gone, however it ended
        with contextlib.suppress(OSError):
            sys.stdin.read()
        done.set()

    threading.Thread(target=wait_stdin_closed, daemon=True).start()
    server = RecordingServer("framed", port=port, idle_timeout=30.0)
    server.start()
    try:
        print(server.port, flush=True)
        done.wait()
    finally:
        server.stop()
        os.close(fd)


class UpstreamProcess:
    """The upstream in a process of its own, restartable on the same port."""

    def __init__(self, orders_path: Path, port: int = 0) -> None:
        self.orders_path = orders_path
        self.port = port
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start it (on the former port after the first start); returns once it listens."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.soak.upstream_process",
                str(self.port),
                str(self.orders_path),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=REPO_ROOT,
            text=True,
        )
        self.proc = proc
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # printed once it listens
        proc.stdout.close()
        if not line.isdigit():
            self.stop(kill=True)
            raise RuntimeError(f"upstream process did not start (exit {proc.poll()})")
        self.port = int(line)
        self.starts += 1

    def stop(self, kill: bool = False, timeout: float = 10.0) -> None:
        """SIGTERM (or SIGKILL) by PID and wait; SIGKILL if SIGTERM is not enough."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        if proc.stdin is not None:
            proc.stdin.close()

    def executed_orders(self) -> Counter[str]:
        """How many times each customer's order was executed, over every start."""
        with contextlib.suppress(FileNotFoundError):
            return Counter(self.orders_path.read_text().split())
        return Counter()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
