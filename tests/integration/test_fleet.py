"""Fleet mode end to end: two sidecar processes sharing breaker state and cache through Redis.

client ──► sidecar A ─┐
                      ├──► FaultProxy ──► thriftpy2 upstream
client ──► sidecar B ─┘
           (both: state.redis_url = one real redis-server)

Failures are ``internal_error`` answers injected by the proxy; what reaches
the upstream side is counted at the proxy and the upstream. Breaker states
are read from each sidecar's metrics. Redis is a real ``redis-server`` on a
free port (`tests.support.redis.RedisServer`), stopped and started again by PID
where a test needs an outage.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import thriftpy2.thrift

from sidecar.testing.faults import FaultPlan, FaultProxyThread
from tests.support.clients import thriftpy2_client
from tests.support.redis import RedisServer, redis_keys, redis_server
from tests.support.rig import breaker_state, breaker_transitions, faulty_upstream, wait_probe_due
from tests.support.servers import Thriftpy2Server, thriftpy2_server
from tests.support.sidecar import SidecarProcess, run_sidecar
from tests.support.wait import wait_until

TAE = thriftpy2.thrift.TApplicationException
FAIL_MAX = 3
RESET_TIMEOUT = 2.0
REFRESH = 0.1
CLOSED, HALF_OPEN, OPEN = 0, 1, 2


def fleet_config(
    redis: RedisServer, prefix: str, serve_on: list[str], **extra: Any
) -> dict[str, Any]:
    config: dict[str, Any] = {
        # A generous timeout: two cores shared with other test runs; nothing here
        # tests that Redis is slow.
        "state": {
            "redis_url": redis.url,
            "key_prefix": prefix,
            "refresh_interval": f"{int(REFRESH * 1000)}ms",
            "timeout": "500ms",
        },
        "breaker": {"fail_max": FAIL_MAX, "reset_timeout": f"{RESET_TIMEOUT}s"},
        "retry": {"per_try_timeout": "3s", "deadline": "5s"},
        "fallback": {"serve_on": serve_on, "cache": {"backend": "redis"}},
    }
    config.update(extra)
    return config


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"fleet-{uuid.uuid4().hex[:10]}"


@dataclass
class Fleet:
    upstream: Thriftpy2Server
    proxy: FaultProxyThread
    a: SidecarProcess
    b: SidecarProcess

    @property
    def breaker(self) -> str:
        return self.proxy.address

    def state(self, sidecar: SidecarProcess, breaker: str | None = None) -> float:
        return breaker_state(sidecar, breaker or self.breaker)

    def transitions(self, sidecar: SidecarProcess, old: str, new: str) -> float:
        return breaker_transitions(sidecar, self.breaker, old, new)


@contextlib.contextmanager
def fleet(config: dict[str, Any]) -> Iterator[Fleet]:
    with (
        faulty_upstream() as (upstream, proxy),
        run_sidecar([proxy.address], config=config) as a,
        run_sidecar([proxy.address], config=config) as b,
    ):
        yield Fleet(upstream, proxy, a, b)


def client(sidecar: SidecarProcess) -> contextlib.AbstractContextManager[Any]:
    return thriftpy2_client(sidecar.address, "framed")


def app_error(call: Callable[[], object]) -> TAE:
    with pytest.raises(TAE) as info:
        call()
    return info.value


def open_through(f: Fleet, sidecar: SidecarProcess, c: Any) -> None:
    """``FAIL_MAX`` injected failures through one sidecar open its breaker."""
    f.proxy.plan.extend_schedule(["internal_error"] * FAIL_MAX)
    for i in range(FAIL_MAX):
        assert "fault injected" in app_error(lambda i=i: c.getItem(100 + i)).message
    assert f.state(sidecar) == OPEN


def test_breaker_opened_through_a_is_obeyed_by_b_then_half_open_and_close_propagate(
    redis: RedisServer, prefix: str
) -> None:
    with fleet(fleet_config(redis, prefix, serve_on=[])) as f, client(f.a) as ca, client(f.b) as cb:
        assert cb.getItem(1).id == 1
        open_through(f, f.a, ca)
        started = time.monotonic()
        wait_until(lambda: f.state(f.b) == OPEN, timeout=5.0, message="B's breaker open")
        seen_after = time.monotonic() - started
        assert f.transitions(f.b, "closed", "open") == 1  # B logged and counted it
        # The fleet's view is exported beside the local one.
        shared_state = "thrift_sidecar_breaker_shared_state"
        wait_until(
            lambda: f.b.metrics().value(shared_state, breaker=f.breaker) == OPEN,
            timeout=5.0,
            message="B exports the shared state",
        )
        shared_failures = "thrift_sidecar_breaker_shared_consecutive_failures"
        wait_until(
            lambda: f.a.metrics().value(shared_failures, breaker=f.breaker) >= 1,
            timeout=5.0,
            message="A exports the fleet's failure count",
        )

        # While open, B sends nothing: not to the proxy, let alone the upstream.
        seen, executed = f.proxy.stats.calls, f.upstream.calls.total()
        for i in range(5):
            error = app_error(lambda i=i: cb.getItem(i))
            assert "circuit open" in error.message
        assert (f.proxy.stats.calls, f.upstream.calls.total()) == (seen, executed)
        assert f.b.metrics().value("thrift_sidecar_breaker_rejections_total") == 5

        # After the reset timeout a probe through A, slow on purpose: B sees half-open...
        wait_probe_due(f.a, f.breaker, timeout=RESET_TIMEOUT + 5)
        f.proxy.plan.extend_schedule([("delay", 1.5)])
        result: list[Any] = []
        probe = threading.Thread(target=lambda: result.append(ca.getItem(5)))
        probe.start()
        try:
            wait_until(lambda: f.state(f.b) == HALF_OPEN, timeout=1.4, message="B half-open")
        finally:
            probe.join(10)
        assert [item.id for item in result] == [5]
        # ...and the good probe closes B's breaker within a refresh interval or so.
        wait_until(lambda: f.state(f.b) == CLOSED, timeout=5.0, message="B closed")
        assert f.transitions(f.b, "open", "half-open") == 1
        assert f.transitions(f.b, "half-open", "closed") == 1
        assert cb.getItem(9).id == 9
        shared = f.b.state()["shared_state"]
        print(
            f"\nB obeyed A's open breaker {seen_after * 1e3:.0f} ms after A opened it "
            f"(refresh interval {REFRESH * 1e3:.0f} ms); B's shared state: up={shared['up']}, "
            f"{shared['breaker_states_adopted']} states adopted"
        )
        assert shared["enabled"] is True
        assert shared["up"] is True
        assert shared["url"] == redis.url
        assert shared["breakers"][0]["shared"]["state"] == "closed"


def test_a_reply_cached_through_a_is_served_by_b_during_an_outage(
    redis: RedisServer, prefix: str
) -> None:
    config = fleet_config(redis, prefix, serve_on=["breaker_open", "retries_exhausted"])
    with fleet(config) as f, client(f.a) as ca, client(f.b) as cb:
        original = ca.getItem(42)
        wait_until(
            lambda: any("getItem" in k for k in redis_keys(redis, f"{prefix}:fallback:*")),
            timeout=5.0,
            message="the reply cached in Redis",
        )
        assert f.upstream.calls["getItem"] == 1  # B has never seen this call
        f.proxy.set_down(True)  # the upstream is unreachable: connect refused
        served = cb.getItem(42)
        assert served == original
        m = f.b.metrics()
        assert m.value("thrift_sidecar_fallback_replies_total", source="cache") == 1
        assert m.value("thrift_sidecar_upstream_attempts_total", result="ok") == 0
        assert f.upstream.calls["getItem"] == 1
        store = f.b.state()["fallback_store"]
        assert (store["backend"], store["healthy"]) == ("redis", True)
        # A call nobody cached has no fallback: an error, not somebody else's reply.
        assert "no fallback" in app_error(lambda: cb.getItem(43)).message


class Traffic:
    """Calls through one sidecar in a thread until stopped; counts successes and failures."""

    def __init__(self, sidecar: SidecarProcess) -> None:
        self.sidecar = sidecar
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with client(self.sidecar) as c:
            n = 0
            while not self._stop.is_set():
                n += 1
                try:
                    item = c.getItem(n % 50)
                    if item.id != n % 50:
                        self.failed.append(f"wrong reply {item.id} for {n % 50}")
                    else:
                        self.ok += 1
                except Exception as exc:  # a failed call: counted, and the test fails
                    self.failed.append(repr(exc))
                    return

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_redis_stopped_mid_traffic_fails_no_call_and_sharing_resumes_after_restart(
    prefix: str,
) -> None:
    with redis_server() as own:
        config = fleet_config(own, prefix, serve_on=[])
        with fleet(config) as f:
            up = "thrift_sidecar_state_backend_up"
            errors = "thrift_sidecar_state_backend_errors_total"
            with Traffic(f.a) as ta, Traffic(f.b) as tb:
                wait_until(lambda: ta.ok > 50 and tb.ok > 50, timeout=10.0, message="traffic")
                assert f.a.metrics().value(up) == 1
                own.stop()
                stopped_at = (ta.ok, tb.ok)
                for s in (f.a, f.b):
                    wait_until(lambda s=s: s.metrics().value(up) == 0, timeout=5.0, message="down")
                wait_until(
                    lambda: ta.ok > stopped_at[0] + 200 and tb.ok > stopped_at[1] + 200,
                    timeout=20.0,
                    message="traffic during the outage",
                )
                during = (ta.ok - stopped_at[0], tb.ok - stopped_at[1])
                errors_down = f.a.metrics().value(errors)
                assert errors_down > 0
                state = f.a.state()["shared_state"]
                assert state["up"] is False
                assert state["last_error"]
                own.start()  # the same port, empty
                for s in (f.a, f.b):
                    wait_until(lambda s=s: s.metrics().value(up) == 1, timeout=10.0, message="up")
                restarted_at = (ta.ok, tb.ok)
                wait_until(
                    lambda: ta.ok > restarted_at[0] + 20 and tb.ok > restarted_at[1] + 20,
                    timeout=10.0,
                    message="traffic after the restart",
                )
            print(
                f"\nRedis stopped mid-traffic: {during[0]} + {during[1]} calls answered during "
                f"the outage, {len(ta.failed) + len(tb.failed)} failed; "
                f"A's state_backend_errors_total {errors_down:.0f} while down"
            )
            assert ta.failed == []
            assert tb.failed == []
            # Shared again: a breaker opened through A reaches B.
            with client(f.a) as ca:
                open_through(f, f.a, ca)
            wait_until(lambda: f.state(f.b) == OPEN, timeout=5.0, message="B open after restart")
            for s in (f.a, f.b):
                log = s.log()
                assert log.count("unreachable") == 1, log
                assert log.count("answers again") == 1, log


def test_every_key_has_a_ttl_and_two_upstreams_never_collide(
    redis: RedisServer, prefix: str
) -> None:
    serve_on = ["breaker_open", "retries_exhausted"]
    with (
        thriftpy2_server("framed") as upstream,
        FaultProxyThread(upstream.address, "framed", FaultPlan()) as p1,
        FaultProxyThread(upstream.address, "framed", FaultPlan()) as p2,
        run_sidecar([p1.address], config=fleet_config(redis, prefix, serve_on)) as s1,
        run_sidecar(
            [p2.address],
            config=fleet_config(
                redis,
                prefix,
                serve_on,
                breaker={"scope": "method", "fail_max": FAIL_MAX, "reset_timeout": "60s"},
            ),
        ) as s2,
        client(s1) as c1,
        client(s2) as c2,
    ):
        assert c1.getItem(7).id == 7
        assert len(c1.listItems(3)) == 3
        assert c2.getItem(7).id == 7
        assert c2.getItem(8).id == 8
        p1.plan.extend_schedule(["internal_error"] * FAIL_MAX)
        for i in range(FAIL_MAX):
            app_error(lambda i=i: c1.getItem(100 + i))
        s1_breaker = f"{prefix}:breaker:{{{p1.address}}}"
        s2_breaker = f"{prefix}:breaker:{{{p2.address}/getItem}}"

        def written() -> dict[str, int] | None:
            keys = redis_keys(redis, f"{prefix}:*")
            with redis.client() as r:
                opened = r.hget(s1_breaker, "state") == b"open"
            entries = [k for k in keys if k.startswith(f"{prefix}:fallback:")]
            return keys if opened and len(entries) == 4 and s2_breaker in keys else None

        keys = wait_until(written, timeout=5.0, message="keys written")
        print("\n" + "\n".join(f"{k}  ttl {ttl / 1000:.0f}s" for k, ttl in sorted(keys.items())))
        assert all(ttl > 0 for ttl in keys.values()), keys  # -1 would be: no TTL
        tags = [f"{{{p1.address}", f"{{{p2.address}"]
        assert all(sum(tag in k for tag in tags) == 1 for k in keys), keys
        one = {k.split("}", 1)[1] for k in keys if tags[0] in k and ":fallback:" in k}
        two = {k.split("}", 1)[1] for k in keys if tags[1] in k and ":fallback:" in k}
        assert len(one) == 2
        assert len(two) == 2
        assert len(one & two) == 1  # getItem(7): the same call, two entries
        # One upstream's open breaker is not the other's.
        assert s1.metrics().value("thrift_sidecar_breaker_state") == OPEN
        assert s2.metrics().value("thrift_sidecar_breaker_state") == CLOSED
        # Nor are its cached replies: listItems(3) was cached through s1 only.
        p2.set_down(True)
        assert c2.getItem(8).id == 8  # its own cache
        assert "no fallback" in app_error(lambda: c2.listItems(3)).message


def test_a_sidecar_of_two_workers_obeys_the_fleet_and_shares_its_cache(
    redis: RedisServer, prefix: str
) -> None:
    """Fleet mode on top of ``workers: 2``: each worker syncs with Redis; a breaker
    opened through a one-process sidecar is obeyed by both workers of the other,
    and a reply cached through the one-process sidecar is served by a worker."""
    config = fleet_config(redis, prefix, serve_on=["breaker_open"])
    with (
        faulty_upstream() as (upstream, proxy),
        run_sidecar([proxy.address], config=config) as a,
        run_sidecar([proxy.address], config={**config, "workers": 2}) as b,
    ):
        f = Fleet(upstream, proxy, a, b)
        with client(a) as ca:
            item = ca.getItem(9)  # cached in Redis through A
            open_through(f, a, ca)

        def both_workers_open() -> bool:
            states = b.metrics().matching("thrift_sidecar_breaker_state", breaker=f.breaker)
            return sorted(states.values()) == [OPEN, OPEN] and len(states) == 2

        wait_until(both_workers_open, timeout=5.0, message="both of B's workers open")
        seen = proxy.stats.calls
        with client(b) as cb:
            assert cb.getItem(9) == item  # from the fleet's cache, whichever worker
        assert proxy.stats.calls == seen
