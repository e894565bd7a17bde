"""A bug inside one call answers that client with INTERNAL_ERROR; nobody else notices."""

from __future__ import annotations

import pytest
import thriftpy2.thrift

from sidecar.protocol.appexc import ApplicationExceptionType
from sidecar.proxy import call as call_module
from tests.support.clients import thriftpy2_client
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import SidecarThread, base_config


@pytest.fixture
def broken_classifier(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Make outcome classification raise while the returned flag is set."""
    broken = [False]
    real = call_module.classify_reply

    def classify(mtype: int, body: object) -> object:
        if broken[0]:
            raise RuntimeError("a bug in the sidecar")
        return real(mtype, body)  # type: ignore[arg-type]

    monkeypatch.setattr(call_module, "classify_reply", classify)
    return broken


def test_a_bug_in_one_call_answers_internal_error_and_the_sidecar_carries_on(
    broken_classifier: list[bool],
) -> None:
    with (
        thriftpy2_server("framed") as upstream,
        SidecarThread(base_config([upstream.address], breaker={"fail_max": 1000})) as sc,
        thriftpy2_client(sc.address, "framed") as bystander,
        thriftpy2_client(sc.address, "framed") as victim,
    ):
        assert bystander.add(1, 2) == 3
        broken_classifier[0] = True
        with pytest.raises(thriftpy2.thrift.TApplicationException) as raised:
            victim.add(2, 3)
        assert raised.value.type == ApplicationExceptionType.INTERNAL_ERROR
        assert "internal error" in raised.value.message
        broken_classifier[0] = False
        # The same connection and the other one both keep working.
        assert victim.add(4, 5) == 9
        assert bystander.add(6, 7) == 13
        metrics = sc.metrics()
        assert metrics.value("thrift_sidecar_requests_total", outcome="sidecar_error") == 1
        assert upstream.calls["add"] == 4
