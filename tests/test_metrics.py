"""Every metric of the design, after real traffic, over HTTP; and the series count stays capped.

The first test drives a sidecar subprocess through retries, a retry budget
running dry, a breaker trip, fallbacks served while the circuit is open and
a client speaking garbage, then fetches ``/metrics`` and checks every metric
of design §8 (and the ones we added) with the exact values that traffic
implies. The second sends 10,000 calls with invented method names and
checks that no metric grows past the bound that ``metrics.max_method_labels``
sets.
"""

from __future__ import annotations

import ast
import copy
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import thriftpy2.thrift

from sidecar import __version__, native
from sidecar.metrics import BREAKER_TRANSITIONS, HEALTH_CHECK_RESULTS, OTHER, PROTOCOL_ERROR_KINDS
from sidecar.resilience.outcome import Outcome
from tests.support.clients import thriftpy2_client
from tests.support.idl import load_thriftpy2_interop
from tests.support.ops import IDL, PREFIX, label_sets, rig, sample, scrape, send_garbage
from tests.support.raw import encode_call, raw_call, raw_calls
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import REPO_ROOT, SidecarThread, base_config, run_sidecar
from tests.support.source import parse_source
from tests.support.wait import wait_until

TAE = thriftpy2.thrift.TApplicationException

# design.md §8, in its order: name (as the parser names the family) and type.
DESIGN_METRICS = {
    "requests": "counter",
    "request_duration_seconds": "histogram",
    "upstream_attempts": "counter",
    "retries": "counter",
    "retry_budget_exhausted": "counter",
    "breaker_state": "gauge",
    "breaker_transitions": "counter",
    "fallback_replies": "counter",
    "fallback_cache_entries": "gauge",
    "fallback_cache_bytes": "gauge",
    "client_connections": "gauge",
    "protocol_errors": "counter",
    "config_reloads": "counter",
    "build_info": "gauge",
}
# Added here and in style.md, documented in docs/metrics-reference.md.
MORE_METRICS = {
    "retries_given_up": "counter",
    "retry_budget_tokens": "gauge",
    "breaker_last_opened_timestamp_seconds": "gauge",
    "breaker_rejections": "counter",
    "breaker_consecutive_failures": "gauge",
    "upstream_ejections": "counter",
    "upstream_ejected": "gauge",
    "upstream_connections": "gauge",
    "client_connections_rejected": "counter",
    "fallback_store_up": "gauge",
    "fallback_store_errors": "counter",
    "control_actions": "counter",
    "client_idle_closes": "counter",
    "state_backend_errors": "counter",
    "state_backend_up": "gauge",
    "breaker_shared_state": "gauge",
    "breaker_shared_consecutive_failures": "gauge",
}

FAIL_MAX = 3
CONFIG: dict[str, Any] = {
    "idl": IDL,
    "retry": {
        "max_attempts": 3,
        "initial_backoff": "1ms",
        "max_backoff": "5ms",
        "per_try_timeout": "5s",
        "deadline": "10s",
    },
    "breaker": {"fail_max": FAIL_MAX, "reset_timeout": "5m"},
    "fallback": {"serve_on": ["breaker_open"]},
    "methods": {"listItems": {"fallback": {"static": []}}},
}


def _app_error(call: Any) -> TAE:
    with pytest.raises(TAE) as info:
        call()
    return info.value


