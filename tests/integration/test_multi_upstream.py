"""Several upstream addresses: calls spread over the healthy ones, a dead one is ejected.

Two thriftpy2 upstreams behind one sidecar process. The breaker is kept out
of the way (``fail_max`` 50): it guards the upstream as a whole, and this
file is about the addresses within it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.support.clients import thriftpy2_client
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import run_sidecar

CONFIG = {
    "retry": {"max_attempts": 3, "initial_backoff": "1ms", "max_backoff": "5ms"},
    "upstream": {"ejection": {"consecutive_failures": 3, "base_time": "30s"}},
    "breaker": {"fail_max": 50},
}


def test_calls_spread_and_a_dead_upstream_is_ejected_without_errors() -> None:
    with (
        thriftpy2_server("framed") as a,
        thriftpy2_server("framed") as b,
        run_sidecar([a.address, b.address], config=CONFIG) as sidecar,
    ):
        # Both healthy: round robin.
        with thriftpy2_client(sidecar.address, "framed") as client:
            for i in range(40):
                assert client.getItem(i).id == i
        spread = (a.calls["getItem"], b.calls["getItem"])
        assert sum(spread) == 40
        assert min(spread) >= 10

        # B dies: every idempotent call still succeeds, from four clients at once.
        b.stop()
        a_before = a.calls.total()

        def worker(t: int) -> list[str]:
            errors = []
            with thriftpy2_client(sidecar.address, "framed") as client:
                for i in range(50):
                    try:
                        if i % 5 == 0:
                            client.ping()
                        elif i % 5 == 1:
                            assert len(client.listItems(3)) == 3
                        else:
                            assert client.getItem(t * 100 + i).id == t * 100 + i
                    except Exception as exc:
                        errors.append(f"{t}/{i}: {exc!r}")
            return errors

        with ThreadPoolExecutor(4) as pool:
            errors = [e for found in pool.map(worker, range(4)) for e in found]
        m = sidecar.metrics()
        state = sidecar.state()
        a_after = a.calls.total()
        b_attempts = m.value("thrift_sidecar_upstream_attempts_total", upstream=b.address)
        b_failed = b_attempts - m.value(
            "thrift_sidecar_upstream_attempts_total", upstream=b.address, result="ok"
        )
        print(
            f"\nspread while healthy: A {spread[0]}, B {spread[1]}; after B died: 200 calls, "
            f"errors {len(errors)}, A executed {a_after - a_before}, failed attempts on B "
            f"{b_failed:g}, ejections of B "
            f"{m.value('thrift_sidecar_upstream_ejections_total', upstream=b.address):g}, "
            f"retries {m.value('thrift_sidecar_retries_total'):g}, /state ejected "
            f"{state['upstream']['ejected']}"
        )
        assert errors == []
        assert a_after - a_before == 200
        assert m.value("thrift_sidecar_upstream_ejections_total", upstream=b.address) == 1
        assert m.value("thrift_sidecar_upstream_ejections_total", upstream=a.address) == 0
        assert m.value("thrift_sidecar_upstream_ejected", upstream=b.address) == 1
        assert state["upstream"]["ejected"] == [b.address]
        # Ejected after 3 failures in a row; calls already in flight to B (at
        # most one per client) may fail too, then B is left alone.
        assert 3 <= b_failed <= 3 + 4
        assert m.value("thrift_sidecar_retries_total") == b_failed
