"""Concurrency limits: over ``upstream.max_in_flight`` a call is shed at once; the upstream copes.

The upstream is the example Catalog service behind one worker
(`sidecar.testing.capacity.OneWorker`, 10 ms a call): n calls at once take up
to n * 10 ms each. A crowd of clients calling back to back through a real
sidecar (``sidecar run``) overloads it. With a limit, the worker never sees
more calls at once than the limit, the served calls wait for at most that
many, and the rest are answered at once: with the shed error, or with the
cached reply when there is one. Without it, the whole crowd queues at the
upstream. Shed calls never reach the breaker, the upstream or a retry.

Also: oneway calls over the limit are dropped and counted; a reload changes
the limit while the calls in flight keep counting against it.
"""

from __future__ import annotations

import signal
import statistics
import threading
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import pytest
import thriftpy2.thrift

from sidecar.protocol.appexc import ApplicationExceptionType
from sidecar.testing.catalog import CatalogServer
from tests.support.clients import thriftpy2_client
from tests.support.crowd import Answer, catalog_client, crowd, quantile
from tests.support.gate import gate_of, gated_upstream
from tests.support.servers import Thriftpy2Server
from tests.support.sidecar import SidecarProcess, merged, run_sidecar
from tests.support.wait import wait_until

TAE = thriftpy2.thrift.TApplicationException
INTERNAL_ERROR = int(ApplicationExceptionType.INTERNAL_ERROR)
SERVICE_TIME = 0.010  # seconds the upstream's one worker spends on each call
LIMIT = 3
CLIENTS = 24
CALLS = 15  # per client
# Per-try timeout and deadline far above anything the crowd makes the upstream take
# (CLIENTS x SERVICE_TIME): nothing here times out or is retried, limit or not.
CONFIG: dict[str, Any] = {
    "retry": {"per_try_timeout": "10s", "deadline": "20s"},
    "breaker": {"fail_max": 3},
}
NO_SHED_FALLBACK: dict[str, Any] = {"fallback": {"serve_on": ["breaker_open", "retries_exhausted"]}}


@pytest.fixture
def slow_upstream() -> Iterator[CatalogServer]:
    with CatalogServer(service_time=SERVICE_TIME) as server:
        yield server


def get_item(client: Any, n: int) -> Any:
    return client.getItem(n % 5 + 1)


def served(answers: list[Answer]) -> list[float]:
    return [a.seconds for a in answers if a.kind == "ok"]


def shed(answers: list[Answer]) -> list[Answer]:
    return [a for a in answers if a.kind == "error"]


def figures(name: str, answers: list[Answer]) -> str:
    ok, errors = served(answers), [a.seconds for a in shed(answers)]
    line = f"{name}: {len(ok)} served, p50 {statistics.median(ok) * 1000:.1f} ms"
    line += f", p99 {quantile(ok, 0.99) * 1000:.1f} ms"
    if errors:
        line += f"; {len(errors)} shed, p50 {statistics.median(errors) * 1000:.2f} ms"
        line += f", p99 {quantile(errors, 0.99) * 1000:.2f} ms"
    return line


def assert_untouched_breaker(sc: SidecarProcess) -> None:
    metrics = sc.metrics()
    assert metrics.value("thrift_sidecar_breaker_state") == 0
    assert metrics.value("thrift_sidecar_breaker_transitions_total") == 0
    assert metrics.value("thrift_sidecar_breaker_consecutive_failures") == 0
    assert metrics.value("thrift_sidecar_retries_total") == 0


