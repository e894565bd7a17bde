"""The file mechanics the workers' shared tables have in common: a file made whole
before anyone opens it, and a lock between processes that map it.

`create_file` writes a new table beside its path and renames it over the path,
so a worker's ``open`` never sees half a table, and workers still mapping an
old file keep its pages. `FileLock` is a thread lock and an exclusive
``flock`` on the table's own open file: the lock of one process against
another, and of one thread against another in a process. Why mmap and flock:
docs/workers.md.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def create_file(target: Path, size: int, header: bytes) -> int:
    """A new file of ``size`` zero bytes starting with ``header``, renamed to ``target``.

    Returns:
        The file's descriptor, open for reading and writing.

    Raises:
        OSError: the file cannot be written.
    """
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    replaced = False
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, header, 0)
        os.replace(tmp, target)
        replaced = True
        return fd
    except BaseException:
        os.close(fd)
        if not replaced:
            os.unlink(tmp)
        raise


def owning(fd: int, make: Callable[[], T]) -> T:
    """``make()``, the table that owns ``fd`` from then on; ``fd`` closed if it raises."""
    try:
        return make()
    except BaseException:
        os.close(fd)
        raise


class FileLock:
    """Exclusive access to a table among the processes and threads that map it.

    Not inherited across ``fork``: the ``flock`` belongs to the open file,
    which a forked child would share with its parent, so the lock would not
    keep them apart. Acquiring it in a process other than the one that
    opened the file raises RuntimeError.
    """

    def __init__(self, fd: int, what: str) -> None:
        self._fd = fd
        self._what = what
        self._pid = os.getpid()
        self._thread_lock = threading.Lock()

    def acquire(self) -> None:
        """Wait for the lock.

        Raises:
            RuntimeError: the file was opened before a fork.
        """
        if os.getpid() != self._pid:
            raise RuntimeError(f"{self._what} was opened before fork: open it again")
        self._thread_lock.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def release(self) -> None:
        """Give the lock back."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()
