"""The admin and control listeners of a sidecar with ``workers: N``: one port each for all workers.

Each worker serves its own admin and control endpoints on a private loopback
port; the supervisor serves ``metrics.listen`` and ``control.listen`` and
asks the workers:

- ``/metrics``: every worker's exposition, each series with a ``worker``
  label (``0`` .. ``N-1``), merged into one family per metric, plus the
  supervisor's own ``thrift_sidecar_workers`` and ``..._worker_up{worker}``
  and ``..._worker_restarts_total{worker}``, and the failures of the fallback
  store it holds for the workers in ``..._fallback_store_errors_total`` with
  no ``worker`` label. Sum counters over ``worker`` for the sidecar's
  figures. Fetched and merged on the render thread.
- ``/healthz``: 200 while every worker is running, else 503 naming those that are not;
- ``/readyz``: 200 when every worker's ``/readyz`` is, else 503 with their reasons;
- ``/state``: worker 0's document (config, breaker state: shared, every
  worker reports the same) with the per-process figures summed over the
  workers (`sum_states`: client connections, pool connections, retry budget
  tokens, calls in flight and shed, rejected calls, probes and breaker
  transitions), ``ready``
  only when all are, a ``workers`` list (each worker's index, pid and
  document) and ``supervisor`` (its pid and run directory);
- ``/``: the index of ``sidecar top`` over the merged metrics;
- control ``POST``s: sent to every worker (a breaker forced open or closed is
  shared; readiness and the log level are per process), 200 when all answered 200.

A worker that does not answer within `WORKER_TIMEOUT` is left out of
``/metrics`` (its ``worker_up`` says 0) and makes ``/readyz`` fail. Why:
docs/workers.md ("One admin endpoint").
"""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import h11
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from sidecar.admin.control import USAGE
from sidecar.admin.endpoints import AdminServer
from sidecar.admin.listener import Answer, HttpServer, Request, text
from sidecar.metrics import PREFIX

# Seconds a worker has to answer the supervisor.
WORKER_TIMEOUT = 5.0
# Most bytes read from one worker's answer (a /metrics with every label filled
# is a few MiB).
MAX_ANSWER_BYTES = 64 << 20


@dataclass
class WorkerView:
    """What the supervisor knows of one worker.

    Attributes:
        index: 0 .. N-1.
        pid: its process id; None while it is not running.
        admin: its private admin address, once it reported it.
        control: its private control address, once it reported it.
        restarts: times it was started again after exiting.
    """

    index: int
    pid: int | None = None
    admin: tuple[str, int] | None = None
    control: tuple[str, int] | None = None
    restarts: int = 0

    @property
    def running(self) -> bool:
        """Started and reported its addresses."""
        return self.pid is not None and (self.admin is not None or self.control is not None)


Workers = Callable[[], Sequence[WorkerView]]


async def ask(
    address: tuple[str, int], method: str, target: str, timeout: float = WORKER_TIMEOUT
) -> tuple[int, bytes]:
    """One HTTP/1.1 request to a worker's listener: (status, body).

    Raises:
        OSError: no connection, or the worker closed it before a whole answer.
        TimeoutError: no whole answer within ``timeout``.
    """
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(*address)
        try:
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_ANSWER_BYTES)
            headers = [("Host", "worker"), ("Connection", "close"), ("Content-Length", "0")]
            writer.write(conn.send(h11.Request(method=method, target=target, headers=headers)))
            writer.write(conn.send(h11.EndOfMessage()))
            status, body = 0, bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if len(body) + len(data) > MAX_ANSWER_BYTES:
                        raise OSError("the worker's answer is too large")
                    conn.receive_data(data)
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return status, bytes(body)
                elif isinstance(event, h11.ConnectionClosed):
                    raise OSError("the worker closed the connection before answering")
        except h11.ProtocolError as exc:
            raise OSError(f"the worker's answer is not HTTP: {exc}") from None
        finally:
            writer.close()


def fetch_metrics(address: tuple[str, int], timeout: float = WORKER_TIMEOUT) -> str:
    """A worker's /metrics in the Prometheus text format (blocking: the render thread's).

    Raises:
        OSError: no answer, or not a 200.
    """
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        conn.request("GET", "/metrics", headers={"Accept": "text/plain"})
        answer = conn.getresponse()
        body = answer.read(MAX_ANSWER_BYTES + 1)
        if answer.status != 200 or len(body) > MAX_ANSWER_BYTES:
            raise OSError(f"/metrics answered {answer.status}")
        return body.decode()
    except http.client.HTTPException as exc:
        raise OSError(f"/metrics: {exc}") from None
    finally:
        conn.close()


