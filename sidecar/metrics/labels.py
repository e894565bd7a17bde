"""Metric names and labels: the name prefix, the fixed label values, what each label means.

Method names arrive on the wire, so their label values are capped
(`MethodLabels`): names known from the config or the IDL always get their own
label, other names get one until ``max_method_labels`` distinct names are in
use, and everything after that is `OTHER`. Every metric with a ``method``
label (and the per-method breakers) uses these values, so a client cannot
blow up the series count. Names the upstream has not yet answered (invented
ones never are) may hold at most half the slots, so that a client inventing
names cannot leave the upstream's real methods sharing `OTHER` and its
breaker (docs/robustness.md, "Method labels: names the
upstream refuses take half at most"). `LABEL_DOCS` feeds
``docs/metrics-reference.md``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final, Protocol

PREFIX: Final = "thrift_sidecar_"
OTHER: Final = "other"

# The `kind` label of client protocol errors: the ``kind=`` values raised in
# sidecar/protocol/ and ``internal`` (a bug caught in server.py). A test in
# tests/test_metrics.py checks that this list covers the code.
PROTOCOL_ERROR_KINDS: Final = (
    "garbage",
    "oversized",
    "truncated",
    "too_deep",
    "bad_version",
    "bad_type",
    "compact",
    "http",
    "json",
    "malformed",
    "memory",
    "unsupported",
    "internal",
)
# The moves a breaker makes (pybreaker's state names).
BREAKER_TRANSITIONS: Final = (
    ("closed", "open"),
    ("open", "half-open"),
    ("half-open", "open"),
    ("half-open", "closed"),
)
CONNECTION_STATES: Final = ("busy", "idle")
# The `result` of a health check probe: pass, or the outcome that failed it
# (sidecar/proxy/health.py; `sidecar.resilience.outcome.Outcome` values but ok).
HEALTH_CHECK_RESULTS: Final = (
    "pass",
    "declared_exception",
    "app_exception",
    "internal_error",
    "connect_error",
    "connection_closed",
    "timeout",
    "protocol_error",
)
# Why a client connection was closed at once (sidecar/proxy/server.py `Server.admit`).
CONNECTION_REJECT_REASONS: Final = ("max_connections", "fd_limit", "draining")
# The fallback store's operations that can fail (sidecar/fallback/sqlite_health.py).
FALLBACK_STORE_OPERATIONS: Final = ("read", "write", "purge", "file", "reopen")
RELOAD_RESULTS: Final = ("ok", "error")
# TLS handshakes that failed: which side of the sidecar, and why (sidecar/proxy/tls.py).
TLS_SIDES: Final = ("client", "upstream")
TLS_HANDSHAKE_REASONS: Final = (
    "plaintext",
    "no_client_certificate",
    "bad_certificate",
    "unknown_ca",
    "expired",
    "version",
    "other",
)

# What an operator did through the control listener (sidecar/admin/control.py).
CONTROL_ACTIONS: Final = (
    "log_level",
    "breaker_open",
    "breaker_close",
    "readiness_fail",
    "readiness_restore",
)

# What each label means, for docs/metrics-reference.md.
LABEL_DOCS: Final[dict[str, str]] = {
    "service": "The service part of a multiplexed name (`Interop` in `Interop:getItem`); "
    "empty for a bare name.",
    "method": "The method name. In `requests_total` and `request_duration_seconds` the bare "
    "method (the service has its own label); elsewhere the name as sent, `Service:method` "
    "for multiplexed calls. Capped: names from the config and the IDL, then new names until "
    "`metrics.max_method_labels` are in use, then `other`. A name the upstream has not yet "
    "answered gets its own value on first sight only while such names hold under half "
    "the values; otherwise it is `other` until the upstream answers it (with anything but "
    "`UNKNOWN_METHOD`). With workers, the cap and its half hold for all of them together. "
    "Only identifiers get a label of "
    "their own: any other name (one that is not UTF-8 on the wire among them) is `other`.",
    "outcome": "What the client got: the last attempt's outcome (`ok`, `declared_exception`, "
    "`app_exception`, `internal_error`, `connect_error`, `connection_closed`, `timeout`, "
    "`protocol_error`), or `fallback` (a cached or static reply), `circuit_open` (rejected "
    "by the breaker, no fallback), `shed` (over `upstream.max_in_flight`, no fallback; "
    "oneway: dropped), `bad_request` (not a CALL or ONEWAY message), "
    "`sidecar_error` (a bug in the sidecar, answered with INTERNAL_ERROR and logged).",
    "upstream": "One upstream address `host:port` (attempts, connections, ejections, "
    "health checks), or "
    "all the upstream's addresses joined by commas (the retry budget and the concurrency "
    "limit, which they share).",
    "result": "`upstream_attempts_total`: the attempt's outcome (`ok` ... `protocol_error`, "
    "as for `outcome`); `config_reloads_total`: `ok` or `error`; "
    "`health_check_probes_total`: `pass`, or the outcome that failed the probe "
    "(`declared_exception` ... `protocol_error`).",
    "reason": "`retries_total`: the outcome of the attempt that was retried "
    "(`connect_error`, `connection_closed`, `timeout`, `internal_error`, `protocol_error`). "
    "`retries_given_up_total`: why not retried: `not_retryable` (outcome not in "
    "`retry.retry_on`), `attempts_exhausted`, `unsafe` (sent, and not idempotent or oneway), "
    "`deadline`, `budget_exhausted`, `probe` (a half-open probe gets one attempt), "
    "`circuit_open` (the circuit opened meanwhile). "
    "`tls_handshake_errors_total`: why the handshake failed: `plaintext` (the peer does not "
    "speak TLS), `no_client_certificate` (mutual TLS required and no certificate given), "
    "`bad_certificate` (a certificate that does not verify, or for another name), "
    "`unknown_ca` (signed by a CA that is not trusted), `expired` (a certificate not valid "
    "now), `version` (no TLS version or cipher in common), `other`. "
    "`client_connections_rejected_total`: `max_connections` (the configured limit "
    "reached), `fd_limit` (the limit lowered at start-up to fit the open-file limit, "
    "`RLIMIT_NOFILE`, reached), `draining`.",
    "side": "`client` (a client's handshake with the listener) or `upstream` (the "
    "sidecar's handshake with an upstream address).",
    "breaker": "The breaker's name: the upstream (its addresses joined by commas), then "
    "`/method` when `breaker.scope: method`.",
    "from_state": "`closed`, `open` or `half-open`.",
    "to_state": "`closed`, `open` or `half-open`.",
    "source": "`cache` (the last good reply to the same arguments) or `static` (the "
    "method's static reply from the config).",
    "state": "`busy` (a call in flight) or `idle`.",
    "kind": "What was wrong: " + ", ".join(f"`{k}`" for k in PROTOCOL_ERROR_KINDS) + ".",
    "operation": "`state_backend_errors_total`: the Redis operation that failed: "
    "`breaker_read`, `breaker_write`, and `cache_read`, `cache_write` when the fallback "
    "store is Redis (its failures count here only). `fallback_store_errors_total` (the "
    "SQLite store): `read`, `write` (a batch of writes), `purge` (of expired entries), "
    "`file` (the SQLite file was deleted or replaced while open), `reopen` (a fresh file "
    "could not be opened at the path).",
    "version": "The sidecar's version.",
    "build": "`mypyc` when the per-call modules run compiled (docs/compiled.md), `python` "
    "when none does, `partial` for a mix (a broken install).",
    "action": "What the control listener did: "
    + ", ".join(f"`{a}`" for a in CONTROL_ACTIONS)
    + " (only actions that were carried out are counted).",
}


# A method name as Thrift identifiers are written, bare or ``Service:method``;
# anything else (control bytes, spaces, junk) never becomes a label value.
_IDENTIFIER: Final = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_.]*:)?[A-Za-z_][A-Za-z0-9_.]*\Z")


# What `Grants.state` says of a label value.
NOT_GRANTED: Final = 0
UNANSWERED: Final = 1  # given on first sight; the upstream has not answered it yet
ANSWERED: Final = 2


class Grants(Protocol):
    """Which label values have been given to names outside the config and the IDL.

    `LocalGrants` keeps them in the process; with workers,
    `sidecar.workers.label_table.LabelTable` keeps them in a file every worker
    maps, so that one method gets one value in every worker and the workers
    together give out no more than ``limit`` values. ``reserved`` is how many
    values the names from the config and the IDL hold (every worker runs the
    same config): given values and reserved ones share ``limit``, and given
    values not yet answered may hold ``limit // 2`` at most.
    """

    def state(self, label: str) -> int:
        """`NOT_GRANTED`, `UNANSWERED` or `ANSWERED`."""
        ...

    def grant(self, label: str, answered: bool, reserved: int) -> bool:
        """Give ``label`` a value if the limits allow (or it has one); True if it has one.
        ``answered``: the upstream has answered it (which also settles a value given
        unanswered)."""
        ...

    def has_room(self, reserved: int) -> bool:
        """Whether an answered name could still get a value."""
        ...

    def given(self) -> int:
        """How many values have been given: a count that only grows. A name resolved
        to `OTHER` is resolved again once it has (`MethodLabels.given`)."""
        ...


class LocalGrants:
    """`Grants` in this process: one sidecar without workers."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._answered: dict[str, bool] = {}  # label -> answered
        self._unanswered = 0

    def state(self, label: str) -> int:
        answered = self._answered.get(label)
        if answered is None:
            return NOT_GRANTED
        return ANSWERED if answered else UNANSWERED

    def grant(self, label: str, answered: bool, reserved: int) -> bool:
        held = self._answered.get(label)
        if held is not None:
            if answered and not held:
                self._answered[label] = True
                self._unanswered -= 1
            return True
        if reserved + len(self._answered) >= self._limit:
            return False
        if not answered:
            if self._unanswered >= self._limit // 2:
                return False
            self._unanswered += 1
        self._answered[label] = answered
        return True

    def has_room(self, reserved: int) -> bool:
        return reserved + len(self._answered) < self._limit

    def given(self) -> int:
        return len(self._answered)


