"""Operating the sidecar: metrics, admin endpoints, logs, signals, generated references.

Everything here runs the real thing: ``python -m sidecar run`` as a
subprocess (`tests.support.sidecar.run_sidecar`), signalled by its PID, its
metrics fetched over HTTP and parsed with prometheus_client's parser, its log
read from its stderr. Upstreams are the thriftpy2 servers of
`tests.support.servers`, with the fault-injecting proxy of
`sidecar.demo.faults` in between where a test needs failures on cue.

Helpers shared by the modules:

- `rig`: upstream, fault proxy and sidecar, started together.
- `scrape`: the families of one scrape, by name, parsed by prometheus_client.
- `send_garbage`: bytes that are not Thrift, on a fresh connection.
- `json_log` / `log_lines`: the sidecar's log, as parsed JSON or text lines.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from sidecar.demo.faults import FaultPlan, FaultProxyThread
from tests.support.clients import split_address
from tests.support.servers import Thriftpy2Server, thriftpy2_server
from tests.support.sidecar import REPO_ROOT, SidecarProcess, http_get, run_sidecar

IDL = str(REPO_ROOT / "idl" / "interop.thrift")
PREFIX = "thrift_sidecar_"

# Bytes no Thrift reader accepts: the first byte is neither a plausible frame
# length nor a binary-protocol version.
GARBAGE = b"\xff\xfe\xfd\xfc garbage, not thrift\r\n"


@dataclass
class Rig:
    """client -> sidecar -> fault proxy -> thriftpy2 upstream (framed)."""

    upstream: Thriftpy2Server
    proxy: FaultProxyThread
    sidecar: SidecarProcess

    @property
    def upstream_address(self) -> str:
        """The address the sidecar forwards to (the proxy's)."""
        return self.proxy.address


@contextlib.contextmanager
def rig(
    config: dict[str, Any] | None = None,
    *,
    args: list[str] | None = None,
    extra_upstreams: list[str] | None = None,
) -> Iterator[Rig]:
    """Start an upstream, a fault proxy in front of it and a sidecar in front of that.

    Args:
        config: merged into `tests.support.sidecar.base_config`.
        args: extra ``sidecar run`` arguments (``--log-format json`` ...).
        extra_upstreams: more upstream addresses after the proxy's.
    """
    with (
        thriftpy2_server("framed") as upstream,
        FaultProxyThread(upstream.address, "framed", FaultPlan()) as proxy,
        run_sidecar([proxy.address, *(extra_upstreams or [])], config=config, args=args) as sidecar,
    ):
        yield Rig(upstream, proxy, sidecar)


def scrape(sidecar: SidecarProcess) -> dict[str, Metric]:
    """GET /metrics, parsed by ``prometheus_client.parser``: families by name.

    Counter families are named without ``_total`` by the parser; their
    samples keep it.
    """
    status, body = http_get(sidecar.admin + "/metrics")
    assert status == 200, body
    return {family.name: family for family in text_string_to_metric_families(body)}


def sample(families: dict[str, Metric], name: str, suffix: str = "", **labels: str) -> float | None:
    """The value of the one sample of family ``name`` with exactly ``labels``, else None."""
    family = families[name]
    for s in family.samples:
        if s.name == name + suffix and s.labels == labels:
            return float(s.value)
    return None


def label_sets(family: Metric) -> set[tuple[tuple[str, str], ...]]:
    """The distinct label sets of a family's series (``le`` of histogram buckets left out)."""
    return {tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")) for s in family.samples}


def send_garbage(address: str, data: bytes = GARBAGE, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a new connection and read until the sidecar closes it."""
    chunks = []
    with socket.create_connection(split_address(address), timeout=timeout) as sock:
        sock.sendall(data)
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def log_lines(sidecar: SidecarProcess) -> list[str]:
    """The sidecar's log so far, one entry per line."""
    return sidecar.log().splitlines()


def json_log(sidecar: SidecarProcess) -> list[dict[str, Any]]:
    """The sidecar's JSON log so far; every line must parse as a JSON object."""
    records = []
    for line in log_lines(sidecar):
        record = json.loads(line)
        assert isinstance(record, dict), line
        records.append(record)
    return records
