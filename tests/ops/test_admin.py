"""The admin endpoint: /metrics on its own registry, /healthz, /readyz, /state.

``/readyz`` answering 503 while draining is checked in test_drain_reload.py,
where a drain happens.
"""

from __future__ import annotations

import copy
import datetime
import signal
import socket
from typing import Any

import pytest
import thriftpy2.thrift
from prometheus_client import REGISTRY

from sidecar import __version__
from sidecar.metrics import SidecarMetrics
from tests.ops import rig
from tests.support.clients import split_address, thriftpy2_client
from tests.support.raw import encode_call, raw_call
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import Metrics, SidecarThread, base_config, http_get
from tests.support.wait import wait_until

TAE = thriftpy2.thrift.TApplicationException


def _http(address: str, request: bytes) -> bytes:
    """Send a raw HTTP request to ``http://host:port`` and read the whole answer."""
    host, port = split_address(address.removeprefix("http://"))
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_metrics_live_in_their_own_registry_and_endpoints_answer() -> None:
    with (
        thriftpy2_server("framed") as upstream,
        SidecarThread(base_config([upstream.address])) as st,
    ):
        with thriftpy2_client(st.address, "framed") as c:
            assert c.add(2, 3) == 5
        status, body = http_get(st.admin + "/metrics")
        assert status == 200
        assert Metrics(body).value("thrift_sidecar_requests_total", method="add", outcome="ok") == 1
        # Only the sidecar's own metrics: no process or Python collectors.
        assert "python_info" not in body
        assert "process_cpu_seconds_total" not in body
        # ... and none of them in prometheus_client's global registry.
        global_names = [m.name for m in REGISTRY.collect()]
        assert global_names, "the global registry has its default collectors"
        assert not [n for n in global_names if n.startswith("thrift_sidecar_")]
        SidecarMetrics()  # a second set in this process does not collide
        SidecarMetrics()

        assert http_get(st.admin + "/healthz") == (200, "ok\n")
        assert http_get(st.admin + "/readyz") == (200, "ready\n")
        status, body = http_get(st.admin + "/nope")
        assert status == 404
        assert "/metrics" in body
        answer = _http(st.admin, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 405 ")
        answer = _http(st.admin, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"text/plain" in head
        assert rest == b""
        answer = _http(st.admin, b"GET /" + b"x" * 10_000 + b" HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")


FAIL_MAX = 2
RESET_TIMEOUT = 60.0
STATE_CONFIG: dict[str, Any] = {
    "breaker": {"fail_max": FAIL_MAX, "reset_timeout": f"{RESET_TIMEOUT:g}s"},
    # No floor and a long window: the token count is exactly ratio * calls.
    "retry": {"budget": {"ratio": 0.2, "min_retries_per_second": 0, "window": "5m"}},
    "fallback": {"serve_on": ["breaker_open"]},
}


def test_state_document_after_traffic_and_reloads() -> None:
    with rig(STATE_CONFIG) as r, thriftpy2_client(r.sidecar.address, "framed") as c:
        assert c.getItem(1).id == 1
        r.proxy.plan.extend_schedule(["internal_error"] * FAIL_MAX)
        for _ in range(FAIL_MAX):
            with pytest.raises(TAE):
                c.getItem(3)
        assert c.getItem(1).id == 1  # the cached reply, while open
        with pytest.raises(TAE, match="circuit open"):
            c.getItem(9)
        r.sidecar.signal(signal.SIGHUP)  # the same file: a reload that changes nothing
        wait_until(lambda: r.sidecar.state()["config_version"] == 2, message="reloaded")
        item = raw_call(r.upstream.address, encode_call("getItem", {"id": 1}), "framed")
        state = wait_until(
            lambda: (s := r.sidecar.state())["client_connections"] == 1 and s,
            message="one client connected",
        )

        assert set(state) == {
            "version",
            "config_version",
            "ready",
            "uptime_seconds",
            "listen",
            "upstream",
            "breakers",
            "pools",
            "retry_budget",
            "fallback_store",
            "fallback_store_losses",
            "shared_state",
            "config",
            "method_labels",
            "client_connections",
        }
        assert state["version"] == __version__
        assert state["ready"] is True
        assert state["uptime_seconds"] > 0
        assert state["listen"] == r.sidecar.address
        assert state["upstream"] == {
            "name": r.upstream_address,
            "addresses": [r.upstream_address],
            "ejected": [],
        }

        [breaker] = state["breakers"]
        last_opened = breaker.pop("last_opened")
        probe_in = breaker.pop("probe_in_seconds")
        assert breaker == {
            "name": r.upstream_address,
            "state": "open",
            "consecutive_failures": FAIL_MAX,
            "half_open_successes": 0,
            "probes_in_flight": 0,
            "rejected_calls": 2,
            "transitions": {"closed->open": 1},
            "fail_max": FAIL_MAX,
            "reset_timeout_seconds": RESET_TIMEOUT,
        }
        opened = datetime.datetime.fromisoformat(last_opened)
        age = (datetime.datetime.now(datetime.UTC) - opened).total_seconds()
        assert 0 <= age < RESET_TIMEOUT
        assert RESET_TIMEOUT - age - 1 <= probe_in <= RESET_TIMEOUT - age + 1

        assert state["pools"] == [
            {
                "address": r.upstream_address,
                "transport": "framed",
                "open": 1,
                "idle": 1,
                "busy": 0,
                "max": 64,
                "ejected": False,
            }
        ]
        assert state["retry_budget"] == {
            "tokens": 0.6,  # 3 calls were let through, 0.2 each
            "exhausted_total": 0,
            "ratio": 0.2,
            "min_retries_per_second": 0.0,
            "window_seconds": 300.0,
        }
        assert state["fallback_store"] == {
            "backend": "memory",
            "entries": 1,
            "bytes": len("getItem|") + 32 + 300 + len(item),
            "healthy": True,
        }
        assert state["fallback_store_losses"] == {
            "dropped_writes": 0,
            "failed_writes": 0,
            "missed_reads": 0,
        }
        assert state["config"] == {
            "version": 2,
            "reloads_ok": 1,
            "reloads_failed": 0,
            "last_reload_error": None,
            "restart_needed_for": [],
        }
        assert state["shared_state"] == {"enabled": False}  # local mode
        assert state["method_labels"] == {"in_use": 1, "max": 200}  # getItem

        # A rejected reload is in the document; a listen change waits for a restart.
        broken = copy.deepcopy(r.sidecar.config)
        broken["retry"]["max_attempts"] = 0
        r.sidecar.write_config(broken)
        r.sidecar.signal(signal.SIGHUP)
        config = wait_until(
            lambda: (s := r.sidecar.state()["config"])["reloads_failed"] == 1 and s,
            message="rejected reload",
        )
        assert config["version"] == 2
        assert "retry.max_attempts" in config["last_reload_error"]
        moved = copy.deepcopy(r.sidecar.config)
        moved["listen"] = "127.0.0.1:1"
        r.sidecar.write_config(moved)
        r.sidecar.signal(signal.SIGHUP)
        config = wait_until(
            lambda: (s := r.sidecar.state()["config"])["version"] == 3 and s,
            message="third version",
        )
        assert config["restart_needed_for"] == ["listen"]
        assert config["last_reload_error"] is None
        assert r.sidecar.state()["listen"] == r.sidecar.address
