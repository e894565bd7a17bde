"""A bug inside one call answers that call with INTERNAL_ERROR; nobody else notices.

Each way into a `Call` (``start``, ``on_reply``, ``on_error``, the callback
of the task that opens an upstream connection, the backoff timer, the
fallback lookup) is broken in turn, by patching a function that runs below
it, while a real sidecar (`SidecarThread`) serves a real upstream. The
victim gets ``TApplicationException(INTERNAL_ERROR)``; the log's traceback
shows which entry point caught it; the same connection, another client's
connection, the breaker and the upstream pool keep working, and the call's
concurrency slot was given back (``upstream.max_in_flight: 1``: one slot
kept by a broken call would shed every call after it). A bug in a
client connection's callback closes that connection only and is counted as
``protocol_errors_total{kind="internal"}``.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import thriftpy2.thrift
import thriftpy2.transport

from sidecar.fallback import service as fallback_service
from sidecar.protocol import auto as auto_module
from sidecar.protocol.appexc import ApplicationExceptionType
from sidecar.proxy import call as call_module
from sidecar.proxy.balancer import UpstreamSet
from sidecar.proxy.upstream import UpstreamConnection
from sidecar.resilience.budget import RetryBudget
from tests.support.clients import thriftpy2_client
from tests.support.gate import gate_of, gated_upstream
from tests.support.servers import Thriftpy2Server
from tests.support.sidecar import SidecarThread, base_config, merged
from tests.support.wait import wait_until

TAE = thriftpy2.thrift.TApplicationException
INTERNAL_ERROR = int(ApplicationExceptionType.INTERNAL_ERROR)
# `plant` replaces a method on a class; compiled callers call the one built in.
PURE_BUG = pytest.mark.pure_python("injects its bug by replacing a method compiled callers bind")
# Attempts short enough to wait for, long enough for a busy machine; never the breaker:
# the failures here are the tests' own.
CONFIG: dict[str, Any] = {
    "upstream": {"max_in_flight": 1},
    "breaker": {"fail_max": 1000},
    "retry": {
        "max_attempts": 1,
        "per_try_timeout": "1s",
        "deadline": "10s",
        "initial_backoff": "50ms",
        "budget": {"min_retries_per_second": 1000},
    },
}


class Bug(RuntimeError):
    """A bug in the sidecar, planted by a test."""


class Switch:
    """Arms a planted bug: off until `on`, and for ``after`` good uses once on."""

    def __init__(self) -> None:
        self.armed = False
        self.spared = 0

    def on(self, after: int = 0) -> None:
        self.armed, self.spared = True, after

    def off(self) -> None:
        self.armed = False

    def fire(self) -> None:
        if self.armed:
            if self.spared > 0:
                self.spared -= 1
                return
            raise Bug("a bug in the sidecar")


def plant(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> Switch:
    """Replace ``owner.name`` with itself behind a `Switch`; returns the switch."""
    switch = Switch()
    real = getattr(owner, name)

    def planted(*args: Any, **kwargs: Any) -> Any:
        switch.fire()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, planted)
    return switch


@pytest.fixture
def upstream() -> Iterator[Thriftpy2Server]:
    with gated_upstream() as server:
        yield server


def entry_point_of(caplog: pytest.LogCaptureFixture) -> str:
    """The `Call` entry point whose guard logged the one internal error."""
    [record] = [r for r in caplog.records if r.getMessage().startswith("internal error handling")]
    assert record.exc_info is not None
    assert record.exc_info[2] is not None
    frames = traceback.extract_tb(record.exc_info[2])
    assert frames[0].name in call_module.ENTRY_POINTS, [f.name for f in frames]
    assert isinstance(record.exc_info[1], Bug)
    return frames[0].name


def assert_internal_error(raised: pytest.ExceptionInfo[Any]) -> None:
    assert raised.value.type == INTERNAL_ERROR
    assert "internal error handling this call" in raised.value.message


def fails_inside(
    switch: Switch, call: Callable[[], object], caplog: pytest.LogCaptureFixture, after: int = 0
) -> str:
    """``call`` with the bug armed (after ``after`` good uses) answers INTERNAL_ERROR;
    returns the `Call` entry point that caught the bug."""
    switch.on(after)
    with pytest.raises(TAE) as raised:
        call()
    switch.off()
    assert_internal_error(raised)
    return entry_point_of(caplog)


def assert_nothing_else_touched(
    sc: SidecarThread, upstream: Thriftpy2Server, victim: Any, bystander: Any
) -> None:
    """The same connection and another one still work; one call counted as the sidecar's."""
    assert victim.add(4, 5) == 9
    assert bystander.add(6, 7) == 13
    with thriftpy2_client(sc.address, "framed") as newcomer:
        assert newcomer.add(1, 1) == 2
    metrics = sc.metrics()
    assert metrics.value("thrift_sidecar_requests_total", outcome="sidecar_error") == 1
    assert metrics.value("thrift_sidecar_requests_total", outcome="shed") == 0
    assert metrics.value("thrift_sidecar_calls_in_flight") == 0
    assert metrics.value("thrift_sidecar_breaker_state") == 0
    assert metrics.value("thrift_sidecar_protocol_errors_total", kind="internal") == 0


@pytest.fixture
def sidecar(upstream: Thriftpy2Server) -> Iterator[SidecarThread]:
    with SidecarThread(base_config([upstream.address], **CONFIG)) as sc:
        yield sc


