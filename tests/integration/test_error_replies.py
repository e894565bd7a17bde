"""What error replies tell clients about the upstream: a name, not its host and port.

A client of the sidecar has no use for the upstream's internal address, and
an attacker has some; by default error replies say "the upstream" (or
``upstream.name``), while logs and metrics keep the address for operators.
``upstream.addresses_in_replies: true`` brings the address back.
"""

from __future__ import annotations

from typing import Any

import pytest
import thriftpy2.thrift

from tests.support.clients import thriftpy2_client
from tests.support.ops import log_lines
from tests.support.sidecar import free_port, run_sidecar

TAE = thriftpy2.thrift.TApplicationException
# One attempt, and a breaker that opens on the first failure: the second call
# is refused by the open breaker, the first fails to connect.
QUICK = {"retry": {"max_attempts": 1}, "breaker": {"fail_max": 1, "reset_timeout": "60s"}}


def _two_errors(upstream: str, config: dict[str, Any]) -> tuple[str, str]:
    """The messages of a failed connect and of an open breaker; the log names the address."""
    with (
        run_sidecar([upstream], config={**QUICK, **config}) as sidecar,
        thriftpy2_client(sidecar.address) as client,
    ):
        with pytest.raises(TAE) as refused:
            client.ping()
        with pytest.raises(TAE) as circuit_open:
            client.ping()
        logged = "\n".join(log_lines(sidecar))
    assert upstream in logged  # operators still see the address
    return refused.value.message, circuit_open.value.message


def test_error_replies_call_the_upstream_by_name_by_default() -> None:
    port = free_port()  # nothing listens there: the connect is refused
    upstream = f"127.0.0.1:{port}"
    refused, circuit_open = _two_errors(upstream, {})
    assert refused.startswith("cannot connect to the upstream: "), refused
    assert "circuit open for the upstream" in circuit_open, circuit_open
    for text in (refused, circuit_open):
        assert "127.0.0.1" not in text, text
        assert str(port) not in text, text


def test_a_configured_name_is_used() -> None:
    port = free_port()
    refused, circuit_open = _two_errors(f"127.0.0.1:{port}", {"upstream": {"name": "inventory"}})
    assert refused.startswith("cannot connect to upstream inventory: "), refused
    assert "circuit open for upstream inventory" in circuit_open, circuit_open
    assert str(port) not in refused + circuit_open


def test_addresses_in_replies_brings_the_address_back() -> None:
    upstream = f"127.0.0.1:{free_port()}"
    refused, circuit_open = _two_errors(upstream, {"upstream": {"addresses_in_replies": True}})
    assert f"cannot connect to upstream {upstream}" in refused, refused
    assert f"circuit open for upstream {upstream}" in circuit_open, circuit_open