def test_every_metric_after_retries_a_trip_fallbacks_and_garbage() -> None:
    idl = load_thriftpy2_interop()
    with rig(CONFIG) as r, thriftpy2_client(r.sidecar.address, "framed") as c:
        up = r.upstream_address
        breaker = up  # scope upstream: the breaker is named after the upstream
        plan = r.proxy.plan

        # Before any call: the series of what is known exist, at zero. One method, one
        # series: a bare name of the IDL is labelled with its service (Interop:getItem),
        # and no series is labelled with the bare name or an empty service.
        f = scrape(r.sidecar)
        for name in ("Interop:getItem", "Interop:listItems", "Interop:placeOrder", "Echo:echo"):
            service, _, method = name.rpartition(":")
            labels = {"service": service, "method": method}
            assert sample(f, PREFIX + "requests", "_total", **labels, outcome="ok") == 0, name
            assert sample(f, PREFIX + "request_duration_seconds", "_count", **labels) == 0
            assert (
                sample(
                    f, PREFIX + "upstream_attempts", "_total", upstream=up, method=name, result="ok"
                )
                == 0
            )
        for bare in ("getItem", "listItems", "placeOrder"):
            assert sample(f, PREFIX + "requests", "_total", service="", method=bare) is None
            assert (
                sample(f, PREFIX + "upstream_attempts", "_total", upstream=up, method=bare) is None
            )
        for method, source in (
            ("Interop:getItem", "cache"),
            ("Interop:listItems", "cache"),
            ("Interop:listItems", "static"),
        ):
            assert (
                sample(f, PREFIX + "fallback_replies", "_total", method=method, source=source) == 0
            )
        assert (
            sample(
                f,
                PREFIX + "fallback_replies",
                "_total",
                method="Interop:placeOrder",
                source="cache",
            )
            is None
        )  # not cacheable
        assert sample(f, PREFIX + "breaker_state", breaker=breaker) == 0
        for old, new in BREAKER_TRANSITIONS:
            assert (
                sample(
                    f,
                    PREFIX + "breaker_transitions",
                    "_total",
                    breaker=breaker,
                    from_state=old,
                    to_state=new,
                )
                == 0
            )
        assert sample(f, PREFIX + "retry_budget_exhausted", "_total", upstream=up) == 0
        for kind in PROTOCOL_ERROR_KINDS:
            assert sample(f, PREFIX + "protocol_errors", "_total", kind=kind) == 0

        # The budget's floor is earned from start-up (10 tokens/s): enough for two retries.
        wait_until(
            lambda: (
                (sample(scrape(r.sidecar), PREFIX + "retry_budget_tokens", upstream=up) or 0) >= 2
            ),
            message="two retry tokens",
        )

        # A: two retries absorbed; a write that is not retried; successes.
        assert c.getItem(1).id == 1
        plan.extend_schedule(["reset_before", "reset_before"])
        assert c.getItem(2).id == 2
        plan.extend_schedule(["reset_before"])
        order = idl.Order(customer="ops", lines=[idl.OrderLine(itemId=1, quantity=1)])
        assert _app_error(lambda: c.placeOrder(order)).type == TAE.INTERNAL_ERROR
        assert c.getItem(1).id == 1  # resets the breaker's failure count

        # B: reload with an empty retry budget; the next retry is refused.
        empty_budget = copy.deepcopy(r.sidecar.config)
        empty_budget["retry"]["budget"] = {"ratio": 0, "min_retries_per_second": 0}
        r.sidecar.write_config(empty_budget)
        r.sidecar.signal(signal.SIGHUP)
        wait_until(
            lambda: (
                sample(scrape(r.sidecar), PREFIX + "config_reloads", "_total", result="ok") == 1
            ),
            message="config reload counted",
        )
        plan.extend_schedule(["reset_before"])
        assert _app_error(lambda: c.getItem(5)).type == TAE.INTERNAL_ERROR
        assert c.getItem(1).id == 1

        # C: the upstream fails FAIL_MAX calls in a row: the circuit opens.
        plan.extend_schedule(["internal_error"] * FAIL_MAX)
        opened_after = time.time()
        for _ in range(FAIL_MAX):
            assert "fault injected" in _app_error(lambda: c.getItem(3)).message
        opened_before = time.time()

        # D: while open: a cached reply, a static one, and nothing to serve.
        seen = r.proxy.stats.calls
        assert c.getItem(1).id == 1
        assert c.listItems(5) == []
        error = _app_error(lambda: c.getItem(77))
        assert "circuit open" in error.message
        assert r.proxy.stats.calls == seen  # nothing reached the upstream

        # E: a client that speaks garbage loses its connection.
        assert send_garbage(r.sidecar.address) == b""

        item1 = raw_call(r.upstream.address, encode_call("getItem", {"id": 1}), "framed")
        item2 = raw_call(r.upstream.address, encode_call("getItem", {"id": 2}), "framed")

        def settled() -> Any:
            fams = scrape(r.sidecar)
            return fams if sample(fams, PREFIX + "client_connections") == 1 else None

        f = wait_until(settled, message="only the held client connected")

        # Every metric is there, with its type.
        for name, kind in {**DESIGN_METRICS, **MORE_METRICS}.items():
            assert PREFIX + name in f, name
            assert f[PREFIX + name].type == kind, name

        def v(name: str, suffix: str = "", **labels: str) -> float | None:
            return sample(f, PREFIX + name, suffix, **labels)

        get = {"service": "Interop", "method": "getItem"}
        assert v("requests", "_total", **get, outcome="ok") == 4
        assert v("requests", "_total", **get, outcome="connection_closed") == 1
        assert v("requests", "_total", **get, outcome="internal_error") == FAIL_MAX
        assert v("requests", "_total", **get, outcome="fallback") == 1
        assert v("requests", "_total", **get, outcome="circuit_open") == 1
        assert (
            v(
                "requests",
                "_total",
                service="Interop",
                method="placeOrder",
                outcome="connection_closed",
            )
            == 1
        )
        assert (
            v("requests", "_total", service="Interop", method="listItems", outcome="fallback") == 1
        )
        assert v("requests", "_total", service="Interop", method="listItems", outcome="ok") == 0
        assert v("requests", "_total", service="", method="getItem", outcome="ok") is None

        # The histogram: one observation per call, cumulative buckets, +Inf == count.
        assert v("request_duration_seconds", "_count", **get) == 10
        assert v("request_duration_seconds", "_bucket", **get, le="+Inf") == 10
        assert (v("request_duration_seconds", "_sum", **get) or 0) > 0
        buckets = [
            s.value
            for s in f[PREFIX + "request_duration_seconds"].samples
            if s.name.endswith("_bucket")
            and s.labels["method"] == "getItem"
            and s.labels["service"] == "Interop"
        ]
        assert buckets == sorted(buckets)
        assert v("request_duration_seconds", "_count", service="Interop", method="placeOrder") == 1

        attempts = {"upstream": up, "method": "Interop:getItem"}
        assert v("upstream_attempts", "_total", **attempts, result="ok") == 4
        assert v("upstream_attempts", "_total", **attempts, result="connection_closed") == 3
        assert v("upstream_attempts", "_total", **attempts, result="internal_error") == FAIL_MAX
        assert (
            v(
                "upstream_attempts",
                "_total",
                upstream=up,
                method="Interop:placeOrder",
                result="connection_closed",
            )
            == 1
        )

        assert _values(f, "retries") == {("Interop:getItem", "connection_closed"): 2}
        assert _values(f, "retries_given_up") == {
            ("Interop:placeOrder", "unsafe"): 1,
            ("Interop:getItem", "budget_exhausted"): 1,
            ("Interop:getItem", "not_retryable"): FAIL_MAX,
        }
        assert v("retry_budget_exhausted", "_total", upstream=up) == 1
        assert v("retry_budget_tokens", upstream=up) == 0  # ratio 0, floor 0

        assert v("breaker_state", breaker=breaker) == 2
        assert _values(f, "breaker_transitions") == {
            (breaker, "closed", "open"): 1,
            (breaker, "open", "half-open"): 0,
            (breaker, "half-open", "open"): 0,
            (breaker, "half-open", "closed"): 0,
        }
        opened = v("breaker_last_opened_timestamp_seconds", breaker=breaker) or 0
        assert opened_after - 1 <= opened <= opened_before + 1
        assert v("breaker_rejections", "_total", breaker=breaker) == 3
        assert v("breaker_consecutive_failures", breaker=breaker) == FAIL_MAX

        assert v("upstream_ejections", "_total", upstream=up) == 0  # one address: never
        assert v("upstream_ejected", upstream=up) == 0
        assert v("upstream_connections", upstream=up, state="busy") == 0
        assert v("upstream_connections", upstream=up, state="idle") == 1

        assert _values(f, "fallback_replies") == {
            ("Interop:getItem", "cache"): 1,
            ("Interop:listItems", "static"): 1,
            ("Interop:listItems", "cache"): 0,
            # every other IDL method the default patterns make cacheable, at 0
            **{
                (name, "cache"): 0
                for name in _cacheable_idl_names()
                if name not in ("Interop:getItem", "Interop:listItems")
            },
        }
        assert v("fallback_cache_entries") == 2  # getItem(1) and getItem(2)
        key_bytes = len("getItem|") + 32  # cache_key: name, "|", 128-bit hex digest
        args_bytes = 12  # getItem(id) in binary: i64 field header, value, stop
        entry = key_bytes + 300 + args_bytes  # 300: the memory store's overhead per entry
        assert v("fallback_cache_bytes") == 2 * entry + len(item1) + len(item2)

        assert v("client_connections") == 1
        for reason in ("max_connections", "fd_limit", "draining"):
            assert v("client_connections_rejected", "_total", reason=reason) == 0
        assert v("client_idle_closes", "_total") == 0
        assert v("protocol_errors", "_total", kind="garbage") == 1
        assert (
            sum(s.value for s in f[PREFIX + "protocol_errors"].samples if s.name.endswith("_total"))
            == 1
        )
        assert v("config_reloads", "_total", result="ok") == 1
        assert v("config_reloads", "_total", result="error") == 0
        assert v("build_info", version=__version__, build=native.build()) == 1
        assert f[PREFIX + "state_backend_up"].samples == []  # local mode: absent, not "down"
        assert [s for s in f[PREFIX + "state_backend_errors"].samples] == []


