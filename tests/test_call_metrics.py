"""`CallMetrics` exports what prometheus_client's own Counter and Histogram would.

Both are fed the same observations; their expositions (text format and
OpenMetrics) are parsed with prometheus_client's parsers and compared sample
by sample: every bucket, the sum and the count. ``_created`` samples are left
out: the sidecar does not export them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from sidecar.metrics import LATENCY_BUCKETS, PREFIX, CallMetrics, split_name

REQUESTS = PREFIX + "requests_total"
DURATION = PREFIX + "request_duration_seconds"
ATTEMPTS = PREFIX + "upstream_attempts_total"

Sample = tuple[str, tuple[tuple[str, str], ...]]


class Reference:
    """The same three metrics as prometheus_client's own types."""

    def __init__(self, docs: dict[str, str]) -> None:
        self.registry = CollectorRegistry()
        labels = CallMetrics.LABELS
        self.requests = Counter(
            REQUESTS, docs[PREFIX + "requests"], labels[REQUESTS], registry=self.registry
        )
        self.duration = Histogram(
            DURATION,
            docs[DURATION],
            labels[DURATION],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.attempts = Counter(
            ATTEMPTS, docs[PREFIX + "upstream_attempts"], labels[ATTEMPTS], registry=self.registry
        )


class Both:
    """A `CallMetrics` and a `Reference`, fed alike."""

    def __init__(self) -> None:
        self.calls = CallMetrics()
        self.registry = CollectorRegistry()
        self.registry.register(self.calls)
        docs = {family.name: family.documentation for family in self.calls.describe()}
        self.ref = Reference(docs)

    def request(self, label: str, outcome: str, seconds: float) -> None:
        self.calls.method(label).request(outcome, seconds)
        service, method = split_name(label)
        self.ref.requests.labels(service, method, outcome).inc()
        self.ref.duration.labels(service, method).observe(seconds)

    def attempt(self, label: str, address: str, result: str) -> None:
        self.calls.method(label).attempt(address, result)
        self.ref.attempts.labels(address, label, result).inc()

    def known(self, label: str, addresses: Iterable[str]) -> None:
        """Series at zero, as `SidecarMetrics.init_method` makes them."""
        stats = self.calls.method(label)
        stats.show_request("ok")
        service, method = split_name(label)
        self.ref.requests.labels(service, method, "ok")
        self.ref.duration.labels(service, method)
        for address in addresses:
            stats.show_attempt(address, "ok")
            self.ref.attempts.labels(address, label, "ok")


def families(text: str, parse: Callable[[str], Iterable[Any]]) -> dict[str, Any]:
    # The text parser makes a family of its own of each ``_created`` series.
    return {f.name: f for f in parse(text) if not f.name.endswith("_created")}


def samples(family: Any) -> dict[Sample, float]:
    found: dict[Sample, float] = {}
    for sample in family.samples:
        if sample.name.endswith("_created"):
            continue
        key = (sample.name, tuple(sorted(sample.labels.items())))
        assert key not in found, f"{key} exported twice"
        found[key] = sample.value
    return found


def same_float(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def assert_same_exposition(both: Both) -> dict[str, dict[Sample, float]]:
    """Compare in both formats; return the text format's samples per family."""
    result: dict[str, dict[Sample, float]] = {}
    for generate, parse in (
        (generate_latest, parse_text),
        (openmetrics.generate_latest, parse_openmetrics),
    ):
        ours = families(generate(both.registry).decode(), parse)
        theirs = families(generate(both.ref.registry).decode(), parse)
        assert sorted(ours) == sorted(theirs)
        for name, family in ours.items():
            reference = theirs[name]
            assert (family.type, family.documentation) == (reference.type, reference.documentation)
            got, want = samples(family), samples(reference)
            assert sorted(got) == sorted(want), name
            for key, value in want.items():
                assert same_float(got[key], value), (key, got[key], value)
            if generate is generate_latest:
                result[name] = got
    return result


def bucket(exported: dict[str, dict[Sample, float]], service: str, method: str, le: str) -> float:
    key = (DURATION + "_bucket", (("le", le), ("method", method), ("service", service)))
    return exported[PREFIX + "request_duration_seconds"][key]


def test_values_on_every_bucket_bound_fall_in_that_bucket() -> None:
    both = Both()
    for bound in LATENCY_BUCKETS:
        both.request("add", "ok", bound)
    exported = assert_same_exposition(both)
    for i, bound in enumerate(LATENCY_BUCKETS):
        assert bucket(exported, "", "add", repr(float(bound))) == i + 1
    assert bucket(exported, "", "add", "+Inf") == len(LATENCY_BUCKETS)


def test_zero_just_past_the_bounds_and_infinity() -> None:
    both = Both()
    both.request("add", "ok", 0.0)
    for bound in LATENCY_BUCKETS:
        both.request("add", "ok", math.nextafter(bound, math.inf))
        both.request("add", "timeout", math.nextafter(bound, 0.0))
    both.request("add", "ok", 10.000001)
    both.request("add", "ok", math.inf)
    exported = assert_same_exposition(both)
    assert bucket(exported, "", "add", "0.00025") == 2  # 0 and just under the first bound
    assert bucket(exported, "", "add", "+Inf") == 2 * len(LATENCY_BUCKETS) + 3
    duration = exported[PREFIX + "request_duration_seconds"]
    assert duration[(DURATION + "_sum", (("method", "add"), ("service", "")))] == math.inf


def test_sum_count_and_counters_over_several_methods_and_addresses() -> None:
    both = Both()
    both.known("add", ["10.0.0.1:9090", "10.0.0.2:9090"])
    both.known("Catalog:getItem", ["10.0.0.1:9090"])
    both.known("idle", ["10.0.0.1:9090"])  # never called: zero series
    latencies = [0.0003, 0.0017, 0.02, 0.2, 1.5, 0.0001, 7.0, 12.0, 0.004]
    for i, seconds in enumerate(latencies):
        label = "add" if i % 2 else "Catalog:getItem"
        both.request(label, "ok" if i % 3 else "timeout", seconds)
        both.attempt(label, "10.0.0.1:9090", "ok")
        both.attempt(label, "10.0.0.2:9090", "connect_error")
    both.request("other", "app_exception", 0.05)
    exported = assert_same_exposition(both)
    duration = exported[PREFIX + "request_duration_seconds"]
    count = duration[(DURATION + "_count", (("method", "getItem"), ("service", "Catalog")))]
    assert count == 5
    total = duration[(DURATION + "_sum", (("method", "add"), ("service", "")))]
    assert total == sum(latencies[1::2])
    idle_count = duration[(DURATION + "_count", (("method", "idle"), ("service", "")))]
    assert idle_count == 0


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "Catalog:getItem", "Svc:multi:part", "other"]),
            st.sampled_from(["ok", "timeout", "fallback"]),
            st.one_of(
                st.sampled_from([*LATENCY_BUCKETS, 0.0, math.inf]),
                st.floats(min_value=0.0, max_value=20.0),
                st.floats(min_value=0.0, max_value=0.001),
            ),
        ),
        max_size=40,
    )
)
def test_property_same_exposition_as_prometheus_client(
    observations: list[tuple[str, str, float]],
) -> None:
    both = Both()
    for label, outcome, seconds in observations:
        both.request(label, outcome, seconds)
        both.attempt(label, "127.0.0.1:9090", outcome)
    assert_same_exposition(both)


