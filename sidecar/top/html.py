"""The admin port's index page: links to the endpoints and the table of ``sidecar top``.

Rendered on the server, refreshed by the browser (a ``refresh`` meta tag);
no script. Every value that comes from the wire or the config (method and
breaker names, addresses, the version) is escaped with `html.escape`.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from sidecar.top import screen
from sidecar.top.table import Table

ENDPOINTS = (
    ("/metrics", "metrics (Prometheus text or OpenMetrics)"),
    ("/healthz", "liveness"),
    ("/readyz", "readiness, and why not"),
    ("/state", "state (JSON): breakers, pools, budget, cache, config"),
)

_STYLE = (
    "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "th,td{padding:.2em .8em;text-align:right;border-bottom:1px solid #ddd}"
    "th:first-child,td:first-child{text-align:left;font-family:monospace}"
    ".bad{color:#b00;font-weight:bold}"
)


def _table(headings: tuple[str, ...], rows: Sequence[tuple[str, ...]], bad: set[int]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headings)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="bad"' if i in bad else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>")
    if not rows:
        body.append(f'<tr><td colspan="{len(headings)}">none yet</td></tr>')
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def render_index(frame: Table, refresh: int = 2) -> str:
    """The whole page; ``refresh`` is seconds between the browser's reloads."""
    s = frame.state
    links = "".join(
        f'<li><a href="{escape(path)}">{escape(path)}</a> {escape(what)}</li>'
        for path, what in ENDPOINTS
    )
    methods = [
        (
            r.method,
            screen.rate(r.calls_per_second),
            screen.success(r.success),
            screen.rate(r.errors_per_second),
            screen.rate(r.retries_per_second),
            screen.rate(r.fallbacks_per_second),
            screen.latency(r.p50),
            screen.latency(r.p99),
        )
        for r in frame.methods
    ]
    breakers = [
        (
            b.name,
            b.state,
            str(b.failures),
            str(b.rejected),
            "-" if b.probe_in is None else f"{b.probe_in:.1f}s",
        )
        for b in frame.breakers
    ]
    addresses = [
        (a.address, "ejected" if a.ejected else "no", str(a.open), str(a.busy))
        for a in frame.addresses
    ]
    ready = "ready" if s.get("ready") else "not ready"
    uptime = screen.duration(float(s.get("uptime_seconds") or 0))
    summary = (
        f"version {s.get('version', '?')}, up {uptime}"
        f", {ready}, config version {s.get('config_version', '?')}, "
        f"{s.get('client_connections', 0)} client connections; rates over {frame.interval:.1f}s"
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{int(refresh)}">'
        f"<title>thrift-sidecar</title><style>{_STYLE}</style></head><body>"
        f"<h1>thrift-sidecar</h1><p>{escape(summary)}</p><ul>{links}</ul>"
        "<h2>Methods</h2>"
        + _table(("method", *(h.lower() for h in screen.METHOD_HEADINGS)), methods, set())
        + "<h2>Breakers</h2>"
        + _table(
            ("breaker", "state", "failures", "rejected", "probe in"),
            breakers,
            {i for i, b in enumerate(frame.breakers) if b.state != "closed"},
        )
        + "<h2>Upstream addresses</h2>"
        + _table(
            ("address", "ejected", "open", "busy"),
            addresses,
            {i for i, a in enumerate(frame.addresses) if a.ejected},
        )
        + "</body></html>\n"
    )
