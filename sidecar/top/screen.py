"""One frame of ``sidecar top`` as plain text, and the formats the index page shares.

Method names and breaker names arrive from the wire or the config: before
they reach a terminal, anything that is not a printable character (an
escape sequence, a newline) is shown as ``\\xNN`` (`printable`).
"""

from __future__ import annotations

from sidecar.top.table import Table

METHOD_WIDTH = 32
METHOD_HEADINGS = (
    "CALLS/S",
    "SUCCESS",
    "ERRORS/S",
    "RETRIES/S",
    "FALLBACKS/S",
    "P50",
    "P99",
)


def printable(text: str) -> str:
    """``text`` with every non-printable character written as an escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters (an ellipsis marks the cut)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def rate(value: float) -> str:
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def success(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def latency(seconds: float | None) -> str:
    """``0.42ms``, ``12ms``, ``1.5s``; ``-`` when nothing was measured."""
    if seconds is None:
        return "-"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 0.01:
        return f"{seconds * 1000:.2f}ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds:.2f}s"


def duration(seconds: float) -> str:
    """Uptime as ``1h02m03s``."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def method_cells(row_method: str, cells: tuple[str, ...]) -> str:
    name = fit(printable(row_method), METHOD_WIDTH)
    return f"{name:<{METHOD_WIDTH}}" + "".join(f"{c:>12}" for c in cells)


def render(frame: Table, source: str) -> str:
    """The frame as lines of text (no terminal control codes)."""
    s = frame.state
    ready = "ready" if s.get("ready") else "NOT READY"
    lines = [
        f"thrift-sidecar {s.get('version', '?')}  {source}  up "
        f"{duration(float(s.get('uptime_seconds') or 0))}  {ready}  "
        f"config v{s.get('config_version', '?')}  clients {s.get('client_connections', 0)}  "
        f"rates over {frame.interval:.1f}s",
        "",
        method_cells("METHOD", METHOD_HEADINGS),
    ]
    for r in frame.methods:
        cells = (
            rate(r.calls_per_second),
            success(r.success),
            rate(r.errors_per_second),
            rate(r.retries_per_second),
            rate(r.fallbacks_per_second),
            latency(r.p50),
            latency(r.p99),
        )
        lines.append(method_cells(r.method, cells))
    if not frame.methods:
        lines.append("(no calls yet)")
    lines += ["", f"{'BREAKER':<40}{'STATE':>10}{'FAILURES':>10}{'REJECTED':>10}{'PROBE IN':>10}"]
    for b in frame.breakers:
        probe = "-" if b.probe_in is None else f"{b.probe_in:.1f}s"
        state = b.state.upper() if b.state != "closed" else b.state
        name = fit(printable(b.name), 40)
        lines.append(f"{name:<40}{state:>10}{b.failures:>10}{b.rejected:>10}{probe:>10}")
    lines += ["", f"{'UPSTREAM':<40}{'EJECTED':>10}{'OPEN':>10}{'BUSY':>10}"]
    for a in frame.addresses:
        ejected = "EJECTED" if a.ejected else "no"
        lines.append(f"{fit(printable(a.address), 40):<40}{ejected:>10}{a.open:>10}{a.busy:>10}")
    budget = s.get("retry_budget") or {}
    store = s.get("fallback_store") or {}
    lines += [
        "",
        f"retry budget {budget.get('tokens', '?')} tokens   fallback cache "
        f"{store.get('entries', '?')} entries ({store.get('backend', '?')})",
    ]
    return "\n".join(lines) + "\n"
