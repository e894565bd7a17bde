"""The supervisor's admin pieces without processes: merging expositions and /state documents."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from sidecar.admin.workers import WorkersCollector, WorkerView, merge_families, sum_states


def exposition(calls: int, seconds: float) -> str:
    registry = CollectorRegistry()
    counter = Counter("x_requests", "Calls.", ["method"], registry=registry)
    counter.labels("get").inc(calls)
    Histogram("x_seconds", "Time.", registry=registry).observe(seconds)
    return generate_latest(registry).decode()


def test_each_workers_series_get_a_worker_label_in_one_family_per_metric() -> None:
    families = merge_families([(0, exposition(3, 0.1)), (1, exposition(5, 2.0))])
    registry = CollectorRegistry()

    class Merged(Collector):
        def collect(self) -> Iterable[Metric]:
            return families

    registry.register(Merged())
    text = generate_latest(registry).decode()
    assert text.count("# TYPE x_requests_total counter") == 1
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    calls = {s.labels["worker"]: s.value for s in parsed["x_requests"].samples}
    assert calls == {"0": 3.0, "1": 5.0}
    counts = {
        s.labels["worker"]: s.value
        for s in parsed["x_seconds"].samples
        if s.name.endswith("_count")
    }
    assert counts == {"0": 1.0, "1": 1.0}


def test_per_process_figures_are_summed_and_shared_ones_kept() -> None:
    def state(clients: int, tokens: float, rejected: int, ready: bool) -> dict[str, object]:
        return {
            "ready": ready,
            "config_version": 3,
            "client_connections": clients,
            "retry_budget": {"tokens": tokens, "exhausted_total": 1, "ratio": 0.2},
            "concurrency": {"in_flight": 1, "shed_total": 0, "max_in_flight": None},
            "pools": [{"address": "a:1", "open": 2, "idle": 1, "busy": 1, "max": 8}],
            "breakers": [
                {"name": "a:1", "state": "open", "rejected_calls": rejected, "probes_in_flight": 0}
            ],
        }

    doc = sum_states([state(2, 10.0, 4, True), state(3, 5.5, 6, True)])
    assert doc["client_connections"] == 5
    assert doc["retry_budget"] == {"tokens": 15.5, "exhausted_total": 2, "ratio": 0.2}
    assert doc["pools"][0] == {"address": "a:1", "open": 4, "idle": 2, "busy": 2, "max": 16}
    assert doc["breakers"][0]["rejected_calls"] == 10
    assert doc["breakers"][0]["state"] == "open"
    assert doc["config_version"] == 3
    assert doc["ready"] is True
    assert sum_states([state(1, 1.0, 0, True), state(1, 1.0, 0, False)])["ready"] is False
    assert sum_states([]) == {}


def test_breaker_transitions_are_summed_as_each_worker_counts_its_own() -> None:
    def state(transitions: dict[str, int]) -> dict[str, object]:
        return {"breakers": [{"name": "a:1", "state": "closed", "transitions": transitions}]}

    doc = sum_states(
        [state({"closed->open": 1}), state({"closed->open": 1, "open->half-open": 1}), state({})]
    )
    assert doc["breakers"][0]["transitions"] == {"closed->open": 2, "open->half-open": 1}


def test_the_supervisors_store_failures_render_once_without_a_worker_label() -> None:
    registry = CollectorRegistry()
    registry.register(
        WorkersCollector(lambda: [WorkerView(0)], 1, lambda: [("file", 2), ("read", 0)])
    )
    text = generate_latest(registry).decode()
    assert text.count("# TYPE thrift_sidecar_fallback_store_errors_total counter") == 1
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        tuple(sorted(s.labels.items())): s.value
        for s in parsed["thrift_sidecar_fallback_store_errors"].samples
    }
    assert samples == {(("operation", "file"),): 2.0, (("operation", "read"),): 0.0}
