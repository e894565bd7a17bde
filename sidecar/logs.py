"""Logging set-up: text or JSON lines on stderr, and a rate limiter for floods.

`configure_logging` sends the ``sidecar`` loggers to stderr as ``text`` or
``json`` (one object per line, with the ``extra`` fields as keys of their
own). `RateLimitedLog` guards lines that a peer can cause at will: after a
burst it says it is suppressing, then how many it suppressed; the metrics
stay exact. Formats, fields and limits: docs/logging.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# With workers: N, a worker's lines say which worker wrote them.
WORKER_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [worker %(worker)d]: %(message)s"

# This process's worker index (`set_worker`); None outside ``workers: N``.
_worker: int | None = None


def set_worker(index: int) -> None:
    """Mark every line this process logs from now on as worker ``index``'s: text
    lines say ``[worker N]``, JSON lines carry ``"worker": N``."""
    global _worker
    _worker = index


class _WorkerField(logging.Filter):
    """Puts the worker index on each record (the ``worker`` field)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


# Control characters (C0, DEL, C1) and line separators as a text line shows them.
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROLS.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
_CONTROLS.update({0x2028: "\\u2028", 0x2029: "\\u2029"})  # line and paragraph separators


class TextFormatter(logging.Formatter):
    """The text format: one line per record, whatever the message quotes.

    Messages quote what peers send (method names, an upstream's error text):
    a line break in one would start a line of the peer's making. Control
    characters in the formatted line are written as escapes (``\\n``,
    ``\\x1b``); a traceback, appended after it, keeps its own lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        return line if line.isprintable() else line.translate(_CONTROLS)


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
    """Send the sidecar's logs to stderr at ``level`` in ``text`` or ``json``.

    Safe to call again (a reload that changes ``log``): the handler is replaced.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = TextFormatter(TEXT_FORMAT if _worker is None else WORKER_TEXT_FORMAT)
    handler.setFormatter(formatter)
    if _worker is not None:
        handler.addFilter(_WorkerField(_worker))
    root = logging.getLogger("sidecar")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


# Defaults of `RateLimitedLog`: 10 lines per 10 s lets a short burst be read
# whole, and keeps a sustained flood to about one line a second.
DEFAULT_BURST = 10
DEFAULT_PERIOD = 10.0


class RateLimitedLog:
    """Lets at most ``burst`` warnings per ``period`` seconds through, then summarises.

    Windows are fixed: the first line after a window ended opens a new one.
    The first line over the burst is replaced by one saying that similar
    lines are being suppressed; when the window ends, one line says how many
    were (scheduled on the running event loop; without one, the summary is
    written with the next line let through, or by `flush`).

    Args:
        logger: where the lines go.
        burst: lines let through per window.
        period: window length in seconds.
        what: names the lines in the notices, e.g. "protocol error lines".
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        logger: logging.Logger,
        burst: int = DEFAULT_BURST,
        period: float = DEFAULT_PERIOD,
        *,
        what: str = "similar lines",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._burst = burst
        self._period = period
        self._what = what
        self._clock = clock
        self._window_start = -period - 1.0
        self._in_window = 0
        self._timer: asyncio.TimerHandle | None = None
        self.suppressed = 0
        self.suppressed_total = 0

    def warning(
        self, message: str, *args: object, extra: Mapping[str, object] | None = None
    ) -> bool:
        """Log ``message % args`` unless over the limit. Returns whether it was written."""
        now = self._clock()
        if now - self._window_start >= self._period:
            self.flush()
            self._window_start = now
            self._in_window = 0
        if self._in_window < self._burst:
            self._in_window += 1
            self._logger.warning(message, *args, extra=extra)
            return True
        self.suppressed += 1
        self.suppressed_total += 1
        if self.suppressed == 1:
            left = self._window_start + self._period - now
            self._logger.warning(
                "more than %d %s in %gs: suppressing them for %.1fs",
                self._burst,
                self._what,
                self._period,
                left,
                extra={"rate_limited": True},
            )
            self._schedule(left)
        return False

    def flush(self) -> None:
        """Write the summary of the suppressed lines now, if there are any."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.suppressed:
            count, self.suppressed = self.suppressed, 0
            seconds = min(self._period, self._clock() - self._window_start)
            self._logger.warning(
                "%d %s suppressed in the last %.1fs",
                count,
                self._what,
                seconds,
                extra={"rate_limited": True, "suppressed": count},
            )

    def _schedule(self, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        window = self._window_start

        def summarise() -> None:
            self._timer = None
            if self._window_start == window:  # else a newer window has flushed it already
                self.flush()

        self._timer = loop.call_later(max(0.0, delay), summarise)