def merge_families(expositions: Iterable[tuple[int, str]]) -> list[Metric]:
    """The families of several workers' text expositions as one set: each sample
    gains a ``worker`` label; families of one name are merged (first help and type win)."""
    merged: dict[str, Metric] = {}
    for index, exposition in expositions:
        worker = str(index)
        for family in text_string_to_metric_families(exposition):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                into.add_sample(
                    sample.name, {**sample.labels, "worker": worker}, sample.value, sample.timestamp
                )
    return list(merged.values())


def _add(into: dict[str, Any], other: dict[str, Any], keys: Iterable[str]) -> None:
    for key in keys:
        if isinstance(into.get(key), int | float) and isinstance(other.get(key), int | float):
            into[key] = into[key] + other[key]


def _add_by(
    into: list[dict[str, Any]], other: list[dict[str, Any]], by: str, keys: Iterable[str]
) -> None:
    found = {entry.get(by): entry for entry in into}
    for entry in other:
        mine = found.get(entry.get(by))
        if mine is not None:
            _add(mine, entry, keys)


def sum_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The first worker's /state with the per-process figures summed over all."""
    if not states:
        return {}
    doc: dict[str, Any] = json.loads(json.dumps(states[0]))  # a deep copy
    doc["ready"] = all(bool(s.get("ready")) for s in states)
    for other in states[1:]:
        _add(doc, other, ["client_connections"])
        _add(
            doc.get("retry_budget", {}),
            other.get("retry_budget", {}),
            ["tokens", "exhausted_total"],
        )
        _add(doc.get("concurrency", {}), other.get("concurrency", {}), ["in_flight", "shed_total"])
        _add_by(
            doc.get("pools", []), other.get("pools", []), "address", ["open", "idle", "busy", "max"]
        )
        _add_by(
            doc.get("breakers", []),
            other.get("breakers", []),
            "name",
            ["rejected_calls", "probes_in_flight"],
        )
        _add_transitions(doc.get("breakers", []), other.get("breakers", []))
    return doc


def _add_transitions(into: list[dict[str, Any]], other: list[dict[str, Any]]) -> None:
    """Sum each breaker's transitions: a worker counts those it made (docs/workers.md)."""
    found = {entry.get("name"): entry for entry in into}
    for entry in other:
        mine = found.get(entry.get("name"))
        if mine is None or not isinstance(entry.get("transitions"), dict):
            continue
        summed = mine.setdefault("transitions", {})
        for change, count in entry["transitions"].items():
            summed[change] = summed.get(change, 0) + count


# The failures of the fallback store the supervisor holds for its workers.
STORE_ERRORS = PREFIX + "fallback_store_errors"


class WorkersCollector(Collector):
    """Collects every running worker's metrics (merged) and the supervisor's own figures.

    Args:
        workers: the workers as the supervisor sees them now.
        configured: how many workers the config asks for.
        store_errors: (operation, failures so far) of the fallback store the
            supervisor holds for the workers (SQLite), shown in
            ``fallback_store_errors_total`` without a ``worker`` label; the
            workers' own series of it stay at 0 (they hold no store).
    """

    def __init__(
        self,
        workers: Workers,
        configured: int,
        store_errors: Callable[[], Iterable[tuple[str, int]]] = tuple,
    ) -> None:
        self._workers = workers
        self._configured = configured
        self._store_errors = store_errors

    def collect(self) -> Iterator[Metric]:
        expositions: list[tuple[int, str]] = []
        up = GaugeMetricFamily(
            PREFIX + "worker_up",
            "1 while the worker runs and answered this scrape, else 0.",
            labels=["worker"],
        )
        restarts = Metric(
            PREFIX + "worker_restarts",
            "Times the worker was started again after it exited unexpectedly.",
            "counter",
        )
        for view in self._workers():
            answered = False
            if view.admin is not None:
                try:
                    expositions.append((view.index, fetch_metrics(view.admin)))
                    answered = True
                except OSError:
                    pass
            up.add_metric([str(view.index)], 1.0 if answered else 0.0)
            restarts.add_sample(
                PREFIX + "worker_restarts_total", {"worker": str(view.index)}, view.restarts
            )
        families = merge_families(expositions)
        errors = list(self._store_errors())
        if errors:
            by_name = {family.name: family for family in families}
            family = by_name.get(STORE_ERRORS)
            if family is None:
                family = Metric(STORE_ERRORS, "Failed operations of the fallback store.", "counter")
                families.append(family)
            for operation, count in errors:
                family.add_sample(STORE_ERRORS + "_total", {"operation": operation}, count)
        yield from families
        yield GaugeMetricFamily(
            PREFIX + "workers", "Worker processes configured (workers).", value=self._configured
        )
        yield up
        yield restarts


