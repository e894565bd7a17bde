"""The circuit breaker through a real sidecar: opens, rejects, probes, closes, reopens.

client ──► sidecar ──► FaultProxy ──► thriftpy2 upstream. Failures are
``internal_error`` answers made by the proxy (a breaker failure, not retried
by default); executions are counted at the proxy and at the upstream, and the
breaker's state is read from the metrics. Fallbacks are off (``serve_on:
[]``) so that a rejected call shows as the error the design promises.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import thriftpy2.thrift

from sidecar.protocol.appexc import ApplicationExceptionType, parse_application_exception
from sidecar.protocol.envelope import MessageType, parse_header
from tests.support.idl import load_thriftpy2_interop
from tests.support.raw import encode_call, raw_call
from tests.support.rig import Rig, rig, wait_probe_due

TAE = thriftpy2.thrift.TApplicationException
INTERNAL_ERROR = ApplicationExceptionType.INTERNAL_ERROR
FAIL_MAX = 3
RESET_TIMEOUT = 1.5
CONFIG: dict[str, Any] = {
    "breaker": {
        "fail_max": FAIL_MAX,
        "reset_timeout": f"{RESET_TIMEOUT}s",
        "success_threshold": 2,
        "half_open_max_calls": 2,
    },
    "retry": {"per_try_timeout": "3s", "deadline": "5s"},
    "fallback": {"serve_on": []},
}
CLOSED, HALF_OPEN, OPEN = "closed", "half-open", "open"


def open_breaker(r: Rig, client: Any) -> None:
    """Make ``FAIL_MAX`` calls fail with the upstream's INTERNAL_ERROR."""
    r.plan.extend_schedule(["internal_error"] * FAIL_MAX)
    for i in range(FAIL_MAX):
        assert r.state() == 0, f"opened after {i} failures"
        error = _app_error(lambda: client.getItem(1))
        assert "fault injected" in error.message  # the upstream's own error, passed on
    assert r.state() == 2


def wait_reset_timeout(r: Rig) -> None:
    """Wait until the sidecar reports the breaker's reset timeout as passed."""
    assert r.state() == 2
    wait_probe_due(r.sidecar, r.breaker, timeout=RESET_TIMEOUT + 5)


def _app_error(call: Callable[[], object]) -> TAE:
    with pytest.raises(TAE) as info:
        call()
    return info.value


def _assert_circuit_open(error: TAE, r: Rig) -> None:
    assert error.type == INTERNAL_ERROR
    assert "circuit open for the upstream" in error.message
    assert r.breaker not in error.message  # its address is not the client's business


