"""Operating the sidecar: metrics, admin endpoints, logs, signals, generated references.

Everything here runs the real thing: ``python -m sidecar run`` as a
subprocess (`tests.support.sidecar.run_sidecar`), signalled by its PID, its
metrics fetched over HTTP and parsed with prometheus_client's parser, its log
read from its stderr. Upstreams are the thriftpy2 servers of
`tests.support.servers`, with the fault-injecting proxy of
`sidecar.testing.faults` in between where a test needs failures on cue.

Helpers shared by the modules:

- `rig`: upstream, fault proxy and sidecar, started together (from
  `tests.support.rig`, re-exported for the modules here).
- `scrape`: the families of one scrape, by name, parsed by prometheus_client.
- `send_garbage`: bytes that are not Thrift, on a fresh connection.
- `json_log` / `log_lines`: the sidecar's log, as parsed JSON or text lines.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.support.raw import raw_send
from tests.support.rig import rig as rig
from tests.support.sidecar import REPO_ROOT, SidecarProcess, http_get

IDL = str(REPO_ROOT / "idl" / "interop.thrift")
PREFIX = "thrift_sidecar_"

# Bytes no Thrift reader accepts: the first byte is neither a plausible frame
# length nor a binary-protocol version.
GARBAGE = b"\xff\xfe\xfd\xfc garbage, not thrift\r\n"


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
    return raw_send(address, data, timeout=timeout)


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