def _values(families: dict[str, Any], name: str) -> dict[tuple[str, ...], float]:
    """A counter's ``_total`` samples by their label values (in label order)."""
    return {
        tuple(s.labels.values()): s.value
        for s in families[PREFIX + name].samples
        if s.name == PREFIX + name + "_total"
    }


def _cacheable_idl_names() -> list[str]:
    """IDL method labels that the default patterns make cacheable.

    One label per method: ``Service:method``, and the bare name too for a
    method that more than one service defines (``ping``: Interop and Echo).
    """
    from fnmatch import fnmatchcase

    idl = load_thriftpy2_interop()
    services = {svc: getattr(idl, svc).thrift_services for svc in ("Interop", "Echo")}
    names = []
    for service, methods in services.items():
        for method in methods:
            owners = [svc for svc, ms in services.items() if method in ms]
            labels = [f"{service}:{method}"] + ([method] if len(owners) > 1 else [])
            for name in labels:
                if any(
                    fnmatchcase(n, p) for n in (name, method) for p in ("get*", "list*", "ping")
                ):
                    names.append(name)
    return sorted(set(names))


# The series cap


LIMIT = 50
CALLS = 10_000
KNOWN = ("getItem", "placeOrder")
REQUEST_OUTCOMES = len(Outcome) + 4  # + fallback, circuit_open, shed, bad_request
GIVE_UP_REASONS = 7
TRANSITION_PAIRS = 6  # every ordered pair of three states