def test_opens_rejects_lets_exactly_the_probes_through_and_closes() -> None:
    with rig(CONFIG) as r, r.client() as client:
        assert client.getItem(7).id == 7
        open_breaker(r, client)
        opened_at = time.monotonic()
        assert r.transitions(CLOSED, OPEN) == 1

        # While open: nothing reaches the proxy, let alone the upstream.
        seen, executed = r.proxy.stats.calls, r.upstream.calls.total()
        for i in range(5):
            _assert_circuit_open(_app_error(lambda i=i: client.getItem(i)), r)
        assert time.monotonic() - opened_at < RESET_TIMEOUT, "too slow to test the open state"
        assert (r.proxy.stats.calls, r.upstream.calls.total()) == (seen, executed)
        m = r.metrics()
        assert m.value("thrift_sidecar_breaker_rejections_total", breaker=r.breaker) == 5
        assert m.value("thrift_sidecar_requests_total", outcome="circuit_open") == 5

        # After the reset timeout: six concurrent calls to a slow upstream, two probes.
        wait_reset_timeout(r)
        r.proxy.plan.set_rates(delay=1.0)
        r.proxy.plan.set_delay(0.6)
        before = r.upstream.calls["getItem"]
        results: list[object] = [None] * 6
        clients = [r.client() for _ in range(6)]
        connected = [c.__enter__() for c in clients]
        barrier = threading.Barrier(6)

        def call(k: int) -> None:
            barrier.wait(5)
            try:
                results[k] = connected[k].getItem(100 + k)
            except TAE as exc:
                results[k] = exc

        try:
            threads = [threading.Thread(target=call, args=(k,)) for k in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
        finally:
            for c in clients:
                c.__exit__(None, None, None)
        probes = {k: x for k, x in enumerate(results) if not isinstance(x, TAE)}
        rejected = [x for x in results if isinstance(x, TAE)]
        print(
            f"\nhalf-open: {len(probes)} probes went through, {len(rejected)} rejected; "
            f"upstream executed {r.upstream.calls['getItem'] - before}"
        )
        assert r.upstream.calls["getItem"] - before == 2
        assert len(probes) == 2
        assert all(item.id == 100 + k for k, item in probes.items())  # their own answers
        for error in rejected:
            _assert_circuit_open(error, r)

        # Two successes (success_threshold 2) closed it.
        assert r.state() == 0
        assert r.transitions(OPEN, HALF_OPEN) == 1
        assert r.transitions(HALF_OPEN, CLOSED) == 1
        r.proxy.plan.clear()
        assert client.getItem(8).id == 8


def test_one_success_is_not_enough_and_a_failed_probe_opens_it_again() -> None:
    """success_threshold 2: after one good probe it stays half-open; a failed one reopens it."""
    with rig(CONFIG) as r, r.client() as client:
        open_breaker(r, client)
        wait_reset_timeout(r)
        assert client.getItem(5).id == 5  # probe 1 succeeds
        assert r.state() == 1
        r.proxy.plan.extend_schedule(["internal_error"])
        seen = r.proxy.stats.calls
        error = _app_error(lambda: client.getItem(1))
        assert "fault injected" in error.message  # probe 2 reached the upstream side
        assert r.proxy.stats.calls == seen + 1
        assert r.state() == 2
        assert r.transitions(OPEN, HALF_OPEN) == 1
        assert r.transitions(HALF_OPEN, OPEN) == 1
        assert r.transitions(HALF_OPEN, CLOSED) == 0
        # Open again, for a full reset timeout: the next call is rejected at once.
        _assert_circuit_open(_app_error(lambda: client.getItem(2)), r)
        assert r.proxy.stats.calls == seen + 1


def test_declared_exceptions_and_unknown_methods_neither_trip_nor_retry() -> None:
    """Answers are never failures, even when every outcome is retryable and every method safe."""
    config = {
        **CONFIG,
        "retry": {
            "max_attempts": 5,
            "initial_backoff": "1ms",
            "retry_on": [
                "internal_error",
                "connect_error",
                "connection_closed",
                "timeout",
                "protocol_error",
            ],
            "idempotent": ["*"],
        },
    }
    n = 20
    idl = load_thriftpy2_interop()
    with rig(config) as r, r.client() as client:
        for i in range(n):
            with pytest.raises(idl.NotFound):
                client.getItem(-1 - i)
        with pytest.raises(idl.ServiceBusy):
            client.getItem(idl.BUSY_ITEM_ID)
        for seqid in range(1, n + 1):
            reply = raw_call(
                r.sidecar.address, encode_call("ping", seqid=seqid, name="noSuchMethod"), "framed"
            )
            header = parse_header(reply)
            assert header is not None
            assert (header.type, header.seqid) == (MessageType.EXCEPTION, seqid)
            exc_type, _ = parse_application_exception(reply[header.body_offset :])
            assert exc_type == ApplicationExceptionType.UNKNOWN_METHOD
        m = r.metrics()
        assert r.state() == 0
        assert m.value("thrift_sidecar_breaker_consecutive_failures", breaker=r.breaker) == 0
        assert m.value("thrift_sidecar_breaker_transitions_total") == 0
        assert m.value("thrift_sidecar_retries_total") == 0
        # Executed once per client call: never retried.
        assert r.upstream.calls["getItem"] == n + 1
        assert r.proxy.stats.by_method.get("noSuchMethod") == n
        assert m.value("thrift_sidecar_requests_total", outcome="declared_exception") == n + 1
        assert m.value("thrift_sidecar_requests_total", outcome="app_exception") == n
        print(
            f"\n{n + 1} declared exceptions and {n} UNKNOWN_METHOD: breaker closed, 0 retries, "
            f"getItem executed {r.upstream.calls['getItem']}"
        )
        # The control: with the same settings, real failures do open it. The
        # breaker counts calls, not attempts: fail_max calls, each retried.
        r.proxy.plan.set_rates(internal_error=1.0)
        for i in range(FAIL_MAX):
            _app_error(lambda i=i: client.getItem(i + 1))
        assert r.state() == 2
