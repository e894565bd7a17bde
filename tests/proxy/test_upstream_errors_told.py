"""`UpstreamError.told_as`: each way the sidecar words an upstream failure, without the address."""

from __future__ import annotations

import pytest

from sidecar.errors import (
    UpstreamClosed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

ADDRESS = "10.1.2.3:9090"

ERRORS = [
    UpstreamUnavailable(
        f"cannot connect to upstream {ADDRESS}: Connection refused", address=ADDRESS
    ),
    UpstreamUnavailable(
        f"all 8 connections to upstream {ADDRESS} stayed busy for 0.5s", address=ADDRESS
    ),
    UpstreamUnavailable(
        f"cannot connect to upstream {ADDRESS}: TLS handshake failed: hostname mismatch, "
        "certificate is not valid for '10.1.2.3'",
        address=ADDRESS,
    ),
    UpstreamTimeout(f"upstream {ADDRESS} did not reply within 1s", address=ADDRESS, sent=True),
    UpstreamClosed(
        f"upstream {ADDRESS} closed the connection before replying", address=ADDRESS, sent=True
    ),
    UpstreamProtocolError(
        f"upstream {ADDRESS} sent invalid bytes: bad", address=ADDRESS, sent=True
    ),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: str(e)[:40])
def test_told_as_a_name_never_shows_the_host_or_port(error: UpstreamError) -> None:
    text = error.told_as("the upstream")
    assert "10.1.2.3" not in text, text
    assert "9090" not in text, text
    assert "the upstream" in text


def test_told_as_none_keeps_the_address() -> None:
    error = UpstreamTimeout(
        f"upstream {ADDRESS} did not reply within 1s", address=ADDRESS, sent=True
    )
    assert error.told_as(None) == str(error)
    assert error.told_as("upstream inventory") == "upstream inventory did not reply within 1s"