def test_a_limit_keeps_an_overloaded_upstream_at_its_unloaded_latency(
    slow_upstream: CatalogServer, capsys: pytest.CaptureFixture[str]
) -> None:
    worker = slow_upstream.worker
    assert worker is not None
    # The same crowd without a limit: it all queues at the one worker.
    with run_sidecar([slow_upstream.address], config=CONFIG) as sc:
        unlimited = crowd(sc.address, clients=CLIENTS, calls=CALLS, call=get_item)
        assert_untouched_breaker(sc)
    assert [a for a in unlimited if a.kind != "ok"] == []
    assert worker.max_in_flight > LIMIT, "the crowd must overload the upstream"
    worker.reset_max()

    limited_config = merged(CONFIG, NO_SHED_FALLBACK, {"upstream": {"max_in_flight": LIMIT}})
    with run_sidecar([slow_upstream.address], config=limited_config) as sc:
        executed_before = slow_upstream.calls["getItem"]
        alone = crowd(sc.address, clients=1, calls=10, call=get_item)  # unloaded: one at a time
        worker.reset_max()
        limited = crowd(sc.address, clients=CLIENTS, calls=CALLS, call=get_item)
        metrics = sc.metrics()
        assert_untouched_breaker(sc)
        executed = slow_upstream.calls["getItem"] - executed_before

    # The upstream never had more than LIMIT calls at once.
    assert worker.max_in_flight <= LIMIT
    refused = shed(limited)
    assert refused, "the crowd must be shed in part"
    assert len(served(limited)) + len(refused) == CLIENTS * CALLS
    for answer in refused:
        assert answer.exc_type == INTERNAL_ERROR
        assert answer.message.startswith("call shed: ")
        assert "calls were in flight at the upstream " in answer.message
        assert f"(upstream.max_in_flight {LIMIT}), no fallback for getItem" in (answer.message)
    # Shed calls never reached the upstream, were never attempted, and are counted.
    assert executed == len(served(limited)) + len(alone)
    assert metrics.value("thrift_sidecar_upstream_attempts_total") == executed
    assert metrics.value("thrift_sidecar_requests_total", outcome="shed") == len(refused)
    assert metrics.value("thrift_sidecar_requests_total", outcome="ok") == executed
    assert metrics.value("thrift_sidecar_calls_shed_total") == len(refused)
    assert metrics.value("thrift_sidecar_calls_in_flight") == 0
    assert metrics.value("thrift_sidecar_concurrency_limit") == LIMIT

    # Served calls wait for at most LIMIT calls at the worker, not for the crowd;
    # shed calls wait for nothing. (Figures: pytest -s.)
    with capsys.disabled():
        print()
        print(figures("one client", alone))
        print(figures("no limit", unlimited))
        print(figures(f"max_in_flight {LIMIT}", limited))
    assert statistics.median(served(limited)) * 2 < statistics.median(served(unlimited))
    assert statistics.median(a.seconds for a in refused) < statistics.median(served(limited))


def test_shed_reads_get_the_cached_reply(slow_upstream: CatalogServer) -> None:
    config = merged(CONFIG, {"upstream": {"max_in_flight": LIMIT}})  # serve_on: the default
    with run_sidecar([slow_upstream.address], config=config) as sc:
        with thriftpy2_client_catalog(sc.address) as client:
            for item in range(1, 6):  # one good reply of each, remembered
                assert client.getItem(item).id == item
        before = slow_upstream.calls["getItem"]
        answers = crowd(sc.address, clients=CLIENTS, calls=CALLS, call=get_item)
        metrics = sc.metrics()
        executed = slow_upstream.calls["getItem"] - before
        assert_untouched_breaker(sc)
    assert [a for a in answers if a.kind != "ok"] == [], "every shed read had a cached reply"
    assert slow_upstream.worker is not None
    assert slow_upstream.worker.max_in_flight <= LIMIT
    shed_count = metrics.value("thrift_sidecar_calls_shed_total")
    assert shed_count > 0
    assert executed == CLIENTS * CALLS - shed_count
    assert metrics.value("thrift_sidecar_fallback_replies_total", source="cache") == shed_count
    assert metrics.value("thrift_sidecar_requests_total", outcome="fallback") == shed_count
    assert metrics.value("thrift_sidecar_requests_total", outcome="shed") == 0


ADAPTIVE: dict[str, Any] = {
    "min_concurrency": 2,
    "update_interval": "50ms",
    "min_rtt_requests": 10,
}


def test_an_adaptive_limit_keeps_the_upstream_near_its_unloaded_latency(
    slow_upstream: CatalogServer, capsys: pytest.CaptureFixture[str]
) -> None:
    config = merged(CONFIG, NO_SHED_FALLBACK, {"upstream": {"adaptive_concurrency": ADAPTIVE}})
    with run_sidecar([slow_upstream.address], config=config) as sc:
        answers = crowd(
            sc.address, clients=CLIENTS, calls=100_000, seconds=2.0, call=get_item, timeout=60
        )
        metrics = sc.metrics()
        state = sc.state()["concurrency"]
        assert_untouched_breaker(sc)
    worker = slow_upstream.worker
    assert worker is not None
    refused = shed(answers)
    with capsys.disabled():
        print()
        print(figures("adaptive", answers), f"; upstream at most {worker.max_in_flight} at once")
        print("state:", state)
    # The upstream is kept far below the crowd (24 at once without a limit).
    assert worker.max_in_flight <= CLIENTS // 2
    assert refused
    for answer in refused:
        assert answer.message.startswith("call shed: ")
    assert metrics.value("thrift_sidecar_calls_shed_total") == len(refused)
    adaptive = state["adaptive"]
    assert adaptive["min_rtt_seconds"] >= SERVICE_TIME
    assert 2 <= adaptive["limit"] <= CLIENTS // 2
    assert metrics.value("thrift_sidecar_concurrency_limit") == state["max_in_flight"]
    # Served calls wait for a few calls at the worker, not for the crowd.
    assert statistics.median(served(answers)) < CLIENTS * SERVICE_TIME / 2


