"""PolicyTable: per-method resolution, idempotency, cacheability, the bound, and method labels."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import SidecarConfig, load_config
from sidecar.fallback.static import ArgumentTypes
from sidecar.metrics import OTHER, MethodLabels
from sidecar.protocol.appexc import ApplicationExceptionType, encode_application_exception
from sidecar.protocol.decoders import FramedDecoder
from sidecar.protocol.message import Message, encode_frame
from sidecar.proxy import policy as policy_module
from sidecar.proxy.oneway import OnewayMethods
from sidecar.proxy.policy import MAX_CACHED_NAMES, MethodPolicy, PolicyTable
from sidecar.resilience.outcome import Outcome


def table(
    config: SidecarConfig, *, known: list[str] | None = None, limit: int = 200
) -> PolicyTable:
    return PolicyTable(config, MethodLabels(known or sorted(config.methods), limit))


def from_yaml(tmp_path: Path, text: str) -> SidecarConfig:
    path = tmp_path / "sidecar.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_config(path, environ={})


def config_of(data: dict[str, Any]) -> SidecarConfig:
    return SidecarConfig.model_validate(data)


# Every retry key: (YAML key, value in retry:, in methods.m, in methods["Svc:m"], reader).
RETRY_KEYS: list[tuple[str, Any, Any, Any, Any]] = [
    ("max_attempts", 3, 4, 5, lambda p: p.retry.max_attempts),
    ("initial_backoff", "10ms", "20ms", "30ms", lambda p: p.retry.backoff.initial),
    ("multiplier", 2.0, 3.0, 4.0, lambda p: p.retry.backoff.multiplier),
    ("max_backoff", "1s", "2s", "3s", lambda p: p.retry.backoff.maximum),
    ("per_try_timeout", "100ms", "200ms", "300ms", lambda p: p.retry.per_try_timeout),
    ("deadline", "5s", "6s", "7s", lambda p: p.retry.deadline),
    (
        "retry_on",
        ["connect_error"],
        ["connect_error", "timeout"],
        ["internal_error"],
        lambda p: sorted(p.retry.retry_on),
    ),
]
EXPECTED: dict[str, tuple[Any, Any, Any]] = {
    "max_attempts": (3, 4, 5),
    "initial_backoff": (0.01, 0.02, 0.03),
    "multiplier": (2.0, 3.0, 4.0),
    "max_backoff": (1.0, 2.0, 3.0),
    "per_try_timeout": (0.1, 0.2, 0.3),
    "deadline": (5.0, 6.0, 7.0),
    "retry_on": (
        [Outcome.CONNECT_ERROR],
        [Outcome.CONNECT_ERROR, Outcome.TIMEOUT],
        [Outcome.INTERNAL_ERROR],
    ),
}


@pytest.mark.parametrize(("key", "glob", "bare", "full", "read"), RETRY_KEYS)
def test_precedence_for_every_retry_key(
    key: str, glob: Any, bare: Any, full: Any, read: Any
) -> None:
    config = config_of(
        {
            "retry": {key: glob},
            "methods": {"m": {"retry": {key: bare}}, "Svc:m": {"retry": {key: full}}},
        }
    )
    t = table(config)
    g, b, f = EXPECTED[key]
    assert read(t.for_name("Svc:m")) == f
    assert read(t.for_name("Other:m")) == b
    assert read(t.for_name("m")) == b
    assert read(t.for_name("Svc:x")) == g
    assert read(t.for_name("x")) == g
    assert read(t.for_name("Svc:mm")) == g  # no prefix matching


@pytest.mark.parametrize(("key", "glob", "bare", "full", "read"), RETRY_KEYS)
def test_precedence_is_per_key(key: str, glob: Any, bare: Any, full: Any, read: Any) -> None:
    # methods["Svc:m"] sets one other key only: this key still comes from methods["m"].
    other = "deadline" if key != "deadline" else "max_attempts"
    config = config_of(
        {
            "retry": {key: glob},
            "methods": {"m": {"retry": {key: bare}}, "Svc:m": {"retry": {other: 9}}},
        }
    )
    t = table(config)
    g, b, _ = EXPECTED[key]
    assert read(t.for_name("Svc:m")) == b
    assert read(t.for_name("Svc:x")) == g


def test_precedence_from_a_yaml_file(tmp_path: Path) -> None:
    config = from_yaml(
        tmp_path,
        """
        retry:
          max_attempts: 2
          per_try_timeout: 1s
          idempotent: ["get*"]
        methods:
          getItem:
            retry: {max_attempts: 4, per_try_timeout: 200ms}
          "Catalog:getItem":
            retry: {max_attempts: 6}
          placeOrder:
            idempotent: false
        """,
    )
    t = table(config)
    catalog = t.for_name("Catalog:getItem")
    assert (catalog.retry.max_attempts, catalog.retry.per_try_timeout) == (6, 0.2)
    other = t.for_name("Store:getItem")
    assert (other.retry.max_attempts, other.retry.per_try_timeout) == (4, 0.2)
    plain = t.for_name("listItems")
    assert (plain.retry.max_attempts, plain.retry.per_try_timeout) == (2, 1.0)
    assert catalog.idempotent
    assert not plain.idempotent
    assert not t.for_name("placeOrder").idempotent


def test_a_name_that_is_not_utf8_is_kept_as_sent_and_shown_as_text() -> None:
    t = table(config_of({}))
    raw = t.for_name(str(b"Svc:get\xff", "utf-8", "surrogateescape"))
    assert (raw.service, raw.method) == ("Svc", "get\udcff")  # as on the wire: sent back so
    assert raw.display_name == "Svc.get\\xff"  # as text: in logs and messages
    assert raw.label == OTHER


def test_names_split_into_service_and_method() -> None:
    t = table(config_of({}))
    p = t.for_name("Catalog:getItem")
    assert (p.name, p.service, p.method, p.display_name) == (
        "Catalog:getItem",
        "Catalog",
        "getItem",
        "Catalog.getItem",
    )
    bare = t.for_name("getItem")
    assert (bare.service, bare.method, bare.display_name) == ("", "getItem", "getItem")


# Idempotency


@pytest.mark.parametrize(
    ("patterns", "name", "expected"),
    [
        (["get*", "list*", "ping"], "getItem", True),
        (["get*", "list*", "ping"], "Catalog:getItem", True),
        (["get*", "list*", "ping"], "listItems", True),
        (["get*", "list*", "ping"], "ping", True),
        (["get*", "list*", "ping"], "Echo:ping", True),
        (["get*", "list*", "ping"], "pingAll", False),
        (["get*", "list*", "ping"], "forget", False),  # globs are anchored
        (["get*", "list*", "ping"], "GetItem", False),  # and case-sensitive
        (["get*", "list*", "ping"], "placeOrder", False),
        (["get*", "list*", "ping"], "get:placeOrder", False),  # a service named get
        (["Catalog:get*"], "Catalog:getItem", True),
        (["Catalog:get*"], "Store:getItem", False),
        (["Catalog:get*"], "getItem", False),  # a bare name has no service
        (["*:ping"], "Echo:ping", True),
        (["*:ping"], "ping", False),
        (["list?"], "lists", True),
        (["list?"], "listed", False),
        (["[gh]et*"], "hetItem", True),
        (["*"], "anything", True),
        ([], "getItem", False),
    ],
)
def test_idempotent_from_patterns(patterns: list[str], name: str, expected: bool) -> None:
    t = table(config_of({"retry": {"idempotent": patterns}}))
    p = t.for_name(name)
    assert p.idempotent is expected
    assert p.retry.idempotent is expected


def test_idempotent_override() -> None:
    config = config_of(
        {
            "retry": {"idempotent": ["get*"]},
            "methods": {
                "placeOrder": {"idempotent": True},
                "getSecret": {"idempotent": False},
                "Vault:getItem": {"idempotent": False},
            },
        }
    )
    t = table(config)
    assert t.for_name("placeOrder").idempotent
    assert t.for_name("Shop:placeOrder").idempotent
    assert not t.for_name("getSecret").idempotent
    assert not t.for_name("Vault:getSecret").idempotent
    assert not t.for_name("Vault:getItem").idempotent
    assert t.for_name("Catalog:getItem").idempotent
    assert t.for_name("getItem").idempotent


def test_a_bare_idempotent_false_is_not_lost_by_a_service_entry() -> None:
    # methods.placeOrder says "never repeat"; a Shop:placeOrder entry that only tunes
    # timeouts must not bring the patterns back (here "*" would make it idempotent).
    config = config_of(
        {
            "retry": {"idempotent": ["*"]},
            "methods": {
                "placeOrder": {"idempotent": False},
                "Shop:placeOrder": {"retry": {"per_try_timeout": "2s"}},
            },
        }
    )
    p = table(config).for_name("Shop:placeOrder")
    assert p.retry.per_try_timeout == 2.0
    assert not p.idempotent
    assert not p.cacheable


# Cacheability


@pytest.mark.parametrize(
    ("fallback_methods", "name", "expected"),
    [
        (None, "getItem", True),  # default: the idempotent patterns
        (None, "Catalog:listItems", True),
        (None, "placeOrder", False),
        (["get*"], "getItem", True),
        (["get*"], "listItems", False),  # idempotent, but not listed
        (["*"], "placeOrder", False),  # listed, but never for a non-idempotent method
        (["*"], "ping", True),
        (["Catalog:*"], "Catalog:getItem", True),
        (["Catalog:*"], "Store:getItem", False),
        ([], "getItem", False),
    ],
)
def test_cacheable(fallback_methods: list[str] | None, name: str, expected: bool) -> None:
    data: dict[str, Any] = {"retry": {"idempotent": ["get*", "list*", "ping"]}}
    if fallback_methods is not None:
        data["fallback"] = {"methods": fallback_methods}
    assert table(config_of(data)).for_name(name).cacheable is expected


def test_cacheable_follows_the_idempotent_override() -> None:
    config = config_of(
        {
            "retry": {"idempotent": ["get*"]},
            "fallback": {"methods": ["*"]},
            "methods": {"getBalance": {"idempotent": False}, "placeOrder": {"idempotent": True}},
        }
    )
    t = table(config)
    assert not t.for_name("getBalance").cacheable
    assert t.for_name("placeOrder").cacheable
    assert t.for_name("getItem").cacheable


def test_per_method_cache_switch() -> None:
    config = config_of(
        {
            "retry": {"idempotent": ["get*", "list*"]},
            "methods": {
                "listItems": {"fallback": {"cache": False}},
                "getNothing": {"fallback": {"cache": False}},
                "placeOrder": {"fallback": {"cache": True}},  # not idempotent: still no
                "getRare": {"fallback": {"cache": True}},
            },
            "fallback": {"methods": ["getItem"]},
        }
    )
    t = table(config)
    assert not t.for_name("listItems").cacheable
    assert not t.for_name("getNothing").cacheable
    assert not t.for_name("placeOrder").cacheable
    assert t.for_name("getRare").cacheable
    assert t.for_name("getItem").cacheable
    assert not t.for_name("getOther").cacheable


@pytest.mark.parametrize("name", ["placeOrder", "Shop:placeOrder", "deleteAll", "x"])
def test_never_cacheable_when_not_idempotent(name: str) -> None:
    config = config_of(
        {
            "retry": {"idempotent": ["get*"]},
            "fallback": {"methods": ["*", "*:*"]},
            "methods": {name: {"fallback": {"cache": True}}},
        }
    )
    p = table(config).for_name(name)
    assert not p.idempotent
    assert not p.cacheable


# The bound on remembered names


def test_table_stops_growing_but_still_resolves() -> None:
    config = config_of(
        {
            "retry": {"idempotent": ["get*"], "max_attempts": 2},
            "methods": {"getSpecial": {"retry": {"max_attempts": 7}}},
        }
    )
    t = table(config)
    first = [t.for_name(f"getFiller{i}") for i in range(MAX_CACHED_NAMES)]
    assert all(t.for_name(f"getFiller{i}") is first[i] for i in range(0, MAX_CACHED_NAMES, 997))
    assert len(t._cache) == MAX_CACHED_NAMES
    # Past the bound: resolved afresh every time (no new entries), and correctly.
    for _ in range(3):
        late = t.for_name("Svc:getSpecial")
        assert late.retry.max_attempts == 7
        assert late.idempotent
        assert late.cacheable
        other = t.for_name("placeOrder")
        assert other.retry.max_attempts == 2
        assert not other.idempotent
    assert t.for_name("placeOrder") is not t.for_name("placeOrder")
    assert t.for_name("placeOrder") == t.for_name("placeOrder")
    assert len(t._cache) == MAX_CACHED_NAMES
    # Names remembered before the bound was reached are still served from the table.
    assert t.for_name("getFiller0") is first[0]


def test_bound_with_a_small_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy_module, "MAX_CACHED_NAMES", 3)
    t = table(config_of({}))
    remembered = [t.for_name(n) for n in ("a", "b", "c")]
    assert [t.for_name(n) for n in ("a", "b", "c")] == remembered
    assert all(t.for_name(n) is p for n, p in zip("abc", remembered, strict=True))
    d1, d2 = t.for_name("d"), t.for_name("d")
    assert d1 is not d2
    assert d1 == d2
    assert len(t._cache) == 3


# Method labels


def test_labels_known_names_keep_theirs_then_new_ones_until_the_limit() -> None:
    labels = MethodLabels(["getItem", "Catalog:listItems"], limit=4)
    assert labels.label("getItem") == "getItem"
    assert labels.label("new1") == "new1"
    assert labels.label("new2") == "new2"
    assert labels.label("new3") == OTHER
    assert labels.label("Catalog:listItems") == "Catalog:listItems"
    assert labels.label("new1") == "new1"  # an admitted name keeps its label
    assert labels.label("new3") == OTHER
    assert labels.known() == sorted(["Catalog:listItems", "getItem", "new1", "new2"])


def test_labels_more_known_names_than_the_limit() -> None:
    known = [f"m{i}" for i in range(10)]
    labels = MethodLabels(known, limit=3)
    assert [labels.label(n) for n in known] == known
    assert labels.label("new") == OTHER
    assert len(labels.known()) == 10


def test_label_set_stays_bounded_under_invented_names() -> None:
    labels = MethodLabels(["getItem"], limit=50)
    seen = {labels.label(f"Svc:invented{i}") for i in range(5_000)}
    assert len(seen) == 26  # 25 names not yet answered (half the limit) and "other"
    assert OTHER in seen
    for i in range(5_000):  # names the upstream answers take the rest, and no more
        labels.confirm(f"Svc:answered{i}")
    assert len(labels.known()) == 50


def test_policies_carry_capped_labels() -> None:
    config = config_of({"methods": {"getItem": {"retry": {"max_attempts": 4}}}})
    labels = MethodLabels(sorted(config.methods), limit=3)
    t = PolicyTable(config, labels)
    got: list[MethodPolicy] = [t.for_name(n) for n in ("getItem", "x1", "x2", "x3", "x4")]
    # One slot of three may go to a name the upstream has not answered yet.
    assert [p.label for p in got] == ["getItem", "x1", OTHER, OTHER, OTHER]
    assert got[3].name == "x3"  # the name itself is kept; only the label is capped
    assert t.for_name("x1").label == "x1"
    assert [p.label_awaits_answer for p in got] == [False, True, True, True, True]


def exception_reply(exc_type: ApplicationExceptionType) -> Message:
    wire = encode_application_exception("x2", 7, exc_type, "no")
    messages = FramedDecoder(1 << 20).receive_data(encode_frame(wire))
    assert len(messages) == 1
    return messages[0]


@pytest.mark.parametrize(
    ("outcome", "exc_type", "takes_label"),
    [
        (Outcome.OK, None, True),
        (Outcome.DECLARED_EXCEPTION, None, True),
        (Outcome.INTERNAL_ERROR, None, True),
        (Outcome.APP_EXCEPTION, ApplicationExceptionType.WRONG_METHOD_NAME, True),
        (Outcome.APP_EXCEPTION, ApplicationExceptionType.UNKNOWN_METHOD, False),
        (Outcome.TIMEOUT, None, False),
        (Outcome.CONNECT_ERROR, None, False),
        (Outcome.PROTOCOL_ERROR, None, False),
    ],
)
def test_a_name_past_the_unanswered_share_gets_its_label_when_the_upstream_answers_it(
    outcome: Outcome, exc_type: ApplicationExceptionType | None, takes_label: bool
) -> None:
    """Invented names (answered UNKNOWN_METHOD) hold at most half the slots; a real
    method met after them gets its own label once the upstream has answered it."""
    t = PolicyTable(config_of({}), MethodLabels([], limit=4))
    assert [t.for_name(n).label for n in ("made_up1", "made_up2")] == ["made_up1", "made_up2"]
    first = t.for_name("x2")
    assert first.label == OTHER
    assert first.label_awaits_answer
    reply = None if exc_type is None else exception_reply(exc_type)
    t.answered(first, outcome, reply)
    again = t.for_name("x2")
    assert again.label == ("x2" if takes_label else OTHER)
    assert again.label_awaits_answer is not takes_label


def test_an_answered_name_frees_its_share_of_unanswered_slots() -> None:
    labels = MethodLabels([], limit=4)
    t = PolicyTable(config_of({}), labels)
    first = t.for_name("real")
    assert first.label == "real"
    assert first.label_awaits_answer
    t.answered(first, Outcome.OK, None)
    assert not t.for_name("real").label_awaits_answer  # resolved again, settled
    # "real" no longer counts as unanswered: two invented names still fit beside it.
    assert [labels.label(n) for n in ("made_up1", "made_up2", "made_up3")] == [
        "made_up1",
        "made_up2",
        OTHER,
    ]


def test_once_every_label_is_taken_no_name_awaits_an_answer() -> None:
    labels = MethodLabels(["a", "b"], limit=2)
    t = PolicyTable(config_of({}), labels)
    late = t.for_name("late")
    assert late.label == OTHER
    assert not late.label_awaits_answer


# Declared exceptions by name: resolved against the IDL once, carried as field ids

EXCEPTIONS_IDL = """
exception NotFound { 1: string message }
exception Overloaded { 1: i32 retryAfterMs }
exception TemporarilyUnavailable { 1: string why }

