"""``workers: 2`` through a real sidecar: one port, one admin endpoint, shared state.

client ──► sidecar (supervisor + 2 workers) ──► FaultProxy ──► thriftpy2 upstream.
Which worker serves a connection is the kernel's choice (SO_REUSEPORT); the
tests find out by reading each worker's ``requests_total`` through the
supervisor's /metrics after a call, and open connections until both workers
have one (bounded).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import thriftpy2.thrift
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sidecar.protocol.appexc import ApplicationExceptionType
from sidecar.testing.catalog import CatalogServer
from tests.integration import reply_parts
from tests.support.clients import thriftpy2_client
from tests.support.crowd import crowd
from tests.support.raw import encode_call, raw_calls
from tests.support.rig import Rig, rig
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import http_get, run_sidecar
from tests.support.wait import wait_until

TAE = thriftpy2.thrift.TApplicationException
FAIL_MAX = 4
REQUESTS = "thrift_sidecar_requests_total"
FALLBACKS = "thrift_sidecar_fallback_replies_total"
# Connections tried to find one on each worker: all on one worker has odds of 2^-23.
MAX_CONNECTIONS = 24
CONFIG: dict[str, Any] = {
    "workers": 2,
    "breaker": {"fail_max": FAIL_MAX, "reset_timeout": "60s"},
    "retry": {"per_try_timeout": "3s", "deadline": "5s"},
    "fallback": {"serve_on": []},
}


def requests_by_worker(r: Rig) -> dict[str, float]:
    """``requests_total`` summed per ``worker`` label, read through the supervisor."""
    by: dict[str, float] = {}
    for labels, value in r.metrics().matching(REQUESTS).items():
        worker = dict(labels)["worker"]
        by[worker] = by.get(worker, 0.0) + value
    return by


@contextlib.contextmanager
def client_per_worker(r: Rig) -> Iterator[dict[str, Any]]:
    """One open client on each worker: {worker label: client}."""
    with contextlib.ExitStack() as stack:
        found: dict[str, Any] = {}
        for _ in range(MAX_CONNECTIONS):
            client = stack.enter_context(thriftpy2_client(r.sidecar.address, "framed"))
            before = requests_by_worker(r)
            assert client.getItem(1).id == 1
            after = requests_by_worker(r)
            grew = [w for w, n in after.items() if n > before.get(w, 0.0)]
            assert len(grew) == 1, (before, after)
            found.setdefault(grew[0], client)
            if len(found) == 2:
                break
        assert sorted(found) == ["0", "1"], f"every connection went to worker {list(found)}"
        yield found


def sqlite_rows(path: Path) -> int:
    """Rows in the SQLite cache file, read by a connection of our own."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def breaker_states(r: Rig) -> dict[str, float]:
    """The breaker state gauge as each worker reports it."""
    found = r.metrics().matching("thrift_sidecar_breaker_state", breaker=r.breaker)
    return {dict(labels)["worker"]: value for labels, value in found.items()}


