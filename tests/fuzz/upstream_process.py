"""The fuzz run's upstream: a thriftpy2 server of `tests.support.servers`, in a process of its own.

Run as ``python -m tests.fuzz.upstream_process``: it prints its port on one
line, then serves until its standard input closes or it gets SIGTERM. Its own
process keeps the upstream's threads from competing for the fuzzer's GIL, so
that a stall in one is not measured as a stall in the other.

`upstream_process()` starts it, yields its address, and stops it by its PID.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    from tests.support.servers import thriftpy2_server

    # Garbage the sidecar forwards makes the handlers fail; a line per failure is noise here.
    logging.basicConfig(level=logging.CRITICAL)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())

    def wait_stdin_closed() -> None:
        with contextlib.suppress(OSError):
            sys.stdin.read()
        done.set()

    threading.Thread(target=wait_stdin_closed, daemon=True).start()
    with thriftpy2_server("framed") as server:
        print(server.port, flush=True)
        done.wait()


@contextlib.contextmanager
def upstream_process(timeout: float = 20.0) -> Iterator[str]:
    """Start the upstream process; yields ``"127.0.0.1:PORT"``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fuzz.upstream_process"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=REPO_ROOT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # the process prints its port at once
        if not line.isdigit():
            raise RuntimeError(f"upstream process did not start (exit {proc.poll()})")
        yield f"127.0.0.1:{line}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


if __name__ == "__main__":
    main()
