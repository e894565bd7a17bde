"""Building and driving the benchmark's C tools; process CPU accounting.

The load generator (`src/loadgen.c`) and the upstream (`src/upstream.c`)
are compiled with the system's ``gcc`` into ``bench/bin/`` (gitignored)
the first time they are needed and again whenever a source is newer than
its binary. Every process started here is ended by its PID: SIGTERM, a
bounded wait, then SIGKILL.

Used by `run.py` (the benchmark) and `test_bench_tools.py` (the self-check).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
SRC_DIR = BENCH_DIR / "src"
BIN_DIR = BENCH_DIR / "bin"
HOST = "127.0.0.1"

# -O2 is what a distribution would build with; -pthread for the upstream's
# optional worker threads.
CFLAGS = ["-O2", "-Wall", "-Wextra", "-pthread"]
TOOLS = ("loadgen", "upstream")
# Seconds a freshly started process gets to report that it is listening.
START_TIMEOUT = 15.0
# Seconds a process gets to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def build_tools(bin_dir: Path = BIN_DIR) -> dict[str, Path]:
    """Compile the C tools when missing or older than their sources.

    Each binary is written to a temporary name and renamed into place, so a
    concurrent build or run never sees half a file.

    Returns:
        ``{"loadgen": path, "upstream": path}``.

    Raises:
        RuntimeError: gcc is missing or the build failed (its output is in
            the message).
    """
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("the benchmark tools need a C compiler (gcc or cc) on PATH")
    bin_dir.mkdir(parents=True, exist_ok=True)
    header = SRC_DIR / "wire.h"
    built = {}
    for name in TOOLS:
        source = SRC_DIR / f"{name}.c"
        target = bin_dir / name
        newest = max(source.stat().st_mtime, header.stat().st_mtime)
        if not target.exists() or target.stat().st_mtime < newest:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=bin_dir)
            os.close(fd)
            result = subprocess.run(
                [gcc, *CFLAGS, "-o", tmp, str(source)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if result.returncode != 0:
                Path(tmp).unlink(missing_ok=True)
                raise RuntimeError(f"building {name} failed:\n{result.stderr}")
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)
        built[name] = target
    return built


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> int | None:
    """End a process we started, by its PID: SIGTERM, wait, then SIGKILL.

    Returns:
        Its exit status (None if it could not be reaped).
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
    return proc.returncode


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next line of a process's stdout, waiting at most ``timeout`` seconds.

    Raises:
        RuntimeError: the process exited or stayed silent.
    """
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"pid {proc.pid} printed nothing within {timeout}s")
            if sel.select(remaining):
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"pid {proc.pid} exited with {proc.wait()}")
                return line


@contextlib.contextmanager
def upstream_server(
    binary: Path, threads: int = 1, port: int = 0
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Run the C upstream; yields (process, port) and stops it by PID on exit."""
    proc = subprocess.Popen(
        [str(binary), "--host", HOST, "--port", str(port), "--threads", str(threads)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = read_line(proc, START_TIMEOUT)
        word, _, number = line.partition(" ")
        if word != "LISTENING":
            raise RuntimeError(f"upstream said {line!r}")
        yield proc, int(number)
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def wait_for_port(port: int, proc: subprocess.Popen[Any], timeout: float = START_TIMEOUT) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``.

    Raises:
        RuntimeError: ``proc`` exited first, or the deadline passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"pid {proc.pid} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on port {port} after {timeout}s")
        time.sleep(0.02)


def run_loadgen(
    binary: Path,
    port: int,
    *,
    conns: int,
    payload: int,
    transport: str,
    duration: float,
    warmup: float = 0.5,
    rate: float = 0.0,
    drain: float = 5.0,
) -> dict[str, Any]:
    """One load generator run; returns its JSON report.

    Raises:
        RuntimeError: it failed to run, or ran past its own time bound.
    """
    args = [
        str(binary),
        "--host",
        HOST,
        "--port",
        str(port),
        "--conns",
        str(conns),
        "--payload",
        str(payload),
        "--transport",
        transport,
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        "--rate",
        str(rate),
        "--drain",
        str(drain),
    ]
    # Its own bound is warmup + duration + drain; allow that plus start-up.
    limit = warmup + duration + drain + 15.0
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        proc.communicate()
        raise RuntimeError(f"loadgen ran past {limit}s: {' '.join(args)}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen exited {proc.returncode}: {err.strip()}")
    report: dict[str, Any] = json.loads(out)
    return report


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process: all its threads, dead ones included.

    Read from ``/proc/PID/stat`` (fields 14 and 15, in clock ticks, usually
    10 ms each: a 3-second run at tens of thousands of calls/s makes that
    resolution negligible).
    """
    with open(f"/proc/{pid}/stat", "rb") as fh:
        raw = fh.read()
    # The command name (field 2) may contain spaces: split after its ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (see `cpu_times`)."""
    user, system = cpu_times(pid)
    return user + system


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores; not idle, not iowait)."""
    with open("/proc/stat") as fh:
        ticks = [int(v) for v in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLK_TCK
