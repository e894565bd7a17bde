"""Signals, sent by PID to a real sidecar process: SIGTERM/SIGINT drain, SIGHUP reloads.

Drain: the listener closes at once (new connections are refused, /readyz says
503), idle client connections are closed, calls in flight are answered, and
the process exits 0 within ``drain_timeout``. A call still running when
``drain_timeout`` passes is cut off (its client sees the connection close)
and the process exits 1, so that a supervisor can tell a clean stop from one
that dropped calls.

Reload: a changed retry policy applies to the next calls of a client
connection that was open before; a broken file changes nothing and is
counted; a changed ``listen`` is logged as needing a restart. No client
connection is closed by a reload, not even one with a call in flight.
"""

from __future__ import annotations

import copy
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import thriftpy2.thrift
import thriftpy2.transport

from tests.support.clients import split_address, thriftpy2_client
from tests.support.ops import PREFIX, rig, sample, scrape
from tests.support.raw import decode_reply, encode_call, raw_calls
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import SidecarProcess, free_port, http_get, run_sidecar
from tests.support.wait import wait_until

TAE = thriftpy2.thrift.TApplicationException
# Generous: two cores shared with other test runs; what is checked is the bound, not speed.
EXIT_SLACK = 5.0
SLOW = {"retry": {"per_try_timeout": "30s", "deadline": "60s"}}


def _refused(address: str) -> bool:
    try:
        with socket.create_connection(split_address(address), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


def _readyz(sc: SidecarProcess) -> int | None:
    try:
        return http_get(sc.admin + "/readyz", timeout=1.0)[0]
    except OSError:
        return None


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``call`` in a thread; the list gets its result or the exception it raised."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(call())
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_sigterm_answers_the_call_in_flight_refuses_new_ones_and_exits_0() -> None:
    drain_timeout = 5.0
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config={**SLOW, "drain_timeout": "5s"}) as sc,
        thriftpy2_client(sc.address, "framed", timeout=30) as busy,
        socket.create_connection(split_address(sc.address), timeout=10) as idle,
    ):
        wait_until(lambda: sc.state()["client_connections"] == 2, message="both connected")
        thread, result = _in_thread(lambda: busy.sleepMs(2000))
        wait_until(lambda: upstream.calls["sleepMs"] == 1, message="the slow call in flight")

        sent = time.monotonic()
        sc.signal(signal.SIGTERM)
        wait_until(lambda: _refused(sc.address), timeout=3, message="new connections refused")
        wait_until(lambda: _readyz(sc) == 503, timeout=3, message="/readyz 503 while draining")
        assert idle.recv(1) == b"", "the idle connection is closed"
        assert thread.is_alive(), "... while the slow call is still in flight"

        thread.join(30)
        assert result == [2000]
        status = sc.proc.wait(drain_timeout + EXIT_SLACK)
        took = time.monotonic() - sent
    assert status == 0
    assert took < drain_timeout + EXIT_SLACK
    log = sc.log()
    assert "SIGTERM received: shutting down" in log
    assert "draining: no new connections, waiting up to 5s for calls in flight" in log
    assert "drain timeout passed" not in log


def test_sigint_stops_an_idle_sidecar_with_status_0() -> None:
    with run_sidecar([f"127.0.0.1:{free_port()}"]) as sc:
        sc.signal(signal.SIGINT)
        assert sc.proc.wait(EXIT_SLACK) == 0
    assert "SIGINT received: shutting down" in sc.log()


def test_a_drain_past_drain_timeout_cuts_the_call_and_exits_1() -> None:
    drain_timeout = 1.0
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config={**SLOW, "drain_timeout": "1s"}) as sc,
        thriftpy2_client(sc.address, "framed", timeout=30) as busy,
    ):
        thread, result = _in_thread(lambda: busy.sleepMs(20_000))
        wait_until(lambda: upstream.calls["sleepMs"] == 1, message="the slow call in flight")
        sent = time.monotonic()
        sc.signal(signal.SIGTERM)
        status = sc.proc.wait(drain_timeout + EXIT_SLACK)
        took = time.monotonic() - sent
        thread.join(10)
    assert status == 1
    assert drain_timeout <= took < drain_timeout + EXIT_SLACK
    [error] = result
    # Told why, not just cut off.
    assert isinstance(error, TAE), error
    assert error.type == TAE.INTERNAL_ERROR
    assert "shutting down" in error.message
    assert "drain_timeout (1s)" in error.message
    assert "drain timeout passed; closed connections with calls still in flight" in sc.log()


# Reload


def _reloads(sc: SidecarProcess, result: str) -> float | None:
    return sample(scrape(sc), PREFIX + "config_reloads", "_total", result=result)


