"""The ``SIDECAR_*`` environment layer: which variables set which keys, to what.

Every key can be set as ``SIDECAR_<SECTION>__<KEY>`` (for example
``SIDECAR_RETRY__MAX_ATTEMPTS=4``; below ``methods`` the method name keeps
its case), the common ones by their short names (`ENV_SHORTCUTS`). Lists are
comma-separated, ``null`` sets null, an empty variable counts as unset.
``SIDECAR_CONFIG`` names the file and is no key. A variable that names no key
is kept, so that validation reports it as an unknown key (a typo), except
the service-link variables Kubernetes injects for a Service whose name starts
with ``sidecar`` (``SIDECAR_SERVICE_HOST``, ``SIDECAR_PORT_9090_TCP``, ...),
which are recognised by name and value and ignored.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import typing
from collections.abc import Mapping
from typing import Any

from sidecar.config.base import KeyPath
from sidecar.config.keys import annotation_at, step
from sidecar.config.model import SidecarConfig
from sidecar.config.names import ENV_PREFIX, ENV_SHORTCUTS

log = logging.getLogger(__name__)

# Variables that are not config keys: the config file itself (read by the CLI).
NOT_KEYS = frozenset({"SIDECAR_CONFIG"})

# Kubernetes' service-link variables (kubelet, pkg/kubelet/envvars): the
# Service's name upper-cased with dashes as underscores, then these suffixes.
# A Service port's name follows the same rule; the protocol is TCP, UDP or SCTP.
_SERVICE = r"SIDECAR(?:_[A-Z0-9_]+?)?"
_PORT_FAMILY = rf"{_SERVICE}_PORT_(?P<port>\d+)_(?P<proto>TCP|UDP|SCTP)"
_IP = "ip"
_NUMBER = "number"
_URL = "url"
_PROTO = "proto"
_SERVICE_LINKS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"{_SERVICE}_SERVICE_HOST"), _IP),
    (re.compile(rf"{_SERVICE}_SERVICE_PORT(?:_[A-Z0-9_]+)?"), _NUMBER),
    (re.compile(rf"{_SERVICE}_PORT"), _URL),
    (re.compile(_PORT_FAMILY), _URL),
    (re.compile(rf"{_PORT_FAMILY}_PROTO"), _PROTO),
    (re.compile(rf"{_PORT_FAMILY}_PORT"), _NUMBER),
    (re.compile(rf"{_PORT_FAMILY}_ADDR"), _IP),
)
_LINK_URL = re.compile(
    r"(?P<proto>tcp|udp|sctp)://(?:\[(?P<v6>[^\]]+)\]|(?P<v4>[^:]+)):(?P<port>\d+)"
)


def is_service_link(name: str, value: str) -> bool:
    """Is this a variable Kubernetes injects for a Service named ``sidecar...``?

    Both the name and the value must have the shape Kubernetes gives them, so
    that a misspelt config key is not mistaken for one.
    """
    for pattern, kind in _SERVICE_LINKS:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        groups = match.groupdict()
        if _value_fits(kind, value, groups.get("port"), groups.get("proto")):
            return True
    return False


def _value_fits(kind: str, value: str, port: str | None, proto: str | None) -> bool:
    if kind == _IP:
        return _is_ip(value)
    if kind == _NUMBER:
        return value.isdigit() and (port is None or value == port)
    if kind == _PROTO:
        return proto is not None and value == proto.lower()
    url = _LINK_URL.fullmatch(value)
    if url is None or not _is_ip(url["v6"] or url["v4"]):
        return False
    return port is None or (url["port"] == port and url["proto"] == (proto or "").lower())


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def env_layer(environ: Mapping[str, str]) -> tuple[dict[KeyPath, Any], dict[KeyPath, str]]:
    """(value by key path, variable name by key path) of the ``SIDECAR_*`` variables."""
    values: dict[KeyPath, Any] = {}
    names: dict[KeyPath, str] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in NOT_KEYS or raw.strip() == "":
            continue
        path = ENV_SHORTCUTS.get(name)
        if path is None:
            path = _env_path(name[len(ENV_PREFIX) :].split("__"))
            if annotation_at(path) is None and is_service_link(name, raw):
                log.debug("ignoring %s: a Kubernetes service-link variable, not a config key", name)
                continue
        values[path] = _env_value(path, raw)
        names[path] = name
    return values, names


def _env_path(parts: list[str]) -> KeyPath:
    node: Any = SidecarConfig
    path: list[str] = []
    for part in parts:
        node, spelled = step(node, part)
        # Keys of mappings (method names) keep their case; field names are lower case.
        path.append(str(spelled) if node is not None else part.lower())
    return tuple(path)


def _env_value(path: KeyPath, raw: str) -> Any:
    if raw.strip().lower() in ("null", "none"):
        return None
    if typing.get_origin(annotation_at(path)) is tuple:
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def env_overrides(environ: Mapping[str, str]) -> dict[KeyPath, Any]:
    """Key paths and values set by ``SIDECAR_*`` variables."""
    return env_layer(environ)[0]


def env_sources(environ: Mapping[str, str]) -> dict[KeyPath, str]:
    """Key paths set by ``SIDECAR_*`` variables, with the name of each variable."""
    return env_layer(environ)[1]
