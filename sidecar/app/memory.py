"""Memory the process gives back: large message buffers are returned to the system when freed.

glibc's malloc serves a large block from the heap once a block of that size
has been freed (its mmap threshold adapts upward, to 32 MiB), and a freed heap
block in the middle of the heap is not returned: after a few 16 MiB messages
the sidecar's RSS stayed tens of megabytes higher for good (issue 13, finding
11). Fixing the threshold at 1 MiB makes every block of a large message its
own mapping, unmapped when the message is done. Smaller blocks are not
affected. Where the C library is not glibc, nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("sidecar")

# mallopt's parameter number for the mmap threshold (glibc's malloc.h).
_M_MMAP_THRESHOLD = -3
# Blocks of this size and larger get a mapping of their own.
LARGE_BLOCK = 1 << 20


def return_large_blocks() -> bool:
    """Fix glibc's mmap threshold at `LARGE_BLOCK`; False where that cannot be done."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK))
    if not done:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; large buffers may stay in the heap")
    return done
