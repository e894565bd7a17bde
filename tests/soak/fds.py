"""What a process's open file descriptors are, for telling which ones a run left behind."""

from __future__ import annotations

import contextlib
import os
from collections import Counter

import psutil


def fd_table(pid: int, names: dict[int, str] | None = None) -> Counter[str]:
    """Each open fd described: a file's path, a TCP socket's peer (named by port), or its link.

    Args:
        pid: the process.
        names: peers' ports and what to call them (``{6379: "redis"}``).
    """
    names = names or {}
    peers: dict[int, str] = {}
    with contextlib.suppress(psutil.Error):
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.fd < 0:
                continue
            if conn.raddr:
                port = conn.raddr.port
                peers[conn.fd] = (
                    f"tcp to {names.get(port, 'port')}" if port in names else "tcp to a client"
                )
            else:
                peers[conn.fd] = f"tcp listening on {names.get(conn.laddr.port, 'a port')}"
    table: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                table[peers.get(int(fd), link if not link.startswith("socket:") else "socket")] += 1
    return table


def left_behind(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    """Fds open after and not before, by description."""
    return dict(after - before)