@pytest.mark.parametrize("seconds", [1e-12, 1e-300, 1e9, 1e300])
def test_out_of_range_values_land_where_prometheus_client_puts_them(seconds: float) -> None:
    both = Both()
    both.request("add", "ok", seconds)
    assert_same_exposition(both)


def test_showing_a_series_again_keeps_its_count() -> None:
    """A reload makes the known series again (`SidecarMetrics.init_method`): counts stay."""
    both = Both()
    both.known("add", ["10.0.0.1:9090"])
    both.request("add", "ok", 0.001)
    both.attempt("add", "10.0.0.1:9090", "ok")
    both.known("add", ["10.0.0.1:9090", "10.0.0.2:9090"])
    exported = assert_same_exposition(both)
    attempts = exported[PREFIX + "upstream_attempts"]
    key = (ATTEMPTS, (("method", "add"), ("result", "ok"), ("upstream", "10.0.0.1:9090")))
    assert attempts[key] == 1


def _copy(text: str) -> str:
    """An equal str that is another object (a str read from elsewhere: a config, a reload)."""
    copied = "".join(list(text))
    assert copied == text
    assert copied is not text
    return copied


_ADDRESSES = ["10.0.0.1:9090", "10.0.0.2:9090"]
_OUTCOMES = ["ok", "timeout"]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "Catalog:getItem"]),
            st.sampled_from(_ADDRESSES),
            st.sampled_from(_OUTCOMES),
            st.booleans(),  # the same str objects as before, or equal copies
            st.booleans(),  # show the series again first (a reload)
        ),
        max_size=40,
    )
)
def test_counts_repeated_alternated_or_keyed_by_equal_copies_land_in_one_series(
    steps: list[tuple[str, str, str, bool, bool]],
) -> None:
    """A method finds the count it updated last by the identity of its key's strs; an
    equal str that is another object, an alternation of keys, or series shown again
    must still count in the one series of that key, as prometheus_client's would."""
    both = Both()
    for label, address, outcome, copied, show in steps:
        if copied:
            address, outcome = _copy(address), _copy(outcome)
        if show:
            both.known(label, _ADDRESSES)
        both.request(label, outcome, 0.001)
        both.attempt(label, address, outcome)
    assert_same_exposition(both)
