"""What heavy scraping of ``/metrics`` costs the Thrift side: client latency with and without.

The C upstream and load generator (bench/src) with a sidecar between them;
the sidecar's method labels are first filled (``--labels`` distinct method
names, 200 by default, the cap), so that a render is as large as it gets.
Then, for each checkout given (this one by default, others with ``--source``
to compare versions), two fixed-rate runs of the load generator:

- ``quiet``: no scrapes;
- ``scraped``: ``--scrapers`` threads fetching ``/metrics`` in OpenMetrics
  (what Prometheus asks for) back to back for the whole run.

The table gives the client's p50/p99/p99.9 latency and the scrapes served.

    .venv/bin/python bench/scrapes.py
    .venv/bin/python bench/scrapes.py --source /path/to/older/checkout
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchtools import (
    HOST,
    REPO_ROOT,
    build_tools,
    run_loadgen,
    sidecar_process,
    upstream_server,
)

ACCEPT = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def call_message(name: str, seqid: int) -> bytes:
    """A framed, strict binary CALL of ``name`` with an empty argument struct."""
    encoded = name.encode()
    body = struct.pack(">iI", -2147418111, len(encoded)) + encoded + struct.pack(">i", seqid)
    body += b"\x00"  # the argument struct's STOP
    return struct.pack(">i", len(body)) + body


def fill_labels(port: int, count: int) -> None:
    """Send one call of each of ``count`` method names (each becomes a label); read the replies."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        for i in range(count):
            sock.sendall(call_message(f"method{i}", i + 1))
            size = struct.unpack(">i", _read(sock, 4))[0]
            _read(sock, size)


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class Scrapers:
    """Threads fetching /metrics back to back until stopped (bounded by ``limit`` seconds)."""

    def __init__(self, url: str, count: int, limit: float) -> None:
        self._url = url
        self._stop = threading.Event()
        self._deadline = time.monotonic() + limit
        self.served = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]

    def __enter__(self) -> Scrapers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            request = urllib.request.Request(self._url, headers={"Accept": ACCEPT})
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    answer.read()
                ok = True
            except OSError:
                ok = False
            with self._lock:
                if ok:
                    self.served += 1
                else:
                    self.failed += 1


def measure(source: Path, args: argparse.Namespace, tools: dict[str, Path]) -> list[dict[str, Any]]:
    rows = []
    with (
        upstream_server(tools["upstream"]) as (_, upstream_port),
        tempfile.TemporaryDirectory() as tmp,
        sidecar_process(
            ["-m", "sidecar", "run"], upstream_port, Path(tmp) / "sidecar.log", source=source
        ) as sidecar,
    ):
        fill_labels(sidecar.port, args.labels)
        for mode in ("quiet", "scraped"):
            scrapers = Scrapers(
                sidecar.admin_url + "/metrics",
                args.scrapers if mode == "scraped" else 0,
                limit=args.duration + 30,
            )
            with scrapers:
                report = run_loadgen(
                    tools["loadgen"],
                    sidecar.port,
                    conns=4,
                    payload=64,
                    transport="framed",
                    duration=args.duration,
                    rate=args.rate,
                )
            latency = report["latency_us"]
            rows.append(
                {
                    "source": str(source),
                    "mode": mode,
                    "calls": report["calls"],
                    "errors": report["errors"],
                    "p50_ms": latency["p50"] / 1000,
                    "p99_ms": latency["p99"] / 1000,
                    "p999_ms": latency["p999"] / 1000,
                    "max_ms": latency["max"] / 1000,
                    "scrapes": scrapers.served,
                    "scrape_failures": scrapers.failed,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, action="append", help="checkout(s) to measure")
    parser.add_argument("--labels", type=int, default=200, help="method labels to fill")
    parser.add_argument("--scrapers", type=int, default=8, help="scraping threads")
    parser.add_argument("--rate", type=float, default=1000.0, help="Thrift calls per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 600:
        parser.error("--duration must be in (0, 600]")
    tools = build_tools()
    sources = args.source or [REPO_ROOT]
    rows = [row for source in sources for row in measure(source.resolve(), args, tools)]
    print(
        f"{args.rate:g} calls/s, 4 connections, {args.labels} method labels, "
        f"{args.scrapers} scrapers (OpenMetrics), {args.duration:g} s per run\n"
    )
    print("| checkout | run | calls | errors | p50 ms | p99 ms | p99.9 ms | max ms | scrapes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {Path(r['source']).name} | {r['mode']} | {r['calls']} | {r['errors']} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {r['max_ms']:.1f} | "
            f"{r['scrapes']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
