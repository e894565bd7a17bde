"""Declared exceptions classified by name, through a real sidecar and the interop IDL.

getItem(BUSY_ITEM_ID) always throws ServiceBusy (field 2 of its result),
getItem(-1) NotFound (field 1). With ``retry_on_exceptions: [ServiceBusy]``
and ``breaker.failure_exceptions: [ServiceBusy]`` the first is retried and
counts as a breaker failure; the second stays an answer.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.handler import BUSY_ITEM_ID
from tests.support.idl import load_thriftpy2_interop
from tests.support.ops import IDL
from tests.support.rig import rig

CONFIG: dict[str, Any] = {
    "idl": IDL,
    "retry": {"max_attempts": 3, "initial_backoff": "1ms", "per_try_timeout": "3s"},
    "breaker": {"fail_max": 2, "reset_timeout": "60s", "failure_exceptions": ["ServiceBusy"]},
    "fallback": {"serve_on": []},
    "methods": {"getItem": {"retry_on_exceptions": ["ServiceBusy"]}},
}


def test_named_exceptions_are_retried_and_count_as_failures_others_stay_answers() -> None:
    idl = load_thriftpy2_interop()
    with rig(CONFIG) as r, r.client() as client:
        calls = r.upstream.calls
        with pytest.raises(idl.NotFound):
            client.getItem(-1)
        assert calls["getItem"] == 1  # an answer: not retried
        assert r.state() == 0
        with pytest.raises(idl.ServiceBusy):
            client.getItem(BUSY_ITEM_ID)
        assert calls["getItem"] == 1 + 3  # retried up to max_attempts, the last one returned
        m = r.metrics()
        assert m.value("thrift_sidecar_retries_total", reason="declared_exception") == 2
        assert m.value("thrift_sidecar_breaker_consecutive_failures", breaker=r.breaker) == 1
        with pytest.raises(idl.ServiceBusy):
            client.getItem(BUSY_ITEM_ID)
        assert r.state() == 2  # fail_max 2: two calls that ended in ServiceBusy
