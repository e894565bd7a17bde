"""Active health checks through a real sidecar: outages seen by probes, not by sacrificed calls.

client ──► sidecar ──► FaultProxy ──► thriftpy2 upstream (and a second upstream
for the tests with two addresses). The upstream records every method it
executes, in order, with the time: probes call ``ping``, clients ``getItem``,
so the record says which calls were probes. Outages are the proxy going down
(its listener closed, connections reset) and coming back on the same port.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import thriftpy2.thrift

from sidecar.testing.faults import FaultProxyThread
from tests.config.test_tls import Certs
from tests.proxy.test_tls import TlsUpstream, server_side
from tests.support.clients import thriftpy2_client
from tests.support.redis import redis_server
from tests.support.rig import (
    Rig,
    breaker_state,
    breaker_transitions,
    faulty_upstream,
    rig,
    wait_probe_due,
)
from tests.support.servers import Thriftpy2Server, thriftpy2_server
from tests.support.sidecar import SidecarProcess, merged, run_sidecar
from tests.support.wait import wait_until

INTEROP_IDL = Path(__file__).resolve().parents[2] / "idl" / "interop.thrift"

TAE = thriftpy2.thrift.TApplicationException
INTERVAL = 0.4
TIMEOUT = 0.2
RESET_TIMEOUT = 1.0
# Room for a loaded 2-core machine: the scrape that sees the breaker closed, scheduling.
SLACK = 1.0
HEALTH = {
    "method": "ping",
    "interval": f"{INTERVAL}s",
    "timeout": f"{TIMEOUT}s",
    "unhealthy_threshold": 3,
    "healthy_threshold": 2,
}


class Executions:
    """What an upstream executed, in order: (method, monotonic time)."""

    def __init__(self, server: Thriftpy2Server) -> None:
        self._lock = threading.Lock()
        self._seen: list[tuple[str, float]] = []
        server.hook = self._record

    def _record(self, name: str) -> None:
        with self._lock:
            self._seen.append((name, time.monotonic()))

    def since(self, t: float) -> list[str]:
        with self._lock:
            return [name for name, at in self._seen if at >= t]


def _breaker_state(r: Rig) -> float:
    return r.state()


def test_outage_and_recovery_use_no_client_call_as_a_probe() -> None:
    """The breaker opens on client failures, and only passing probes close it.

    While the upstream is away and after it is back, until the breaker closes,
    client calls get their cached fallback; the upstream executes no
    ``getItem`` before the probe (``ping``) that closed the breaker, and the
    breaker closes within one interval (plus the probe's timeout) of the
    upstream's return.
    """
    config = {
        "health_check": {**HEALTH, "healthy_threshold": 2},
        "breaker": {"fail_max": 3, "reset_timeout": f"{RESET_TIMEOUT}s"},
        "retry": {"max_attempts": 2, "initial_backoff": "1ms", "max_backoff": "2ms"},
    }
    with rig(config) as r, r.client() as client:
        executions = Executions(r.upstream)
        cached = client.getItem(1)  # remembered: the fallback while the upstream is away
        r.proxy.set_down(True)
        for _ in range(20):  # calls fail (fallback from the cache) until the breaker opens
            assert client.getItem(1) == cached
            if _breaker_state(r) == 2:
                break
        assert _breaker_state(r) == 2
        wait_probe_due(r.sidecar, r.breaker, timeout=RESET_TIMEOUT + 5)

        # Past the reset timeout, upstream still away: the breaker stays open
        # (probes fail), and client calls keep getting the fallback.
        for _ in range(5):
            assert client.getItem(1) == cached
        assert _breaker_state(r) == 2

        # A client keeps calling while the upstream comes back.
        stop = threading.Event()
        answers: list[object] = []

        def keep_calling() -> None:
            with r.client() as c:
                for _ in range(2000):  # bounded: 2000 calls, or until stopped
                    if stop.is_set():
                        return
                    try:
                        answers.append(c.getItem(1))
                    except TAE as exc:
                        answers.append(exc)
                    time.sleep(0.005)

        caller = threading.Thread(target=keep_calling)
        caller.start()
        try:
            wait_until(lambda: len(answers) >= 5, timeout=5, message="client calls")
            back_at = time.monotonic()
            r.proxy.set_down(False)
            wait_until(
                lambda: _breaker_state(r) == 0,
                timeout=INTERVAL + TIMEOUT + 5,
                interval=0.01,
                message="breaker closed",
            )
            closed_after = time.monotonic() - back_at
            wait_until(
                lambda: "getItem" in executions.since(back_at),
                timeout=5,
                message="client calls reaching the upstream again",
            )
        finally:
            stop.set()
            caller.join(10)

        after = executions.since(back_at)
        first_client_call = after.index("getItem")
        print(
            f"\nbreaker closed {closed_after:.3f}s after the upstream came back "
            f"(interval {INTERVAL}s, timeout {TIMEOUT}s); upstream executed "
            f"{after[:first_client_call]} before the first client call; "
            f"{len(answers)} client calls during recovery"
        )
        # 0 client calls used as probes: the probe closed it, then client calls came.
        assert after[:first_client_call], "no probe before the first client call"
        assert set(after[:first_client_call]) == {"ping"}
        # Every client call got an answer: its fallback, or the upstream's own reply.
        assert all(a == cached for a in answers), [a for a in answers if a != cached][:3]
        # Closed by the first passing probe (success_threshold 1), within one interval.
        assert r.transitions("open", "half-open") == 1
        assert r.transitions("half-open", "closed") == 1
        assert closed_after <= INTERVAL + TIMEOUT + SLACK
        m = r.metrics()
        assert m.value("thrift_sidecar_health_check_probes_total", result="pass") >= 1
        assert m.value("thrift_sidecar_health_check_probes_total", result="connect_error") >= 1
        # Probes are not client calls: no ping in requests_total or upstream_attempts_total.
        assert m.value("thrift_sidecar_requests_total", method="ping") == 0
        assert m.value("thrift_sidecar_upstream_attempts_total", method="ping") == 0
        assert m.value("thrift_sidecar_breaker_rejections_total", breaker=r.breaker) > 0


@contextlib.contextmanager
def two_addresses(
    config: dict[str, Any],
) -> Iterator[tuple[FaultProxyThread, Thriftpy2Server, Thriftpy2Server, SidecarProcess]]:
    """A: fault proxy in front of upstream 1; B: upstream 2. Yields (proxy, up1, up2, sidecar)."""
    with (
        thriftpy2_server("framed") as up1,
        thriftpy2_server("framed") as up2,
        FaultProxyThread(up1.address, "framed") as proxy,
        run_sidecar([proxy.address, up2.address], config=config) as sidecar,
    ):
        yield proxy, up1, up2, sidecar


def _address_state(sidecar: SidecarProcess, address: str) -> dict[str, Any]:
    for entry in sidecar.state()["health_check"]["addresses"]:
        if entry["address"] == address:
            return dict(entry)
    raise AssertionError(f"{address} not in /state")


def _watch(
    sidecar: SidecarProcess, address: str, until_in_rotation: bool, timeout: float
) -> list[dict[str, Any]]:
    """/state snapshots of ``address`` until its rotation is as asked (deadline ``timeout``)."""
    seen: list[dict[str, Any]] = []

    def done() -> bool:
        seen.append(_address_state(sidecar, address))
        return bool(seen[-1]["in_rotation"] == until_in_rotation)

    wait_until(done, timeout=timeout, interval=0.02, message=f"{address} rotation")
    return seen


def test_a_dead_address_leaves_after_unhealthy_threshold_and_returns_after_healthy() -> None:
    config = {"health_check": HEALTH, "breaker": {"fail_max": 50}}
    with two_addresses(config) as (proxy, up1, up2, sidecar):
        a = proxy.address
        wait_until(lambda: up1.calls["ping"] >= 1 and up2.calls["ping"] >= 1, timeout=5)
        assert _address_state(sidecar, a)["in_rotation"]

        proxy.set_down(True)
        going = _watch(sidecar, a, until_in_rotation=False, timeout=3 * INTERVAL + 5)
        # In rotation exactly while fewer than 3 probes in a row have failed.
        for snap in going[:-1]:
            assert snap["failures_in_a_row"] < 3, snap
            assert snap["healthy"], snap
        assert going[-1]["failures_in_a_row"] >= 3, going[-1]
        assert not going[-1]["healthy"], going[-1]
        m = sidecar.metrics()
        assert m.value("thrift_sidecar_upstream_ejected", upstream=a) == 1
        assert m.value("thrift_sidecar_upstream_healthy", upstream=a) == 0
        assert m.value("thrift_sidecar_health_check_probes_total", upstream=a, result="pass") >= 1

        # Out of rotation: client calls go to B only, without a failed attempt on A.
        attempts_a = m.value("thrift_sidecar_upstream_attempts_total", upstream=a)
        b_before = up2.calls["getItem"]
        with thriftpy2_client(sidecar.address, "framed") as client:
            for i in range(20):
                assert client.getItem(i).id == i
        assert up2.calls["getItem"] - b_before == 20
        m = sidecar.metrics()
        assert m.value("thrift_sidecar_upstream_attempts_total", upstream=a) == attempts_a

        proxy.set_down(False)
        coming = _watch(sidecar, a, until_in_rotation=True, timeout=2 * INTERVAL + 5)
        for snap in coming[:-1]:
            assert snap["passes_in_a_row"] < 2, snap
        assert coming[-1]["passes_in_a_row"] >= 2, coming[-1]
        assert coming[-1]["healthy"], coming[-1]
        print(
            f"\nA left rotation after {going[-1]['failures_in_a_row']} failed probes and "
            f"came back after {coming[-1]['passes_in_a_row']} passing ones"
        )
        a_before = up1.calls["getItem"]
        with thriftpy2_client(sidecar.address, "framed") as client:
            for i in range(20):
                assert client.getItem(i).id == i
        assert up1.calls["getItem"] > a_before  # round robin reaches A again
        m = sidecar.metrics()
        assert m.value("thrift_sidecar_upstream_ejected", upstream=a) == 0
        assert m.value("thrift_sidecar_upstream_healthy", upstream=a) == 1


def test_a_passively_ejected_address_returns_on_passing_probes_not_on_the_timer() -> None:
    """Client calls eject A (its getItem fails; its ping too); the 200 ms ejection
    timer passes and A stays out; once its pings pass twice in a row, it is back."""
    config = {
        "health_check": {**HEALTH, "unhealthy_threshold": 100},  # probes alone never eject
        "breaker": {"fail_max": 50},
        "upstream": {"ejection": {"consecutive_failures": 2, "base_time": "200ms"}},
    }
    with two_addresses(config) as (proxy, up1, _up2, sidecar):
        a = proxy.address
        failing = threading.Event()
        failing.set()

        def hook(name: str) -> None:
            if failing.is_set():
                raise RuntimeError(f"{name} fails on purpose")

        up1.hook = hook
        with thriftpy2_client(sidecar.address, "framed") as client:
            for i in range(6):  # round robin: three calls to A fail (INTERNAL_ERROR)
                with contextlib.suppress(TAE):
                    client.getItem(i)
        wait_until(lambda: a in sidecar.state()["upstream"]["ejected"], timeout=5)
        assert "until its health checks pass" in sidecar.log()

        # Four times the ejection timer: A stays out while its probes fail.
        observed_until = time.monotonic() + 0.8
        while time.monotonic() < observed_until:
            assert a in sidecar.state()["upstream"]["ejected"]
            time.sleep(0.05)
        assert _address_state(sidecar, a)["healthy"]  # the probes never said unhealthy

        failing.clear()
        coming = _watch(sidecar, a, until_in_rotation=True, timeout=2 * INTERVAL + 5)
        for snap in coming[:-1]:
            assert snap["passes_in_a_row"] < 2, snap
        assert coming[-1]["passes_in_a_row"] >= 2


def test_a_reload_turns_health_checks_on_changes_them_and_turns_them_off() -> None:
    with thriftpy2_server("framed") as up, run_sidecar([up.address]) as sidecar:
        assert sidecar.state()["health_check"] == {"enabled": False}
        reloads = 0

        def reload(health_check: dict[str, Any] | None) -> None:
            nonlocal reloads
            sidecar.write_config(merged(sidecar.config, {"health_check": health_check}))
            sidecar.signal(signal.SIGHUP)
            reloads += 1
            wait_until(
                lambda: (
                    sidecar.metrics().value("thrift_sidecar_config_reloads_total", result="ok")
                    == reloads
                ),
                timeout=10,
                message="reload applied",
            )

        reload({**HEALTH, "method": "ping"})
        wait_until(lambda: up.calls["ping"] >= 2, timeout=5, message="probes calling ping")
        state = sidecar.state()["health_check"]
        assert state["enabled"]
        assert state["method"] == "ping"

        reload({**HEALTH, "method": "serviceName"})  # no arguments: no IDL needed
        wait_until(lambda: up.calls["serviceName"] >= 2, timeout=5, message="new method")
        pings = up.calls["ping"]
        assert sidecar.state()["health_check"]["method"] == "serviceName"

        reload(None)
        assert sidecar.state()["health_check"] == {"enabled": False}
        # A probe in flight during the reload may still land; none starts afterwards.
        time.sleep(INTERVAL)
        counts = (up.calls["ping"], up.calls["serviceName"])
        time.sleep(3 * INTERVAL)  # an absence: watched for three intervals
        assert (up.calls["ping"], up.calls["serviceName"]) == counts
        assert up.calls["ping"] == pings
        m = sidecar.metrics()
        assert not m.matching("thrift_sidecar_upstream_healthy")  # verdicts gone with them


def _probes(sidecar: SidecarProcess, result: str) -> float:
    return sidecar.metrics().value("thrift_sidecar_health_check_probes_total", result=result)


def test_arguments_typed_by_the_idl_and_a_declared_exception_fails_the_probe() -> None:
    """getItem(id) as the probe: id 5 answers an Item (pass); id -1 throws the declared
    NotFound, which fails the probe (a success REPLY is needed, as in Envoy)."""
    probe = {**HEALTH, "method": "getItem", "unhealthy_threshold": 2}
    config = {"idl": str(INTEROP_IDL), "health_check": {**probe, "arguments": {"id": 5}}}
    with thriftpy2_server("framed") as up, run_sidecar([up.address], config=config) as sidecar:
        wait_until(lambda: _probes(sidecar, "pass") >= 2, timeout=5, message="passing probes")
        assert up.calls["getItem"] >= 2
        assert _probes(sidecar, "declared_exception") == 0

        sidecar.write_config(
            merged(sidecar.config, {"health_check": {**probe, "arguments": {"id": -1}}})
        )
        sidecar.signal(signal.SIGHUP)
        wait_until(
            lambda: sidecar.state()["health_check"]["addresses"][0]["healthy"] is False,
            timeout=5,
            message="unhealthy after declared exceptions",
        )
        assert _probes(sidecar, "declared_exception") >= 2
        assert sidecar.metrics().value("thrift_sidecar_upstream_healthy") == 0


def test_probes_speak_the_upstream_transport() -> None:
    """A buffered-only upstream: probes in buffered transport pass, whether the config
    says so (upstream.transport) or the clients' calls showed it (transport same)."""
    with thriftpy2_server("buffered") as up:
        config = {"health_check": HEALTH, "upstream": {"transport": "buffered"}}
        with run_sidecar([up.address], config=config) as sidecar:
            wait_until(lambda: _probes(sidecar, "pass") >= 2, timeout=5, message="probes")
        with run_sidecar([up.address], config={"health_check": HEALTH}) as sidecar:
            # Before any client call: framed binary, which this upstream does not speak.
            wait_until(
                lambda: (
                    sidecar.metrics().value("thrift_sidecar_health_check_probes_total")
                    > _probes(sidecar, "pass")
                ),
                timeout=5,
                message="a failed probe",
            )
            assert _probes(sidecar, "pass") == 0
            with thriftpy2_client(sidecar.address, "buffered") as client:
                assert client.getItem(3).id == 3
            passed = _probes(sidecar, "pass")
            wait_until(lambda: _probes(sidecar, "pass") >= passed + 2, timeout=5)


def test_probes_reach_an_mtls_upstream(tmp_path: Path) -> None:
    """upstream.tls applies to the probes' own connections: CA and client certificate."""
    pki = Certs(tmp_path)
    pki.ca_file()
    pki.issue("sidecar-client", "the-sidecar")
    root = pki.root
    config = {
        "health_check": HEALTH,
        "upstream": {
            "tls": {
                "ca": str(root / "ca.crt"),
                "cert": str(root / "sidecar-client.crt"),
                "key": str(root / "sidecar-client.key"),
            }
        },
    }
    with (
        TlsUpstream(server_side(pki, client_ca=True)) as upstream,
        run_sidecar([upstream.address], config=config) as sidecar,
    ):
        wait_until(lambda: _probes(sidecar, "pass") >= 2, timeout=5, message="probes over TLS")
        assert upstream.calls["ping"] >= 2
        assert upstream.handshake_errors == []


def test_in_fleet_mode_a_probe_closes_the_shared_breaker_for_every_sidecar() -> None:
    """Two sidecars share the breaker through Redis; the outage opens it through A; after
    the upstream's return a passing probe closes it, through pybreaker's shared storage,
    for both, and no getItem reaches the upstream before that probe."""
    prefix = f"health-{uuid.uuid4().hex[:10]}"
    with redis_server() as redis, faulty_upstream() as (upstream, proxy):
        config = {
            "health_check": HEALTH,
            "state": {
                "redis_url": redis.url,
                "key_prefix": prefix,
                "refresh_interval": "100ms",
                "timeout": "500ms",
            },
            "breaker": {"fail_max": 3, "reset_timeout": f"{RESET_TIMEOUT}s"},
            "retry": {"max_attempts": 2, "initial_backoff": "1ms", "max_backoff": "2ms"},
            "fallback": {"serve_on": ["breaker_open"]},
        }
        with (
            run_sidecar([proxy.address], config=config) as a,
            run_sidecar([proxy.address], config=config) as b,
            thriftpy2_client(a.address, "framed") as ca,
            thriftpy2_client(b.address, "framed") as cb,
        ):
            executions = Executions(upstream)
            breaker = proxy.address
            proxy.set_down(True)
            for _ in range(3):
                with contextlib.suppress(TAE):
                    ca.getItem(1)
            for sidecar in (a, b):
                wait_until(lambda s=sidecar: breaker_state(s, breaker) == 2, timeout=5)
            wait_probe_due(b, breaker, timeout=RESET_TIMEOUT + 5)
            with contextlib.suppress(TAE):
                cb.getItem(2)  # past the reset timeout: rejected, not a probe
            back_at = time.monotonic()
            proxy.set_down(False)
            for sidecar in (a, b):
                wait_until(
                    lambda s=sidecar: breaker_state(s, breaker) == 0,
                    timeout=INTERVAL + TIMEOUT + 5,
                    message="shared breaker closed",
                )
            assert cb.getItem(3).id == 3
            assert ca.getItem(4).id == 4
            after = executions.since(back_at)
            first_client_call = after.index("getItem")
            assert after[:first_client_call]
            assert set(after[:first_client_call]) == {"ping"}
            # The sidecar whose probe closed it went half-open -> closed; the other may
            # only have seen the shared state go from open to closed.
            closes = [breaker_transitions(s, breaker, "half-open", "closed") for s in (a, b)]
            assert sum(closes) >= 1, closes