def test_invented_method_names_do_not_grow_any_metric_past_the_cap() -> None:
    config = {
        "metrics": {"max_method_labels": LIMIT},
        "breaker": {"scope": "method"},
        "retry": {"per_try_timeout": "10s", "deadline": "20s"},
        "methods": {"getItem": {"retry": {"max_attempts": 2}}, "placeOrder": {"idempotent": False}},
    }
    rng = random.Random(5)
    names: set[str] = set()
    while len(names) < CALLS:
        name = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=12))
        names.add(f"Svc{rng.randrange(1000)}:{name}" if rng.random() < 0.3 else name)
    ordered = sorted(names)
    rng.shuffle(ordered)
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config=config) as sc,
    ):
        batch = 500
        for start in range(0, CALLS, batch):
            messages = [
                encode_call("ping", seqid=i, name=ordered[i]) for i in range(start, start + batch)
            ]
            messages.append(encode_call("getItem", {"id": 7}, seqid=CALLS + start))
            replies = raw_calls(sc.address, messages, "framed", timeout=30)
            assert len(replies) == batch + 1
        f = scrape(sc)

    # Label values, at most: the known names, LIMIT - len(KNOWN) others, and "other".
    labels = LIMIT + 1
    addresses = 1
    bounds = {
        "requests": labels * REQUEST_OUTCOMES,
        "request_duration_seconds": labels,
        "upstream_attempts": addresses * labels * len(Outcome),
        "retries": labels * len(Outcome),
        "retries_given_up": labels * GIVE_UP_REASONS,
        "fallback_replies": labels * 2,
        "breaker_state": labels,
        "breaker_last_opened_timestamp_seconds": labels,
        "breaker_rejections": labels,
        "breaker_consecutive_failures": labels,
        "breaker_shared_state": labels,
        "breaker_shared_consecutive_failures": labels,
        "breaker_transitions": labels * TRANSITION_PAIRS,
        "retry_budget_exhausted": 1,
        "retry_budget_tokens": 1,
        "calls_shed": 1,
        "calls_in_flight": 1,
        "concurrency_limit": 1,
        "hedges": labels,
        "hedges_won": labels,
        "hedge_budget_exhausted": labels,
        "upstream_ejections": addresses,
        "upstream_stray_replies": addresses,
        "upstream_ejected": addresses,
        "health_check_probes": addresses * len(HEALTH_CHECK_RESULTS),
        "upstream_healthy": addresses,
        "upstream_connections": addresses * 2,
        "protocol_errors": len(PROTOCOL_ERROR_KINDS),
        "config_reloads": 2,
        "build_info": 1,
        "state_backend_errors": 4,
        "fallback_cache_entries": 1,
        "fallback_cache_bytes": 1,
        "client_connections": 1,
        "client_connections_rejected": 3,
        "fallback_store_up": 1,
        "fallback_store_errors": 5,
        "control_actions": 5,
        "client_idle_closes": 1,
        "state_backend_up": 1,
        "event_loop_lag_seconds": 1,
        "breaker_failure_ratio": labels,
        "breaker_slow_call_ratio": labels,
        "tls_handshake_errors": 2 * 7,
        # prometheus_client's process metrics: one series each.
        "process_virtual_memory_bytes": 1,
        "process_resident_memory_bytes": 1,
        "process_start_time_seconds": 1,
        "process_cpu_seconds": 1,
        "process_open_fds": 1,
        "process_max_fds": 1,
    }
    assert set(bounds) == {n.removeprefix(PREFIX) for n in f}, "a metric without a bound"
    for name, bound in bounds.items():
        series = label_sets(f[name if name.startswith("process_") else PREFIX + name])
        assert len(series) <= bound, (name, len(series), bound)
    method_values = {_method_label(dict(s)) for fam in f.values() for s in label_sets(fam)} - {None}
    # The upstream answers every invented name UNKNOWN_METHOD, so they take half the
    # labels at most (the other half stays for methods it answers).
    assert len(method_values) == len(set(KNOWN)) + LIMIT // 2 + 1
    assert OTHER in method_values
    assert set(KNOWN) <= method_values
    breakers = {dict(s)["breaker"] for s in label_sets(f[PREFIX + "breaker_state"])}
    assert len(breakers) <= labels

    # Exact: every invented name got UNKNOWN_METHOD; the first LIMIT // 2 got labels.
    def requests(**labels: str) -> float:
        return sum(
            s.value
            for s in f[PREFIX + "requests"].samples
            if s.name.endswith("_total") and all(s.labels[k] == v for k, v in labels.items())
        )

    assert requests(outcome="app_exception") == CALLS
    assert requests(method=OTHER, outcome="app_exception") == CALLS - LIMIT // 2
    assert requests(method="getItem", outcome="ok") == CALLS // batch


