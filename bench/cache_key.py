"""What a fallback cache key costs per call: xxh3-128 (the key) against BLAKE2b (the key before).

Times, in one process with the variants interleaved round by round (medians
of the rounds), for 64 B and 16 KiB of argument bytes:

Timed with the process's CPU clock, so other load on the machine does not
count (caches shared with it still do).

- ``cache_key`` as the sidecar computes it (`sidecar.fallback.store`);
- BLAKE2b-128 alone (``hexdigest`` and ``digest``);
- xxh3-128 (PyPI ``xxhash``, if installed) as ``hexdigest`` and ``intdigest``,
  the candidate fast key;
- comparing the stored argument bytes with the call's (what serving a
  reply under a non-cryptographic key needs, so a crafted collision cannot
  poison the cache), and the ``bytes()`` copy of a reply that `remember`
  makes on every store.

Usage: python bench/cache_key.py [--rounds 7] [--number 20000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sidecar.fallback.key import cache_key

SIZES = (64, 16384)
NAME = "Bench:echo"


def variants(args: bytes) -> dict[str, Callable[[], object]]:
    """The operations timed for one argument size, by name."""
    copy = bytes(bytearray(args))  # equal, not the same object: a real comparison
    view = memoryview(bytearray(args))
    out: dict[str, Callable[[], object]] = {
        "cache_key (xxh3-128 hex)": lambda: cache_key(NAME, args),
        "blake2b-128 hexdigest": lambda: hashlib.blake2b(args, digest_size=16).hexdigest(),
        "blake2b-128 digest": lambda: hashlib.blake2b(args, digest_size=16).digest(),
        "compare stored arguments": lambda: args == copy,
        "bytes() copy of a memoryview": lambda: bytes(view),
    }
    try:
        import xxhash
    except ImportError:
        return out
    out["xxh3-128 hexdigest"] = lambda: xxhash.xxh3_128_hexdigest(args)
    out["xxh3-128 intdigest"] = lambda: xxhash.xxh3_128_intdigest(args)
    out["xxh3-128 key + compare"] = lambda: (xxhash.xxh3_128_intdigest(args), args == copy)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=20000, help="calls per timing")
    opts = parser.parse_args()
    try:
        import xxhash

        have = f"xxhash {xxhash.VERSION}"
    except ImportError:
        have = "xxhash not installed (pip install xxhash): xxh3 rows missing"
    print(
        f"Cache key cost, ns per call: median of {opts.rounds} interleaved rounds of "
        f"{opts.number} calls; {have}; load average {os.getloadavg()[0]:.2f}.\n"
    )
    table: dict[str, dict[int, float]] = {}
    for size in SIZES:
        ops = variants(os.urandom(size))
        times: dict[str, list[float]] = {name: [] for name in ops}
        for _ in range(opts.rounds):
            for name, op in ops.items():
                times[name].append(
                    timeit.timeit(op, number=opts.number, timer=time.process_time)
                    / opts.number
                    * 1e9
                )
        for name, values in times.items():
            table.setdefault(name, {})[size] = statistics.median(values)
    print("| operation | " + " | ".join(f"{s} B" for s in SIZES) + " |")
    print("|---|" + "---:|" * len(SIZES))
    for name, by_size in table.items():
        print(f"| {name} | " + " | ".join(f"{by_size[s]:,.0f}" for s in SIZES) + " |")


if __name__ == "__main__":
    main()
