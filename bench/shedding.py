"""Shedding under overload: an upstream of fixed capacity offered twice what it serves.

Usage (from the repository root, with the project's environment):

    python bench/shedding.py             # 10 s per target, 400 calls/s, 5 ms a call
    python bench/shedding.py --quick     # 3 s per target, to check the harness

What runs: the example Catalog service behind one worker (``python -m
sidecar.testing.upstream --service-time 5``: each call holds the worker 5 ms,
so it serves 200 calls/s however many it is given at once), and two sidecars
in front of it (``python -m sidecar run``), one at a time:

- ``unloaded``: the default (``upstream.max_in_flight: null``) offered a
  tenth of the upstream's capacity: the latency to stay near;
- ``no limit``: the same offered ``--rate``;
- ``max_in_flight N``: with a limit, offered ``--rate``, for each N of
  ``--limits`` (default 2 and 8);
- ``adaptive``: ``upstream.adaptive_concurrency`` with its defaults (Envoy's
  gradient controller), offered ``--rate``.

Both have per-try timeouts and deadlines of a minute, so that nothing times
out or is retried: what grows is visible. The load is open loop, at a fixed
rate above the upstream's capacity (``--rate``, default 400 calls/s) for
``--seconds``: each ``getItem`` call is sent at its due time on a connection
of its own (a free one, or a new one), whatever happened to the calls before
it, and its latency is counted from that due time. Then the calls still out
are waited for (at most ``--drain`` seconds; those left are counted as
unanswered).

Per target: served calls per second (ok replies within the offered period),
p50 / p99 / max latency of served calls, the served calls' p50 in the first
and in the last second of the run (does latency grow?), shed calls and their
reply latency, and the sidecar's own count (``calls_shed_total``, breaker
transitions). Output: a markdown table on stdout, JSON and markdown in
``bench/results/shedding-*``. Every process is started here and ended by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchtools import (
    HOST,
    REPO_ROOT,
    SidecarProcess,
    free_port,
    loadavg,
    save_results,
    sidecar_process,
    stop_process,
    wait_for_port,
)

sys.path.insert(0, str(REPO_ROOT))

from prometheus_client.parser import text_string_to_metric_families
from thriftpy2.protocol import TBinaryProtocol
from thriftpy2.thrift import TMessageType
from thriftpy2.transport import TMemoryBuffer

from sidecar.testing.catalog import load_catalog_idl

REPLY = 2
# Most client connections open at once (each carries one call at a time).
MAX_CONNECTIONS = 4096
# Timeouts far above what the run can make the upstream take: nothing times out.
CONFIG = """\
retry: {per_try_timeout: 60s, deadline: 60s}
fallback: {serve_on: [breaker_open, retries_exhausted]}
"""


def get_item_frame(item_id: int = 7) -> bytes:
    """A framed, strict binary ``Catalog.getItem(item_id)`` CALL (seqid 1)."""
    idl = load_catalog_idl()
    buf = TMemoryBuffer()
    proto = TBinaryProtocol(buf)
    proto.write_message_begin("getItem", TMessageType.CALL, 1)
    idl.Catalog.getItem_args(id=item_id).write(proto)
    proto.write_message_end()
    payload = buf.getvalue()
    return struct.pack("!i", len(payload)) + payload


@dataclass
class Call:
    """One call of the load: when it was due, when its reply came, what it was."""

    due: float
    done: float | None = None
    kind: str = "unanswered"  # ok | shed | error | unanswered

    @property
    def latency(self) -> float:
        assert self.done is not None
        return self.done - self.due


@dataclass
class Connections:
    """Idle client connections to one address, opened on demand up to `MAX_CONNECTIONS`."""

    port: int
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)
    opened: int = 0
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_CONNECTIONS))

    async def take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        await self.slots.acquire()
        if self.idle:
            return self.idle.pop()
        self.opened += 1
        return await asyncio.open_connection(HOST, self.port)

    def give_back(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.idle.append(conn)
        self.slots.release()

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def one_call(conns: Connections, frame: bytes, call: Call) -> None:
    conn = await conns.take()
    reader, writer = conn
    try:
        writer.write(frame)
        (size,) = struct.unpack("!i", await reader.readexactly(4))
        body = await reader.readexactly(size)
    except (OSError, asyncio.IncompleteReadError):
        writer.close()
        conns.slots.release()
        call.kind = "error"
        call.done = time.perf_counter()
        return
    call.done = time.perf_counter()
    if body[3] == REPLY:
        call.kind = "ok"
    else:
        call.kind = "shed" if b"call shed" in body else "error"
    conns.give_back(conn)


async def offer(port: int, rate: float, seconds: float, drain: float) -> tuple[list[Call], float]:
    """Open-loop load: ``rate`` calls/s for ``seconds``, then wait ``drain`` s for replies.

    Returns:
        Every call, and the ``perf_counter`` time the load started.
    """
    frame = get_item_frame()
    conns = Connections(port)
    calls: list[Call] = []
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter() + 0.05
    total = int(rate * seconds)
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        call = Call(due)
        calls.append(call)
        tasks.append(asyncio.create_task(one_call(conns, frame, call)))
    _, pending = await asyncio.wait(tasks, timeout=drain)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    conns.close()
    return calls, start


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, round(q * 100) - 1)]


def summarise(calls: list[Call], start: float, seconds: float) -> dict[str, Any]:
    """The figures of one run (latencies in ms)."""
    end = start + seconds
    ok = [c for c in calls if c.kind == "ok"]
    shed = [c for c in calls if c.kind == "shed"]
    first = [c.latency for c in ok if c.due < start + 1]
    last = [c.latency for c in ok if c.due >= end - 1]

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 2)

    return {
        "offered": len(calls),
        "offered_per_s": len(calls) / seconds,
        "served": len(ok),
        "served_per_s": sum(1 for c in ok if c.done is not None and c.done <= end) / seconds,
        "served_p50_ms": ms(percentile([c.latency for c in ok], 0.5)),
        "served_p99_ms": ms(percentile([c.latency for c in ok], 0.99)),
        "served_max_ms": ms(max((c.latency for c in ok), default=None)),
        "served_first_second_p50_ms": ms(percentile(first, 0.5)),
        "served_last_second_p50_ms": ms(percentile(last, 0.5)),
        "shed": len(shed),
        "shed_p50_ms": ms(percentile([c.latency for c in shed], 0.5)),
        "shed_p99_ms": ms(percentile([c.latency for c in shed], 0.99)),
        "errors": sum(1 for c in calls if c.kind == "error"),
        "unanswered": sum(1 for c in calls if c.kind == "unanswered"),
    }


def state(admin_url: str) -> dict[str, Any]:
    """The sidecar's ``/state`` document."""
    with urllib.request.urlopen(admin_url + "/state", timeout=5) as response:
        return dict(json.loads(response.read()))


