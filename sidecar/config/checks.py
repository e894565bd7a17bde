"""What a valid config still needs to run, and what it probably gets wrong.

`require_upstream` is the one check that stops `sidecar run` (``check-config``
turns it into a warning). `config_warnings` only informs: each warning names
the keys involved and what will happen, so that the author can decide.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from sidecar.config.hedge import parse_hedge_delay
from sidecar.config.keys import format_key
from sidecar.config.methods import is_idempotent, matches_any
from sidecar.config.model import SidecarConfig
from sidecar.config.names import SHORT_NAMES, flag_of, shortcut_variable
from sidecar.config.units import format_duration, split_address
from sidecar.errors import ConfigError

_LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::")


def require_upstream(config: SidecarConfig) -> None:
    """Refuse a config without an upstream address: there is nowhere to send calls.

    Raises:
        ConfigError: no address, with the key, the flag and the variable that set one.
    """
    if config.upstream.addresses:
        return
    key = format_key(SHORT_NAMES["upstream"])
    flag, variable = flag_of("upstream"), shortcut_variable("upstream")
    raise ConfigError(
        f"{key}: at least one upstream address is needed to run; set {key} in the file, "
        f"{flag} HOST:PORT or {variable}"
    )


def config_warnings(config: SidecarConfig, known_methods: Iterable[str] | None = None) -> list[str]:
    """Human-readable warnings; an empty list means nothing to say.

    Args:
        config: a valid configuration.
        known_methods: method names from the IDL (bare and ``Service:method``),
            when one is configured; None without an IDL (nothing is known then, and
            the checks that need the names are skipped).
    """
    warnings: list[str] = []
    r = config.retry
    for name, method in config.methods.items():
        idempotent = is_idempotent(config, name)
        if method.idempotent and not matches_any(name, r.idempotent):
            warnings.append(
                f"retrying after send is enabled for method {name}, which the "
                f"retry.idempotent patterns do not cover (methods.{name}.idempotent: true): "
                "a call whose reply is lost may run twice on the upstream"
            )
        if not idempotent and method.retry.max_attempts not in (None, 1):
            warnings.append(
                f"methods.{name}.retry.max_attempts is {method.retry.max_attempts} but {name} "
                "is not idempotent: it is retried only when the call was never sent "
                "(connect errors), never after a timeout or a lost reply"
            )
        if not idempotent and method.retry_on_exceptions:
            warnings.append(
                f"methods.{name}.retry_on_exceptions is set but {name} is not idempotent: "
                "a declared exception is a reply to a call that was sent, so it is never retried"
            )
        if not idempotent and method.fallback.cache:
            warnings.append(
                f"methods.{name}.fallback.cache is set but {name} is not idempotent; "
                "replies of non-idempotent methods are never cached"
            )
        if not idempotent and method.fallback.static is not None:
            warnings.append(
                f"methods.{name}.fallback.static answers the non-idempotent method {name} with "
                "a made-up success while the upstream is down: clients will believe the write "
                "happened (a static_exception tells them it did not)"
            )
    has_static = any(
        m.fallback.static is not None or m.fallback.static_exception is not None
        for m in config.methods.values()
    )
    if has_static and not config.fallback.serve_on:
        warnings.append(
            "static fallback replies are configured but fallback.serve_on is empty: "
            "they are never served"
        )
    if "*" in r.idempotent or "*:*" in r.idempotent:
        warnings.append(
            "retry.idempotent matches every method: retrying after send is enabled for "
            "writes too, which may then run twice on the upstream"
        )
    if known_methods is not None:
        known = set(known_methods)
        for name in config.methods:
            if name not in known:
                warnings.append(
                    f"methods.{name}: the IDL has no such method, so these settings "
                    "apply to nothing (a typo?)"
                )
        bare = sorted(m for m in known if ":" not in m)
        writes = [m for m in bare if is_idempotent(config, m) and _looks_like_write(m)]
        for m in writes:
            warnings.append(
                f"retrying after send is enabled for {m}, whose name suggests a write: "
                f"check that it is safe to repeat (methods.{m}.idempotent: false if not)"
            )
    try:
        require_upstream(config)
    except ConfigError as exc:
        warnings.append(f"no upstream address, so `sidecar run` will refuse to start: {exc}")
    if _loops_to_itself(config):
        warnings.append(
            f"upstream.addresses includes the sidecar's own listen address ({config.listen}): "
            "calls would loop back into the sidecar"
        )
    if "internal_error" in r.retry_on:
        warnings.append(
            "retry.retry_on lists internal_error: idempotent calls that fail inside the "
            "upstream will be run again"
        )
    if r.per_try_timeout > r.deadline:
        warnings.append(
            f"retry.per_try_timeout ({format_duration(r.per_try_timeout)}) is longer than "
            f"retry.deadline ({format_duration(r.deadline)}): the deadline cuts every "
            "attempt short"
        )
    if r.initial_backoff > r.max_backoff:
        warnings.append(
            f"retry.initial_backoff ({format_duration(r.initial_backoff)}) is longer than "
            f"retry.max_backoff ({format_duration(r.max_backoff)}): every wait is capped "
            "at max_backoff"
        )
    ej = config.upstream.ejection
    if ej.base_time > ej.max_time:
        warnings.append(
            f"upstream.ejection.base_time ({format_duration(ej.base_time)}) is longer than "
            f"upstream.ejection.max_time ({format_duration(ej.max_time)}): every ejection "
            "lasts max_time"
        )
    if config.fallback.cache.ttl == 0 and config.fallback.serve_on:
        warnings.append("fallback.cache.ttl is 0: cached replies are never served")
    if config.metrics.listen is None:
        warnings.append("metrics.listen is null: no /metrics, /healthz or /readyz endpoint")
    control = config.control.listen
    if control is not None and not _is_loopback(split_address(control)[0]):
        warnings.append(
            f"control.listen ({control}) is not a loopback address: whoever reaches it can "
            "trip breakers, fail readiness and change the log level"
        )
    warnings += _hedge_warnings(config)
    return warnings


def _hedge_warnings(config: SidecarConfig) -> list[str]:
    """A fixed hedge delay that an attempt's per-try timeout always beats: no hedge ever goes."""
    found = []
    r = config.retry
    delay = config.hedge.delay
    seconds = None if delay is None else parse_hedge_delay(delay).seconds
    if seconds is not None and seconds >= r.per_try_timeout:
        found.append(
            f"hedge.delay ({delay}) is not shorter than retry.per_try_timeout "
            f"({format_duration(r.per_try_timeout)}): an attempt times out before its hedge "
            "could be sent"
        )
    for name, method in config.methods.items():
        delay = method.hedge.delay
        seconds = None if delay is None else parse_hedge_delay(delay).seconds
        per_try = method.retry.per_try_timeout or r.per_try_timeout
        if seconds is not None and seconds >= per_try:
            found.append(
                f"methods.{name}.hedge.delay ({delay}) is not shorter than its per-try timeout "
                f"({format_duration(per_try)}): an attempt times out before its hedge could be "
                "sent"
            )
    return found


_WRITE_PREFIXES = (
    "add",
    "create",
    "delete",
    "insert",
    "place",
    "post",
    "put",
    "remove",
    "send",
    "set",
    "submit",
    "update",
    "write",
)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _looks_like_write(method: str) -> bool:
    return method.lower().startswith(_WRITE_PREFIXES)


def _loops_to_itself(config: SidecarConfig) -> bool:
    host, port = split_address(config.listen)
    if port == 0:
        return False
    for address in config.upstream.addresses:
        up_host, up_port = split_address(address)
        if up_port == port and (up_host == host or (host in _LOOPBACK and up_host in _LOOPBACK)):
            return True
    return False