def test_the_breaker_opens_after_fail_max_failures_across_both_workers() -> None:
    with rig(CONFIG) as r, client_per_worker(r) as clients:
        r.plan.extend_schedule(["internal_error"] * FAIL_MAX)
        order = [clients["0"], clients["1"]] * (FAIL_MAX // 2)
        for i, client in enumerate(order):
            assert breaker_states(r) == {"0": 0.0, "1": 0.0}, f"open after {i} failures"
            with pytest.raises(TAE) as info:
                client.getItem(2)
            assert "fault injected" in info.value.message
        # fail_max failures in all, half in each worker: open for both.
        assert breaker_states(r) == {"0": 2.0, "1": 2.0}
        seen = r.proxy.stats.calls
        for client in clients.values():
            with pytest.raises(TAE) as info:
                client.getItem(3)
            assert info.value.type == ApplicationExceptionType.INTERNAL_ERROR
            assert "circuit open" in info.value.message
        assert r.proxy.stats.calls == seen  # nothing reached the upstream
        # Opened once, by worker 1's failure (the last): counted once, by the worker that
        # opened it; worker 0 adopted it (its gauge says open) and does not count it again.
        seen_open = r.metrics().matching(
            "thrift_sidecar_breaker_transitions_total",
            breaker=r.breaker,
            from_state="closed",
            to_state="open",
        )
        assert {dict(k)["worker"]: v for k, v in seen_open.items()} == {"0": 0.0, "1": 1.0}
        log = r.sidecar.log()
        assert "closed -> open; calls get a fallback" in log
        assert "closed -> open (another worker's change)" in log


def test_one_admin_endpoint_shows_every_worker() -> None:
    with rig(CONFIG) as r, client_per_worker(r):
        status, body = http_get(r.sidecar.admin + "/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(body)}
        up = {s.labels["worker"]: s.value for s in families["thrift_sidecar_worker_up"].samples}
        assert up == {"0": 1.0, "1": 1.0}
        assert families["thrift_sidecar_workers"].samples[0].value == 2.0
        by_worker = requests_by_worker(r)
        assert set(by_worker) == {"0", "1"}
        assert all(n >= 1 for n in by_worker.values())

        assert http_get(r.sidecar.admin + "/readyz") == (200, "ready (2 workers)\n")
        state = r.sidecar.state()
        pids = [w["pid"] for w in state["workers"]]
        assert len(set(pids)) == 2
        assert r.sidecar.proc.pid not in pids
        assert [b["name"] for b in state["breakers"]] == [r.breaker]

        # A control action reaches every worker; the breaker it opens is shared.
        control = "http://" + r.sidecar.config["control"]["listen"]
        name = urllib.request.quote(r.breaker, safe="")
        request = urllib.request.Request(f"{control}/breakers/{name}/open", method="POST")
        with urllib.request.urlopen(request, timeout=5) as answer:
            said = answer.read().decode()
        assert "worker 0: opened breaker" in said
        assert "worker 1: " in said
        assert breaker_states(r) == {"0": 2.0, "1": 2.0}


def worker_pids(r: Rig) -> list[int]:
    return [int(w["pid"]) for w in r.sidecar.state()["workers"]]


def test_sighup_reloads_every_worker_and_sigterm_stops_them_all() -> None:
    with rig(CONFIG) as r:
        versions = [w["state"]["config_version"] for w in r.sidecar.state()["workers"]]
        assert versions == [1, 1]
        config = yaml.safe_load(r.sidecar.config_path.read_text())
        config["breaker"]["fail_max"] = FAIL_MAX + 1
        r.sidecar.write_config(config)
        r.sidecar.signal(signal.SIGHUP)

        def reloaded() -> bool:
            workers = r.sidecar.state()["workers"]
            return [w["state"]["config_version"] for w in workers] == [2, 2]

        wait_until(reloaded, timeout=10, message="both workers reloaded")
        pids = worker_pids(r)
        run_dir = Path(r.sidecar.state()["supervisor"]["run_dir"])
        assert (run_dir / "breakers").is_file()
        r.sidecar.signal(signal.SIGTERM)
        assert r.sidecar.proc.wait(timeout=30) == 0
        for pid in pids:
            assert not _running(pid), f"worker {pid} still runs"
        assert not run_dir.exists()
        log = r.sidecar.log()
        for index in (0, 1):  # each worker's lines say whose they are
            assert f"sidecar [worker {index}]: config reloaded (version 2)" in log
            assert f"sidecar [worker {index}]: stopped" in log


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return False


def test_a_worker_that_dies_is_started_again() -> None:
    with rig(CONFIG) as r:
        first = worker_pids(r)
        os.kill(first[1], signal.SIGKILL)  # a worker of the sidecar this test started

        def replaced() -> bool:
            state = r.sidecar.state()
            pids = [w.get("pid") for w in state["workers"]]
            return pids[0] == first[0] and pids[1] not in (None, first[1])

        wait_until(replaced, timeout=20, interval=0.1, message="worker 1 started again")
        wait_until(
            lambda: http_get(r.sidecar.admin + "/readyz")[0] == 200, timeout=10, message="ready"
        )
        restarts = r.metrics().matching("thrift_sidecar_worker_restarts_total")
        assert {dict(k)["worker"]: v for k, v in restarts.items()} == {"0": 0.0, "1": 1.0}
        with thriftpy2_client(r.sidecar.address, "framed") as client:
            assert client.getItem(5).id == 5


def test_two_workers_together_retry_no_more_than_the_budget_allows() -> None:
    """A dead upstream (every call reset before it is forwarded) and a budget of
    ratio 0 and 2 retries/s over a 10 s window: 20 retries for the sidecar in one
    window, whichever worker makes them (each earns half the floor)."""
    floor, window, calls = 2.0, 10.0, 30
    config = {
        **CONFIG,
        "breaker": {"fail_max": 1_000_000},
        "retry": {
            "max_attempts": 5,
            "initial_backoff": "1ms",
            "max_backoff": "5ms",
            "per_try_timeout": "2s",
            "deadline": "5s",
            "budget": {"ratio": 0.0, "min_retries_per_second": floor, "window": f"{window}s"},
        },
    }
    with rig(config) as r, client_per_worker(r) as clients:
        r.plan.extend_schedule(["reset_before"] * (2 * calls * 5))
        for client in clients.values():
            for i in range(calls):
                with pytest.raises(TAE):
                    client.getItem(i)
        m = r.metrics()
    retries = m.matching("thrift_sidecar_retries_total")
    by_worker: dict[str, float] = {}
    for labels, value in retries.items():
        by_worker[dict(labels)["worker"]] = by_worker.get(dict(labels)["worker"], 0.0) + value
    # Each worker spent its half of the floor, and no more: 10 + 10.
    assert by_worker == {"0": floor * window / 2, "1": floor * window / 2}
    assert m.value("thrift_sidecar_retry_budget_exhausted_total") > 0


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_reply_cached_through_one_worker_is_served_by_the_other(
    backend: str, tmp_path: Path
) -> None:
    cache: dict[str, Any] = {"backend": backend}
    if backend == "sqlite":
        cache["path"] = str(tmp_path / "fallback.db")
    config = {**CONFIG, "fallback": {"serve_on": ["breaker_open"], "cache": cache}}
    with rig(config) as r, client_per_worker(r) as clients:
        item = clients["0"].getItem(7)  # stored through worker 0

        def held() -> bool:  # the supervisor's store, as worker 1 reports it
            entries = r.metrics().matching("thrift_sidecar_fallback_cache_entries", worker="1")
            return sum(entries.values()) >= 1

        wait_until(held, timeout=10, message="the reply in the shared store")
        control = "http://" + r.sidecar.config["control"]["listen"]
        name = urllib.request.quote(r.breaker, safe="")
        request = urllib.request.Request(f"{control}/breakers/{name}/open", method="POST")
        urllib.request.urlopen(request, timeout=5).close()
        seen = r.proxy.stats.calls
        assert clients["1"].getItem(7) == item  # worker 1 serves worker 0's reply
        assert r.proxy.stats.calls == seen
        served = r.metrics().matching(FALLBACKS, source="cache", worker="1")
        assert sum(served.values()) == 1


def test_max_in_flight_bounds_the_upstream_for_all_workers_together() -> None:
    """``upstream.max_in_flight: 2`` with two workers: each takes one slot, so a crowd
    spread over both never has more than 2 calls at the upstream at once.

    The kernel spreads connections over the workers by a hash of their addresses
    (SO_REUSEPORT). With 12 clients one worker gets two or fewer in about 4 % of runs
    (binomial), and so few may never have two calls at once: CI once saw one worker shed
    nothing. With 32 clients that is one run in millions."""
    limit, clients, calls = 2, 32, 5
    with CatalogServer(service_time=0.01) as upstream:
        worker = upstream.worker
        assert worker is not None
        config = {
            "workers": 2,
            "upstream": {"max_in_flight": limit},
            "retry": {"per_try_timeout": "10s", "deadline": "20s"},
            "fallback": {"serve_on": []},
        }
        with run_sidecar([upstream.address], config=config) as sc:
            answers = crowd(sc.address, clients=clients, calls=calls, call=_get_item)
            shed_by_worker = sc.metrics().matching("thrift_sidecar_calls_shed_total")
    assert worker.max_in_flight <= limit
    shed = [a for a in answers if a.kind == "error"]
    assert shed, "the crowd must be shed in part"
    assert all(
        f"(upstream.max_in_flight 1, this worker's share of {limit})" in a.message for a in shed
    )
    assert sorted(dict(k)["worker"] for k, v in shed_by_worker.items() if v > 0) == ["0", "1"]


def _get_item(client: Any, n: int) -> Any:
    return client.getItem(n % 5 + 1)


def _pid_namespaces() -> bool:
    """Whether this machine lets the tests start a process in a PID namespace of its own."""
    try:
        done = subprocess.run(
            ["unshare", "--fork", "--pid", "true"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.skipif(not _pid_namespaces(), reason="needs unshare --pid (root or user namespaces)")
def test_workers_run_under_a_supervisor_that_is_pid_1() -> None:
    """In a container whose entrypoint is ``sidecar run`` the supervisor is PID 1;
    its workers must not take their parent's PID 1 for their supervisor's death."""
    prefix = ["unshare", "--fork", "--pid", "--kill-child=SIGTERM"]
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config=CONFIG, prefix=prefix) as sc,
    ):
        assert [w["state"]["ready"] for w in sc.state()["workers"]] == [True, True]
        with thriftpy2_client(sc.address, "framed") as client:
            assert client.getItem(4).id == 4
        children = Path(f"/proc/{sc.proc.pid}/task/{sc.proc.pid}/children").read_text()
        supervisor = int(children.split()[0])  # the sidecar this test started, under unshare
        os.kill(supervisor, signal.SIGTERM)
        assert sc.proc.wait(timeout=30) == 0


def test_the_shared_sqlite_stores_failures_are_counted_once(tmp_path: Path) -> None:
    """The SQLite store lives in the supervisor: its own failures (here: the file
    deleted under it) show in the merged /metrics once, without a ``worker`` label."""
    path = tmp_path / "fallback.db"
    config = {**CONFIG, "fallback": {"cache": {"backend": "sqlite", "path": str(path)}}}
    with rig(config) as r:
        with thriftpy2_client(r.sidecar.address, "framed") as client:
            assert client.getItem(1).id == 1
        wait_until(path.is_file, timeout=10, message="the cache file")
        wait_until(lambda: sqlite_rows(path) == 1, timeout=10, message="the reply in the file")
        path.unlink()

        def counted() -> dict[tuple[tuple[str, str], ...], float]:
            found = r.metrics().matching("thrift_sidecar_fallback_store_errors_total")
            return {labels: value for labels, value in found.items() if value}

        wait_until(counted, timeout=15, message="the deleted file counted")
        # The workers' own series (0: they hold no store) keep their label.
        assert counted() == {(("operation", "file"),): 1.0}


def test_workers_give_method_labels_out_of_one_table() -> None:
    """``metrics.max_method_labels`` bounds the sidecar, not each worker. Each worker
    used to give label values on its own: invented names took half the values in
    every worker (the merged /metrics held twice the bound), and a real method met
    after them was `other` in each worker until that worker saw it answered. The
    workers now share one table: invented names hold half the values in all, and a
    method the upstream answered through one worker has its own value in the other
    from its first call."""
    limit, names = 4, 16
    config = {**CONFIG, "metrics": {"max_method_labels": limit}}
    with rig(config) as r:
        # One connection a name: the kernel spreads them over both workers.
        for i in range(names):
            call = encode_call("ping", seqid=i, name=f"madeUp{i}")
            (reply,) = raw_calls(r.sidecar.address, [call], "framed", timeout=10)
            assert reply_parts(reply).exc_type == ApplicationExceptionType.UNKNOWN_METHOD
        invented = r.metrics().matching(REQUESTS)
        assert {dict(k)["worker"] for k in invented} == {"0", "1"}, "one worker got every name"
        given = {dict(k)["method"] for k in invented} - {"other"}
        assert len(given) == limit // 2, given
        others = _others(r)
        # getItem: `other` on its first call (the unanswered half is full), answered, and
        # from then on its own value in both workers.
        with client_per_worker(r) as clients:
            for client in clients.values():
                assert client.getItem(2).id == 2
        assert _others(r) == others + 1
        by_worker = {
            dict(k)["worker"]: v
            for k, v in r.metrics().matching(REQUESTS, method="getItem").items()
        }
        assert sorted(by_worker) == ["0", "1"]


def test_a_worker_takes_the_label_another_worker_got_a_name_it_called_other() -> None:
    """A name one worker resolved to `other` (the unanswered half full), whose call
    there failed, takes its own value in that worker as soon as the other worker
    has seen the upstream answer it: that worker's next call of it counts under its
    own name. It used to count once more as `other`, until the worker saw an answer
    itself (with the upstream failing the method, for as long as it failed)."""
    config = {
        **CONFIG,
        "metrics": {"max_method_labels": 4},
        "retry": {**CONFIG["retry"], "max_attempts": 1},
    }
    with rig(config) as r, client_per_worker(r) as clients:  # getItem: answered, a value
        for i in range(4):  # invented names take the unanswered half (two values)
            call = encode_call("ping", seqid=i, name=f"madeUp{i}")
            (reply,) = raw_calls(r.sidecar.address, [call], "framed", timeout=10)
            assert reply_parts(reply).exc_type == ApplicationExceptionType.UNKNOWN_METHOD
        first, second = clients["0"], clients["1"]
        others = _requests(r, "other", "0")  # the invented names past the half, there
        r.plan.extend_schedule(["reset_before"])  # worker 0's call fails: no answer seen
        with pytest.raises(TAE):
            first.listItems(1)
        assert r.plan.pending == 0
        assert _requests(r, "other", "0") == others + 1
        assert len(second.listItems(1)) == 1  # answered through worker 1: a value
        assert len(first.listItems(1)) == 1
        assert _requests(r, "listItems", "0") == 1  # its own name, not `other` again
        assert _requests(r, "other", "0") == others + 1


def _requests(r: Rig, method: str, worker: str) -> float:
    """``requests_total`` of ``method`` in ``worker``, every outcome."""
    found = r.metrics().matching(REQUESTS, method=method)
    return sum(v for labels, v in found.items() if dict(labels)["worker"] == worker)


def _others(r: Rig) -> float:
    """Calls counted as method `other`, in every worker."""
    return sum(r.metrics().matching(REQUESTS, method="other").values())