class WorkersAdminServer(AdminServer):
    """The supervisor's admin listener (see the module docstring).

    Args:
        workers: the workers as the supervisor sees them now.
        configured: how many workers the config asks for.
        stopping: says whether the supervisor is shutting down (``/readyz`` 503).
        about: the supervisor's own entry in ``/state`` (pid, run directory).
        store_errors: the failures of the fallback store the supervisor holds
            (`WorkersCollector`).
    """

    def __init__(
        self,
        workers: Workers,
        configured: int,
        stopping: Callable[[], bool],
        about: Callable[[], dict[str, Any]] = dict,
        store_errors: Callable[[], Iterable[tuple[str, int]]] = tuple,
    ) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WorkersCollector(workers, configured, store_errors))
        self._state_doc: dict[str, Any] = {}
        super().__init__(registry, lambda: True, lambda: self._state_doc)
        self._workers = workers
        self._stopping = stopping
        self._about = about

    def route(self, request: Request) -> Answer | asyncio.Future[Answer]:
        if request.method not in ("GET", "HEAD"):
            return super().route(request)
        path = request.path
        if path == "/healthz":
            down = [str(v.index) for v in self._workers() if not v.running]
            if down:
                return text(503, f"workers not running: {', '.join(down)}")
            return text(200, "ok")
        if path == "/readyz":
            return asyncio.ensure_future(self._readiness())
        if path == "/state":
            return asyncio.ensure_future(self._state_answer())
        if path in ("/", "/index.html"):
            return asyncio.ensure_future(self._index_answer(request))
        return super().route(request)

    async def _readiness(self) -> Answer:
        if self._stopping():
            return text(503, "not ready: shutting down")
        views = list(self._workers())
        answers = await asyncio.gather(
            *(self._ask_admin(v, "/readyz") for v in views), return_exceptions=True
        )
        reasons = []
        for view, answer in zip(views, answers, strict=True):
            if isinstance(answer, BaseException):
                reasons.append(f"worker {view.index}: {answer or type(answer).__name__}")
            elif answer[0] != 200:
                reasons.append(f"worker {view.index}: {answer[1].decode(errors='replace').strip()}")
        if reasons:
            return text(503, "not ready: " + "; ".join(reasons))
        return text(200, f"ready ({len(views)} workers)")

    async def _ask_admin(self, view: WorkerView, target: str) -> tuple[int, bytes]:
        if view.admin is None:
            raise OSError("not running")
        return await ask(view.admin, "GET", target)

    async def refresh_state(self) -> dict[str, Any]:
        """Worker 0's /state with every worker's under ``workers``; kept for the index."""
        views = list(self._workers())
        answers = await asyncio.gather(
            *(self._ask_admin(v, "/state") for v in views), return_exceptions=True
        )
        listed: list[dict[str, Any]] = []
        states: list[dict[str, Any]] = []
        for view, answer in zip(views, answers, strict=True):
            entry: dict[str, Any] = {"index": view.index, "pid": view.pid}
            if isinstance(answer, BaseException) or answer[0] != 200:
                entry["error"] = str(answer) if isinstance(answer, BaseException) else answer[0]
            else:
                entry["state"] = json.loads(answer[1])
                states.append(entry["state"])
            listed.append(entry)
        doc = sum_states(states)
        if len(states) < len(views):
            doc["ready"] = False
        doc["workers"] = listed
        doc["supervisor"] = self._about()
        self._state_doc = doc
        return doc

    async def _state_answer(self) -> Answer:
        doc = await self.refresh_state()
        body = json.dumps(doc, indent=2, sort_keys=True, default=str)
        return Answer(200, "application/json", body.encode() + b"\n")

    async def _index_answer(self, request: Request) -> Answer:
        await self.refresh_state()
        made = super().route(request)
        return await made if isinstance(made, asyncio.Future) else made


class WorkersControlServer(HttpServer):
    """The supervisor's control listener: each POST sent on to every worker."""

    name = "control"

    def __init__(self, workers: Workers) -> None:
        super().__init__()
        self._workers = workers

    def route(self, request: Request) -> Answer | asyncio.Future[Answer]:
        if request.method != "POST":
            return text(405, f"only POST: {USAGE}", [("Allow", "POST")])
        return asyncio.ensure_future(self._to_all(request))

    async def _to_all(self, request: Request) -> Answer:
        views = list(self._workers())
        target = request.target

        async def one(view: WorkerView) -> tuple[int, bytes]:
            if view.control is None:
                raise OSError("not running")
            return await ask(view.control, "POST", target)

        answers = await asyncio.gather(*(one(v) for v in views), return_exceptions=True)
        lines, status = [], 200
        for view, answer in zip(views, answers, strict=True):
            if isinstance(answer, BaseException):
                status = 502
                lines.append(f"worker {view.index}: no answer ({answer or type(answer).__name__})")
            else:
                if answer[0] != 200:
                    status = answer[0] if status == 200 else status
                said = answer[1].decode(errors="replace").strip()
                lines.append(f"worker {view.index}: {said}")
        return Answer(status, "text/plain; charset=utf-8", ("\n".join(lines) + "\n").encode())