def scrape(admin_url: str) -> dict[str, float]:
    """Sums of the sidecar's counters this benchmark reports, by metric name."""
    with urllib.request.urlopen(admin_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = {
        "thrift_sidecar_calls_shed_total",
        "thrift_sidecar_breaker_transitions_total",
        "thrift_sidecar_retries_total",
    }
    sums = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                sums[sample.name] += sample.value
    return sums


@contextlib.contextmanager
def slow_upstream(service_ms: float, log: Path) -> Iterator[int]:
    """The Catalog behind one worker of ``service_ms`` a call; yields its port."""
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "sidecar.testing.upstream",
        "--port",
        str(port),
        "--service-time",
        str(service_ms),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=out)
        try:
            wait_for_port(port, proc)
            yield port
        finally:
            stop_process(proc)


@contextlib.contextmanager
def sidecar_with(tmp: Path, name: str, upstream: str, port: int) -> Iterator[SidecarProcess]:
    """A sidecar with `CONFIG` and ``upstream`` (YAML flow mapping of upstream keys, or "")."""
    config = tmp / f"{name}.yaml"
    config.write_text(CONFIG + (f"upstream: {upstream}\n" if upstream else ""))
    program = ["-m", "sidecar", "run", "--config", str(config)]
    with sidecar_process(program, port, tmp / f"{name}.log") as sidecar:
        yield sidecar