service Catalog {
  string getItem(1: i64 id)
      throws (1: NotFound notFound, 2: Overloaded overloaded, 3: TemporarilyUnavailable busy),
  string lookup(1: i64 id) throws (1: Overloaded overloaded, 2: NotFound notFound),
  void placeOrder(1: i64 id) throws (1: Overloaded overloaded),
  void ping(),
}

service Admin {
  string getItem(1: i64 id) throws (4: Overloaded overloaded),
}
"""


def idl_config(tmp_path: Path, data: dict[str, Any]) -> SidecarConfig:
    idl = tmp_path / "catalog.thrift"
    idl.write_text(EXCEPTIONS_IDL, encoding="utf-8")
    return config_of({"idl": str(idl), **data})


def resolved_table(config: SidecarConfig) -> PolicyTable:
    from sidecar.fallback.idl import load_idl, services
    from sidecar.fallback.static import exception_ids

    assert config.idl is not None
    ids = exception_ids(config, services(load_idl(config.idl)), config.idl)
    return PolicyTable(config, MethodLabels(sorted(config.methods), 200), exception_ids=ids)


def test_retry_on_exceptions_by_name_become_field_ids(tmp_path: Path) -> None:
    config = idl_config(
        tmp_path,
        {
            "methods": {
                "getItem": {"retry_on_exceptions": ["Overloaded", "TemporarilyUnavailable"]},
                "lookup": {"retry_on_exceptions": ["Overloaded"]},
            }
        },
    )
    t = resolved_table(config)
    assert t.for_name("Catalog:getItem").retry.retry_exceptions == frozenset({2, 3})
    assert t.for_name("Admin:getItem").retry.retry_exceptions == frozenset({4})
    # A bare name does not say which service: the ids of every service with the method.
    assert t.for_name("getItem").retry.retry_exceptions == frozenset({2, 3, 4})
    assert t.for_name("lookup").retry.retry_exceptions == frozenset({1})  # its own field id
    assert t.for_name("ping").retry.retry_exceptions == frozenset()
    assert not t.for_name("ping").classifies_exceptions


def test_a_service_entry_naming_exceptions_wins_over_the_bare_one(tmp_path: Path) -> None:
    config = idl_config(
        tmp_path,
        {
            "methods": {
                "getItem": {"retry_on_exceptions": ["Overloaded"]},
                "Admin:getItem": {"retry_on_exceptions": ["Overloaded"]},
            }
        },
    )
    t = resolved_table(config)
    assert t.for_name("Admin:getItem").retry.retry_exceptions == frozenset({4})


def test_failure_exceptions_by_name_for_every_method_that_declares_them(tmp_path: Path) -> None:
    config = idl_config(tmp_path, {"breaker": {"failure_exceptions": ["Overloaded"]}})
    t = resolved_table(config)
    assert t.for_name("Catalog:getItem").failure_exceptions == frozenset({2})
    assert t.for_name("Admin:getItem").failure_exceptions == frozenset({4})
    assert t.for_name("getItem").failure_exceptions == frozenset({2, 4})  # bare: either service
    assert t.for_name("lookup").failure_exceptions == frozenset({1})
    assert t.for_name("placeOrder").failure_exceptions == frozenset({1})
    assert t.for_name("ping").failure_exceptions == frozenset()
    assert t.for_name("lookup").classifies_exceptions


def test_declared_exception_retried_only_when_listed_and_idempotent(tmp_path: Path) -> None:
    import random

    from sidecar.resilience.retry import NOT_RETRYABLE, UNSAFE, GiveUp, Retry

    config = idl_config(
        tmp_path,
        {
            "methods": {
                "Catalog:getItem": {"retry_on_exceptions": ["Overloaded"]},
                "placeOrder": {"retry_on_exceptions": ["Overloaded"]},
            }
        },
    )
    t = resolved_table(config)

    def decide(name: str, exception_id: int | None) -> Retry | GiveUp:
        return t.for_name(name).retry.decide(
            attempt=1,
            outcome=Outcome.DECLARED_EXCEPTION,
            sent=True,
            oneway=False,
            now=0.0,
            deadline_at=100.0,
            rng=random.Random(1),
            tokens=10.0,
            exception_id=exception_id,
        )

    assert isinstance(decide("Catalog:getItem", 2), Retry)  # Overloaded
    assert decide("Catalog:getItem", 1) == GiveUp(NOT_RETRYABLE)  # NotFound: an answer
    assert decide("Catalog:getItem", None) == GiveUp(NOT_RETRYABLE)
    assert decide("placeOrder", 1) == GiveUp(UNSAFE)  # not idempotent: it ran upstream


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"methods": {"getItem": {"retry_on_exceptions": ["Overloaded", "Busy"]}}},
            "methods.getItem.retry_on_exceptions: 'Busy' is not declared by getItem "
            "(declared: NotFound, Overloaded, TemporarilyUnavailable)",
        ),
        (
            {"methods": {"ping": {"retry_on_exceptions": ["Overloaded"]}}},
            "methods.ping.retry_on_exceptions: 'Overloaded' is not declared by ping "
            "(declared: none)",
        ),
        (
            {"breaker": {"failure_exceptions": ["Overloaded", "Exploded"]}},
            "breaker.failure_exceptions: 'Exploded' is not declared by any method",
        ),
        (
            {"methods": {"nothing": {"retry_on_exceptions": ["Overloaded"]}}},
            "methods.nothing: no such method",
        ),
    ],
)
def test_unknown_exception_names_are_config_errors_naming_the_key(
    tmp_path: Path, data: dict[str, Any], message: str
) -> None:
    from sidecar.errors import ConfigError
    from sidecar.fallback.static import load_idl_parts

    with pytest.raises(ConfigError) as raised:
        load_idl_parts(idl_config(tmp_path, data))
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (
            {"methods": {"getItem": {"retry_on_exceptions": ["Overloaded"]}}},
            "methods.getItem.retry_on_exceptions",
        ),
        ({"breaker": {"failure_exceptions": ["Overloaded"]}}, "breaker.failure_exceptions"),
    ],
)
def test_exception_names_without_an_idl_are_config_errors(data: dict[str, Any], key: str) -> None:
    from sidecar.errors import ConfigError
    from sidecar.fallback.static import load_idl_parts

    with pytest.raises(ConfigError) as raised:
        load_idl_parts(config_of(data))
    assert str(raised.value).startswith(f"{key}: ")
    assert "set idl:" in str(raised.value)


def test_without_names_nothing_is_classified(tmp_path: Path) -> None:
    t = resolved_table(idl_config(tmp_path, {}))
    policy = t.for_name("getItem")
    assert policy.failure_exceptions == frozenset()
    assert policy.retry.retry_exceptions == frozenset()
    assert not policy.classifies_exceptions


def test_retry_on_exceptions_of_a_non_idempotent_method_is_warned_about(tmp_path: Path) -> None:
    from sidecar.config import config_warnings

    config = idl_config(
        tmp_path, {"methods": {"placeOrder": {"retry_on_exceptions": ["Overloaded"]}}}
    )
    warnings = config_warnings(config)
    assert any(
        w.startswith(
            "methods.placeOrder.retry_on_exceptions is set but placeOrder is not idempotent"
        )
        for w in warnings
    ), warnings
    assert not any("retry_on_exceptions" in w for w in config_warnings(idl_config(tmp_path, {})))


def test_learned_oneway_names_are_shown_as_text_in_state() -> None:
    learned = OnewayMethods()
    learned.unanswered(str(b"log\xff", "utf-8", "surrogateescape"))
    learned.unanswered("logEvent")
    assert learned.describe()["learned_oneway"] == ["logEvent", "log\\xff"]


def test_argument_types_go_to_the_names_the_idl_gives_them() -> None:
    """A bare name and its ``Service:method`` form get the IDL's arguments; a
    multiplexed name of a service the IDL does not have gets none (not the bare
    name's: another service may declare other arguments)."""
    declared = ArgumentTypes({1: 10}, {1: "id"})
    config = SidecarConfig.model_validate({"upstream": {"addresses": ["127.0.0.1:1"]}})
    t = PolicyTable(
        config,
        MethodLabels([], 200),
        argument_types={"getItem": declared, "Interop:getItem": declared},
    )
    assert t.for_name("getItem").arguments is declared
    assert t.for_name("Interop:getItem").arguments is declared
    assert t.for_name("Other:getItem").arguments is None
    assert t.for_name("listItems").arguments is None


def test_only_a_method_neither_idl_nor_config_calls_oneway_or_not_is_probed() -> None:
    """`MethodPolicy.oneway_unknown`: what the IDL or ``methods.<name>.oneway`` says
    (true or false) is known; only a name both are silent on is probed."""
    config = config_of({"methods": {"notify": {"oneway": True}, "sleepMs": {"oneway": False}}})
    t = PolicyTable(
        config,
        MethodLabels([], 200),
        oneway_methods=frozenset({"log"}),
        argument_types={"getItem": ArgumentTypes({1: 10}, {1: "id"})},
    )
    assert [
        (name, t.for_name(name).oneway, t.for_name(name).oneway_unknown)
        for name in ("notify", "sleepMs", "log", "getItem", "add")
    ] == [
        ("notify", True, False),
        ("sleepMs", False, False),
        ("log", True, False),
        ("getItem", False, False),
        ("add", False, True),
    ]
