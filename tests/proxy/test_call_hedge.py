"""A call's hedges inside a running sidecar (`SidecarThread`): bugs and cancellation.

A bug below the hedge timer answers that call with INTERNAL_ERROR and
releases both of its attempts, like a bug at any other entry point
(tests/proxy/test_call.py); a drain that cuts a call with a hedge in flight
closes both attempts' connections (nothing stays open on the upstream), and
gives up a hedge still connecting (its pool slot is freed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import thriftpy2.thrift

from sidecar.protocol.appexc import ApplicationExceptionType
from sidecar.proxy import hedger as hedger_module
from tests.support.clients import thriftpy2_client
from tests.support.hold import Hold, held_server
from tests.support.listeners import NotAccepting
from tests.support.servers import Thriftpy2Server
from tests.support.sidecar import SidecarThread, base_config, free_port
from tests.support.wait import wait_until

TAE = thriftpy2.thrift.TApplicationException
CONFIG: dict[str, Any] = {
    "hedge": {"delay": "20ms", "budget": {"min_hedges_per_second": 100}},
    "retry": {"max_attempts": 1, "per_try_timeout": "20s", "deadline": "30s"},
    "breaker": {"fail_max": 1000},
}


@pytest.fixture
def upstream() -> Iterator[tuple[Thriftpy2Server, Hold]]:
    with held_server() as upstream:
        yield upstream


def open_connections(sc: SidecarThread, address: str | None = None) -> int:
    """Open connections (and connects under way) of every pool, or of ``address``'s."""
    assert sc.sidecar is not None
    assert sc.sidecar.parts is not None
    pools = [
        p
        for p in sc.sidecar.parts.server.context.upstreams.pools()
        if address is None or p.address == address
    ]
    return sc.call(lambda: sum(p.open_connections for p in pools))


@pytest.mark.pure_python("injects its bug by replacing a method compiled callers bind")
def test_a_bug_in_the_hedge_timer_answers_that_call_and_releases_its_attempt(
    upstream: tuple[Thriftpy2Server, Hold],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, hold = upstream

    def broken(message: Any) -> Any:
        raise RuntimeError("a bug in the sidecar")

    with (
        SidecarThread(base_config([server.address], **CONFIG)) as sc,
        thriftpy2_client(sc.address, "framed") as victim,
        thriftpy2_client(sc.address, "framed") as bystander,
    ):
        assert victim.getItem(1).id == 1
        assert bystander.getItem(2).id == 2
        hold.arm("getItem")
        monkeypatch.setattr(hedger_module, "hedge_copy", broken)
        with caplog.at_level(logging.ERROR, "sidecar.pipeline"), pytest.raises(TAE) as raised:
            victim.getItem(3)  # without the guard: no answer until the hold ends (10 s)
        assert raised.value.type == ApplicationExceptionType.INTERNAL_ERROR
        assert "internal error handling this call" in raised.value.message
        assert any(r.getMessage().startswith("internal error handling") for r in caplog.records)
        assert hold.held == 1
        # Both attempts' connections (the held one's, the hedge's) were closed: not left
        # waiting, not lost to the pool.
        wait_until(lambda: open_connections(sc) == 0, message="both connections closed")
        monkeypatch.undo()
        assert victim.getItem(4).id == 4
        assert bystander.getItem(5).id == 5


def test_a_drain_that_cuts_a_hedged_call_closes_both_attempts(
    upstream: tuple[Thriftpy2Server, Hold],
) -> None:
    server, hold = upstream
    with SidecarThread(base_config([server.address], **CONFIG)) as sc:
        assert sc.sidecar is not None
        with thriftpy2_client(sc.address, "framed") as client:
            assert client.getItem(1).id == 1
            hold.arm("getItem", 2)  # the first attempt and its hedge
            future = sc.loop.run_in_executor(None, client.getItem, 7)
            wait_until(lambda: hold.held == 2, message="both attempts held at the upstream")
            assert open_connections(sc) == 2
            stopped = asyncio.run_coroutine_threadsafe(
                sc.sidecar.stop(drain_timeout=0.2), sc.loop
            ).result(10)
            assert stopped is False  # the call was cut
            with pytest.raises(TAE, match=r"drain|shutting|stopp"):
                asyncio.run_coroutine_threadsafe(asyncio.wait_for(future, 10), sc.loop).result(15)
            # Without releasing the hedge, its connection would still be open, busy.
            assert open_connections(sc) == 0


def test_a_drain_that_cuts_a_hedged_call_gives_up_its_hedge_still_connecting(
    upstream: tuple[Thriftpy2Server, Hold],
) -> None:
    server, hold = upstream
    port = free_port()
    slow = f"127.0.0.1:{port}"
    config = base_config([server.address, slow], **CONFIG, upstream={"connect_timeout": "10s"})
    with SidecarThread(config) as sc:
        assert sc.sidecar is not None
        with thriftpy2_client(sc.address, "framed") as client:
            # Calls take the addresses in turn: getItem(1) the live one (getItem is then
            # known two-way), ping the other (nothing listens yet: refused at once),
            # getItem(7) the live one again, where it is held.
            assert client.getItem(1).id == 1
            with pytest.raises(TAE, match="cannot connect"):
                client.ping()
            with NotAccepting(port):
                hold.arm("getItem")
                future = sc.loop.run_in_executor(None, client.getItem, 7)
                # Its hedge goes to the other address, where the connect hangs.
                wait_until(lambda: open_connections(sc, slow) == 1, message="the hedge connecting")
                assert hold.held == 1
                stopped = asyncio.run_coroutine_threadsafe(
                    sc.sidecar.stop(drain_timeout=0.2), sc.loop
                ).result(10)
                assert stopped is False  # the call was cut
                with pytest.raises(TAE, match=r"drain|shutting|stopp"):
                    asyncio.run_coroutine_threadsafe(asyncio.wait_for(future, 10), sc.loop).result(
                        15
                    )
                # The hedge's connect was given up, its slot freed; the first attempt's
                # connection closed.
                wait_until(lambda: open_connections(sc) == 0, message="no connection left")
