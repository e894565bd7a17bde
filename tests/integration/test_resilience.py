"""Retries through a real sidecar: transient failures absorbed, writes never repeated.

Every test runs a thriftpy2 upstream, a `FaultProxy` in front of it and a
sidecar process (`run_sidecar`) in front of the proxy:

    client ──► sidecar ──► FaultProxy ──► upstream

The proxy decides each attempt's fate and counts what it saw; the upstream
counts what it executed; the sidecar's metrics say what it retried. Figures
worth reporting are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import thriftpy2.thrift

from sidecar.protocol.appexc import ApplicationExceptionType
from sidecar.testing.faults import FaultPlan
from tests.support.clients import thriftpy2_client
from tests.support.idl import load_thriftpy2_interop
from tests.support.rig import rig
from tests.support.servers import TransportName
from tests.support.sidecar import run_sidecar
from tests.support.wait import wait_until

TAE = thriftpy2.thrift.TApplicationException
INTERNAL_ERROR = ApplicationExceptionType.INTERNAL_ERROR
# A breaker that never opens, for tests about retries alone.
NO_BREAKER = {"breaker": {"fail_max": 1_000_000}}


def _order() -> Any:
    idl = load_thriftpy2_interop()
    return idl.Order(customer="alice", lines=[idl.OrderLine(itemId=4, quantity=2)])


def _app_error(call: Callable[[], object]) -> TAE:
    """The TApplicationException a call raises (fails the test if it returns)."""
    with pytest.raises(TAE) as info:
        call()
    return info.value


def _timed(call: Callable[[], object]) -> tuple[float, object]:
    started = time.monotonic()
    try:
        result: object = call()
    except TAE as exc:
        result = exc
    return time.monotonic() - started, result


def _assert_all_internal_errors_within(results: list[tuple[float, object]], limit: float) -> None:
    """Every `_timed` result is an INTERNAL_ERROR that took at most ``limit`` seconds."""
    for seconds, result in results:
        assert isinstance(result, TAE), result
        assert result.type == INTERNAL_ERROR
        assert seconds <= limit


# -- resets absorbed -------------------------------------------------------------------


def test_thirty_percent_resets_mid_call_are_invisible_to_clients() -> None:
    """1,000 idempotent calls from 10 threads while 30 % of attempts lose their connection.

    Half the resets come before the upstream executes the call, half after
    (executed, reply lost). Ten attempts make a call fail only with
    probability 0.3 ** 10 (6e-6). The budget ratio is 0.5 here: at a 30 %
    fault rate about 0.43 retries per call are needed, more than the default
    0.2 allows (which is the budget doing its job against a sick upstream).
    """
    config = {
        "retry": {
            "max_attempts": 10,
            "initial_backoff": "1ms",
            "max_backoff": "10ms",
            "per_try_timeout": "5s",
            "deadline": "20s",
            "budget": {"ratio": 0.5},
        },
        "methods": {"add": {"idempotent": True}},
        **NO_BREAKER,
    }
    plan = FaultPlan({"reset_before": 0.15, "reset_after": 0.15}, seed=2024)
    threads, per_thread = 10, 100
    with rig(config, plan) as r:

        def worker(t: int) -> list[str]:
            errors = []
            with r.client(timeout=30) as client:
                for i in range(per_thread):
                    try:
                        if i % 2:
                            assert client.getItem(t * 1000 + i).id == t * 1000 + i
                        else:
                            assert client.add(t, i) == t + i
                    except Exception as exc:
                        errors.append(f"{t}/{i}: {exc!r}")
            return errors

        started = time.monotonic()
        with ThreadPoolExecutor(threads) as pool:
            errors = [e for found in pool.map(worker, range(threads)) for e in found]
        elapsed = time.monotonic() - started
        m = r.metrics()
        stats = r.proxy.stats
        executed = r.upstream.calls["getItem"] + r.upstream.calls["add"]

    calls = threads * per_thread
    attempts = m.value("thrift_sidecar_upstream_attempts_total")
    retries = m.value("thrift_sidecar_retries_total")

    def retried(reason: str) -> float:
        return m.value("thrift_sidecar_retries_total", reason=reason)

    print(
        f"\nresets: {calls} calls in {elapsed:.2f}s, client errors {len(errors)}, "
        f"attempts {attempts:g}, retries {retries:g} "
        f"(connection_closed {retried('connection_closed'):g}, "
        f"connect_error {retried('connect_error'):g}), "
        f"resets before/after {stats.action('reset_before')}/{stats.action('reset_after')}, "
        f"executions {executed}, proxy connections {stats.connections}"
    )
    assert errors == []
    # Every attempt reached the proxy, and every one that failed was retried.
    assert attempts == stats.calls
    assert retries == attempts - calls
    assert stats.action("reset_before") + stats.action("reset_after") == retries
    assert 0.2 < retries / attempts < 0.4  # the faults really happened, at about 30 %
    # Executed once per call, plus once per reply lost after execution.
    assert executed == calls + stats.action("reset_after")
    assert m.value("thrift_sidecar_requests_total", outcome="ok") == calls


# -- writes: never repeated once sent ------------------------------------------------


@pytest.mark.parametrize(("fault", "executions"), [("reset_after", 1), ("reset_before", 0)])
def test_write_whose_connection_breaks_after_sending_is_not_retried(
    fault: str, executions: int
) -> None:
    """placeOrder is not idempotent: once sent, a broken connection ends the call.

    With ``reset_after`` the upstream executed it and the reply was lost; with
    ``reset_before`` it never ran, but the sidecar cannot tell the two apart
    (the bytes were written), so both must give up.
    """
    config = {"retry": {"max_attempts": 5, "initial_backoff": "1ms"}, **NO_BREAKER}
    with rig(config, FaultPlan(schedule=[fault])) as r:
        with r.client() as client:
            error = _app_error(lambda: client.placeOrder(_order()))
            # The connection to the sidecar is still good.
            assert client.placeOrder(_order()).orderId == executions + 1
        m = r.metrics()
        assert r.upstream.calls["placeOrder"] == executions + 1
    assert error.type == INTERNAL_ERROR
    assert "closed the connection" in error.message
    assert m.value("thrift_sidecar_retries_total", method="placeOrder") == 0
    assert (
        m.value("thrift_sidecar_retries_given_up_total", method="placeOrder", reason="unsafe") == 1
    )
    assert (
        m.value(
            "thrift_sidecar_upstream_attempts_total",
            method="placeOrder",
            result="connection_closed",
        )
        == 1
    )
    print(f"\n{fault}: placeOrder executed {executions} time(s), client error {error.message!r}")


def test_write_whose_connect_is_refused_is_retried_and_executed_once() -> None:
    """Nothing was sent, so placeOrder is retried; it runs exactly once when the upstream is back.

    The proxy is down (listener closed: ECONNREFUSED) until the sidecar has
    counted a refused attempt, then comes back on the same port.
    """
    config = {
        "retry": {
            "max_attempts": 10,
            "initial_backoff": "50ms",
            "max_backoff": "400ms",
            "deadline": "10s",
        },
        **NO_BREAKER,
    }
    with rig(config) as r:
        r.proxy.set_down(True)
        outcome: dict[str, Any] = {}

        def place() -> None:
            with r.client(timeout=15) as client:
                started = time.monotonic()
                try:
                    outcome["receipt"] = client.placeOrder(_order())
                except Exception as exc:
                    outcome["error"] = exc
                outcome["seconds"] = time.monotonic() - started

        thread = threading.Thread(target=place)
        thread.start()
        try:
            wait_until(
                lambda: (
                    r.metrics().value(
                        "thrift_sidecar_upstream_attempts_total",
                        method="placeOrder",
                        result="connect_error",
                    )
                    >= 1
                ),
                timeout=10,
                message="a refused attempt",
            )
        finally:
            r.proxy.set_down(False)
            thread.join(20)
        m = r.metrics()
        refused = m.value(
            "thrift_sidecar_upstream_attempts_total", method="placeOrder", result="connect_error"
        )
        retried = m.value(
            "thrift_sidecar_retries_total", method="placeOrder", reason="connect_error"
        )
        print(
            f"\nrefused connect: placeOrder {outcome.get('receipt') or outcome.get('error')!r} "
            f"after {outcome['seconds']:.2f}s, refused attempts {refused:g}, retries {retried:g}, "
            f"executions {r.upstream.calls['placeOrder']}"
        )
        assert "error" not in outcome
        assert outcome["receipt"].orderId == 1
        assert r.upstream.calls["placeOrder"] == 1
        assert retried == refused >= 1
        assert (
            m.value("thrift_sidecar_upstream_attempts_total", method="placeOrder", result="ok") == 1
        )


# -- timeouts ------------------------------------------------------------------------


def test_slow_reply_is_abandoned_on_time_and_never_delivered_late() -> None:
    """Per-try timeout 300 ms; some attempts take 800 ms.

    An idempotent ``add`` whose first attempt is slow is answered by its
    retry soon after 300 ms. A ``placeOrder`` that is slow is not retried: the
    client gets INTERNAL_ERROR soon after 300 ms, and ``add`` calls keep going
    on the same client connection while the late reply arrives. Every answer
    must be its own call's: a late reply read as the answer to a later call
    would show as a wrong sum or a seqid mismatch.
    """
    per_try, slow, slack = 0.3, 0.8, 0.5
    config = {
        "retry": {
            "max_attempts": 3,
            "initial_backoff": "5ms",
            "max_backoff": "20ms",
            "per_try_timeout": f"{per_try}s",
            "deadline": "5s",
        },
        # placeOrder declared two-way: a oneway probe behind its slow first call would
        # be one more late reply at the proxy (see test_oneway.py for the probe).
        "methods": {"add": {"idempotent": True}, "placeOrder": {"oneway": False}},
        **NO_BREAKER,
    }
    steps: list[Any] = []
    slow_calls = set()
    for i in range(20):
        if i % 4 == 1:
            steps += [("delay", slow), "ok"]
            slow_calls.add(i)
        else:
            steps.append("ok")
    with rig(config, FaultPlan(schedule=steps)) as r:
        with r.client() as client:
            answers = [_timed(lambda i=i: client.add(i, 1000 + i)) for i in range(20)]
            # Part 2: a slow write, then calls while its late reply arrives.
            wait_until(
                lambda: r.proxy.stats.late_replies == len(slow_calls),
                timeout=5,
                message="the slow add replies delivered late",
            )
            late_before = r.proxy.stats.late_replies
            r.plan.extend_schedule([("delay", slow)])
            write_seconds, write_result = _timed(lambda: client.placeOrder(_order()))
            followers: list[tuple[int, Any]] = []

            def late_reply_came() -> bool:
                """One more call; done once the write's late reply has reached the proxy."""
                n = 100 + len(followers)
                followers.append((n, client.add(n, n)))
                return r.proxy.stats.late_replies > late_before

            # A call every 10 ms until the late reply has come (5 s at most).
            wait_until(late_reply_came, timeout=5, interval=0.01, message="the late reply")
            for _ in range(5):  # and a few after it
                n = 100 + len(followers)
                followers.append((n, client.add(n, n)))
        wait_until(
            lambda: r.proxy.stats.late_replies == len(slow_calls) + 1,
            timeout=5,
            message="every slow reply delivered late",
        )
        stats = r.proxy.stats
        m = r.metrics()
        executed_add = r.upstream.calls["add"]
        executed_order = r.upstream.calls["placeOrder"]

    slow_seconds = [answers[i][0] for i in sorted(slow_calls)]
    print(
        f"\nper-try timeout {per_try}s: slow add calls answered in "
        f"{', '.join(f'{s:.3f}' for s in slow_seconds)}s; slow placeOrder error after "
        f"{write_seconds:.3f}s; {len(followers)} calls after it all correct; "
        f"late replies {stats.late_replies}, proxy connections {stats.connections}, "
        f"timeouts {m.value('thrift_sidecar_upstream_attempts_total', result='timeout'):g}"
    )
    assert [result for _, result in answers] == [1000 + 2 * i for i in range(20)]
    for seconds in slow_seconds:
        assert per_try <= seconds <= per_try + slack
    assert isinstance(write_result, TAE)
    assert write_result.type == INTERNAL_ERROR
    assert "did not reply within" in write_result.message
    assert per_try <= write_seconds <= per_try + slack
    assert stats.late_replies > late_before  # a late reply did come while calls went on
    assert followers == [(n, 2 * n) for n, _ in followers]
    assert (
        m.value("thrift_sidecar_upstream_attempts_total", result="timeout") == len(slow_calls) + 1
    )
    assert m.value("thrift_sidecar_retries_total", method="add", reason="timeout") == len(
        slow_calls
    )
    assert m.value("thrift_sidecar_retries_total", method="placeOrder") == 0
    # A timed-out connection is closed: each slow attempt cost one connection.
    assert stats.connections == 1 + len(slow_calls) + 1
    # The slow attempts still executed (late): a slow upstream is not a dead one.
    assert executed_add == 20 + len(slow_calls) + len(followers)
    assert executed_order == 1


