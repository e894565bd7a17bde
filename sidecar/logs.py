"""Logging set-up: text or JSON lines on stderr, and a rate limiter for floods.

Every line names what happened and to what (an upstream, a method, a peer), so
that an operator can act on it without reading code.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure_logging(level: str, fmt: str) -> None:
    """Send the sidecar's logs to stderr at ``level`` in ``text`` or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger("sidecar")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class RateLimitedLog:
    """Lets at most ``burst`` lines per ``period`` seconds through, then summarises.

    A flood of garbage from clients must not flood the log: after the burst,
    lines are counted, and the next line let through says how many were
    suppressed.
    """

    def __init__(self, logger: logging.Logger, burst: int = 10, period: float = 10.0) -> None:
        self._logger = logger
        self._burst = burst
        self._period = period
        self._window_start = -period
        self._in_window = 0
        self.suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window_start >= self._period:
            self._window_start = now
            self._in_window = 0
        if self._in_window >= self._burst:
            self.suppressed += 1
            return
        self._in_window += 1
        if self.suppressed:
            message += " (%d similar lines suppressed)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self._logger.warning(message, *args)