def _method_label(labels: dict[str, str]) -> str | None:
    """The capped label behind a series: ``method``, or ``service:method`` where split."""
    if "method" not in labels:
        return None
    service = labels.get("service")
    return f"{service}:{labels['method']}" if service else labels["method"]


def test_protocol_error_kinds_cover_the_code() -> None:
    """Every ``kind="..."`` raised in sidecar/ is a documented, pre-initialised kind."""
    found = set()
    for path in (REPO_ROOT / "sidecar").rglob("*.py"):
        for node in ast.walk(parse_source(Path(path).read_text())):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "kind" and isinstance(kw.value, ast.Constant):
                        found.add(kw.value.value)
    found.discard(None)
    assert found, "no kind= found: the scan is broken"
    assert found <= set(PROTOCOL_ERROR_KINDS), found - set(PROTOCOL_ERROR_KINDS)


def test_event_loop_lag_and_process_metrics() -> None:
    """A loop held up shows in event_loop_lag_seconds; process_* describe the process."""
    with (
        thriftpy2_server("framed") as upstream,
        SidecarThread(base_config([upstream.address])) as st,
    ):
        m = st.metrics()
        assert m.value("process_open_fds") > 0
        assert m.value("process_resident_memory_bytes") > 10 << 20
        assert abs(m.value("process_start_time_seconds") - time.time()) < 3600
        assert m.value(PREFIX + "event_loop_lag_seconds") < 0.5
        # Hold the loop for 1.5 s (a stand-in for a render or a parse that blocks it).
        st.call(lambda: time.sleep(1.5))
        lag = wait_until(
            lambda: (v := st.metrics().value(PREFIX + "event_loop_lag_seconds")) >= 0.4 and v,
            timeout=10.0,
            message="the lag measured",
        )
        assert 0.4 <= lag < 5.0
