"""A reload builds a new context: calls in flight finish on the one they started with.

A call is held at a real upstream (its ``getItem`` waits on a gate) while
`Sidecar.reload` applies a new config on the sidecar's loop. The held call
keeps the retry and fallback settings it started with; calls that start
after the reload, on connections opened before it too, get the new ones.
What each call got is read from the upstream's call count, the error text
the client receives and ``/metrics``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import thriftpy2.thrift
import yaml

from sidecar.app.reload import apply, kept_for_restart
from sidecar.config import SidecarConfig, load_config
from tests.support.clients import thriftpy2_client
from tests.support.gate import gate_of, gated_upstream
from tests.support.servers import Thriftpy2Server
from tests.support.sidecar import SidecarThread, base_config, merged
from tests.support.wait import wait_until

TAE = thriftpy2.thrift.TApplicationException
BASE: dict[str, Any] = {
    "breaker": {"fail_max": 1000},
    "retry": {
        "initial_backoff": "1ms",
        "deadline": "20s",
        "budget": {"min_retries_per_second": 1000},
    },
}


@pytest.fixture
def upstream() -> Iterator[Thriftpy2Server]:
    with gated_upstream() as server:
        yield server


def _load(tmp_path: Path, raw: dict[str, Any]) -> SidecarConfig:
    path = tmp_path / "reloaded.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(str(path), environ={})


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``call`` in a thread; the list gets its result or the exception it raised."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(call())
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _reload(sc: SidecarThread, new: SidecarConfig) -> list[str]:
    assert sc.sidecar is not None
    sidecar = sc.sidecar
    return sc.call(lambda: sidecar.reload(new))


def test_a_call_in_flight_keeps_its_retry_settings_and_new_calls_get_the_new_ones(
    upstream: Thriftpy2Server, tmp_path: Path
) -> None:
    before = base_config(
        [upstream.address],
        **merged(BASE, {"retry": {"max_attempts": 3, "per_try_timeout": "1s"}}),
    )
    after = merged(before, {"retry": {"max_attempts": 1, "per_try_timeout": "1.5s"}})
    gate = gate_of(upstream)
    with (
        SidecarThread(before) as sc,
        thriftpy2_client(sc.address, "framed", timeout=30) as held_client,
        thriftpy2_client(sc.address, "framed", timeout=30) as later_client,
    ):
        gate.close()
        thread, held = _in_thread(lambda: held_client.getItem(7))
        wait_until(lambda: upstream.calls["getItem"] == 1, message="the held call's first try")
        assert _reload(sc, _load(tmp_path, after)) == []
        assert thread.is_alive(), "the reload happened while the call was in flight"
        thread.join(15)
        [error] = held
        assert isinstance(error, TAE), error
        assert "did not reply within 1s (3 attempts)" in str(error.message)
        assert upstream.calls["getItem"] == 3

        with pytest.raises(TAE) as raised:
            later_client.getItem(8)
        assert "did not reply within 1.5s" in str(raised.value.message)
        assert "attempts" not in str(raised.value.message)
        assert upstream.calls["getItem"] == 4
        gate.open()
        metrics = sc.metrics()
        assert metrics.value("thrift_sidecar_retries_total", method="getItem") == 2
        assert sc.sidecar is not None
        assert sc.sidecar.config_version == 2


def test_a_call_in_flight_keeps_its_fallback_settings_and_new_calls_get_the_new_ones(
    upstream: Thriftpy2Server, tmp_path: Path
) -> None:
    before = base_config(
        [upstream.address],
        **merged(
            BASE,
            {
                "retry": {"max_attempts": 1, "per_try_timeout": "1s"},
                "fallback": {"serve_on": ["retries_exhausted"]},
            },
        ),
    )
    after = merged(before, {"fallback": {"serve_on": []}})
    gate = gate_of(upstream)
    with (
        SidecarThread(before) as sc,
        thriftpy2_client(sc.address, "framed", timeout=30) as client,
        thriftpy2_client(sc.address, "framed", timeout=30) as held_client,
    ):
        assert client.getItem(7).id == 7  # remembered for the fallback
        gate.close()
        thread, held = _in_thread(lambda: held_client.getItem(7))
        wait_until(lambda: upstream.calls["getItem"] == 2, message="the held call at the upstream")
        _reload(sc, _load(tmp_path, after))
        assert thread.is_alive(), "the reload happened while the call was in flight"
        thread.join(15)
        [item] = held
        assert not isinstance(item, Exception), f"the held call lost its fallback: {item}"
        assert item.id == 7

        with pytest.raises(TAE) as raised:  # started after the reload: no fallback any more
            client.getItem(7)
        assert "did not reply within 1s" in str(raised.value.message)
        gate.open()
        metrics = sc.metrics()
        assert metrics.value("thrift_sidecar_fallback_replies_total", source="cache") == 1


def test_a_reload_changes_no_key_that_needs_a_restart(tmp_path: Path) -> None:
    old = _load(tmp_path, base_config(["127.0.0.1:9"]))
    raw = merged(
        base_config(["127.0.0.1:10"]),
        {"retry": {"max_attempts": 5}, "breaker": {"scope": "method"}},
    )
    new, ignored = kept_for_restart(old, _load(tmp_path, raw))
    assert set(ignored) == {"listen", "upstream", "metrics", "control", "breaker.scope"}
    assert new.listen == old.listen
    assert new.upstream == old.upstream
    assert new.breaker.scope == old.breaker.scope
    assert new.retry.max_attempts == 5


def test_apply_to_a_sidecar_not_started_is_refused(tmp_path: Path) -> None:
    from sidecar.app import Sidecar

    config = _load(tmp_path, base_config(["127.0.0.1:9"]))
    with pytest.raises(RuntimeError, match="not running"):
        apply(Sidecar(config), config)
