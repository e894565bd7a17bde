"""The hedging keys: ``hedge`` and ``methods.<name>.hedge``; idempotent methods only."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import SidecarConfig, config_warnings, load_config
from sidecar.config.hedge import HedgeDelay, parse_hedge_delay
from sidecar.metrics import MethodLabels
from sidecar.proxy.hedge import HedgePlan
from sidecar.proxy.policy import PolicyTable
from tests.config.files import error_of, write


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("p95", HedgeDelay(percentile=95.0)),
        ("P99.9", HedgeDelay(percentile=99.9)),
        ("20ms", HedgeDelay(seconds=0.02)),
        ("1s", HedgeDelay(seconds=1.0)),
        (0.25, HedgeDelay(seconds=0.25)),
        (0, HedgeDelay(seconds=0.0)),
    ],
)
def test_a_delay_is_a_duration_or_a_percentile(text: object, parsed: HedgeDelay) -> None:
    assert parse_hedge_delay(text) == parsed


@pytest.mark.parametrize("bad", ["p0", "p100", "q95", "fast", "-5ms", True])
def test_a_bad_delay_names_the_key(tmp_path: Path, bad: object) -> None:
    message = error_of(tmp_path, {"hedge": {"delay": bad}})
    assert "hedge.delay:" in message


def test_the_delay_is_kept_as_people_write_it(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            {"hedge": {"delay": 0.02}, "methods": {"getItem": {"hedge": {"delay": "P95"}}}},
        ),
        environ={},
    )
    assert config.hedge.delay == "20ms"
    assert config.methods["getItem"].hedge.delay == "p95"


def test_hedging_a_method_that_is_not_idempotent_is_an_error_naming_the_key(
    tmp_path: Path,
) -> None:
    message = error_of(tmp_path, {"methods": {"placeOrder": {"hedge": {"delay": "20ms"}}}})
    assert "methods.placeOrder.hedge: only idempotent methods may be hedged" in message
    message = error_of(
        tmp_path,
        {"methods": {"getItem": {"idempotent": False, "hedge": {"max_extra": 2}}}},
    )
    assert "methods.getItem.hedge: only idempotent methods may be hedged" in message
    # Turning it off is always allowed; so is hedging a method marked idempotent.
    fine = {
        "hedge": {"delay": "p95"},
        "methods": {
            "placeOrder": {"hedge": {"max_extra": 0}},
            "reserve": {"idempotent": True, "hedge": {"delay": "5ms"}},
        },
    }
    load_config(write(tmp_path, fine), environ={})


def plans(data: dict[str, object], *names: str) -> list[HedgePlan | None]:
    config = SidecarConfig.model_validate(data)
    table = PolicyTable(config, MethodLabels(sorted(config.methods), 200))
    return [table.for_name(name).hedge for name in names]


def test_off_by_default() -> None:
    assert plans({}, "getItem", "placeOrder") == [None, None]


def test_a_global_hedge_applies_to_idempotent_two_way_methods_only() -> None:
    data = {
        "hedge": {"delay": "p95", "max_extra": 2},
        "methods": {"notify": {"oneway": True}},
    }
    p95 = HedgePlan(HedgeDelay(percentile=95.0), 2)
    assert plans(data, "getItem", "ping", "Catalog:listItems", "placeOrder", "notify") == [
        p95,
        p95,
        p95,
        None,
        None,
    ]


def test_per_method_keys_inherit_and_override() -> None:
    data = {
        "hedge": {"delay": "30ms"},
        "methods": {
            "getItem": {"hedge": {"delay": "p99"}},
            "listItems": {"hedge": {"max_extra": 0}},
            "Catalog:ping": {"hedge": {"max_extra": 3}},
        },
    }
    assert plans(data, "getItem", "Catalog:getItem", "listItems", "Catalog:ping", "ping") == [
        HedgePlan(HedgeDelay(percentile=99.0), 1),
        HedgePlan(HedgeDelay(percentile=99.0), 1),
        None,
        HedgePlan(HedgeDelay(seconds=0.03), 3),
        HedgePlan(HedgeDelay(seconds=0.03), 1),
    ]
    # A method entry alone turns hedging on for that method.
    only = {"methods": {"getItem": {"hedge": {"delay": "10ms"}}}}
    assert plans(only, "getItem", "listItems") == [HedgePlan(HedgeDelay(seconds=0.01), 1), None]


def test_a_fixed_delay_the_per_try_timeout_always_beats_is_warned_about() -> None:
    data = {
        "upstream": {"addresses": ["127.0.0.1:9"]},
        "retry": {"per_try_timeout": "1s"},
        "hedge": {"delay": "1s"},
        "methods": {
            "getItem": {"hedge": {"delay": "300ms"}, "retry": {"per_try_timeout": "200ms"}},
            "listItems": {"hedge": {"delay": "p99"}},
            "ping": {"hedge": {"delay": "20ms"}},
        },
    }
    warnings = [w for w in config_warnings(SidecarConfig.model_validate(data)) if "hedge" in w]
    assert warnings == [
        "hedge.delay (1s) is not shorter than retry.per_try_timeout (1s): an attempt times "
        "out before its hedge could be sent",
        "methods.getItem.hedge.delay (300ms) is not shorter than its per-try timeout (200ms): "
        "an attempt times out before its hedge could be sent",
    ]
