"""The control listener: changes by hand to a running sidecar, POST only.

- ``POST /log-level?level=debug``: the least severe level logged (until a
  restart, or a reload whose ``log`` section changed);
- ``POST /breakers/NAME/open`` and ``/breakers/NAME/close``: trip or reset a
  breaker (NAME as ``/state`` and the metrics show it, percent-encoded if
  need be); an opened breaker lets a probe through after
  ``breaker.reset_timeout``, as after real failures;
- ``POST /readiness/fail`` and ``/readiness/restore``: ``/readyz`` answers
  503 (to drain the pod) and back.

Each action done is logged in one line saying who (the peer address) did
what, and counted in ``thrift_sidecar_control_actions_total{action}``. It
listens on ``control.listen``, loopback by default, apart from the admin
port that Prometheus scrapes, which stays read-only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from sidecar.admin.listener import Answer, HttpServer, Request, text
from sidecar.admin.readiness import Readiness
from sidecar.metrics import SidecarMetrics
from sidecar.resilience.breaker import Breaker

log = logging.getLogger("sidecar.control")

LEVELS = ("debug", "info", "warning", "error")
USAGE = (
    "POST /log-level?level=LEVEL, /breakers/NAME/open, /breakers/NAME/close, "
    "/readiness/fail or /readiness/restore"
)


class ControlServer(HttpServer):
    """Serves the control endpoints (see the module docstring).

    Args:
        metrics: where actions are counted.
        breakers: returns every breaker of the running sidecar.
        readiness: the readiness to fail and restore.
        logger: the logger whose level ``/log-level`` sets.
        limits: see `HttpServer`.
    """

    name = "control"

    def __init__(
        self,
        metrics: SidecarMetrics,
        breakers: Callable[[], list[Breaker]],
        readiness: Readiness,
        *,
        logger: logging.Logger | None = None,
        **limits: Any,
    ) -> None:
        super().__init__(**limits)
        self._metrics = metrics
        self._breakers = breakers
        self._readiness = readiness
        self._logger = logger or logging.getLogger("sidecar")

    def route(self, request: Request) -> Answer:
        if request.method != "POST":
            return text(405, f"only POST: {USAGE}", [("Allow", "POST")])
        path = request.path
        if path == "/log-level":
            return self._log_level(request)
        if path == "/readiness/fail":
            self._readiness.fail(request.peer)
            return self._done(request, "readiness_fail", "failed readiness on purpose")
        if path == "/readiness/restore":
            self._readiness.restore()
            return self._done(request, "readiness_restore", "restored readiness")
        if path.startswith("/breakers/"):
            name, _, verb = path.removeprefix("/breakers/").rpartition("/")
            if verb in ("open", "close") and name:
                return self._breaker(request, unquote(name), verb)
        return text(404, f"not found: {USAGE}")

    def _log_level(self, request: Request) -> Answer:
        level = (request.query.get("level") or [""])[-1].lower()
        if level not in LEVELS:
            return text(400, f"level must be one of {', '.join(LEVELS)} (?level=debug)")
        was = logging.getLevelName(self._logger.level).lower()
        answer = self._done(request, "log_level", f"set the log level to {level} (was {was})")
        self._logger.setLevel(level.upper())
        return answer

    def _breaker(self, request: Request, name: str, verb: str) -> Answer:
        breakers = {b.name: b for b in self._breakers()}
        breaker = breakers.get(name)
        if breaker is None:
            known = ", ".join(sorted(breakers)) or "none yet"
            return text(404, f"no breaker named {name!r}; breakers: {known}")
        was = breaker.state
        if verb == "open":
            breaker.force_open()
        else:
            breaker.force_close()
        done = "opened" if verb == "open" else "closed"
        return self._done(request, f"breaker_{verb}", f"{done} breaker {name} (was {was})")

    def _done(self, request: Request, action: str, what: str) -> Answer:
        """Log and count an action carried out; the answer says what was done."""
        self._metrics.control_actions.labels(action).inc()
        log.warning(
            "control: %s %s", request.peer, what, extra={"peer": request.peer, "action": action}
        )
        return text(200, what)
