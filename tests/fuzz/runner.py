"""Run the fuzzer against a real sidecar process in front of a real thriftpy2 upstream.

    fuzz connections ─┐
                      ├─► sidecar (python -m sidecar run) ──► thriftpy2 upstream (framed,
    good client ──────┘                                        a process of its own)

`run_fuzz` starts both, watches the sidecar's RSS and file descriptors with
psutil, lets a `GoodClient` call throughout, sends the inputs of
`tests.fuzz.mutations.generate` (each on its own connection, at most
``concurrency`` at once, until ``inputs`` are sent or ``seconds`` have
passed), then waits for the sidecar to settle and reads ``/metrics``.
Every wait is bounded: a connection that neither answers nor closes within
its bound, nor within a grace period as long again, is a hang, and is
aborted (one that closes in the grace period is counted as late). On a busy
machine the fuzzer itself can stall: its event loop's longest lag is
reported beside the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.fuzz.good_client import GoodClient
from tests.fuzz.inputs import FuzzInput, Limits
from tests.fuzz.mutations import generate
from tests.fuzz.report import Report
from tests.fuzz.sampler import Sampler
from tests.fuzz.upstream_process import upstream_process
from tests.fuzz.wire import (
    EXCEPTION,
    INVALID_MESSAGE_TYPE,
    PROTOCOL_ERROR,
    exception_type,
    read_envelope,
    split_messages,
)
from tests.support.idl import INTEROP_IDL
from tests.support.sidecar import Metrics, run_sidecar
from tests.support.wait import wait_until

# The sidecar sweeps idle connections once a second (sidecar.app.HOUSEKEEPING_INTERVAL).
SWEEP_SECONDS = 1.0
_KEEP_BYTES = 4 << 20
_LINGER_ZERO = struct.pack("ii", 1, 0)  # close() then sends a TCP RST


@dataclass
class FuzzSettings:
    """One run's parameters (all bounded)."""

    seed: int = 1
    inputs: int = 1000
    seconds: float = 60.0
    concurrency: int = 8
    kinds: tuple[str, ...] = ()
    indices: Sequence[int] | None = None  # replay these inputs only
    good_connections: int = 2
    call_deadline: float = 10.0
    hang_bound: float = 10.0
    idle_timeout: float = 2.0
    max_frame_size: int = 16 << 20
    max_depth: int = 64
    big_frame_size: int = 1 << 20
    breaker_reset: float = 2.0
    settle_seconds: float = 15.0
    sidecar_config: dict[str, Any] = field(default_factory=dict)

    @property
    def limits(self) -> Limits:
        return Limits(self.max_frame_size, self.max_depth, self.idle_timeout, self.big_frame_size)

    def config(self) -> dict[str, Any]:
        """The sidecar's config: the interop IDL, short timeouts so a run can wait them out."""
        config: dict[str, Any] = {
            "idl": str(INTEROP_IDL),
            "max_frame_size": self.max_frame_size,
            "max_depth": self.max_depth,
            "idle_timeout": f"{self.idle_timeout}s",
            "upstream": {"transport": "framed", "idle_timeout": "1s"},
            "retry": {
                "per_try_timeout": "1s",
                "deadline": "3s",
                "idempotent": ["get*", "list*", "ping", "add", "echo*"],
            },
            "breaker": {"reset_timeout": f"{self.breaker_reset}s"},
            "methods": {"placeOrder": {"idempotent": False}},
        }
        for key, value in self.sidecar_config.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        return config


def check_expected(inp: FuzzInput, data: bytes) -> bool:
    """Did the connection get what ``inp.expected`` requires?"""
    exp = inp.expected
    if exp.http_400:
        return data.startswith(b"HTTP/1.1 400")
    messages = split_messages(data, inp.transport)
    envelopes = [read_envelope(m) for m in messages]
    for i, (seqid, name) in enumerate(exp.replies):
        env = envelopes[i] if i < len(envelopes) else None
        if env is None or env.seqid != seqid or env.name != name:
            return False
    if exp.error_seqid is not None:
        return any(
            e is not None
            and e.mtype == EXCEPTION
            and e.seqid == exp.error_seqid
            and exception_type(m) in (PROTOCOL_ERROR, INVALID_MESSAGE_TYPE)
            for e, m in zip(envelopes, messages, strict=True)
        )
    return True


async def _read_all(sock: socket.socket) -> tuple[bytes, str]:
    """Everything the sidecar sends until it closes, and how it closed (EOF or an error).

    A raw socket, not asyncio streams: a failed write must not stop the
    reading (streams drop what was received when a write fails).
    """
    loop = asyncio.get_running_loop()
    kept = bytearray()
    try:
        for _ in range(1 << 20):  # bounded; EOF or the caller's timeout ends it sooner
            chunk = await loop.sock_recv(sock, 1 << 16)
            if not chunk:
                return bytes(kept), "EOF"
            if len(kept) < _KEEP_BYTES:
                kept += chunk
    except OSError as exc:
        return bytes(kept), type(exc).__name__
    return bytes(kept), "too much"


async def _send(sock: socket.socket, inp: FuzzInput, reading: asyncio.Future[Any]) -> None:
    loop = asyncio.get_running_loop()
    for step in inp.steps:
        if step.delay:
            await asyncio.wait([reading], timeout=step.delay)
        if reading.done():
            return  # the sidecar closed: the rest cannot be sent
        await loop.sock_sendall(sock, step.data)


