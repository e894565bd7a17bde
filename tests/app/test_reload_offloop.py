"""SIGHUP reads the file off the event loop, and a rejected reload keeps secrets out of sight.

- `Reloads` loads the config in a worker thread: while a slow load (a big IDL,
  a slow disk) is in progress, calls keep being answered; the new config is
  applied on the loop when the load returns. Before, the load ran on the loop
  and every call waited for it.
- A config whose error message quotes a URL with a password (a mistyped
  ``state.redis_url``) is rejected without the password reaching ``/state``
  or the log.
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

from sidecar.app.reload import Reloads
from sidecar.config import SidecarConfig, load_config, redact
from tests.support.clients import thriftpy2_client
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import SidecarThread, base_config, http_get, run_sidecar
from tests.support.wait import wait_until

SECRET = "hunter2-not-for-logs"


def test_redact_hides_url_passwords_only() -> None:
    assert (
        redact(f"got 'redis://:{SECRET}@10.0.0.1:6379/0'") == "got 'redis://:***@10.0.0.1:6379/0'"
    )
    assert redact(f"rediss://app:{SECRET}@cache:6380") == "rediss://app:***@cache:6380"
    assert (
        redact("http://user@host/path and 127.0.0.1:9090")
        == "http://user@host/path and 127.0.0.1:9090"
    )
    assert redact("no url here: a:b@c") == "no url here: a:b@c"


def test_calls_are_answered_while_a_reload_is_loading() -> None:
    loading = threading.Event()
    release = threading.Event()
    with thriftpy2_server("framed") as upstream:
        config = base_config([upstream.address])
        with SidecarThread(config) as st, thriftpy2_client(st.address, "framed") as client:
            new = load_config(
                None, environ={}, overrides={("upstream", "addresses"): [upstream.address]}
            ).model_copy(update={"max_connections": 77})

            def slow_load() -> tuple[SidecarConfig, dict[str, Any]]:
                loading.set()
                assert release.wait(10.0), "the test never released the load"
                return new, {}

            reloads = st.call(lambda: Reloads(st.sidecar, slow_load))
            st.call(reloads.request)
            assert loading.wait(10.0)
            try:
                # The loop is free while the file loads: calls go through.
                for i in range(5):
                    assert client.add(i, 1) == i + 1
                assert st.sidecar.config_version == 1
            finally:
                release.set()
            wait_until(lambda: st.sidecar.config_version == 2, timeout=10.0, message="applied")
            assert st.sidecar.config.max_connections == 77
            st.run(reloads.close())


def test_a_rejected_reload_keeps_the_password_out_of_state_and_log() -> None:
    with thriftpy2_server("framed") as upstream, run_sidecar([upstream.address]) as sc:
        broken = dict(sc.config)
        broken["state"] = {"redis_url": f"http://:{SECRET}@127.0.0.1:6379/0"}
        sc.write_config(broken)
        sc.signal(signal.SIGHUP)

        def rejected() -> dict[str, Any] | None:
            status, body = http_get(sc.admin + "/state")
            config = json.loads(body)["config"]
            return config if status == 200 and config["reloads_failed"] == 1 else None

        config = wait_until(rejected, timeout=10.0, message="the reload rejected")
        assert config is not None
        assert "state.redis_url" in config["last_reload_error"]
        assert "http://:***@127.0.0.1:6379/0" in config["last_reload_error"]
        assert SECRET not in json.dumps(config)
        wait_until(lambda: "config reload rejected" in sc.log(), timeout=10.0, message="log")
        assert SECRET not in sc.log()
