"""The control listener: each action works, is logged and counted; readiness follows the upstream.

A real sidecar process in front of a fault proxy and a thriftpy2 upstream
(`tests.support.rig`), driven over HTTP on 127.0.0.1: POSTs to the control
listener, reads of ``/readyz``, ``/state`` and ``/metrics`` on the admin port.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import thriftpy2.thrift

from sidecar.admin.readiness import Readiness, no_fallback
from sidecar.config import config_warnings, load_config
from sidecar.errors import ConfigError
from sidecar.metrics import CONTROL_ACTIONS
from sidecar.resilience.breaker import Breaker
from tests.support.ops import IDL
from tests.support.rig import Rig, rig
from tests.support.sidecar import SidecarThread, base_config, free_port, http_get
from tests.support.wait import wait_until

TAE = thriftpy2.thrift.TApplicationException
ACTIONS = "thrift_sidecar_control_actions_total"


def post(url: str) -> tuple[int, str]:
    """(status, body) of a POST with an empty body; HTTP errors are returned, not raised."""
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def control_config(**extra: Any) -> dict[str, Any]:
    return {"control": {"listen": f"127.0.0.1:{free_port()}"}, **extra}


def control_url(r: Rig) -> str:
    return "http://" + str(r.sidecar.config["control"]["listen"])


def counted(r: Rig) -> dict[str, float]:
    metrics = r.metrics()
    return {a: metrics.value(ACTIONS, action=a) for a in CONTROL_ACTIONS}


def log_has(r: Rig, text: str) -> bool:
    return text in r.sidecar.log()


def test_each_action_works_is_logged_and_counted_and_the_metrics_port_refuses_posts() -> None:
    config = control_config(breaker={"fail_max": 5, "reset_timeout": "5m"})
    with rig(config) as r, r.client() as c:
        control = control_url(r)
        admin = r.sidecar.admin
        assert counted(r) == dict.fromkeys(CONTROL_ACTIONS, 0)  # the series exist at 0

        # GET changes nothing; an unknown path says what there is.
        status, body = http_get(control + "/readiness/fail")
        assert status == 405
        assert "only POST" in body
        status, body = post(control + "/nope")
        assert status == 404
        assert "/breakers/NAME/open" in body
        # The port Prometheus scrapes is read-only.
        for path in ("/readiness/fail", f"/breakers/{quote(r.breaker, safe='')}/open", "/metrics"):
            assert post(admin + path)[0] == 405
        assert http_get(admin + "/readyz") == (200, "ready\n")

        # Readiness failed on purpose, and back.
        assert post(control + "/readiness/fail") == (200, "failed readiness on purpose\n")
        status, body = http_get(admin + "/readyz")
        assert status == 503
        assert body.startswith("not ready: failed on purpose through the control listener by ")
        assert "127.0.0.1:" in body
        assert c.getItem(1).id == 1  # calls are still served: only readiness changed
        assert post(control + "/readiness/restore") == (200, "restored readiness\n")
        assert http_get(admin + "/readyz") == (200, "ready\n")

        # A breaker tripped and reset by hand.
        name = quote(r.breaker, safe="")
        assert post(control + f"/breakers/{name}/open") == (
            200,
            f"opened breaker {r.breaker} (was closed)\n",
        )
        assert r.state() == 2
        assert r.sidecar.state()["breakers"][0]["state"] == "open"
        with pytest.raises(TAE, match="circuit open"):
            c.getItem(2)
        # Not following the upstream (the default): still ready with the breaker open.
        assert http_get(admin + "/readyz")[0] == 200
        assert post(control + f"/breakers/{name}/close")[0] == 200
        assert r.state() == 0
        assert c.getItem(2).id == 2
        status, body = post(control + "/breakers/nosuch/open")
        assert status == 404
        assert r.breaker in body

        # The log level: debug lines appear only once asked for.
        r.plan.extend_schedule(["reset_before"])
        assert c.getItem(3).id == 3  # retried
        assert not log_has(r, "retrying getItem")
        assert post(control + "/log-level?level=verbose")[0] == 400
        assert post(control + "/log-level?level=DEBUG") == (
            200,
            "set the log level to debug (was info)\n",
        )
        r.plan.extend_schedule(["reset_before"])
        assert c.getItem(4).id == 4
        wait_until(lambda: log_has(r, "retrying getItem"), message="a debug line")
        assert post(control + "/log-level?level=info")[0] == 200

        # Each action carried out was counted once; refused ones were not.
        assert counted(r) == {
            "log_level": 2,
            "breaker_open": 1,
            "breaker_close": 1,
            "readiness_fail": 1,
            "readiness_restore": 1,
        }
        # ... and logged in one line: who, and what.
        lines = [
            line for line in r.sidecar.log().splitlines() if "sidecar.control: control:" in line
        ]
        whats = [line.split("control: 127.0.0.1:", 1)[1].split(" ", 1)[1] for line in lines]
        assert whats == [
            "failed readiness on purpose",
            "restored readiness",
            f"opened breaker {r.breaker} (was closed)",
            f"closed breaker {r.breaker} (was open)",
            "set the log level to debug (was info)",
            "set the log level to info (was debug)",
        ]


def test_readiness_follows_the_upstream_when_nothing_can_be_served() -> None:
    config = control_config(readiness={"require_upstream": True}, breaker={"reset_timeout": "5m"})
    with rig(config) as r, r.client() as c:
        control, admin = control_url(r), r.sidecar.admin
        name = quote(r.breaker, safe="")
        assert http_get(admin + "/readyz") == (200, "ready\n")
        assert post(control + f"/breakers/{name}/open")[0] == 200
        status, body = http_get(admin + "/readyz")
        assert status == 503
        assert body == (
            f"not ready: breaker {r.breaker} is open and no fallback can be served "
            "(no static reply configured, fallback cache empty)\n"
        )
        # A cached reply can be served: ready again with the breaker open.
        assert post(control + f"/breakers/{name}/close")[0] == 200
        assert http_get(admin + "/readyz")[0] == 200
        assert c.getItem(1).id == 1  # cached (getItem is idempotent)
        wait_until(lambda: r.sidecar.state()["fallback_store"]["entries"] == 1, message="cached")
        assert post(control + f"/breakers/{name}/open")[0] == 200
        assert http_get(admin + "/readyz") == (200, "ready\n")
        assert c.getItem(1).id == 1  # and it is served


def test_readiness_with_a_static_reply_stays_ready_with_the_breaker_open() -> None:
    config = control_config(
        idl=IDL,
        readiness={"require_upstream": True},
        breaker={"reset_timeout": "5m"},
        methods={"listItems": {"fallback": {"static": []}}},
    )
    with rig(config) as r, r.client() as c:
        assert post(control_url(r) + f"/breakers/{quote(r.breaker, safe='')}/open")[0] == 200
        assert r.state() == 2
        assert http_get(r.sidecar.admin + "/readyz") == (200, "ready\n")
        assert c.listItems(3) == []  # the static reply


# The rule on its own, and the config


def breaker(name: str, opened: bool) -> Breaker:
    b = Breaker(name, fail_max=1, reset_timeout=60, clock=lambda: 0.0)
    if opened:
        b.force_open()
    return b


def test_what_can_be_served_while_a_breaker_is_open() -> None:
    serve = ("breaker_open", "retries_exhausted")
    assert no_fallback("u", serve, [], 0) == "no static reply configured, fallback cache empty"
    assert no_fallback("u", serve, ["getItem"], 0) is None
    assert no_fallback("u", serve, [], 1) is None
    assert no_fallback("u", ("retries_exhausted",), ["getItem"], 5) == (
        "fallback.serve_on does not include breaker_open"
    )
    # breaker.scope: method: the breaker's own method must have the static reply.
    assert no_fallback("u/getItem", serve, ["Svc:getItem"], 0) is None
    assert no_fallback("u/getItem", serve, ["listItems"], 0) == (
        "no static reply for getItem, fallback cache empty"
    )
    readiness = Readiness()
    facts: dict[str, Any] = {"serve_on": serve, "static_methods": [], "cached_replies": 0}
    open_one = [breaker("a", False), breaker("b", True)]
    assert (
        readiness.problem(serving=True, require_upstream=False, breakers=open_one, **facts) is None
    )
    assert "breaker b is open" in str(
        readiness.problem(serving=True, require_upstream=True, breakers=open_one, **facts)
    )
    half_open = breaker("c", True)
    half_open._cb.half_open()
    assert (
        readiness.problem(serving=True, require_upstream=True, breakers=[half_open], **facts)
        is None
    )
    assert readiness.fail("127.0.0.1:5") is True
    assert "127.0.0.1:5" in str(
        readiness.problem(serving=True, require_upstream=False, breakers=[], **facts)
    )
    assert readiness.restore() is True
    assert readiness.problem(serving=False, require_upstream=False, breakers=[], **facts) == (
        "not serving calls (starting up or draining)"
    )


def test_control_listen_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("metrics: {listen: 127.0.0.1:7100}\ncontrol: {listen: 127.0.0.1:7100}\n")
    with pytest.raises(ConfigError, match=r"control\.listen: the control endpoint cannot share"):
        load_config(str(path), environ={})
    path.write_text("control: {listen: 0.0.0.0:7101}\nupstream: {addresses: [127.0.0.1:1]}\n")
    warnings = config_warnings(load_config(str(path), environ={}))
    assert any("control.listen (0.0.0.0:7101) is not a loopback address" in w for w in warnings)
    path.write_text("control: {listen: 127.0.0.1:7101}\nupstream: {addresses: [127.0.0.1:1]}\n")
    assert not [w for w in config_warnings(load_config(str(path), environ={})) if "control" in w]


def test_the_control_listener_is_off_when_null_and_named_in_the_start_line() -> None:
    upstream = [f"127.0.0.1:{free_port()}"]
    with SidecarThread(base_config(upstream, control={"listen": None})) as st:
        assert st.sidecar is not None
        assert st.sidecar.control_address is None
        assert st.call(lambda: st.sidecar.parts.control) is None  # type: ignore[union-attr]
    port = free_port()
    with SidecarThread(base_config(upstream, control={"listen": f"127.0.0.1:{port}"})) as st:
        assert st.sidecar is not None
        assert st.sidecar.control_address == ("127.0.0.1", port)
        assert post(f"http://127.0.0.1:{port}/readiness/fail")[0] == 200
        assert http_get(st.admin + "/readyz")[0] == 503
        assert st.call(lambda: st.sidecar.readiness.failed_by) is not None  # type: ignore[union-attr]