async def send_input(
    inp: FuzzInput, address: tuple[str, int], s: FuzzSettings, report: Report
) -> None:
    """One input on its own connection; records hangs, violations and slowloris survivors."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, address), 5.0)
    except (OSError, TimeoutError) as exc:
        report.connect_failures[type(exc).__name__] += 1
        sock.close()
        return
    reading = asyncio.ensure_future(_read_all(sock))
    try:
        with contextlib.suppress(OSError, TimeoutError):  # closed, or stalled, while sending
            await asyncio.wait_for(_send(sock, inp, reading), s.hang_bound + inp.duration)
        if inp.drip and not reading.done():
            report.slowloris_survivors += 1
        if inp.end == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            return
        bound = s.hang_bound
        if inp.end == "half_close":
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        else:
            bound += s.idle_timeout + 2 * SWEEP_SECONDS
        done, _ = await asyncio.wait([reading], timeout=bound)
        if not done:
            done, _ = await asyncio.wait([reading], timeout=bound)
            if not done:
                report.hang(
                    f"no answer, no close {2 * bound:g}s after the last write: {inp.describe()}"
                )
                return
            report.late += 1
        got, how = reading.result()
        if not inp.expected.anything and not check_expected(inp, got):
            report.violation(inp.oracle, f"{inp.describe(120)} got={got[:120].hex()} then {how}")
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        sock.close()


async def drive(
    s: FuzzSettings, address: tuple[str, int], report: Report, alive: Callable[[], bool]
) -> None:
    """Send the inputs, at most ``s.concurrency`` connections at once, within ``s.seconds``."""
    loop = asyncio.get_running_loop()
    lag = asyncio.create_task(_watch_lag(report))
    slots = asyncio.Semaphore(s.concurrency)
    tasks: set[asyncio.Task[None]] = set()
    stop_at = loop.time() + s.seconds
    indices = s.indices if s.indices is not None else range(s.inputs)
    for index in indices:
        if loop.time() >= stop_at or not alive():
            break
        await slots.acquire()
        inp = generate(s.seed, index, s.limits, s.kinds)
        report.inputs_sent += 1
        report.by_kind[inp.kind] += 1
        task = asyncio.create_task(send_input(inp, address, s, report))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(lambda _: slots.release())
    if tasks:
        await asyncio.gather(*tasks)
    lag.cancel()


async def _watch_lag(report: Report, interval: float = 0.1) -> None:
    """Note how late the fuzzer's own loop wakes up (a measure of the machine's load)."""
    loop = asyncio.get_running_loop()
    for _ in range(1 << 40):  # bounded; cancelled at the end of the run
        before = loop.time()
        await asyncio.sleep(interval)
        report.fuzzer_max_lag = max(report.fuzzer_max_lag, loop.time() - before - interval)


def _deltas(before: Metrics, after: Metrics, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in after.matching(name).items():
        key = dict(labels).get(label, "")
        out[key] = out.get(key, 0.0) + value
    for labels, value in before.matching(name).items():
        key = dict(labels).get(label, "")
        out[key] = out.get(key, 0.0) - value
    return {k: v for k, v in sorted(out.items()) if v}


def run_fuzz(s: FuzzSettings) -> Report:
    """Start an upstream and a sidecar, fuzz it with a good client alongside, report."""
    report = Report(seed=s.seed)
    with upstream_process() as upstream, run_sidecar([upstream], config=s.config()) as sidecar:
        host, _, port = sidecar.address.rpartition(":")
        address = (host, int(port))
        before = sidecar.metrics()
        with Sampler(sidecar) as sampler:
            started = time.monotonic()
            good = GoodClient(
                sidecar.address,
                GoodClient.default_transports(s.good_connections),
                seed=s.seed,
                call_deadline=s.call_deadline,
                max_seconds=s.seconds + 4 * s.hang_bound + 60,
                idle_timeout=s.idle_timeout,
            )
            with good:
                asyncio.run(drive(s, address, report, lambda: sampler.alive))
            report.good = good.stats
            report.seconds = time.monotonic() - started
            report.crashed = sampler.crashed
            if not report.crashed:
                settle(sampler, s.settle_seconds)
            report.rss_mb, report.fds = sampler.rss, sampler.fds
        if not report.crashed:
            after = sidecar.metrics()
            opened = _deltas(before, after, "thrift_sidecar_breaker_transitions_total", "to_state")
            report.breaker_openings = opened.get("open", 0.0)
            report.protocol_errors = _deltas(
                before, after, "thrift_sidecar_protocol_errors_total", "kind"
            )
            report.outcomes = _deltas(before, after, "thrift_sidecar_requests_total", "outcome")
            report.retries = _deltas(before, after, "thrift_sidecar_retries_total", "reason")
    return report


def settle(sampler: Sampler, seconds: float) -> None:
    """Wait (bounded) for the sidecar's fds to come back to the start; note the after values."""

    def settled() -> bool:
        rss, fds = sampler.sample()
        sampler.rss.after, sampler.fds.after = rss, fds
        return fds <= sampler.fds.before

    with contextlib.suppress(TimeoutError):
        wait_until(settled, timeout=seconds, interval=0.1, message="sidecar fds back to the start")