def render(runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def cell(value: Any, fmt: str = ",.1f") -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        f"Upstream: one worker, {meta['service_ms']:g} ms a call (capacity "
        f"{1000 / meta['service_ms']:,.0f} calls/s); offered {meta['rate']:,.0f} calls/s, open "
        f"loop, for {meta['seconds']:g} s per target. Load average {meta['loadavg_before']} "
        f"before, {meta['loadavg_after']} after.",
        "",
        "| target | offered calls/s | served calls/s | served p50 ms | p99 ms | max ms "
        "| p50 first s / last s ms "
        "| shed | shed p50 ms | shed p99 ms | unanswered | breaker transitions |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        transitions = r["sidecar"]["thrift_sidecar_breaker_transitions_total"]
        lines.append(
            f"| {r['target']} | {cell(r['offered_per_s'], ',.0f')} "
            f"| {cell(r['served_per_s'])} | {cell(r['served_p50_ms'])} "
            f"| {cell(r['served_p99_ms'])} | {cell(r['served_max_ms'])} "
            f"| {cell(r['served_first_second_p50_ms'])} / "
            f"{cell(r['served_last_second_p50_ms'])} | {r['shed']:,} "
            f"| {cell(r['shed_p50_ms'], '.2f')} | {cell(r['shed_p99_ms'], '.2f')} "
            f"| {r['unanswered']:,} | {transitions:g} |"
        )
    for r in runs:
        adaptive = r["concurrency"]["adaptive"]
        if adaptive is not None and adaptive["min_rtt_seconds"] is not None:
            lines.append(
                f"\n{r['target']}: limit {adaptive['limit']} at the end, minRTT "
                f"{adaptive['min_rtt_seconds'] * 1000:.1f} ms, last window's latency "
                f"{(adaptive['sample_rtt_seconds'] or 0) * 1000:.1f} ms."
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 s per target: check the harness")
    p.add_argument("--seconds", type=float, help="seconds of offered load per target [10]")
    p.add_argument("--rate", type=float, default=400.0, help="calls offered per second [400]")
    p.add_argument("--service-ms", type=float, default=5.0, help="the worker's ms a call [5]")
    p.add_argument(
        "--limits", default="2,8", help="upstream.max_in_flight values, comma-separated [2,8]"
    )
    p.add_argument("--drain", type=float, default=60.0, help="most seconds to wait after [60]")
    args = p.parse_args(argv)
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta: dict[str, Any] = {
        "rate": args.rate,
        "seconds": args.seconds,
        "service_ms": args.service_ms,
        "limits": args.limits,
        "cpus": os.cpu_count(),
        "loadavg_before": loadavg(),
    }
    runs: list[dict[str, Any]] = []
    capacity = 1000 / args.service_ms
    targets: list[tuple[str, str, float]] = [
        ("unloaded", "", capacity / 10),
        ("no limit", "", args.rate),
    ]
    for limit in (int(v) for v in args.limits.split(",") if v.strip()):
        targets.append((f"max_in_flight {limit}", f"{{max_in_flight: {limit}}}", args.rate))
    targets.append(("adaptive", "{adaptive_concurrency: {}}", args.rate))
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-shedding-")))
        port = stack.enter_context(slow_upstream(args.service_ms, tmp / "upstream.log"))
        for number, (name, upstream, rate) in enumerate(targets):
            with sidecar_with(tmp, f"sidecar-{number}", upstream, port) as sidecar:
                calls, start = asyncio.run(offer(sidecar.port, rate, args.seconds, args.drain))
                run = {"target": name, **summarise(calls, start, args.seconds)}
                run["sidecar"] = scrape(sidecar.admin_url)
                run["concurrency"] = state(sidecar.admin_url)["concurrency"]
            runs.append(run)
            print(
                f"{name}: {run['served_per_s']:,.0f} served/s, p50 {run['served_p50_ms']} ms, "
                f"{run['shed']:,} shed",
                file=sys.stderr,
                flush=True,
            )
    meta["loadavg_after"] = loadavg()
    markdown = render(runs, meta)
    print(markdown)
    save_results("shedding", args.quick, {"meta": meta, "runs": runs, "markdown": markdown})
    return 0


if __name__ == "__main__":
    sys.exit(main())
