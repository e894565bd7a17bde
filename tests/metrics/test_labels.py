"""MethodLabels: one label per method whatever the client sends, bounded, identifiers only."""

from __future__ import annotations

import pytest

from sidecar.metrics import OTHER, MethodLabels

SERVICE_OF = {"getItem": "Catalog", "listItems": "Catalog"}


def test_a_bare_name_of_one_service_is_labelled_with_it() -> None:
    labels = MethodLabels(["getItem", "Catalog:getItem"], limit=10, service_of=SERVICE_OF)
    assert labels.label("getItem") == "Catalog:getItem"
    assert labels.label("Catalog:getItem") == "Catalog:getItem"
    assert labels.configured == ["Catalog:getItem"]  # one series set, not two
    assert labels.in_use() == 1
    # Learned on the wire too: the bare and the multiplexed form share one value.
    assert labels.label("listItems") == "Catalog:listItems"
    assert labels.label("Catalog:listItems") == "Catalog:listItems"
    assert labels.in_use() == 2


def test_names_without_a_unique_service_keep_their_own_label() -> None:
    labels = MethodLabels([], limit=10, service_of=SERVICE_OF)
    assert labels.label("ping") == "ping"
    assert labels.label("Echo:ping") == "Echo:ping"


@pytest.mark.parametrize(
    "name",
    ["get\x00Item", "bad name", "\x1b[31mred", "ünïcode", "a:b:c", "", "9lives", "x" * 10 + "\n"],
)
def test_names_that_are_not_identifiers_never_become_labels(name: str) -> None:
    labels = MethodLabels([], limit=10)
    assert labels.label(name) == OTHER
    assert labels.in_use() == 0  # and they take no slot


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"caf\xc3", b"get\xff", b"Svc:get\xff"])
def test_names_that_are_not_utf8_are_labelled_other(raw: bytes) -> None:
    """A label value must be text: prometheus_client cannot render a lone surrogate,
    and one such series would break /metrics for every scrape."""
    labels = MethodLabels([], limit=10)
    assert labels.label(str(raw, "utf-8", "surrogateescape")) == OTHER
    assert labels.in_use() == 0


def test_identifiers_take_slots_until_the_limit() -> None:
    labels = MethodLabels(["known"], limit=5)
    # On first sight, while unanswered names hold fewer than half (2) of the slots.
    assert [labels.label(n) for n in ("a", "b", "c", "a")] == ["a", "b", OTHER, "a"]
    assert labels.in_use() == 3
    # Answered ones take the rest, up to the limit.
    assert [labels.confirm(n) for n in ("c", "d", "e")] == [True, True, False]
    assert [labels.label(n) for n in ("c", "d", "e")] == ["c", "d", OTHER]
    assert labels.in_use() == 5
    assert labels.add_known(["late"]) == ["late"]  # configured names pass the limit
    assert labels.label("late") == "late"


def test_an_answered_name_stops_counting_as_unanswered() -> None:
    labels = MethodLabels([], limit=4)
    assert [labels.label(n) for n in ("a", "b", "c")] == ["a", "b", OTHER]
    assert labels.awaits_answer("a", "a")
    assert labels.awaits_answer("c", OTHER)
    assert labels.confirm("a") is False  # it had its label already
    assert not labels.awaits_answer("a", "a")
    assert labels.label("c") == "c"  # the freed share
    assert not labels.awaits_answer("not an identifier", OTHER)