def thriftpy2_client_catalog(address: str) -> closing[Any]:
    return closing(catalog_client(address))


def _hold(address: str, count: int) -> list[threading.Thread]:
    """``count`` getItem calls through ``address``, each on a thread of its own."""

    def call() -> None:
        with thriftpy2_client(address, "framed") as client:
            client.getItem(1)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def _in_flight(sc: SidecarProcess, count: int) -> None:
    wait_until(
        lambda: sc.metrics().value("thrift_sidecar_calls_in_flight") == count,
        timeout=10,
        message=f"{count} calls in flight",
    )


def _shed_error(client: Any) -> str:
    with pytest.raises(TAE) as raised:
        client.add(1, 2)
    assert raised.value.type == INTERNAL_ERROR
    return str(raised.value.message)


@pytest.fixture
def gated() -> Iterator[Thriftpy2Server]:
    with gated_upstream() as server:
        yield server


def test_oneway_calls_over_the_limit_are_dropped_and_counted(gated: Thriftpy2Server) -> None:
    config = merged(CONFIG, {"upstream": {"max_in_flight": 1}})
    with run_sidecar([gated.address], config=config) as sc:
        gate_of(gated).close()
        held = _hold(sc.address, 1)
        _in_flight(sc, 1)
        with thriftpy2_client(sc.address, "framed") as client:
            for n in range(3):
                client.notify(f"dropped-{n}")
            wait_until(
                lambda: sc.metrics().value("thrift_sidecar_requests_total", method="notify") == 3,
                timeout=10,
                message="three oneway calls counted",
            )
            gate_of(gated).open()
            for thread in held:
                thread.join(10)
            _in_flight(sc, 0)
            client.notify("delivered")
            wait_until(lambda: gated.notifications == ["delivered"], timeout=10)
        metrics = sc.metrics()
    assert metrics.value("thrift_sidecar_requests_total", method="notify", outcome="shed") == 3
    assert metrics.value("thrift_sidecar_calls_shed_total") == 3
    assert gated.calls["notify"] == 1


def test_a_reload_changes_the_limit_and_calls_in_flight_keep_counting(
    gated: Thriftpy2Server,
) -> None:
    config = merged(CONFIG, {"upstream": {"max_in_flight": 2}})
    with run_sidecar([gated.address], config=config) as sc:
        gate_of(gated).close()
        held = _hold(sc.address, 2)
        _in_flight(sc, 2)
        with thriftpy2_client(sc.address, "framed") as client:
            assert "(upstream.max_in_flight 2)" in _shed_error(client)

            def reload(limit: int | None, reloads: int) -> None:
                sc.write_config(merged(sc.config, {"upstream": {"max_in_flight": limit}}))
                sc.signal(signal.SIGHUP)
                wait_until(
                    lambda: (
                        sc.metrics().value("thrift_sidecar_config_reloads_total", result="ok")
                        == reloads
                    ),
                    timeout=10,
                    message=f"reload {reloads}",
                )
                assert sc.state()["config"]["restart_needed_for"] == []

            # Higher: one more call is admitted; the two held still count.
            reload(3, 1)
            assert sc.metrics().value("thrift_sidecar_concurrency_limit") == 3
            assert client.add(1, 2) == 3
            held += _hold(sc.address, 1)
            _in_flight(sc, 3)
            message = _shed_error(client)
            assert "3 calls were in flight" in message
            assert "(upstream.max_in_flight 3)" in message
            # Lower than the calls in flight: none is cut, new ones are shed.
            reload(1, 2)
            assert "3 calls were in flight" in _shed_error(client)
            gate_of(gated).open()
            for thread in held:
                thread.join(10)
            _in_flight(sc, 0)
            assert client.add(2, 2) == 4
            # No limit.
            reload(None, 3)
            assert sc.metrics().matching("thrift_sidecar_concurrency_limit") == {}
            gate_of(gated).close()
            held = _hold(sc.address, 4)
            _in_flight(sc, 4)
            assert client.add(3, 2) == 5
            gate_of(gated).open()
            for thread in held:
                thread.join(10)
        metrics = sc.metrics()
        state = sc.state()
    assert gated.calls["getItem"] == 7, "no call in flight was cut"
    assert metrics.value("thrift_sidecar_calls_shed_total") == 3
    assert state["concurrency"] == {
        "in_flight": 0,
        "max_in_flight": None,
        "shed_total": 3,
        "adaptive": None,
    }
