"""Free TCP ports for the processes a test or a benchmark starts, picked outside the kernel's range.

A port found free is bound a moment later by another process (a sidecar,
an upstream, redis-server), so something else can take it in between. A
port from ``bind((host, 0))`` comes from the kernel's ephemeral range,
which every outgoing connection also draws its source port from: in a
busy run (CI runs two test suites at once) a connection sometimes took the
port first. `free_port` picks below that range, where nothing gets a port
without asking for it by number, and gives each of the runs sharing the
machine its own share of it: ``THRIFT_SIDECAR_PORT_BLOCK=I/N`` (block I
of N, from 0; scripts/test sets it per suite), all of it when unset.

A process is not handed a port it was handed lately (the last half of its
block, at most `RECENT` ports): two picks for one config (``listen`` and
``metrics.listen``) were sometimes the same port, and the sidecar refuses
that config.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

# Below this, ports are often well known (redis 6379, HTTP 8080, ...).
LOWEST = 10000
PORT_BLOCK_VARIABLE = "THRIFT_SIDECAR_PORT_BLOCK"
_ATTEMPTS = 200
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Most ports a process remembers having handed out (oldest forgotten first).
RECENT = 1000
_handed: dict[int, None] = {}  # in the order handed out


def ephemeral_low(range_file: Path = _RANGE_FILE) -> int:
    """The first port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(range_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_block(environ: dict[str, str] | os._Environ[str] = os.environ) -> tuple[int, int]:
    """(I, N) from ``THRIFT_SIDECAR_PORT_BLOCK=I/N``; (0, 1) when unset or malformed."""
    index, _, count = environ.get(PORT_BLOCK_VARIABLE, "").partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        return 0, 1
    return (i, n) if 0 <= i < n else (0, 1)


def port_range(low: int, block: tuple[int, int]) -> range:
    """The ports `free_port` picks from: block I of N of [LOWEST, ``low``)."""
    i, n = block
    size = (low - LOWEST) // n
    start = LOWEST + i * size
    return range(start, start + size)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago, from this run's block."""
    ports = port_range(ephemeral_low(), port_block())
    if len(ports) >= 100:
        for _ in range(_ATTEMPTS):
            port = random.choice(ports)
            if port in _handed:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            return _hand_out(port, min(RECENT, len(ports) // 2))
    with socket.socket() as sock:  # no room below the kernel's range: its pick
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _hand_out(port: int, remembered: int) -> int:
    _handed[port] = None
    while len(_handed) > remembered:
        del _handed[next(iter(_handed))]
    return port