def test_no_call_outlives_its_deadline() -> None:
    """Every attempt is slower than the per-try timeout: calls end at the deadline.

    Deadline 1 s, per-try timeout 400 ms, up to 10 attempts: the third attempt
    is cut short by the deadline and the client gets INTERNAL_ERROR.
    """
    deadline, slack = 1.0, 0.5
    config = {
        "retry": {
            "max_attempts": 10,
            "initial_backoff": "10ms",
            "max_backoff": "50ms",
            "per_try_timeout": "400ms",
            "deadline": f"{deadline}s",
        },
        **NO_BREAKER,
    }
    plan = FaultPlan({"delay": 1.0}, delay=1.5)
    with rig(config, plan) as r:

        def worker(t: int) -> list[tuple[float, object]]:
            with r.client() as client:
                return [_timed(lambda i=i: client.getItem(t * 10 + i)) for i in range(3)]

        with ThreadPoolExecutor(4) as pool:
            results = [x for found in pool.map(worker, range(4)) for x in found]
        m = r.metrics()

    durations = [seconds for seconds, _ in results]
    attempts = m.value("thrift_sidecar_upstream_attempts_total", method="getItem")
    print(
        f"\ndeadline {deadline}s: {len(results)} calls took "
        f"{min(durations):.3f}-{max(durations):.3f}s, attempts {attempts:g} "
        f"({attempts / len(results):.2f} per call), given up for the deadline "
        f"{m.value('thrift_sidecar_retries_given_up_total', reason='deadline'):g}"
    )
    _assert_all_internal_errors_within(results, deadline + slack)
    assert attempts >= 2 * len(results)  # retried until the deadline, not given up at once
    assert m.value("thrift_sidecar_requests_total", outcome="timeout") == len(results)