def _retries(sc: SidecarProcess) -> float | None:
    return sample(
        scrape(sc), PREFIX + "retries", "_total", method="getItem", reason="connection_closed"
    )


def _with(config: dict[str, Any], **retry: Any) -> dict[str, Any]:
    changed = copy.deepcopy(config)
    changed["retry"].update(retry)
    return changed


RELOAD_CONFIG: dict[str, Any] = {
    "retry": {
        "max_attempts": 1,
        "initial_backoff": "1ms",
        "per_try_timeout": "10s",
        "deadline": "20s",
        "budget": {"min_retries_per_second": 1000},
    }
}


def test_sighup_applies_a_new_retry_policy_to_open_connections_and_rejects_a_broken_file() -> None:
    with rig(RELOAD_CONFIG) as r, thriftpy2_client(r.sidecar.address, "framed") as c:
        sc, plan = r.sidecar, r.proxy.plan
        base = sc.config
        assert c.getItem(1).id == 1
        # A raw connection opened before the reloads, used after them.
        raw = socket.create_connection(split_address(sc.address), timeout=10)

        # A broken file: rejected, counted, logged; nothing changes.
        sc.write_config(_with(base, max_attempts=0))
        sc.signal(signal.SIGHUP)
        wait_until(lambda: _reloads(sc, "error") == 1, message="rejected reload counted")
        assert _reloads(sc, "ok") == 0
        assert "config reload rejected, still running config version 1" in sc.log()
        assert "retry.max_attempts" in sc.log()
        calls = r.proxy.stats.calls
        plan.extend_schedule(["reset_before"])
        with pytest.raises(TAE, match="closed the connection"):
            c.getItem(2)  # still one attempt
        assert r.proxy.stats.calls == calls + 1
        assert sc.state()["config_version"] == 1

        # A valid file with three attempts: the same connection now retries. A call in
        # flight (held by the proxy for a second) across the reload is answered.
        slow_client = thriftpy2_client(sc.address, "framed", timeout=30)
        slow = slow_client.__enter__()
        try:
            plan.extend_schedule([("delay", 1.0)])
            thread, result = _in_thread(lambda: slow.getItem(4))
            wait_until(lambda: r.proxy.stats.calls == calls + 2, message="slow call in flight")
            sc.write_config(_with(base, max_attempts=3))
            sc.signal(signal.SIGHUP)
            wait_until(lambda: _reloads(sc, "ok") == 1, message="reload counted")
            assert thread.is_alive(), "the reload happened while the call was in flight"
            thread.join(10)
            assert [x.id for x in result] == [4]
        finally:
            slow_client.__exit__(None, None, None)
        assert sc.state()["config_version"] == 2
        plan.extend_schedule(["reset_before"])
        assert c.getItem(2).id == 2
        assert r.proxy.stats.calls == calls + 4  # the reset attempt and its retry
        assert _retries(sc) == 1

        [reply] = raw_calls_on(raw, [encode_call("getItem", {"id": 6})])
        assert decode_reply("getItem", reply).id == 6
        raw.close()
        assert _reloads(sc, "error") == 1
        assert "config reloaded (version 2): changed retry" in sc.log()


def raw_calls_on(sock: socket.socket, messages: list[bytes]) -> list[bytes]:
    """`raw_calls` on a connection that is already open (framed)."""
    from sidecar.protocol.framing import Transport, frame, make_decoder

    sock.sendall(b"".join(frame(m, Transport.FRAMED) for m in messages))
    decoder = make_decoder(Transport.FRAMED, 1 << 20)
    out: list[bytes] = []
    while len(out) < len(messages):
        data = sock.recv(65536)
        assert data, "the connection was closed"
        out.extend(bytes(m.payload()) for m in decoder.receive_data(data))
    return out


def test_sighup_with_a_new_listen_address_says_it_needs_a_restart() -> None:
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address]) as sc,
        thriftpy2_client(sc.address, "framed") as c,
    ):
        moved = copy.deepcopy(sc.config)
        new_address = f"127.0.0.1:{free_port()}"
        moved["listen"] = new_address
        moved["retry"] = {"max_attempts": 2}
        sc.write_config(moved)
        sc.signal(signal.SIGHUP)
        wait_until(lambda: _reloads(sc, "ok") == 1, message="reload counted")
        assert (
            "config reloaded (version 2): changed retry; changes to listen need a restart "
            "and were not applied"
        ) in sc.log()
        # Still on the old address, on the open connection and on new ones.
        assert c.add(1, 2) == 3
        [reply] = raw_calls(sc.address, [encode_call("add", {"a": 2, "b": 2})], "framed")
        assert decode_reply("add", reply) == 4
        assert _refused(new_address)
        assert sc.state()["config"]["restart_needed_for"] == ["listen"]
