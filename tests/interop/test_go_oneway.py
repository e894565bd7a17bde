"""The official Go library's oneway call, sent as CALL, with no call after it for a while.

The Go library sends a oneway method as a CALL and reads no reply. A Go
client that notifies and then makes no call until the sidecar's per-try
timeout has passed must find its connection as it left it: its next call's
reply, and nothing in front of it. The sidecar has no IDL here and no next
call to learn from, so it learns that ``notify`` is oneway from its own probe
(`sidecar.proxy.oneway_probe`). Before the probe, the per-try timeout fired,
the client was sent an error reply it never asked for, and the Go library
took it for the reply to its next call ("out of order sequence response").
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from typing import Any

import pytest

from tests.interop.conftest import Clients
from tests.interop.matrix import Wire
from tests.interop.upstream import WireUpstream
from tests.support.clients import split_address
from tests.support.sidecar import SidecarProcess, run_sidecar
from tests.support.wait import wait_until

REQUESTS = "thrift_sidecar_requests_total"


def check_lines(proc: subprocess.Popen[str], count: int, timeout: float) -> list[dict[str, Any]]:
    """The client's next ``count`` check lines, within ``timeout`` s (read off its stdout
    a byte at a time: a buffered read could take a line the next call waits for)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    lines: list[dict[str, Any]] = []
    line = b""
    while len(lines) < count:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        assert ready, f"{len(lines)} of {count} lines from the Go client within {timeout}s"
        byte = os.read(fd, 1)
        assert byte, f"the Go client ended after {len(lines)} of {count} lines"
        if byte == b"\n":
            lines.append(json.loads(line))
            line = b""
        else:
            line += byte
    return lines


def settled(sidecar: SidecarProcess) -> bool:
    """Has the sidecar decided about the notify in flight: learned oneway, or timed out?"""
    learned = sidecar.state()["oneway"]["learned_oneway"]
    timed_out = sidecar.metrics().value(REQUESTS, method="notify", outcome="timeout")
    return bool(learned or timed_out)


# Every plaintext wire: the probe goes in the upstream's protocol and transport.
WIRES = [
    Wire(protocol, transport, False)
    for protocol in ("binary", "compact")
    for transport in ("framed", "buffered", "header")
]


@pytest.mark.parametrize("wire", WIRES, ids=str)
def test_a_go_client_silent_after_a_oneway_call_gets_its_next_reply(
    clients: Clients, wire: Wire
) -> None:
    command = clients.command("go")  # a build failure is not the sidecar's
    config = {"retry": {"per_try_timeout": "1s", "deadline": "2s"}}
    with (
        WireUpstream(wire) as upstream,
        run_sidecar([upstream.address], config=config) as sidecar,
    ):
        host, port = split_address(sidecar.address)
        proc = subprocess.Popen(
            [*command, host, str(port), wire.protocol, wire.transport, "off", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "INTEROP_SCENARIO": "lone-oneway"},
        )
        try:
            assert check_lines(proc, 2, 60.0) == [
                {"lang": "go", "check": "connect", "ok": True},
                {"lang": "go", "check": "loneOneway", "ok": True},
            ]
            wait_until(lambda: len(upstream.notifications) == 1, message="notify delivered")
            # The client stays silent until the sidecar has made up its mind about the
            # notify: learned it (with the probe, at once) or failed it (without, 1 s on).
            wait_until(lambda: settled(sidecar), timeout=10.0, message="notify settled")
            out, err = proc.communicate("\n", timeout=30.0)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert lines == [{"lang": "go", "check": "callAfterLoneOneway", "ok": True}], err
        assert proc.returncode == 0
        assert sidecar.state()["oneway"]["learned_oneway"] == ["notify"]
        metrics = sidecar.metrics()
        assert metrics.value(REQUESTS, method="notify", outcome="ok") == 1
        assert metrics.value(REQUESTS, method="notify") == 1  # no timeout, nothing else
        assert metrics.value(REQUESTS, method="add", outcome="ok") == 1
