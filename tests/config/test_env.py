"""The ``SIDECAR_*`` environment layer, Kubernetes' service-link variables included."""

from __future__ import annotations

import pytest

from sidecar.config import env_overrides, env_sources, load_config
from sidecar.config.env import is_service_link
from sidecar.errors import ConfigError


def test_env_lists_nulls_empty_and_method_names() -> None:
    env = {
        "SIDECAR_UPSTREAM": "10.0.0.1:9091, 10.0.0.2:9091",
        "SIDECAR_RETRY__RETRY_ON": "timeout,connect_error",
        "SIDECAR_METRICS_LISTEN": "null",
        "SIDECAR_IDL": "",  # empty: unset
        "SIDECAR_METHODS__getItem__RETRY__MAX_ATTEMPTS": "4",
        "SIDECAR_METHODS__placeOrder__IDEMPOTENT": "false",
        "SIDECAR_LOG_LEVEL": "DEBUG",
        "SIDECAR_CONFIG": "/nonexistent.yaml",  # read by the CLI, not a key
        "OTHER": "x",
    }
    config = load_config(None, environ=env)
    assert config.upstream.addresses == ("10.0.0.1:9091", "10.0.0.2:9091")
    assert config.retry.retry_on == ("timeout", "connect_error")
    assert config.metrics.listen is None
    assert config.idl is None
    assert config.methods["getItem"].retry.max_attempts == 4
    assert config.methods["placeOrder"].idempotent is False
    assert config.log.level == "debug"
    assert ("idl",) not in env_overrides(env)
    assert env_sources(env)[("retry", "retry_on")] == "SIDECAR_RETRY__RETRY_ON"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"SIDECAR_RETRY__MAX_ATTEMPTS": "abc"},
            [
                "retry.max_attempts (from environment variable SIDECAR_RETRY__MAX_ATTEMPTS)",
                "whole number",
                "'abc'",
            ],
        ),
        (
            {"SIDECAR_RETRY__MAX_ATEMPTS": "3"},
            ["SIDECAR_RETRY__MAX_ATEMPTS", "did you mean SIDECAR_RETRY__MAX_ATTEMPTS?"],
        ),
        ({"SIDECAR_LISTEN": "nowhere"}, ["listen (from environment variable SIDECAR_LISTEN)"]),
        (
            {"SIDECAR_UPSTREAM": "127.0.0.1:1,bad"},
            ["upstream.addresses[1] (from environment variable SIDECAR_UPSTREAM)", "'bad'"],
        ),
    ],
)
def test_env_errors_name_the_variable(env: dict[str, str], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ=env)
    message = str(info.value)
    for part in expected:
        assert part in message
    # No file was involved, so the message must not blame one (or "defaults").
    assert "defaults" not in message
    assert " in " not in message.split(":")[0]


# What the kubelet injects into every container of a pod, for a Service named `sidecar`
# with ports `thrift` 9090/TCP and `admin` 9464/TCP, and one named `sidecar-metrics`.
KUBERNETES_SERVICE_LINKS = {
    "SIDECAR_SERVICE_HOST": "10.96.12.7",
    "SIDECAR_SERVICE_PORT": "9090",
    "SIDECAR_SERVICE_PORT_THRIFT": "9090",
    "SIDECAR_SERVICE_PORT_ADMIN": "9464",
    "SIDECAR_PORT": "tcp://10.96.12.7:9090",
    "SIDECAR_PORT_9090_TCP": "tcp://10.96.12.7:9090",
    "SIDECAR_PORT_9090_TCP_PROTO": "tcp",
    "SIDECAR_PORT_9090_TCP_PORT": "9090",
    "SIDECAR_PORT_9090_TCP_ADDR": "10.96.12.7",
    "SIDECAR_PORT_9464_TCP": "tcp://10.96.12.7:9464",
    "SIDECAR_PORT_9464_TCP_PROTO": "tcp",
    "SIDECAR_PORT_9464_TCP_PORT": "9464",
    "SIDECAR_PORT_9464_TCP_ADDR": "10.96.12.7",
    "SIDECAR_METRICS_SERVICE_HOST": "fd00::2a",
    "SIDECAR_METRICS_SERVICE_PORT": "9464",
    "SIDECAR_METRICS_PORT": "udp://[fd00::2a]:9464",
    "SIDECAR_METRICS_PORT_9464_UDP": "udp://[fd00::2a]:9464",
    "SIDECAR_METRICS_PORT_9464_UDP_PROTO": "udp",
    "SIDECAR_METRICS_PORT_9464_UDP_PORT": "9464",
    "SIDECAR_METRICS_PORT_9464_UDP_ADDR": "fd00::2a",
}


def test_kubernetes_service_link_variables_are_ignored() -> None:
    env = {**KUBERNETES_SERVICE_LINKS, "SIDECAR_UPSTREAM": "127.0.0.1:9091"}
    config = load_config(None, environ=env)
    assert config.upstream.addresses == ("127.0.0.1:9091",)
    assert env_sources(env) == {("upstream", "addresses"): "SIDECAR_UPSTREAM"}
    assert config == load_config(None, environ={"SIDECAR_UPSTREAM": "127.0.0.1:9091"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # Typos of config keys stay errors, whatever their value.
        ("SIDECAR_RETRY__MAX_ATEMPTS", "3"),
        ("SIDECAR_LISTEN_PORT", "9090"),
        ("SIDECAR_METRICS_PORT", "9464"),
        # Service-link names with values Kubernetes never writes there.
        ("SIDECAR_SERVICE_HOST", "sidecar.default.svc"),
        ("SIDECAR_SERVICE_PORT", "http"),
        ("SIDECAR_PORT", "9090"),
        ("SIDECAR_PORT_9090_TCP_PORT", "9091"),
        ("SIDECAR_PORT_9090_TCP_PROTO", "udp"),
        ("SIDECAR_PORT_9090_TCP", "udp://10.0.0.1:9090"),
        ("SIDECAR_PORT_9090_HTTP", "tcp://10.0.0.1:9090"),
    ],
)
def test_variables_that_only_look_like_service_links_are_errors(name: str, value: str) -> None:
    assert not is_service_link(name, value)
    with pytest.raises(ConfigError, match=f"from environment variable {name}"):
        load_config(None, environ={name: value})


def test_every_injected_variable_is_recognised() -> None:
    for name, value in KUBERNETES_SERVICE_LINKS.items():
        assert is_service_link(name, value), name
