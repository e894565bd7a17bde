"""The demo's output: the table of one row per second, phase titles, events and paragraphs.

Colour only on a terminal, and not when ``NO_COLOR`` is set; arrows in UTF-8
only.
"""

from __future__ import annotations

import os
import textwrap
from typing import TextIO

from sidecar.demo.phases import Phase
from sidecar.demo.readings import Interval

_BREAKER_COLOURS = {"closed": "32", "half-open": "33", "open": "31"}


class Printer:
    """The table and the rest of the output; colour only on a terminal (and not NO_COLOR)."""

    COLUMNS = (
        ("time", 5),
        ("calls", 6),
        ("answered", 8),
        ("errors r/w", 10),
        ("dropped", 7),
        ("faults", 6),
        ("retries", 7),
        ("cache", 6),
        ("static", 6),
        ("shed", 5),
        ("breaker", 9),
        ("p50 ms", 6),
    )

    def __init__(self, out: TextIO, color: bool | None = None) -> None:
        self.out = out
        if color is None:
            color = _isatty(out) and not os.environ.get("NO_COLOR")
        self.color = color
        encoding = (getattr(out, "encoding", None) or "").lower().replace("-", "")
        self.arrow = "→" if encoding == "utf8" else "->"

    def style(self, text: str, *codes: str) -> str:
        if not self.color or not codes:
            return text
        return "\033[" + ";".join(codes) + "m" + text + "\033[0m"

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def header(self) -> None:
        cells = [
            name.rjust(width) if i else name.ljust(width)
            for i, (name, width) in enumerate(self.COLUMNS)
        ]
        self.line(self.style("  ".join(cells).rstrip(), "1"))

    def phase(self, phase: Phase, number: int, width: int = 100) -> None:
        title = f"{number}. {phase.name} ({phase.seconds}s)"
        lines = textwrap.wrap(
            f"{title}: {phase.headline}", width, subsequent_indent="   ", break_on_hyphens=False
        )
        lines[0] = self.style(title, "1", "36") + lines[0][len(title) :]
        for line in lines:
            self.line(line)

    def row(
        self, label: str, interval: Interval, *, down: bool = False, total: bool = False
    ) -> None:
        t = interval.traffic
        values = [
            label,
            f"{t.calls:,}",
            f"{t.answered:,}",
            f"{t.read_errors}/{t.write_errors}",
            f"{t.dropped}",
            "down" if down else f"{interval.faults_injected:,}",
            f"{interval.retries:,.0f}",
            f"{interval.cache:,.0f}",
            f"{interval.static:,.0f}",
            f"{interval.shed:,.0f}",
            interval.breaker,
            f"{interval.p50 * 1000:.2f}" if interval.p50 is not None else "-",
        ]
        colours: dict[int, tuple[str, ...]] = {
            10: (_BREAKER_COLOURS.get(interval.breaker, ""),),
        }
        if t.errors:
            colours[3] = ("31",)
        if t.dropped:
            colours[4] = ("31",)
        cells = []
        for i, (value, (_, width)) in enumerate(zip(values, self.COLUMNS, strict=True)):
            text = value.ljust(width) if i == 0 else value.rjust(width)
            codes = tuple(c for c in (*colours.get(i, ()), "1" if total else "") if c)
            cells.append(self.style(text, *codes))
        self.line("  ".join(cells))

    def paragraph(self, label: str, text: str, width: int = 100) -> None:
        """``label`` then ``text`` wrapped to ``width``, later lines indented under the text."""
        indent = " " * (2 + len(label))
        lines = textwrap.wrap(
            text,
            width,
            initial_indent="  " + label,
            subsequent_indent=indent,
            break_on_hyphens=False,
        )
        for line in lines:
            self.line(line)

    def event(self, text: str) -> None:
        self.line(self.style(f"      {text}", "33"))


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False