@pytest.fixture
def clients(sidecar: SidecarThread) -> Iterator[tuple[Any, Any]]:
    with (
        thriftpy2_client(sidecar.address, "framed") as victim,
        thriftpy2_client(sidecar.address, "framed") as bystander,
    ):
        yield victim, bystander


@pytest.fixture(autouse=True)
def _errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)


def add(victim: Any) -> object:
    return victim.add(2, 3)


def sleep_past_the_try(victim: Any) -> object:
    """Longer than per_try_timeout: the attempt times out."""
    return victim.sleepMs(3000)


@PURE_BUG
@pytest.mark.parametrize(
    ("owner", "name", "warm_up", "call", "entry_point", "upstream_adds"),
    [
        pytest.param(RetryBudget, "deposit", True, add, "start", 1, id="start"),
        pytest.param(call_module, "classify_reply", True, add, "on_reply", 2, id="on_reply"),
        pytest.param(
            call_module, "classify_error", True, sleep_past_the_try, "on_error", None, id="on_error"
        ),
        # No warm-up: the first call of this sidecar, no upstream connection is open yet.
        pytest.param(
            UpstreamConnection,
            "send",
            False,
            add,
            "_acquired",
            0,
            id="the_callback_of_opening_an_upstream_connection",
        ),
    ],
)
def test_a_bug_in(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    upstream: Thriftpy2Server,
    sidecar: SidecarThread,
    clients: tuple[Any, Any],
    owner: Any,
    name: str,
    warm_up: bool,
    call: Callable[[Any], object],
    entry_point: str,
    upstream_adds: int | None,
) -> None:
    """A bug below ``owner.name`` is caught by the `Call` entry point ``entry_point``."""
    victim, bystander = clients
    switch = plant(monkeypatch, owner, name)
    if warm_up:
        assert bystander.add(1, 2) == 3
    assert fails_inside(switch, lambda: call(victim), caplog) == entry_point
    if upstream_adds is not None:
        # 1 in `start`: the broken call never reached the upstream.
        assert upstream.calls["add"] == upstream_adds
    assert_nothing_else_touched(sidecar, upstream, victim, bystander)


@PURE_BUG
def test_a_bug_in_the_backoff_timer(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    upstream: Thriftpy2Server,
) -> None:
    retrying = merged(CONFIG, {"retry": {"max_attempts": 3}})
    with (
        SidecarThread(base_config([upstream.address], **retrying)) as sc,
        thriftpy2_client(sc.address, "framed") as victim,
        thriftpy2_client(sc.address, "framed") as bystander,
    ):
        switch = plant(monkeypatch, UpstreamSet, "pick")
        assert bystander.add(1, 2) == 3
        gate_of(upstream).close()  # the first attempt times out; the retry waits on a timer
        # ... and the retry's pick is broken
        assert fails_inside(switch, lambda: victim.getItem(7), caplog, after=1) == "_retry_due"
        gate_of(upstream).open()
        assert upstream.calls["getItem"] == 1
        assert victim.getItem(8).id == 8
        assert_nothing_else_touched(sc, upstream, victim, bystander)
        assert sc.metrics().value("thrift_sidecar_retries_total", method="getItem") == 1


@PURE_BUG
def test_a_bug_in_the_fallback_lookup_callback(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    upstream: Thriftpy2Server,
    sidecar: SidecarThread,
    clients: tuple[Any, Any],
) -> None:
    victim, bystander = clients
    switch = plant(monkeypatch, fallback_service, "write_seqid")
    assert victim.getItem(7).id == 7  # remembered for the fallback
    gate_of(upstream).close()  # the next one times out: a fallback is looked up
    assert fails_inside(switch, lambda: victim.getItem(7), caplog) == "_fallback_found"
    # Unbroken, the same lookup serves the remembered reply.
    assert victim.getItem(7).id == 7
    gate_of(upstream).open()
    metrics = sidecar.metrics()
    assert metrics.value("thrift_sidecar_fallback_replies_total", source="cache") == 1
    assert_nothing_else_touched(sidecar, upstream, victim, bystander)


@PURE_BUG
def test_a_bug_in_a_client_connection_callback_closes_that_connection_only(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    upstream: Thriftpy2Server,
    sidecar: SidecarThread,
    clients: tuple[Any, Any],
) -> None:
    _, bystander = clients
    assert bystander.add(1, 2) == 3  # its transport is detected already
    switch = plant(monkeypatch, auto_module, "detect")
    switch.on()  # breaks detecting the transport of the next connection
    with (
        thriftpy2_client(sidecar.address, "framed") as victim,
        pytest.raises(thriftpy2.transport.TTransportException),
    ):
        victim.add(2, 3)
    switch.off()
    assert "unexpected error serving client" in caplog.text
    assert bystander.add(6, 7) == 13
    with thriftpy2_client(sidecar.address, "framed") as newcomer:
        assert newcomer.add(1, 1) == 2
    metrics = sidecar.metrics()
    assert metrics.value("thrift_sidecar_protocol_errors_total", kind="internal") == 1
    assert metrics.value("thrift_sidecar_requests_total", outcome="sidecar_error") == 0
    assert upstream.calls["add"] == 3
    wait_until(
        lambda: sidecar.metrics().value("thrift_sidecar_client_connections") == 2,
        message="only the two fixture clients still connected",
    )