@contextlib.contextmanager
def blackhole() -> Iterator[str]:
    """An address whose connects hang: a listener with a full accept queue (SYNs dropped)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        with socket.create_connection(address, timeout=5):  # fills the queue (backlog 0)
            with socket.socket() as probe:
                probe.settimeout(0.2)
                with pytest.raises(TimeoutError):
                    probe.connect(address)
            yield f"{address[0]}:{address[1]}"


def test_a_hanging_connect_is_cut_at_the_per_try_timeout_and_deadline() -> None:
    """connect_timeout (3 s) is longer than the per-try timeout and the deadline.

    The upstream never completes the TCP handshake. Each attempt's connect
    must be cut at the per-try timeout (300 ms), and the call must end by its
    deadline (1 s), not after connect_timeout.
    """
    deadline, slack = 1.0, 0.5
    config = {
        "upstream": {"connect_timeout": "3s"},
        "retry": {
            "max_attempts": 3,
            "initial_backoff": "10ms",
            "max_backoff": "20ms",
            "per_try_timeout": "300ms",
            "deadline": f"{deadline}s",
        },
        **NO_BREAKER,
    }
    with blackhole() as address, run_sidecar([address], config=config) as sidecar:
        with thriftpy2_client(sidecar.address, "framed", timeout=10) as client:
            results = [_timed(lambda i=i: client.getItem(i)) for i in range(2)]
        m = sidecar.metrics()
    print(
        f"\nhanging connect: calls took {', '.join(f'{s:.3f}' for s, _ in results)}s, "
        f"connect_error attempts "
        f"{m.value('thrift_sidecar_upstream_attempts_total', result='connect_error'):g}"
    )
    _assert_all_internal_errors_within(results, deadline + slack)
    assert m.value("thrift_sidecar_upstream_attempts_total", result="connect_error") >= 4


# -- the budget ----------------------------------------------------------------------


def test_retry_budget_caps_the_load_on_a_dead_upstream() -> None:
    """Every connection is reset at once; N calls at a steady rate over T seconds.

    Without a budget each call would make ``max_attempts`` = 5 attempts. With
    ratio 0.2 and a floor of 2 retries/s, attempts (counted at the proxy: one
    connection each) stay within N * (1 + ratio) + floor * T, the floor being
    granted per window of the budget: T is the traffic's duration rounded up to
    whole windows (sidecar/resilience/budget.py).
    """
    ratio, floor, window = 0.2, 2.0, 1.0
    rate, seconds = 20.0, 3.9
    config = {
        "retry": {
            "max_attempts": 5,
            "initial_backoff": "5ms",
            "max_backoff": "20ms",
            "per_try_timeout": "500ms",
            "deadline": "5s",
            "budget": {"ratio": ratio, "min_retries_per_second": floor, "window": f"{window}s"},
        },
        **NO_BREAKER,
    }
    n = int(rate * seconds)
    with rig(config, FaultPlan({"refuse": 1.0})) as r:
        errors = 0
        with r.client() as client:
            started = time.monotonic()
            for i in range(n):
                # Pacing, not waiting for anything: the budget is about calls per
                # second, so call i goes out at its slot of a fixed rate.
                pause = started + i / rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                try:
                    client.getItem(i)
                except TAE:
                    errors += 1
            elapsed = time.monotonic() - started
        m = r.metrics()
        stats = r.proxy.stats

    attempts = stats.connections
    whole_windows = math.ceil(elapsed / window)
    bound = n * (1 + ratio) + floor * window * whole_windows
    print(
        f"\nbudget: {n} calls over {elapsed:.2f}s, upstream attempts {attempts} "
        f"(metrics {m.value('thrift_sidecar_upstream_attempts_total'):g}), "
        f"bound N(1+ratio)+floor*T = {bound:.1f} (T = {whole_windows} windows), "
        f"retries {m.value('thrift_sidecar_retries_total'):g}, refused by budget "
        f"{m.value('thrift_sidecar_retry_budget_exhausted_total'):g}, without a budget "
        f"{n * 5}"
    )
    assert errors == n
    assert stats.refused == attempts
    assert m.value("thrift_sidecar_upstream_attempts_total") == attempts
    assert m.value("thrift_sidecar_retry_budget_exhausted_total") > 0
    assert attempts <= bound


# -- broken connections are never reused ------------------------------------------------


@pytest.mark.parametrize("transport", ["framed", "buffered"])
@pytest.mark.parametrize(
    ("fault", "reused"),
    [("garbage", False), (("delay", 0.6), False), ("reset_after", False), ("internal_error", True)],
    ids=["garbage", "timeout", "reset", "internal_error"],
)
def test_a_broken_upstream_connection_is_discarded(
    fault: Any, reused: bool, transport: TransportName
) -> None:
    """After garbage, a timeout or a reset the next call uses a new upstream connection.

    ``internal_error`` is a valid answer: its connection is kept, which shows
    the proxy's connection count can tell reuse from replacement.
    """
    config = {
        "retry": {"max_attempts": 1, "per_try_timeout": "300ms"},
        **NO_BREAKER,
    }
    with rig(config, FaultPlan(schedule=["ok", fault]), transport) as r:
        with r.client() as client:
            assert client.add(1, 1) == 2
            error = _app_error(lambda: client.add(2, 2))
            answers = [client.add(n, n) for n in range(3, 8)]
        stats = r.proxy.stats
    assert error.type == INTERNAL_ERROR
    assert answers == [6, 8, 10, 12, 14]
    assert stats.connections == (1 if reused else 2)
    print(f"\n{fault} ({transport}): error {error.message!r}, connections {stats.connections}")