class MethodLabels:
    """Maps wire method names to a bounded set of label values.

    One method, one label value, whatever the client sends: a bare name that
    exactly one IDL service defines is labelled ``Service:method`` (``service_of``),
    like its multiplexed form. Names known from the config or the IDL
    (``known``, and `add_known` on a reload) always get their own value.
    Other names are identifiers or `OTHER`, and an identifier gets its own
    value (from `Grants`) while fewer than ``limit`` are in use:

    - on first sight, while the names the upstream has not answered yet hold
      fewer than half the values (``limit // 2``);
    - else when the upstream answers it (`confirm`; the caller decides what
      counts as an answer: a reply, or an exception other than
      UNKNOWN_METHOD).

    So names the upstream refuses (a client inventing them) can never take
    more than half the values, and a real method met after them still gets
    its own value (and, with ``breaker.scope: method``, its own breaker) once
    the upstream has answered it once. With workers the values come from one
    table all of them share (`use`), so the bounds hold for the sidecar.
    """

    def __init__(
        self, known: Iterable[str], limit: int, service_of: dict[str, str] | None = None
    ) -> None:
        self._service_of = dict(service_of or {})
        self._labels: dict[str, str] = {}  # wire name -> label value
        self._values: set[str] = set()  # values this process has met, configured or given
        # Values this process met given but not yet answered.
        self._unanswered: set[str] = set()
        self._limit = limit
        self._grants: Grants = LocalGrants(limit)
        self.configured: list[str] = []  # label values of the known names
        for name in known:
            self._know(name)

    @property
    def limit(self) -> int:
        """``metrics.max_method_labels``."""
        return self._limit

    def use(self, grants: Grants) -> None:
        """Take label values from ``grants`` from now on (a worker's shared table, or
        back to its own), handing it the values given so far."""
        configured = set(self.configured)
        for label in self._values:
            if label not in configured:
                grants.grant(label, label not in self._unanswered, len(self.configured))
        self._grants = grants

    def _canonical(self, name: str) -> str:
        if ":" not in name:
            service = self._service_of.get(name)
            if service:
                return f"{service}:{name}"
        return name

    def _know(self, name: str) -> bool:
        label = self._canonical(name)
        self._labels[name] = label
        if label in self._unanswered:
            self._unanswered.discard(label)
            self._grants.grant(label, True, len(self.configured))
        if label in self._values:
            return False
        self._values.add(label)
        self.configured.append(label)
        return True

    def label(self, name: str) -> str:
        """The label value for a method name (``Service:method`` or bare)."""
        found = self._labels.get(name)
        if found is not None:
            return found
        if not _IDENTIFIER.match(name):
            return OTHER
        label = self._canonical(name)
        if label not in self._values:
            state = self._grants.state(label)
            if state == NOT_GRANTED:
                if not self._grants.grant(label, False, len(self.configured)):
                    return OTHER
                state = UNANSWERED
            self._values.add(label)
            if state == UNANSWERED:
                self._unanswered.add(label)
        self._labels[name] = label
        return label

    def awaits_answer(self, name: str, label: str) -> bool:
        """Would the upstream's answer to a call of ``name`` (labelled ``label``) change
        anything here? Its value was given unanswered, or it is `OTHER` and could still
        get one."""
        if label == OTHER:
            return bool(_IDENTIFIER.match(name)) and self._grants.has_room(len(self.configured))
        return label in self._unanswered

    def given(self) -> int:
        """How many values have been given, here or (with workers) in any worker: a
        count that only grows. A name this process resolved to `OTHER` may have got a
        value once it has grown (another worker saw the upstream answer it): the caller
        resolves it again (`sidecar.proxy.policy.PolicyTable.for_name`)."""
        return self._grants.given()

    def confirm(self, name: str) -> bool:
        """The upstream answered a call of ``name`` as a method it has.

        Returns:
            True when the name's label value changed (from `OTHER` to its own).
        """
        label = self._canonical(name)
        if label in self._values:
            if label in self._unanswered:
                self._unanswered.discard(label)
                self._grants.grant(label, True, len(self.configured))
            return False
        if not _IDENTIFIER.match(name):
            return False
        if not self._grants.grant(label, True, len(self.configured)):
            return False
        self._labels[name] = label
        self._values.add(label)
        return True

    def add_known(self, names: Iterable[str]) -> list[str]:
        """Give configured names their own label, past the limit if need be (a reload).

        Returns:
            The label values that were not configured before.
        """
        return [self._canonical(name) for name in names if self._know(name)]

    def known(self) -> list[str]:
        """Label values this process has met (configured, or given and seen here)."""
        return sorted(self._values)

    def in_use(self) -> int:
        """How many label values this process has met (`OTHER` not counted)."""
        return len(self._values)


def split_name(name: str) -> tuple[str, str]:
    """``"Svc:m"`` → ("Svc", "m"); a bare name has service ``""``."""
    service, sep, method = name.rpartition(":")
    return (service, method) if sep else ("", name)
